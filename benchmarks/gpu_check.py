"""The first GPU run in one invocation (issue 33 item 5): the CUDA tests (tests/test_cuda.py) group by
group, then benchmarks/gpu.py, in priority order, each part a time-boxed subprocess; a JSON line per
part is appended to <out>/results.jsonl as soon as it ends, so a killed run keeps what was done.

    python benchmarks/gpu_check.py --out gpu_check/                 # a CUDA machine: ~9 min at most
    python benchmarks/gpu_check.py --out /tmp/gc                    # no CUDA: a dry run, all skipped
    python benchmarks/gpu_check.py --out /tmp/gc --cpu-logic        # the pipeline on the tests' CPU logic
    python benchmarks/gpu_check.py --out gc --only parity,bench_mfu --timeout parity=200 --budget 900

A line: {part, status (passed | failed | timeout | skipped), reason, wall_s, timeout_s, cmd, counts,
tests {test: outcome}, properties {test: {name: value}} (the tests' record_property values, read from
pytest's junit XML, or as each test ends when the part was killed), bench (gpu.py's --json), tail (the
output's end when not passed), log}. The first line is the environment. At the end a table goes to
stdout and <out>/summary.md. Exit status 1 if a part failed or timed out (skipped parts do not count).
"""
import argparse
import ast
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS_ENV = "GPU_CHECK_EVENTS"                       # the plugin below writes each test's end there
# (part, default timeout s) in priority order: test groups (-k <name> of tests/test_cuda.py; 400 s),
# then benchmark parts (gpu.py with one section each; 360 s); --budget caps the total.
TEST_GROUPS = [("parity", 90), ("train", 120), ("distributed", 60), ("resume", 90), ("sdpa", 40)]
BENCH_PARTS = [("bench_mfu", 60), ("bench_sd15", 90), ("bench_train_memory", 90), ("bench_sdxl", 120)]
BUDGET_S = 540                                        # fits one 600-s command on a rented machine
TAIL = 4000                                           # characters of output kept for a part not passed


@dataclass
class Part:
    name: str
    argv: list[str]
    timeout: float
    needs: tuple = ()                                 # "cuda", "diffusers": skipped when missing
    junit: str | None = None                          # pytest's junit XML: outcomes and properties
    events: str | None = None                         # the plugin's JSON lines (a killed pytest part)
    json: str | None = None                           # the JSON file the command writes (gpu.py --json)
    skip: str | None = None                           # skipped for this reason, whatever is present

#----------------------------------------------------------------------------
# pytest plugin (-p gpu_check): each test's outcome and record_property values as it ends.

def pytest_runtest_logreport(report):
    path = os.environ.get(EVENTS_ENV)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
    props = {k: v for k, v in report.user_properties}
    with open(path, "a") as f:
        f.write(json.dumps(dict(test=report.nodeid.split("::")[-1], outcome=outcome, properties=props),
                           default=str) + "\n")

#----------------------------------------------------------------------------
# Reading results: junit XML (pytest writes each property value as its str()), the plugin's lines.

