"""Real kills: SIGKILL a real `train.py` run at seeded random moments, resume after each, and require
the final export to equal an uninterrupted run's bit for bit, with every checkpoint left readable.

A run writes a checkpoint every step (~150 ms a step here). The first kill lands a seeded delay of
0-150 ms after a seeded number of checkpoints appeared (mostly inside the next step's compute); the
next two land 0-3 ms after the next checkpoint's temp folder appeared (inside the write). After
every kill all complete checkpoints must load (state and export) and equal the uninterrupted run's
checkpoint of the same step; then `resume=true` continues. Both a LoRA run (experiment=smoke) and
a full-model run (experiment=smoke_lcd) are killed.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from lcm.runs import checkpoints as run_ckpts
from lcm.runs import state as run_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
KILLS = 3
SEED = 9
pytestmark = pytest.mark.slow


def _args(experiment: str, run_dir: str, resume: bool) -> list[str]:
    return [sys.executable, "train.py", f"experiment={experiment}", "logger=none", "validation.every=0",
            "train.checkpoint_every=1", f"train.max_steps={STEPS}", "train.log_every=1",
            f"hydra.run.dir={run_dir}", f"resume={'true' if resume else 'false'}"]


ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def _run(experiment: str, run_dir: str, resume: bool) -> None:
    r = subprocess.run(_args(experiment, run_dir, resume), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _read(path: str) -> tuple[dict, dict]:
    """All tensors and the metadata of a safetensors file (raises if it is unreadable)."""
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _same(a: str, b: str) -> None:
    """Two exports hold the same tensors bit for bit and the same metadata (`resume` aside)."""
    (ta, ma), (tb, mb) = _read(a), _read(b)
    assert ta.keys() == tb.keys(), (a, b)
    bits = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731 (NaN-proof, -0.0-proof)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and bits(ta[k]).equal(bits(tb[k])), \
            f"{b}: {k} differs from the uninterrupted run"
    ca, cb = (_run_independent(json.loads(m.pop("lcm.train_config", "{}"))) for m in (ma, mb))
    assert ma == mb and ca == cb, (a, b)


def _run_independent(config: dict) -> dict:
    """A run's config without what differs between the two runs compared: resume and the run dir."""
    config.pop("resume", None)
    if isinstance(config.get("overrides"), list):
        config["overrides"] = [o for o in config["overrides"] if not o.startswith(("resume=", "hydra.run.dir="))]
    return config


def _writes(root: str) -> set[str]:
    """Temp folders of checkpoint writes in progress (or cut by a kill); named with the writer's PID."""
    return {d for d in os.listdir(root) if d.startswith(run_ckpts.TMP_PREFIX)} if os.path.isdir(root) else set()


def _kill_at(experiment: str, run_dir: str, resume: bool, n_ckpts: int, delay: float,
             in_write: bool) -> tuple[int, bool]:
    """Start a run, SIGKILL it `delay` s after `n_ckpts` checkpoints exist (in_write: after n_ckpts - 1
    exist and the next one's temp folder appeared); returns (the newest complete checkpoint, whether
    the kill cut a checkpoint write: a .tmp- folder was left behind)."""
    root = os.path.join(run_dir, "checkpoints")
    stale = _writes(root)                                          # left by the previous kill
    p = subprocess.Popen(_args(experiment, run_dir, resume), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    ready = (lambda: len(run_ckpts.list_checkpoints(root)) >= n_ckpts - 1 and _writes(root) - stale) if in_write else \
        (lambda: len(run_ckpts.list_checkpoints(root)) >= n_ckpts)
    try:
        while not ready():
            assert p.poll() is None, f"run ended before it could be killed: {p.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint appeared in 300 s"
            time.sleep(0.003)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
    finally:
        p.kill()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL, f"the run was not killed (exit code {p.returncode})"
    steps = [s for s, _ in run_ckpts.list_checkpoints(root)]
    return (steps[-1] if steps else 0), bool(_writes(root) - stale)


@pytest.mark.parametrize("experiment,export", [("smoke", "lcm.safetensors"), ("smoke_lcd", "model.safetensors")])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(experiment, export, tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    t0 = time.time()
    _run(experiment, ref, resume=False)
    t_ref = time.time() - t0
    rng = random.Random(f"{SEED}/{experiment}")
    targets = sorted(rng.sample(range(1, STEPS - 1), KILLS))  # checkpoints to wait for; never the last
    reached, mid_write = [], 0
    for i, n in enumerate(targets):
        in_write = i % 3 != 0                                      # kills 2 and 3 aim at a checkpoint write
        delay = rng.uniform(0, 0.003) if in_write else rng.uniform(0, 0.15)
        step, cut = _kill_at(experiment, run, resume=i > 0, n_ckpts=n, delay=delay, in_write=in_write)
        reached, mid_write = reached + [step], mid_write + cut
        ckpts = run_ckpts.list_checkpoints(os.path.join(run, "checkpoints"))
        assert [s for s, _ in ckpts] == list(range(1, len(ckpts) + 1)), "a checkpoint was lost"
        for s, path in ckpts:                                     # every complete checkpoint is readable
            assert run_state.load_state(os.path.join(path, run_state.STATE_FILE))["step"] == s
            _same(run_ckpts.step_dir(os.path.join(ref, "checkpoints"), s) + f"/{export}", os.path.join(path, export))
        assert not os.path.exists(os.path.join(run, export)), "killed before the end, yet exported"
    _run(experiment, run, resume=True)
    _same(os.path.join(ref, export), os.path.join(run, export))
    print(f"\n{experiment}: {KILLS} SIGKILLs at checkpoints {reached} (waited for {targets}; {mid_write} cut a "
          f"checkpoint write), resumed each time; "
          f"final {export} bit-identical; uninterrupted run {t_ref:.1f} s, all {time.time() - t0:.1f} s")
