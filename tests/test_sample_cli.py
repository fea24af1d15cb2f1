"""sample.py end to end: PNGs with parameters, never overwriting; one-line errors for bad input."""
import os
import subprocess
import sys

import pytest

from tests.oracle import inline_comments, tiny_clip, tiny_unet, tiny_vae, write_original

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "tiny.safetensors")
    write_original(path, "sd15", tiny_unet("sd15"), tiny_vae(), [tiny_clip(768, "quick_gelu", layers=1)])
    return path


def run(*args, cwd=ROOT):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_writes_pngs_with_parameters_and_never_overwrites(ckpt, tmp_path):
    from PIL import Image
    args = ["model=sd15", f"model.path={ckpt}", "prompt=a red circle", "steps=2", "height=32", "width=32",
            f"out_dir={tmp_path}"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    second = run(*args)
    assert second.returncode == 0, second.stderr
    paths = [p for p in (first.stdout + second.stdout).split() if p.endswith(".png")]
    assert len(paths) == 2 and len(set(paths)) == 2 and all(os.path.isfile(p) for p in paths)
    params = Image.open(paths[0]).text["parameters"]
    assert params.startswith("a red circle\n") and "Solver: lcm" in params
    assert params.split("\n")[-1].startswith("Steps: 2, Sampler: LCM, CFG scale: 1, Seed: 0, Size: 32x32, ")


@pytest.mark.parametrize("override,message", [
    ("model.path=/nonexistent/model.safetensors", "checkpoint not found: /nonexistent"),
    ("height=30", "multiples of"),
    ("steps=0", "steps must be a positive integer"),
    ("guidance_scale=-2", "guidance_scale must be"),
    ("model.dtype=float8", "model.dtype must be one of"),
])
def test_bad_input_is_one_line_no_traceback(ckpt, tmp_path, override, message):
    args = ["model=sd15", f"model.path={ckpt}", "height=32", "width=32", f"out_dir={tmp_path}"]
    key = override.split("=")[0]
    res = run(*[a for a in args if not a.startswith(key + "=")], override)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_out_dir_that_is_a_file(ckpt, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    res = run("model=sd15", f"model.path={ckpt}", f"out_dir={f}")
    assert res.returncode != 0 and "is a file" in res.stderr and f.read_text() == "keep me"


def test_unknown_solver_is_named(ckpt):
    res = run("model=sd15", f"model.path={ckpt}", "solver=heun")
    assert res.returncode != 0 and "heun" in res.stderr and "Traceback" not in res.stderr


def test_missing_model_path_is_one_line_naming_key_and_example():
    res = run("model=sdxl")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line, = res.stderr.strip().splitlines()
    assert "model.path is not set" in line and "model.path=/weights/sd_xl_base_1.0.safetensors" in line


def test_cuda_where_there_is_none_names_the_cpu_overrides(ckpt):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "CUDA_VISIBLE_DEVICES": ""}     # no CUDA, even on a GPU box
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "model=sd15", f"model.path={ckpt}",
                          "model.device=cuda"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line, = res.stderr.strip().splitlines()
    assert "CUDA is not available" in line and "model.device=cpu model.dtype=float32" in line


def test_help_shows_every_knob_with_its_meaning():
    """Each commented knob of conf/sample.yaml and of the chosen model preset appears as
    `key: default  # comment`; the group line names the preset in effect."""
    res = run("model=sd15", "--help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    top = inline_comments(os.path.join(ROOT, "conf", "sample.yaml"))
    model = inline_comments(os.path.join(ROOT, "conf", "model", "sd15.yaml"))
    assert "guidance_scale" in top and len(top) >= 10
    for indent, comments in (("", top), ("  ", model)):
        for key, comment in comments.items():
            assert any(ln.startswith(f"{indent}{key}:") and ln.endswith(f"# {comment}") for ln in lines), \
                f"--help lacks `{indent}{key}: ...  # {comment}`"
    assert any(ln.startswith("model=sd15") for ln in lines) and any(ln == "  path: ???" for ln in lines)


def test_yaml_notes_and_flow_values(tmp_path):
    """The comment reader: trailing comments, '#' in quotes, the comment line above, wrapped comments,
    nested keys, the file header and defaults entries; flow() quotes what yaml would misread."""
    from lcm.cli import YamlNotes, flow
    f = tmp_path / "x.yaml"
    f.write_text("# @package _global_\n# The header.\ndefaults:\n  - override /data: tiny   # small data\n"
                 "  - _self_\n\na: 1                 # one\nb: \"x # not a comment\"\n# about c\nc:\n"
                 "  d: [1, 2]           # nested\n  e: null             # first half;\n"
                 "                       # second half\nf: 2\n")
    notes = YamlNotes(str(f))
    assert notes.package == "_global_" and notes.header == "The header."
    assert notes.defaults == [("data", "tiny", "small data"), ("_self_", "", "")]
    assert notes.meanings == {"a": "one", "c": "about c", "c.d": "nested", "c.e": "first half; second half"}
    assert flow("no") == '"no"' and flow("${solver.steps}") == "${solver.steps}" and flow("a: b") == '"a: b"'
    assert flow([{"path": "p", "scale": 0.8}]) == "[{path: p, scale: 0.8}]" and flow(None) == "null"