def parse_value(text: str):
    """A property value back into Python (a repr of JSON-able data), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_junit(path: str) -> tuple[dict, dict]:
    """({test: outcome or 'skipped: reason'}, {test: {property: value}}) from a junit XML file."""
    tests, props = {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name")
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tests[name] = "failed" if "failure" in kinds else "error"
        elif "skipped" in kinds:
            tests[name] = f"skipped: {kinds['skipped'].get('message', '')}"
        else:
            tests[name] = "passed"
        found = {p.get("name"): parse_value(p.get("value", "")) for p in case.iter("property")}
        if found:
            props[name] = found
    return tests, props


def parse_events(path: str) -> tuple[dict, dict]:
    tests, props = {}, {}
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            tests[e["test"]] = e["outcome"]
            if e["properties"]:
                props[e["test"]] = e["properties"]
    return tests, props


def counts(tests: dict) -> dict:
    out = {}
    for outcome in tests.values():
        key = outcome.split(":")[0]
        out[key] = out.get(key, 0) + 1
    return out

#----------------------------------------------------------------------------
# The plan and the environment.

def environment(cpu_logic: bool) -> dict:
    import torch
    env = dict(python=sys.version.split()[0], platform=platform.platform(), host=platform.node(),
               cpus=os.cpu_count(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available(),
               cpu_logic=cpu_logic, commit=commit())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= dict(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported(),
                    nccl=str(torch.cuda.nccl.version()) if torch.distributed.is_nccl_available() else None)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    for pkg in ("diffusers", "transformers", "peft", "numpy", "pytest"):
        env[pkg] = version(pkg)
    env["env"] = {k: v for k, v in os.environ.items() if k.startswith(("CUDA", "NCCL", "LCM_", "TORCH", "PYTORCH"))
                  or k in ("OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_VISIBLE_DEVICES")}
    return env


def version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v
    try:
        return v(pkg)
    except PackageNotFoundError:
        return None


def commit() -> str | None:
    """The checkout's commit, read from .git (no git process); None outside a git checkout."""
    try:
        head = open(os.path.join(ROOT, ".git", "HEAD")).read().strip()
        if head.startswith("ref: "):
            return open(os.path.join(ROOT, ".git", head[5:])).read().strip()
        return head
    except OSError:
        return None


def plan(args) -> list[Part]:
    """The parts in priority order, with their commands and default (or --timeout) limits."""
    scale = 3 if args.cpu_logic else 1                   # the tests' CPU logic: slower than a GPU (sdpa ~50 s)
    py, out, limits = args.python, args.out, {n: t * scale for n, t in TEST_GROUPS + BENCH_PARTS}
    for item in args.timeout or []:
        name, _, sec = item.partition("=")
        if name not in limits or not sec:
            sys.exit(f"--timeout {item!r}: expected NAME=SECONDS, NAME one of {', '.join(limits)}")
        limits[name] = float(sec)
    parts = []
    for group, _ in TEST_GROUPS:
        k = f"{group} and ({args.select})" if args.select else group
        parts.append(Part(group, [py, "-m", "pytest", "tests/test_cuda.py", "-k", k, "-q", "-rfEs", "-p", "gpu_check",
                                  "-o", "junit_family=xunit1", f"--junitxml={out}/{group}.xml"],
                          limits[group], ("cuda",), junit=f"{out}/{group}.xml", events=f"{out}/{group}.events.jsonl"))
    gpu = [py, "benchmarks/gpu.py", "--runs", "3", "--no-compile"]
    gpu += ["--tiny", "--device", "cpu", "--dtype", "float32", "--runs", "1"] if args.cpu_logic else []
    gpu = [a for a in gpu if a != "--no-compile"] if args.compile else gpu
    sections = dict(bench_mfu=["--families", "--no-train", "--mfu-batch", "8"],
                    bench_sd15=["--families", "sd15", "--no-train", "--mfu-batch", "0"],
                    bench_train_memory=["--families", "--mfu-batch", "0"],
                    bench_sdxl=["--families", "sdxl", "--no-train", "--mfu-batch", "0"])
    for name, _ in BENCH_PARTS:
        needs = ("cuda",) if name == "bench_mfu" else ("cuda", "diffusers")
        skip = ("a full SDXL-size UNet twice (GiB, minutes): GPU only"
                if args.cpu_logic and name == "bench_train_memory" else None)
        parts.append(Part(name, gpu + sections[name] + ["--json", f"{out}/{name}.json"], limits[name], needs,
                          json=f"{out}/{name}.json", skip=skip))
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(limits):
        sys.exit(f"--only: unknown parts {sorted(set(only) - set(limits))}; parts: {', '.join(limits)}")
    return [p for p in parts if not only or p.name in only]

#----------------------------------------------------------------------------
# Running: one subprocess (own process group) per part, killed at its limit; a JSON line each.

STATE = dict(child=None, stopped=None)               # the running part's process; the signal that stopped us


