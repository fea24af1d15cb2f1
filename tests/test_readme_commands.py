"""The README and the --help texts are tested by running them: every `python ...` / `torchrun ...`
command line in README.md (```bash blocks and inline `code`) and in the examples of
conf/hydra/help/*.yaml runs as written, with the real-weight placeholders (/weights/..., /w/...,
/data/...) swapped for the bundled demo files and a copy of the bundled image folder, and the runs
shortened (train.max_steps, out_dir / run dirs in tmp_path, CPU when there is no CUDA). A command
fails on a non-zero exit or a traceback. What cannot run here is in SKIP, with the reason.

The commands run two at a time in a module fixture; each has its own parametrized test.
"""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from lcm.cli import split_comment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
ASSETS = os.path.join(ROOT, "assets")
pytestmark = pytest.mark.slow

# (pattern on the normalized command, reason): commands that cannot run in a test.
SKIP = [
    (r"^python -m venv\b", "creates .venv, installs packages from the network (setup; .ci/run does it in CI)"),
    (r"^python -m pytest\b", "the test suite itself (CI runs it; -m fullsize is opt-in: full SD size, GiB)"),
    (r"^python benchmarks/gpu\.py", "needs a CUDA GPU (tests/test_benchmarks.py runs the script on tiny models)"),
    (r"^python benchmarks/gpu_check\.py", "the first GPU run (~9 min on CUDA); tests/test_gpu_check.py runs its dry run"),
    (r"^python benchmarks/(?!memory_table)", "full SD1.5-size UNet/VAE in ours and in diffusers: minutes and GiB a run, by hand"),
    (r"^python evaluate\.py .*(?:inception_weights|clip_pretrained)=",
     "FID / CLIP score of real SD weights on COCO: needs the Inception and CLIP weights and the images (not here)"),
    (r"^python evaluate\.py n_prompts=\d+(?: baseline=[\w+-]+)?$",
     "once shortened (n_prompts=4) the same run as `python evaluate.py` / `python evaluate.py baseline=DDIM`, which run"),
    (r"^torchrun .*train\.distributed=fsdp", "tests/test_fsdp.py launches the same 2-process FSDP run (and checks it against one process)"),
    (r"^python -m demo\.matrix\b", "evaluates finished training runs (CPU-hours); tests/test_matrix.py runs it on fake runs"),
    (r"^python -m demo\.compare\b", "evaluates the nine finished 400-step runs above (~72 CPU-minutes of training)"),
    (r"\.\.\.", "arguments elided in the prose; the full recipe (CPU-hours) is in docs/demo_results.md"),
]
# Placeholders of real files -> bundled stand-ins, most specific first ({data}, {run}: made by the test).
NAME = r"[^\s,\]}\"']"                                # a character of a path inside a flow list/dict
PLACEHOLDERS = [
    (rf"/(?:weights|w)/{NAME}*lcm-lora{NAME}*", os.path.join(ASSETS, "demo_lcm_lora.safetensors")),
    (rf"/(?:weights|w)/{NAME}*(?:style|papercut){NAME}*", os.path.join(ASSETS, "demo_style_lora.safetensors")),
    (rf"/(?:weights|w)/{NAME}*(?:TCD|PCM|Hyper-SD|lightning){NAME}*", os.path.join(ASSETS, "demo_lcm_lora.safetensors")),
    (rf"/(?:weights|w|m)/{NAME}+", os.path.join(ASSETS, "demo_teacher.safetensors")),
    (r"model\.path=\.\.\.", "model.path=" + os.path.join(ASSETS, "demo_teacher.safetensors")),
    (rf"/data/{NAME}+", "{data}"),
    (r"outputs/(?:train|evaluate)/<run>", "{run}"),
]
UNMAPPED = re.compile(r"/weights/|(?<![\w.])/w/|/data/|<\w+>")
EVAL_SHORT = {"n_prompts": "4", "demo_n_ref": "64", "batch_size": "4"}
TRAIN_SHORT = {"train.max_steps": "2", "validation.every": "0", "train.log_every": "1",
               "train.checkpoint_every": "2", "train.batch_size": "2"}
