"""benchmarks/gpu_check.py, the one-invocation first GPU run: its dry run without CUDA, the junit XML
reader, a part killed at its timeout (its process group too) while the next part still runs, the
total budget, and one real test group through the tests' CPU logic."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402

QUIET = dict(echo=lambda *a, **k: None)


def read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def check(out, *args, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_dry_run_without_cuda_skips_every_part(tmp_path):
    res = check(tmp_path, CUDA_VISIBLE_DEVICES="")                 # no CUDA device, even on a GPU machine
    assert res.returncode == 0, res.stderr[-2000:]
    lines = read_lines(tmp_path / "results.jsonl")
    assert lines[0]["part"] == "env" and lines[0]["cuda_available"] is False and lines[0]["torch"]
    names = [n for n, _ in gpu_check.TEST_GROUPS + gpu_check.BENCH_PARTS]
    assert [r["part"] for r in lines[1:]] == names
    for r in lines[1:]:
        assert r["status"] == "skipped" and r["reason"].startswith("no CUDA device"), r
        assert r["cmd"]                                            # what would have run
    assert "-k parity" in lines[1]["cmd"] and "--mfu-batch 8" in lines[6]["cmd"]
    table = (tmp_path / "summary.md").read_text()
    assert all(f"| {n} | skipped |" in table for n in names) and "| parity | skipped |" in res.stdout
    assert sum(t for _, t in gpu_check.TEST_GROUPS) <= 8 * 60       # the test groups' defaults fit ~8 min


def test_parse_junit_outcomes_and_properties(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_cuda" name="test_a[smoke-bf16]" time="1.0"><properties>
<property name="err" value="{'max': 0.012, 'l2': 0.004, 'ok': True, 'kern': ['flash']}" />
<property name="n" value="3" /><property name="note" value="not a literal: x" /></properties></testcase>
<testcase classname="tests.test_cuda" name="test_b" time="0.5"><failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_c" time="0.0"><skipped type="pytest.skip" message="needs a CUDA device">s</skipped></testcase>
<testcase classname="tests.test_cuda" name="test_d" time="0.0"><error message="fixture">e</error></testcase>
</testsuite></testsuites>""")
    tests, props = gpu_check.parse_junit(str(path))
    assert tests == {"test_a[smoke-bf16]": "passed", "test_b": "failed", "test_c": "skipped: needs a CUDA device",
                     "test_d": "error"}
    assert props == {"test_a[smoke-bf16]": {"err": {"max": 0.012, "l2": 0.004, "ok": True, "kern": ["flash"]},
                                            "n": 3, "note": "not a literal: x"}}
    assert gpu_check.counts(tests) == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}


def test_a_part_past_its_timeout_is_killed_and_the_next_runs(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    slow = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    parts = [gpu_check.Part("slow", [sys.executable, "-c", slow], timeout=3),
             gpu_check.Part("quick", [sys.executable, "-c", "print('done')"], timeout=30)]
    t0 = time.monotonic()
    recs = gpu_check.run_all(parts, str(tmp_path), dict(os.environ), dict(cuda=True, diffusers=True), None, **QUIET)
    assert time.monotonic() - t0 < 20
    assert [r["status"] for r in recs] == ["timeout", "passed"], recs
    assert recs[0]["reason"] == "killed after its 3 s" and "started" in recs[0]["tail"]
    assert read_lines(tmp_path / "results.jsonl") == json.loads(json.dumps(recs))
    pid = int(pid_file.read_text())                                # the part's whole process group went
    status = open(f"/proc/{pid}/status").read() if os.path.exists(f"/proc/{pid}/status") else "State: X"
    assert "State:\tZ" in status or "State: X" in status, status


def test_parts_past_the_budget_are_skipped(tmp_path):
    parts = [gpu_check.Part("a", [sys.executable, "-c", "pass"], timeout=30),
             gpu_check.Part("b", [sys.executable, "-c", "pass"], timeout=30, needs=("diffusers",))]
    recs = gpu_check.run_all(parts, str(tmp_path), dict(os.environ), dict(cuda=True, diffusers=False), 5, **QUIET)
    assert [r["status"] for r in recs] == ["skipped", "skipped"]
    assert "budget" in recs[0]["reason"] and recs[1]["reason"].startswith("diffusers")


@pytest.mark.slow
def test_cpu_logic_runs_one_real_group(tmp_path):
    """The DDP test through LCM_CUDA_TEST_DEVICE=cpu (gloo): outcomes and recorded values arrive."""
    res = check(tmp_path, "--cpu-logic", "--only", "distributed", "--select", "ddp")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    env, rec = read_lines(tmp_path / "results.jsonl")
    assert env["cpu_logic"] is True and rec["part"] == "distributed" and rec["status"] == "passed", rec
    assert rec["tests"] == {"test_distributed_ddp_nccl_one_gpu": "passed"}
    ddp = rec["properties"]["test_distributed_ddp_nccl_one_gpu"]["ddp"]
    assert ddp["backend"] == "gloo" and ddp["max_diff"] == 0.0       # parsed back into numbers
    events = gpu_check.parse_events(str(tmp_path / "distributed.events.jsonl"))   # the plugin saw the same
    assert events == (rec["tests"], rec["properties"])