def on_signal(signum, frame) -> None:
    """SIGTERM / SIGINT: kill the running part (recorded as such); the parts after it are skipped."""
    STATE["stopped"] = signal.Signals(signum).name
    if STATE["child"] is not None:
        try:
            os.killpg(STATE["child"].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def missing(part: Part, have: dict) -> str | None:
    if part.skip:
        return part.skip
    if "cuda" in part.needs and not have["cuda"]:
        return "no CUDA device (torch.cuda.is_available() is False)"
    if "diffusers" in part.needs and not have["diffusers"]:
        return "diffusers (and peft) not installed: no reference pipeline to compare with"
    return None


def run_part(part: Part, out: str, env: dict, timeout: float) -> dict:
    """Run one part to its end or its timeout: the record for results.jsonl."""
    for path in (part.junit, part.events, part.json):
        if path and os.path.exists(path):
            os.remove(path)
    log = os.path.join(out, f"{part.name}.log")
    t0, status = time.monotonic(), None
    with open(log, "w") as f:
        proc = subprocess.Popen(part.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, EVENTS_ENV: part.events or ""})
        STATE["child"] = proc
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            rc, status = None, "timeout"
        STATE["child"] = None
        if STATE["stopped"]:
            status = "timeout"
    rec = dict(part=part.name, status=status or ("passed" if rc == 0 else "failed"), reason=None,
               wall_s=round(time.monotonic() - t0, 1), timeout_s=timeout, rc=rc, cmd=" ".join(part.argv), log=log)
    if status == "timeout":
        rec["reason"] = (f"killed: gpu_check got {STATE['stopped']}" if STATE["stopped"] else
                         f"killed after its {timeout:.0f} s")
    if rc == 5 and part.junit:                            # pytest: no test collected
        rec |= dict(status="skipped", reason=f"no test selected ({' '.join(part.argv[4:6])})")
    tests, props = {}, {}
    if part.junit and os.path.exists(part.junit):
        tests, props = parse_junit(part.junit)
    elif part.events and os.path.exists(part.events):
        tests, props = parse_events(part.events)
    if part.junit:
        rec |= dict(counts=counts(tests), tests=tests, properties=props)
        if rec["status"] == "passed" and tests and all(t.startswith("skipped") for t in tests.values()):
            rec |= dict(status="skipped", reason=sorted(set(tests.values()))[0])
    if part.json and os.path.exists(part.json):
        with open(part.json) as f:
            try:
                rec["bench"] = json.load(f)
            except json.JSONDecodeError as e:                # killed while writing
                rec["bench"] = f"unreadable: {e}"
    if rec["status"] != "passed":
        with open(log, errors="replace") as f:
            rec["tail"] = f.read()[-TAIL:]
    return rec