EXTRA = [                                             # (pattern, overrides) for what a recipe needs first
    (r"experiment=demo_teacher\b", {"model.path": os.path.join(ASSETS, "demo_teacher.safetensors")}),
]                                                     # (the base init demo.vae writes: same architecture)
CPU = {"model.device": "cpu", "model.dtype": "float32", "train.mixed_precision": "no"}
ARGPARSE_SHORT = {                                    # python -m <module>: flags set to small values
    "demo.text": {"--steps": "2", "--out": "{tmp}/text.safetensors"},
    "demo.taesd": {"--steps": "2", "--full-steps": "1", "--batch": "2", "--out": "{tmp}/taesd.safetensors"},
    "demo.bench": {"--n": "2", "--n-ref": "8", "--cfg-n": "2", "--cfg-steps": "2", "--teacher-steps": "2",
                   "--out": "{tmp}/results.md", "--grid": "{tmp}/grid.png", "--style-grid": "{tmp}/style.png"},
}
COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:\S*/)?(?:python3?|torchrun)(?:\s|$)")

#----------------------------------------------------------------------------
# Extraction: README.md (```bash blocks, inline code) and the help headers' example lines.

def normalize(cmd: str) -> str:
    """One spelling per command: single spaces, `python` for any interpreter path."""
    cmd = " ".join(cmd.split())
    return re.sub(r"^((?:[A-Z_][A-Z0-9_]*=\S+ )*)\S*python3?(?= |$)", r"\1python", cmd)


def shell_commands(line: str) -> list[str]:
    """The python/torchrun commands of one logical shell line (comments cut, `&&` chains split)."""
    code, _ = split_comment(line)
    return [normalize(s) for s in re.split(r"\s*&&\s*|\s*;\s+", code) if COMMAND.match(s.strip())]


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def markdown_commands(text: str) -> list[str]:
    """Commands in a markdown text: shell code blocks, then inline code spans in the prose. A bare
    override span right after an inline sample.py/train.py command (`..., `experiment=x``) is one."""
    fence = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
    out = []
    for m in fence.finditer(text):
        if m.group(1) in ("bash", "sh", "shell", "console", ""):
            out += [c for line in logical_lines(m.group(2)) for c in shell_commands(line)]
    for para in re.split(r"\n\s*\n", fence.sub("", text)):
        para, root, end = " ".join(para.split()), None, 0
        for m in re.finditer(r"`([^`]+)`", para):
            found = shell_commands(m.group(1))
            gap = para[end:m.start()]
            if found:
                out += found
                hydra_root = re.match(r"^(python (?:sample|train)\.py)\b", found[-1])
                root = hydra_root.group(1) if hydra_root else None
            elif root and re.fullmatch(r"\s*(,|and|or|, and)?\s*", gap) and \
                    re.fullmatch(r"(?:[+~]*[\w./-]+=\S+ ?)+", m.group(1)):
                out.append(normalize(f"{root} {m.group(1)}"))
            else:
                root = None
            end = m.end()
    return out


def help_commands(path: str) -> list[str]:
    """Example command lines of a help template's header."""
    import yaml
    with open(path) as f:
        header = yaml.safe_load(f).get("header", "")
    return [c for line in logical_lines(header) for c in shell_commands(line.strip())]


def documented_commands() -> list[tuple[str, str]]:
    """(source, command) for every documented command, first occurrence kept."""
    sources = [("README.md", markdown_commands(open(os.path.join(ROOT, "README.md")).read()))]
    for path in sorted(glob.glob(os.path.join(CONF, "hydra", "help", "*.yaml"))):
        sources.append((os.path.relpath(path, ROOT), help_commands(path)))
    seen, out = set(), []
    for source, cmds in sources:
        for c in cmds:
            if c not in seen:
                seen.add(c)
                out.append((source, c))
    return out


COMMANDS = documented_commands()

#----------------------------------------------------------------------------
# Preparation: placeholders -> stand-ins, shorter runs, outputs into tmp.

