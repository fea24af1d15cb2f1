"""A 2-job Hydra multirun with wandb offline: both runs in one wandb group named after the sweep,
their overrides in the config; `demo.sweep evaluate` adds its figures to each run's summary and
`demo.sweep report` builds the table from the run dirs alone."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_two_job_multirun_logs_one_wandb_group_and_reports(tmp_path):
    sweep = tmp_path / "mysweep"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "train.py", "-m", "experiment=demo_lcm_lora", "logger=wandb", "train.max_steps=2",
           "train.batch_size=2", "train.checkpoint_every=1", "data.length=8", "objective.lora.rank=4",
           "objective.lora.alpha=4", "objective.k=20,50", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(glob.glob(str(sweep / "*" / "config.json")))
    assert len(runs) == 2
    for cfg_path, k in zip(runs, ("20", "50")):
        run = os.path.dirname(cfg_path)
        info = json.load(open(os.path.join(run, "wandb_run.json")))
        assert info["group"] == "mysweep" and info["mode"] == "offline"
        assert f"objective.k={k}" in json.load(open(cfg_path))["overrides"]
        files = glob.glob(os.path.join(run, "wandb", "offline-run-*", f"run-{info['id']}.wandb"))
        assert len(files) == 1 and b"mysweep" in open(files[0], "rb").read()    # the group is in the run record
        assert json.load(open(os.path.join(run, "summary.json")))["final_step"] == 2
    ev = subprocess.run([sys.executable, "-m", "demo.sweep", "evaluate", str(sweep), "--n", "4"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-2000:]
    for cfg_path in runs:                                 # the evaluation joined each run's wandb summary
        run = os.path.dirname(cfg_path)
        segments = glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb"))
        assert len(segments) == 2 and any(b"eval/acc_4steps" in open(f, "rb").read() for f in segments)
    out = tmp_path / "report" / "sweep"
    rep = subprocess.run([sys.executable, "-m", "demo.sweep", "report", str(sweep), "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    table = [ln for ln in open(f"{out}.md") if ln.startswith("| mysweep |")]
    assert len(table) == 2 and {ln.split(" | ")[2] for ln in table} == {"20", "50"}