def kill(proc: subprocess.Popen) -> None:
    """The part's whole process group (pytest, its spawned ranks, gpu.py's train_step children)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_all(parts: list[Part], out: str, env: dict, have: dict, budget: float | None, header: dict | None = None,
            echo=print) -> list[dict]:
    """Each part in order, within its timeout and what is left of the budget; results.jsonl grows."""
    os.makedirs(out, exist_ok=True)
    results_path, records, t0 = os.path.join(out, "results.jsonl"), [], time.monotonic()
    with open(results_path, "w") as f:
        if header:
            f.write(json.dumps(dict(part="env", status="info", **header), default=str) + "\n")
    for part in parts:
        left = None if budget is None else budget - (time.monotonic() - t0)
        reason = missing(part, have)
        if reason is None and STATE["stopped"]:
            reason = f"gpu_check got {STATE['stopped']}"
        if reason is None and left is not None and left < 10:
            reason = f"the total budget ({budget:.0f} s, --budget) is spent"
        if reason:
            rec = dict(part=part.name, status="skipped", reason=reason, wall_s=0.0, cmd=" ".join(part.argv))
        else:
            echo(f"[{time.strftime('%H:%M:%S')}] {part.name}: {' '.join(part.argv)}", flush=True)
            rec = run_part(part, out, env, part.timeout if left is None else min(part.timeout, left))
        records.append(rec)
        with open(results_path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        echo(f"[{time.strftime('%H:%M:%S')}] {part.name}: {rec['status']} ({rec['wall_s']} s)"
             + (f" {rec['reason']}" if rec.get("reason") else "") + (f" {rec['counts']}" if rec.get("counts") else ""),
             flush=True)
    return records

#----------------------------------------------------------------------------
# Summary.

def note(rec: dict) -> str:
    """A few numbers (benchmarks) or the reason, for the table."""
    b = rec.get("bench")
    if rec["status"] == "skipped" or not isinstance(b, dict):
        return rec.get("reason") or ""
    bits = [f"{r['family']}{' compiled' if r['compile'] else ''}: ours {r['ours'] * 1e3:.0f} ms, diffusers "
            f"{r['ref'] * 1e3:.0f} ms, ratio {r['ratio']:.3f}" for r in b.get("latency", [])]
    bits += [f"{r['mode']} b{r['batch']}: {r['tflops']:.3g} TFLOP/s"
             + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
             + (f", peak {r['peak_mb']:.0f} MB" if r.get("peak_mb") else "") for r in b.get("mfu", [])]
    if "training" in b:
        bits.append("peak " + ", ".join(f"{k} {v:.0f} MB" for k, v in b["training"]["peak_mb"].items()))
    return "; ".join(bits) or (rec.get("reason") or "")


def summary(records: list[dict]) -> str:
    lines = ["| part | status | wall (s) | tests | notes |", "|---|---|---:|---|---|"]
    for r in records:
        c = r.get("counts") or {}
        tests = ", ".join(f"{n} {k}" for k, n in sorted(c.items()))
        lines.append(f"| {r['part']} | {r['status']} | {r['wall_s']} | {tests} | {note(r).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results.jsonl, summary.md, per-part logs and XML go here")
    ap.add_argument("--cpu-logic", action="store_true",
                    help="LCM_CUDA_TEST_DEVICE=cpu: the tests' logic on the CPU, gpu.py on tiny models")
    ap.add_argument("--timeout", action="append", metavar="PART=S",
                    help="a part's limit (repeatable; defaults x3 with --cpu-logic)")
    ap.add_argument("--budget", type=float, help=f"total seconds (default {BUDGET_S}; none with --cpu-logic)")
    ap.add_argument("--only", help="comma-separated parts to run: "
                    + ", ".join(n for n, _ in TEST_GROUPS + BENCH_PARTS))
    ap.add_argument("--select", help="a further pytest -k expression within each test group")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile latency rows (minutes more)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter of the parts")
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    budget = args.budget if args.budget is not None else (None if args.cpu_logic else BUDGET_S)
    header = environment(args.cpu_logic)
    print("gpu_check: " + ", ".join(f"{k} {header.get(k)}" for k in ("torch", "cuda", "cudnn", "device", "capability",
                                                                       "memory_gib", "driver", "nccl")), flush=True)
    print("environment: " + json.dumps(header, default=str), flush=True)
    have = dict(cuda=header["cuda_available"] or args.cpu_logic, diffusers=bool(header["diffusers"]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [p for p in (ROOT, os.path.join(ROOT, "benchmarks"), os.environ.get("PYTHONPATH")) if p]))
    if args.cpu_logic:
        env["LCM_CUDA_TEST_DEVICE"] = "cpu"
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    records = run_all(plan(args), args.out, env, have, budget, header)
    table = summary(records)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"# gpu_check: {header.get('device') or 'no CUDA device'}, torch {header['torch']}, "
                f"CUDA {header['cuda']}{', CPU logic' if args.cpu_logic else ''}\n\n{table}")
    print("\n" + table + f"\n{args.out}/results.jsonl, {args.out}/summary.md")
    if not have["cuda"]:
        print("a dry run (no CUDA device): the commands are in results.jsonl; --cpu-logic runs them on the CPU")
    sys.exit(1 if STATE["stopped"] or any(r["status"] in ("failed", "timeout") for r in records) else 0)


if __name__ == "__main__":
    main()