def skip_reason(cmd: str) -> str | None:
    """Why a documented command is not run here (None: it runs), judged after substitution."""
    cmd = substitute(cmd)
    return next((reason for pat, reason in SKIP if re.search(pat, cmd)), None)


def substitute(cmd: str) -> str:
    for pat, repl in PLACEHOLDERS:
        cmd = re.sub(pat, lambda _: repl, cmd)
    return cmd


def set_overrides(args: list[str], values: dict) -> list[str]:
    """Hydra overrides: replace `key=...` where given (also +key / ++key), else append."""
    args = list(args)
    for key, value in values.items():
        hit = [i for i, a in enumerate(args) if re.match(rf"^[+~]*{re.escape(key)}=", a)]
        if hit:
            args[hit[0]] = f"{key}={value}"
        else:
            args.append(f"{key}={value}")
    return args


def set_flags(args: list[str], values: dict) -> list[str]:
    """argparse flags: replace the value after `--flag` (all of them for nargs="+"), else append."""
    args = list(args)
    for flag, value in values.items():
        if flag in args:
            i = args.index(flag)
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            args[i + 1:j] = [value]
        else:
            args += [flag, value]
    return args


def composed_data_target(overrides: list[str]) -> str | None:
    """`_target_` of the data group the train.py overrides compose (None if they do not compose)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    ov = [re.sub(r"^([^=]+=)([^\[\]{}(),]+),[^\[\]{}()]+$", r"\1\2", o)      # a sweep: its first value
          for o in overrides if "=" in o and not o.startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return str(compose("train", overrides=ov).data.get("_target_"))
    except Exception:                                  # the run itself reports why
        return None


def prepare(cmd: str, tmp: str, i: int) -> tuple[list[list[str]], dict]:
    """(argv of each process to run, in order: setup runs then the command; env) for one command."""
    import torch
    cmd = substitute(cmd).replace("{data}", os.path.join(tmp, "images"))
    cmd = cmd.replace("{run}", os.path.join(tmp, f"run{i}"))
    assert not UNMAPPED.search(cmd), f"unmapped placeholder in {cmd!r}: add it to PLACEHOLDERS"
    tokens = shlex.split(cmd)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    while re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if tokens[0] == "torchrun":
        tokens = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + tokens[1:]
    else:
        tokens = [sys.executable] + tokens[1:]
    script = next((t for t in tokens[1:] if t.endswith(".py")), None)
    at = tokens.index(script) + 1 if script else len(tokens)
    head, args = tokens[:at], tokens[at:]
    setup = []
    if "--help" in args or "-h" in args:
        pass
    elif script == "sample.py":
        if png := next((a.split("=", 1)[1] for a in args if a.startswith("from_png=")), None):
            made = os.path.join(tmp, f"png{i}")          # the PNG to read back: written by a plain run first
            setup.append(head + [f"out_dir={made}"])
            args = set_overrides(args, {"from_png": os.path.join(made, os.path.basename(png))})
        args = set_overrides(args, {"out_dir": os.path.join(tmp, f"samples{i}")})
    elif script == "evaluate.py":
        args = set_overrides(args, EVAL_SHORT | ({} if any(a.startswith("hydra.run.dir=") for a in args)
                                                 else {"hydra.run.dir": os.path.join(tmp, f"eval{i}")}))
    elif script == "train.py":
        short = dict(TRAIN_SHORT, **({} if torch.cuda.is_available() else CPU))
        for pat, extra in EXTRA:
            short |= extra if re.search(pat, cmd) else {}
        target = composed_data_target(args) or ""
        short |= {"data.resolution": "32"} if target.endswith("ImageFolder") else {}
        short |= {"data.length": "8"} if target.endswith("DemoDataset") else {}
        if any(a.startswith("resume=") for a in args):  # resume: a short run to continue first
            first = set_overrides([a for a in args if not a.startswith("resume=")], short)
            setup.append(head + first)
            short |= {"train.max_steps": "4"}
        else:
            short |= {"hydra.run.dir": os.path.join(tmp, f"run{i}")}
        args = set_overrides(args, short | {"hydra.sweep.dir": os.path.join(tmp, f"sweep{i}")})
    elif head[1:2] == ["-m"] and head[2] in ARGPARSE_SHORT:
        args = set_flags(args, {k: v.replace("{tmp}", tmp) for k, v in ARGPARSE_SHORT[head[2]].items()})
    return setup + [head + args], env


def execute(argvs: list[list[str]], env: dict) -> tuple[int, str, str, str]:
    """Run the processes in order (cwd = repo root), stopping at a failure: (rc, stdout, stderr, argv)."""
    for argv in argvs:
        res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or "Traceback" in res.stdout + res.stderr:
            break
    return res.returncode, res.stdout, res.stderr, " ".join(shlex.quote(a) for a in argvs[-1])

#----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every runnable documented command, run two at a time: {command: (rc, stdout, stderr, argv)}."""
    tmp = str(tmp_path_factory.mktemp("readme"))
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "tiny_data"), os.path.join(tmp, "images"))
    jobs = {cmd: prepare(cmd, tmp, i) for i, (_, cmd) in enumerate(COMMANDS) if not skip_reason(cmd)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {cmd: pool.submit(execute, *job) for cmd, job in jobs.items()}
        return {cmd: f.result() for cmd, f in futures.items()}


@pytest.mark.parametrize("source,cmd", COMMANDS, ids=[c[:70] for _, c in COMMANDS])
def test_documented_command_runs(results, source, cmd):
    if reason := skip_reason(cmd):
        pytest.skip(reason)
    rc, out, err, ran = results[cmd]
    tail = "\n".join((out + err).splitlines()[-25:])
    assert rc == 0, f"{source}: `{cmd}` exited {rc}\nran: {ran}\n{tail}"
    assert "Traceback" not in out + err, f"{source}: `{cmd}` printed a traceback\nran: {ran}\n{tail}"
    if "--help" in cmd.split():
        assert "Knobs (key: default" in out, f"`{cmd}`: no knob listing\n{tail}"
    elif re.match(r"^python sample\.py", cmd):                 # it wrote (and printed) its PNGs
        pngs = [p for p in out.split() if p.endswith(".png")]
        assert pngs and all(os.path.isfile(p) for p in pngs), f"`{cmd}` wrote no PNG\n{tail}"


def test_extraction_finds_the_documented_forms():
    """Continued lines are joined, inline code and &&-chains are read, help examples are included."""
    cmds = [c for _, c in COMMANDS]
    sd15 = [c for c in cmds if c.startswith("python sample.py model=sd15 model.path=/weights/")]
    assert sd15 and 'lora="[/weights/lcm-lora-sdv1-5.safetensors]"' in sd15[0] and "steps=4" in sd15[0]
    assert "python sample.py" in cmds and "python sample.py --help" in cmds
    assert any(c.startswith("torchrun ") for c in cmds) and any(" -m " in f" {c} " for c in cmds)
    assert any(s.startswith("conf/hydra/help/") for s, _ in COMMANDS)
    md = "Recipes: `python train.py\nexperiment=a`, `experiment=b` and `x=1` there.\n\nAlso `y=2`.\n"
    assert markdown_commands(md) == ["python train.py experiment=a", "python train.py experiment=b",
                                     "python train.py x=1"]
    assert markdown_commands("```bash\nFOO=1 .venv/bin/python sample.py a=1 \\\n  b=2  # c\n```\n") == \
        ["FOO=1 python sample.py a=1 b=2"]


def test_placeholders_map_to_bundled_files():
    """Each real-weight placeholder of the docs has a stand-in that exists."""
    for _, cmd in COMMANDS:
        sub = substitute(cmd)
        assert not UNMAPPED.search(sub) or skip_reason(cmd), cmd
        for path in re.findall(r"(?<![\w.-])(/[^\s,\]}\"'=]+\.safetensors)", sub):
            assert os.path.isfile(path), f"{cmd}: stand-in {path} missing"
