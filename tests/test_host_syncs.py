"""Host reads of tensor values per step (issue 33): on a GPU each one waits for the queued kernels. Counted
on the CPU by wrapping Tensor.item / __bool__ / __float__ / __int__ / __index__ / tolist / cpu / numpy;
per step = (count of an N+2-step call) - (count of an N-step call), so the last step's logging,
checkpoint and decode cancel out. A training step reads the host once (train.on_nan and the SIGTERM
flag, lcm/training/loop.py); a sampling step never."""
import collections
import os
import traceback

import pytest
import torch
from omegaconf import OmegaConf

from lcm.data.sources import ImageFolder
from lcm.objectives.base import LoRAConfig
from lcm.objectives.lcd_lora import LCDLoRA
from lcm.training import loop
from lcm.training.loop import TrainConfig
from train import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_MODEL = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
HOST_SIDE = {"check_grid"}      # reads of tensors that are on the CPU by construction (a device tensor: no read)


@pytest.fixture
def count(monkeypatch):
    """counts[(read, 'file:line function')]: host reads made from project code while counting."""
    counts, on = collections.Counter(), [False]

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            if on[0]:
                fr = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(ROOT)
                      and os.sep + "tests" + os.sep not in f.filename and ".venv" not in f.filename]
                if fr and fr[-1].name not in HOST_SIDE:
                    counts[(name, f"{os.path.relpath(fr[-1].filename, ROOT)}:{fr[-1].lineno} {fr[-1].name}")] += 1
            return real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, read)
    for n in READS:
        wrap(n)

    def counted(fn, *a, **kw):
        counts.clear()
        on[0] = True
        try:
            fn(*a, **kw)
        finally:
            on[0] = False
        return dict(counts)
    return counted


def per_step(a: dict, b: dict, steps: int) -> dict:
    return {k: (b.get(k, 0) - a.get(k, 0)) / steps for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}


def test_a_training_step_reads_the_host_once(count, tmp_path):
    data = ImageFolder(os.path.join(ROOT, "tests", "fixtures", "tiny_data"), resolution=32)

    def run(steps):
        cfg = TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, log_every=100, checkpoint_every=100)
        obj = LCDLoRA(lora=LoRAConfig(rank=4, alpha=4), k=100)
        return count(loop.train, build_pipeline(SMOKE_MODEL), data, cfg, str(tmp_path / str(steps)), obj)
    reads = per_step(run(2), run(4), 2)
    assert sum(reads.values()) == 1, reads
    assert list(reads) == [("tolist", next(k[1] for k in reads))] and "all_min_tensor" in next(iter(reads))[1]


@pytest.mark.parametrize("solver", ["lcm", "ddim"])
def test_a_sampling_step_reads_nothing(count, solver):
    pipe = build_pipeline(SMOKE_MODEL)
    kw = dict(seed=0, solver=solver, output="latent", progress=False, guidance_scale=2.0)
    reads = per_step(count(pipe, "a red circle", steps=2, **kw), count(pipe, "a red circle", steps=4, **kw), 2)
    assert reads == {}


def registry_cases():
    """One variant of every objective of the registry (conf/objective/*.yaml), LoRA where supported,
    with gen_every = 2 where the objective alternates, so 2 counted steps hold one step of each kind."""
    from tests.test_device_hygiene import OBJECTIVES, supported, variants
    for path in OBJECTIVES:
        i, cfg = sorted((i for i in variants(path) if supported(i[1])), key=lambda c: "-lora-" not in c[0])[0]
        if "gen_every" in cfg:
            cfg["gen_every"] = 2
        yield pytest.param(cfg, id=i)


@pytest.mark.parametrize("cfg", list(registry_cases()))
def test_every_objective_reads_the_host_once_per_step(count, tmp_path, cfg):
    from hydra.utils import instantiate
    data = ImageFolder(os.path.join(ROOT, "tests", "fixtures", "tiny_data"), resolution=32)

    def run(steps):
        tcfg = TrainConfig(max_steps=steps, batch_size=2, lr=1e-4, log_every=100, checkpoint_every=100)
        return count(loop.train, build_pipeline(SMOKE_MODEL), data, tcfg, str(tmp_path / str(steps)), instantiate(cfg))
    reads = per_step(run(2), run(4), 2)
    assert sum(reads.values()) == 1, reads
