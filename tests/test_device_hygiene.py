"""Every tensor names its device (issue 33): with the modules built on the CPU beforehand, a call run
under torch.device("meta") as the default device equals the unguarded call. A tensor created without
device= lands on meta and fails (or differs), so a stray factory in sampling, training, encoding,
evaluation or checkpointing is caught here rather than on the first GPU run."""
import glob
import os

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lcm.data.build import make_loader
from lcm.data.encoder import LatentEncoder
from lcm.data.sources import ImageFolder
from lcm.sampling import samplers
from lcm.training import loop
from lcm.training.loop import TrainConfig, make_optimizer, step_generators
from train import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = os.path.join(ROOT, "tests", "fixtures", "tiny_data")
SMOKE_MODEL = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)
OBJECTIVES = sorted(glob.glob(os.path.join(ROOT, "conf", "objective", "*.yaml")))
PROMPT = "a large red circle in the center on a blue background"


def guarded(fn, *a, **kw):
    with torch.device("meta"):
        return fn(*a, **kw)


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a.device == b.device and torch.equal(a, b)


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(SMOKE_MODEL)


@pytest.fixture(scope="module")
def images():
    return ImageFolder(TINY_DATA, resolution=32)

#----------------------------------------------------------------------------
# (a) Sampling with every record of the samplers table.

@pytest.mark.parametrize("solver", sorted(samplers.SAMPLERS))
def test_sampling(pipe, solver):
    kw = dict(steps=2, seed=0, output="latent", progress=False, solver=solver, guidance_scale=2.0)
    assert equal(guarded(pipe, [PROMPT, "a blue square"], **kw), pipe([PROMPT, "a blue square"], **kw))

#----------------------------------------------------------------------------
# (b) One training step of every objective of the registry (conf/objective/*.yaml): LoRA and full
# where it supports them, with and without EMA; the student in DDP on a 1-process gloo group once.

def variants(path: str):
    """(id, objective config) for lora in {LoRA, null} x ema in {null, 0.9}."""
    base = OmegaConf.to_container(OmegaConf.load(path))
    name = os.path.basename(path)[:-5]
    for lora in (True, False):
        for ema in (None, 0.9):
            cfg = dict(base, lora=dict(base.get("lora") or {}, rank=2, alpha=2) if lora else None)
            key = "lora_ema_decay" if lora and "lora_ema_decay" in base else "ema_decay"
            cfg[key] = ema
            if "k" in cfg:
                cfg["k"] = 100                             # a 10-point grid: fewer teacher steps, same code
            yield f"{name}-{'lora' if lora else 'full'}-{'ema' if ema else 'noema'}", cfg


def supported(cfg: dict) -> bool:
    try:
        instantiate(cfg)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError) or "ValueError" in str(e):
            return False
        raise
    return True


CASES = [pytest.param(cfg, id=i) for p in OBJECTIVES for i, cfg in variants(p) if supported(cfg)]


def one_step(model: dict, images, cfg: dict, ddp: bool = False, guard: bool = False) -> dict:
    """Build (unguarded), then one loop step (guarded or not) as lcm/training/loop.py does it; the trainables."""
    pipe = build_pipeline(model)
    obj = instantiate(cfg)
    torch.manual_seed(0)
    obj.setup(pipe)
    obj.student.train()
    student = obj.student
    if ddp:
        student = torch.nn.parallel.DistributedDataParallel(obj.student)
    tcfg = TrainConfig(batch_size=2, lr=1e-3)
    opt = make_optimizer(obj, tcfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    enc = LatentEncoder(pipe, torch.device("cpu"), train_text=obj.trains_text)
    batch = next(iter(make_loader(images, 2, 0, 0, 1, 0, 0)))

    def step():
        gens = step_generators(0, 0, 0, 2)
        with obj.step_context(0, 0):
            z, cond, uncond = enc(batch, gens)
            loss = obj.loss(student, z, cond, uncond, gens)[0].mean()
            loss.backward()
            opt.unscale_clip_(scaler, 0, 1.0)
        opt.step(scaler, 0)
        opt.zero_grad()
        obj.after_step()
        return loss.detach()

    loss = guarded(step) if guard else step()
    out = {n: p.detach().clone() for n, p in obj.trainables}
    if isinstance(obj.ema, torch.nn.Module):
        out |= {f"ema.{n}": p.detach().clone() for n, p in obj.ema.named_parameters()}
    return out | {"loss": loss}


def test_every_objective_has_a_case():
    assert {c.id.split("-")[0] for c in CASES} == {os.path.basename(p)[:-5] for p in OBJECTIVES}


@pytest.mark.parametrize("cfg", CASES)
def test_training_step(images, cfg):
    ref = one_step(SMOKE_MODEL, images, cfg)
    assert equal(one_step(SMOKE_MODEL, images, cfg, guard=True), ref)


def test_training_step_ddp(images, tmp_path):
    cfg = next(c for i, c in variants(os.path.join(ROOT, "conf/objective/lcd_lora.yaml")) if i.endswith("lora-noema"))
    ref = one_step(SMOKE_MODEL, images, cfg)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert equal(one_step(SMOKE_MODEL, images, cfg, ddp=True, guard=True), ref)
    finally:
        torch.distributed.destroy_process_group()

#----------------------------------------------------------------------------
# (c) task=encode, (d) the evaluation grid, (e) checkpoint save and resume.

def test_encode(pipe, images, tmp_path):
    from lcm.data.encode import encode

    def run(out):
        encode(pipe, images, str(out), shard_size=4, batch_size=4)
        return sorted(os.listdir(out))
    assert guarded(run, tmp_path / "g") == run(tmp_path / "u")
    for name in os.listdir(tmp_path / "u"):
        assert (tmp_path / "g" / name).read_bytes() == (tmp_path / "u" / name).read_bytes(), name


def test_evaluation_grid(pipe, tmp_path):
    from lcm.evaluation import Method, MetricSet, PromptSet, register_extractor, register_metric, run_grid
    from lcm.evaluation.metrics import fid_from_features
    register_extractor("hygiene_mean", lambda o: lambda im, p: im.mean((2, 3)))
    register_metric("hygiene_fid", "hygiene_mean",
                    lambda o: lambda f, p: {"hygiene_fid": fid_from_features(f, {"features": f + 1})})
    methods = [Method("teacher", "ddim", [2], 3.0), Method("lcm", "lcm", [1])]
    prompts = PromptSet((PROMPT,) * 2, 0)

    def run(out):
        rows = run_grid(pipe, methods, prompts, MetricSet(["hygiene_fid"]), str(out), batch_size=2, progress=False)
        return [{k: v for k, v in r.items() if "second" not in k} for r in rows]
    assert guarded(run, tmp_path / "g") == run(tmp_path / "u")


def test_checkpoint_save_and_resume(images, tmp_path):
    cfg = next(c for i, c in variants(os.path.join(ROOT, "conf/objective/lcd_lora.yaml")) if i.endswith("lora-ema"))

    def run(d, steps, pipe, resume=None):
        tcfg = TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, log_every=1, checkpoint_every=1)
        return loop.train(pipe, images, tcfg, str(d), instantiate(cfg), resume=resume)["export"]
    ref = load_file(run(tmp_path / "u", 2, build_pipeline(SMOKE_MODEL)))
    guarded(run, tmp_path / "g", 1, build_pipeline(SMOKE_MODEL))
    got = load_file(guarded(run, tmp_path / "g", 2, build_pipeline(SMOKE_MODEL), resume=True))
    assert equal(got, ref)
