"""The trainer on a tiny random model (CPU): presets, roles, resume, NaN, checkpoints, data, CLI."""
import json
import os
import signal
import subprocess
import sys
import tarfile

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from lcm.data.encoder import LatentEncoder
from lcm.data.order import StepSampler, TrainData
from lcm.data.sources import ImageFolder, TarShards
from lcm.objectives.base import LoRAConfig
from lcm.objectives.diffusion import Diffusion
from lcm.objectives.lcd import LCD
from lcm.objectives.lcd_lora import LCDLoRA
from lcm.objectives.lcf import LCF
from lcm.runs import checkpoints as run_ckpts
from lcm.runs import state as run_state
from lcm.training import loop
from lcm.training.loop import TrainConfig, make_optimizer
from lcm.training.validation import ValidationConfig, validate
from train import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = os.path.join(ROOT, "tests", "fixtures", "tiny_data")
SMOKE_MODEL = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)
LORA = LoRAConfig(rank=4, alpha=4)


def tiny_pipe(**over):
    return build_pipeline({**SMOKE_MODEL, **over})


CONSISTENCY = ("k", "w_min", "w_max", "w_fixed", "loss", "huber_c", "lora_scale")
OBJECTIVES = {                                             # mode -> (class, its knobs among small()'s keys)
    "lcm_lora": (LCDLoRA, CONSISTENCY + ("lora_ema_decay",)),
    "lcd": (LCD, CONSISTENCY + ("ema_decay", "w_embedding_dim")),
    "lcf": (LCF, CONSISTENCY + ("ema_decay", "lora_ema_decay")),
    "diffusion": (Diffusion, ("ema_decay", "p_uncond", "lora_scale", "train_text_encoder", "lora_ema_decay")),
}


def small(mode: str = "lcm_lora", validation: dict | None = None, **kw) -> tuple:
    """A short run's loop config, the objective's mode and knobs (as objective.* gives them) and the
    validation config (validation.*; off unless `every` is given)."""
    base = dict(max_steps=4, batch_size=2, lr=1e-3, log_every=1, checkpoint_every=2)
    knobs = {k: kw.pop(k) for k in list(kw) if k not in TrainConfig.__dataclass_fields__}
    v = ValidationConfig(**{"every": 0, "steps": [1, 2], "teacher_steps": 2, "guidance": [1.0], **(validation or {})})
    return TrainConfig(**{**base, **kw}), mode, knobs, v


def objective(mode: str, lora, **knobs):
    cls, allowed = OBJECTIVES[mode]
    assert set(knobs) <= set(allowed), (mode, knobs)
    if "lora_ema_decay" in knobs and cls is LCDLoRA:        # LCDLoRA's own mu is objective.ema_decay
        knobs["ema_decay"] = knobs.pop("lora_ema_decay")
    return cls(lora=lora, **knobs)


def build_roles(pipe, mode: str, lora, **knobs):
    """The objective of `mode`, set up on pipe (its student / target / teacher)."""
    obj = objective(mode, lora, **knobs)
    obj.setup(pipe)
    return obj


def train(pipe, dataset, setup, run_dir, lora, **kw):
    """lcm.training.loop.train with the objective that small()'s mode and knobs describe."""
    cfg, mode, knobs, v = setup
    return loop.train(pipe, dataset, cfg, run_dir, objective(mode, lora, **knobs), validation=v, **kw)


def data():
    return ImageFolder(TINY_DATA, resolution=32)


def lora_params(pipe) -> dict:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".lora_" in n}


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]

#----------------------------------------------------------------------------
# Presets and roles.

def test_presets_match_users_md_sec9():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        lora = compose("train", overrides=["train=lora_distill"])
        sdxl = compose("train", overrides=["experiment=sdxl_lcm_lora"])
        full = compose("train", overrides=["train=full_distill", "objective=lcd"])
    t, o, l, opt = lora.train, lora.objective, lora.objective.lora, lora.optimizer
    assert (o._target_, t.lr, l.rank, l.alpha, o.loss, o.huber_c) == (
        "lcm.objectives.lcd_lora.LCDLoRA", 1e-4, 64, 64, "huber", 1e-3)
    assert (o.w_min, o.w_max, o.k, t.batch_size, list(opt.betas), opt.eps) == (5, 15, 20, 12, [0.9, 0.999], 1e-8)
    assert (opt.weight_decay, t.grad_clip, t.warmup_steps, o.ema_decay, o.w_fixed) == (0, 1.0, 0, None, None)
    assert (sdxl.objective.w_min, sdxl.objective.w_max, sdxl.train.lr) == (3, 15, 1e-4)
    assert (full.objective._target_, full.train.lr, full.objective.ema_decay, full.objective.lora) == (
        "lcm.objectives.lcd.LCD", 1e-6, 0.95, None)
    o = full.objective                                     # the objective reads the documented objective.* names
    assert (o.ema_decay, o.k, o.loss, o.w_embedding_dim) == (0.95, 20, "huber", 256)


def test_optimizer_holds_only_trainables():
    pipe = tiny_pipe()
    roles = build_roles(pipe, "lcm_lora", LORA)
    opt = make_optimizer(roles, small()[0])
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    lora = {id(p) for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    assert held == lora and len(lora) > 0
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if ".lora_" not in n)
    assert all(p.dtype == torch.float32 for _, p in roles.trainables)
    pipe = tiny_pipe()                                      # full LCM: student copy + EMA target + teacher
    roles = build_roles(pipe, "lcd", None, ema_decay=0.95)
    opt = make_optimizer(roles, small()[0])
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in roles.student.parameters()}
    assert not held & {id(p) for p in [*roles.target.parameters(), *roles.teacher.parameters()]}
    assert roles.student.time_cond_proj is not None and roles.teacher.time_cond_proj_dim is None


def test_mode_and_precision_errors():
    with pytest.raises(ValueError, match="needs a LoRA"):
        build_roles(tiny_pipe(), "lcm_lora", None)
    with pytest.raises(ValueError, match="objective.lora=null"):
        build_roles(tiny_pipe(), "lcd", LORA)
    with pytest.raises(ValueError, match="mixed_precision=bf16"):
        train(tiny_pipe(dtype="bfloat16"), data(), small(), "/nonexistent/x", LORA)

#----------------------------------------------------------------------------
# Training runs.

@torch.no_grad()
def held_out_loss(pipe, cfg) -> float:
    """The LCD loss of `pipe` (LoRA or not) on the 8 images x 4 fixed draws."""
    from lcm.denoiser import unet_net as net_fn
    from lcm.objectives.losses import lcd_loss
    from lcm.objectives.teacher import teacher_estimate as teacher_ddim_estimate   # ddim is its default
    from models.lora import adapters_disabled
    from models.text import Conditioning as UNetCond
    knobs = cfg[2]
    items = [TrainData(data())[i] for i in range(8)]
    z = pipe.vae.encode(torch.stack([it["image"] for it in items])).mean * pipe.vae_scale
    cond = UNetCond(pipe.text.encode([it["caption"] for it in items]).context)
    uncond = UNetCond(pipe.text.encode([""]).context.expand(8, -1, -1))
    net = net_fn(pipe.unet)

    def teacher(*a):
        with adapters_disabled(pipe.unet):
            return net(*a)
    est = teacher_ddim_estimate(teacher, pipe.schedule, "epsilon")
    losses = [lcd_loss(net, net, est, z, cond, uncond, pipe.schedule,
                       [torch.Generator().manual_seed(100 * r + i) for i in range(8)],
                       k=knobs.get("k", 20), loss=knobs["loss"], w_fixed=knobs["w_fixed"])[0].mean() for r in range(4)]
    return float(sum(losses) / 4)


@pytest.mark.slow
def test_tiny_run_loss_falls(tmp_path):
    cfg = small(max_steps=20, batch_size=4, lr=1e-2, loss="l2", checkpoint_every=100, w_fixed=5.0)
    pipe = tiny_pipe()
    before = held_out_loss(pipe, cfg)                      # LoRA B = 0 at init: equals the base model
    out = train(pipe, data(), cfg, str(tmp_path / "run"), LoRAConfig(rank=16, alpha=16))
    after = held_out_loss(pipe, cfg)
    assert after < 0.85 * before, (before, after)          # measured: 0.111 -> 0.088
    assert os.path.isfile(out["export"]) and out["status"] == "done"
    m = metrics(out["run_dir"])[-1]
    assert {"loss", "grad_norm", "lr", "lora_norm", "peak_mem_mb", "samples_per_s"} <= set(m) and m["lora_norm"] > 0


def test_resume_is_bit_identical(tmp_path):
    a = tiny_pipe()
    train(a, data(), small(max_steps=4), str(tmp_path / "a"), LORA)
    b = tiny_pipe()
    train(b, data(), small(max_steps=2), str(tmp_path / "b"), LORA)
    with pytest.raises(FileExistsError, match="resume=true"):   # an existing run is never overwritten
        train(tiny_pipe(), data(), small(max_steps=4), str(tmp_path / "b"), LORA)
    partial = tmp_path / "b" / "checkpoints" / ".tmp-step_0000003-999"   # a kill -9 during a write
    partial.mkdir()
    (partial / "lcm.safetensors").write_bytes(b"\0" * 10)
    b = tiny_pipe()
    out = train(b, data(), small(max_steps=4), str(tmp_path / "b"), LORA, resume=True)
    assert not partial.exists()
    pa, pb = lora_params(a), lora_params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [s for s, _ in run_ckpts.list_checkpoints(str(tmp_path / "b" / "checkpoints"))] == [2, 4]
    steps = [m["step"] for m in metrics(out["run_dir"])]
    assert steps == sorted(steps) == [1, 2, 3, 4]                  # the logged step never goes back


def test_lora_ema_target_mu0_is_the_reference_and_mu_exports_the_average(tmp_path):
    """objective.ema_decay: mu = 0 gives the reference run (target = the student); mu = 0.5
    exports the EMA of the online LoRA over the steps, which the pipeline keeps; resume is exact."""
    from safetensors.torch import load_file
    from torch.optim.optimizer import register_optimizer_step_post_hook
    ref, zero = tiny_pipe(), tiny_pipe()
    out_ref = train(ref, data(), small(max_steps=3), str(tmp_path / "ref"), LORA)
    out_zero = train(zero, data(), small(max_steps=3, lora_ema_decay=0.0), str(tmp_path / "zero"), LORA)
    # (equal up to GEMM rounding: the EMA adapter's buffers differ from the student's)
    loss = lambda out: torch.tensor([m["loss"] for m in metrics(out["run_dir"])])
    torch.testing.assert_close(loss(out_zero), loss(out_ref), rtol=1e-5, atol=0)
    fa, fb = load_file(out_ref["export"]), load_file(out_zero["export"])
    assert fa.keys() == fb.keys()
    torch.testing.assert_close(fb, fa, rtol=0, atol=1e-4)   # Adam steps are ~lr = 1e-3 per element

    online = []                                      # the student's LoRA after every optimizer step
    hook = register_optimizer_step_post_hook(lambda *_: online.append(lora_params(pipe)))
    try:
        pipe = tiny_pipe()
        out = train(pipe, data(), small(max_steps=4, lora_ema_decay=0.5), str(tmp_path / "ema"), LORA)
    finally:
        hook.remove()
    fresh = tiny_pipe()
    torch.manual_seed(0)                             # the trainer's seeded LoRA init (train.seed = 0)
    build_roles(fresh, "lcm_lora", LORA)
    expected = {k: v for k, v in lora_params(fresh).items()}
    for step in online:                              # theta_minus <- mu theta_minus + (1 - mu) theta
        expected = {k: 0.5 * expected[k] + 0.5 * step[k] for k in expected}
    got = lora_params(pipe)
    assert got.keys() == expected.keys() and not any("_ema" in k for k in got)   # EMA adapter removed
    assert all(torch.allclose(got[k], expected[k], atol=1e-7) for k in got)
    assert not all(torch.equal(got[k], online[-1][k]) for k in got)              # not the online weights
    exported = tiny_pipe()
    exported.load_lora(out["export"], name="lcm")
    torch.testing.assert_close(lora_params(exported), got)

    b = tiny_pipe()                                  # resume restores the EMA adapter
    train(b, data(), small(max_steps=2, lora_ema_decay=0.5), str(tmp_path / "b"), LORA)
    b = tiny_pipe()
    train(b, data(), small(max_steps=4, lora_ema_decay=0.5), str(tmp_path / "b"), LORA, resume=True)
    assert all(torch.equal(lora_params(b)[k], got[k]) for k in got)
    for mode, mu in (("diffusion", 0.9), ("lcm_lora", 1.0)):
        with pytest.raises(ValueError, match="objective.(lora_)?ema_decay"):
            train(tiny_pipe(), data(), small(mode=mode, lora_ema_decay=mu), str(tmp_path / "c"), LORA)


def test_cached_latents_and_text_give_the_same_run(tmp_path):
    a, b = tiny_pipe(), tiny_pipe()
    train(a, data(), small(max_steps=3), str(tmp_path / "a"), LORA)
    train(b, data(), small(max_steps=3, cache=True), str(tmp_path / "b"), LORA)   # posterior sampled per step
    pa, pb = lora_params(a), lora_params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_bf16_autocast_keeps_trainables_fp32_across_resume(tmp_path):
    run = str(tmp_path / "r")
    cfg = small(max_steps=2, mixed_precision="bf16")
    train(tiny_pipe(dtype="bfloat16"), data(), cfg, run, LORA)
    pipe = tiny_pipe(dtype="bfloat16")
    out = train(pipe, data(), small(max_steps=3, mixed_precision="bf16"), run, LORA, resume=True)
    assert out["step"] == 3
    lora = [p for n, p in pipe.unet.named_parameters() if ".lora_" in n]
    base = [p for n, p in pipe.unet.named_parameters() if ".lora_" not in n]
    assert all(p.dtype == torch.float32 for p in lora) and all(p.dtype == torch.bfloat16 for p in base)
    st = run_state.load_state(os.path.join(run, "checkpoints", "step_0000003", run_state.STATE_FILE))
    assert all(v.dtype == torch.float32 for s in st["optimizer"]["state"].values() for k, v in s.items()
               if k != "step")


def test_fp16_frozen_storage_gives_the_fp32_run_on_an_fp16_model(tmp_path):
    """train.frozen_storage=float16: half the frozen bytes, same LoRA (the weights are fp16 values)."""
    pipes = [tiny_pipe(), tiny_pipe()]
    for p in pipes:
        with torch.no_grad():
            for w in p.unet.parameters():
                w.copy_(w.half().float())
    train(pipes[0], data(), small(max_steps=3), str(tmp_path / "a"), LORA)
    train(pipes[1], data(), small(max_steps=3, frozen_storage="float16"), str(tmp_path / "b"), LORA)
    assert {p.dtype for n, p in pipes[1].unet.named_parameters() if n.endswith(".0.weight") and ".lora_" not in n
            and p.dim() == 4} == {torch.float16}
    pa, pb = lora_params(pipes[0]), lora_params(pipes[1])
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(pa[k].abs().max() > 0 for k in pa if ".lora_up." in k)                # it did train (B starts at 0)


def test_lcf_starts_from_a_lora_file(tmp_path):
    first = train(tiny_pipe(), data(), small(max_steps=2), str(tmp_path / "a"), LORA)
    pipe = tiny_pipe()
    lcf = LoRAConfig(rank=4, alpha=4, init_from=first["export"])
    build_roles(pipe, "lcf", lcf)
    from safetensors.torch import load_file
    sd = load_file(first["export"])
    up = pipe.unet.output_blocks[0][0].in_layers[2].lora_up["lcm"].weight
    key = [k for k in sd if k.endswith("lora_up.weight") and "up_blocks_0_resnets_0_conv1" in k]
    assert len(key) == 1 and torch.equal(up.detach().reshape(sd[key[0]].shape), sd[key[0]].float())
    out = train(tiny_pipe(), data(), small(mode="lcf", max_steps=2), str(tmp_path / "b"), lcf)
    assert out["status"] == "done"


def test_lcd_mode_trains_student_and_ema(tmp_path):
    pipe = tiny_pipe()
    out = train(pipe, data(), small(mode="lcd", lr=1e-5, max_steps=2), str(tmp_path / "r"), None)
    from safetensors import safe_open
    with safe_open(out["export"], "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "model.diffusion_model.time_cond_proj.weight" in keys
    assert json.loads(meta["lcm.config"])["unet"]["time_cond_proj_dim"] == 256
    st = run_state.load_state(os.path.join(out["run_dir"], "checkpoints", "step_0000002", run_state.STATE_FILE))
    assert st["ema"] is not None and not torch.equal(st["ema"]["out.2.weight"], st["trainables"]["out.2.weight"])


def test_nan_loss_stops_with_the_step_or_is_skipped(tmp_path):
    class Poisoned(torch.utils.data.Dataset):             # sample 5 is NaN
        def __init__(self):
            self.base = data()

        def __len__(self):
            return len(self.base)

        def get(self, i, rng):
            item = self.base.get(i, rng)
            return {**item, "image": item["image"] * float("nan")} if i == 5 else item
    sampler = StepSampler(8, 2, seed=0)
    bad = next(s for s in range(8) if any(k % 8 == 5 for k in sampler.keys(s)))
    with pytest.raises(FloatingPointError, match=f"at step {bad}"):
        train(tiny_pipe(), Poisoned(), small(max_steps=bad + 1, checkpoint_every=100), str(tmp_path / "a"), LORA)
    pipe = tiny_pipe()
    out = train(pipe, Poisoned(), small(max_steps=bad + 2, on_nan="skip", checkpoint_every=100), str(tmp_path / "b"),
                LORA)
    assert out["nan_skipped"] >= 1 and all(torch.isfinite(p).all() for p in lora_params(pipe).values())


def test_keep_last_k_checkpoints(tmp_path):
    out = train(tiny_pipe(), data(), small(max_steps=5, checkpoint_every=1, keep_checkpoints=2), str(tmp_path / "r"),
                LORA)
    assert [s for s, _ in run_ckpts.list_checkpoints(os.path.join(out["run_dir"], "checkpoints"))] == [4, 5]
    assert sorted(os.listdir(os.path.join(out["run_dir"], "checkpoints"))) == ["step_0000004", "step_0000005"]


def test_disk_full_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = run_state.save_state, []

    def flaky(path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *a, **kw)
    monkeypatch.setattr(run_state, "save_state", flaky)
    out = train(tiny_pipe(), data(), small(max_steps=6), str(tmp_path / "r"), LORA)
    root = os.path.join(out["run_dir"], "checkpoints")
    assert [s for s, _ in run_ckpts.list_checkpoints(root)] == [2, 6]
    assert not [d for d in os.listdir(root) if d.startswith(run_ckpts.TMP_PREFIX)]
    run_state.load_state(os.path.join(root, "step_0000002", run_state.STATE_FILE))


def test_validation_leaves_params_unchanged(tmp_path):
    pipe = tiny_pipe()
    cfg = small()
    roles = build_roles(pipe, cfg[1], LORA)
    roles.student.train()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rows = validate(pipe, roles, cfg[3], ["a red circle"], 32, teacher := [])
    assert [lbl for lbl, _ in rows] == ["lcm 1 s=1.0", "lcm 2 s=1.0", "teacher ddim 2 s=7.5"] and len(teacher) == 1
    assert all(r.shape == (1, 3, 32, 32) for _, r in rows)
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and pipe.unet is roles.student
    assert roles.student.training


def test_lora_export_loads_into_the_pipeline(tmp_path):
    pipe = tiny_pipe()
    out = train(pipe, data(), small(max_steps=2), str(tmp_path / "r"), LORA)
    fresh = tiny_pipe()
    fresh.load_lora(out["export"], name="lcm")
    kw = dict(steps=2, height=32, width=32, seed=0, output="latent", progress=False)
    a, b = pipe(["a red circle"], **kw), fresh(["a red circle"], **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

def test_lora_scale_augmentation_draws_a_scale_per_step_and_exports_at_one(tmp_path):
    from models.lora import lora_layers

    def run(d):
        pipe, seen = tiny_pipe(), []
        pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(
            {layer.lora_scale["lcm"] for _, layer in lora_layers(m)}))
        train(pipe, data(), small(mode="diffusion", lora_scale=[0.5, 0.9]), str(tmp_path / d), LORA)
        return pipe, seen
    pipe, seen = run("a")
    assert len(seen) == 4 and all(len(s) == 1 for s in seen), seen     # one scale, on every layer, per step
    scales = [s.pop() for s in seen]
    assert all(0.5 <= s <= 0.9 for s in scales) and len(set(scales)) == 4, scales
    assert {layer.lora_scale["lcm"] for _, layer in lora_layers(pipe.unet)} == {1.0}   # export / sampling at 1
    assert [s.pop() for s in run("b")[1]] == scales                    # drawn from the seed: resumable
    for mode, rng in (("lcm_lora", [0.5, 1.0]), ("diffusion", [1.0, 0.5])):
        with pytest.raises(ValueError, match="objective.lora_scale"):
            train(tiny_pipe(), data(), small(mode=mode, lora_scale=rng), str(tmp_path / "c"), LORA)

#----------------------------------------------------------------------------
# SDXL conditioning: zero unconditional branch, size/crop ids in y.

def test_sdxl_encoder_builds_vector_and_zero_uncond():
    from lcm.conditioning import sdxl_vector
    from models.text import TextConditioner
    tower = dict(width=32, layers=1, heads=2, act="gelu", pad_token_id=0, layer="penultimate", final_norm=False)
    pipe = tiny_pipe()
    pipe.text = TextConditioner([{**tower, "proj_dim": None}, {**tower, "proj_dim": 8}], pooled_from=1)
    pipe.family = "sdxl"
    batch = dict(image=torch.zeros(2, 3, 32, 32), caption=["a", "b"], original_size=[(64, 48), (32, 32)],
                 crop_top_left=[(3, 0), (0, 0)], index=torch.tensor([0, 1]))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    z, cond, uncond = LatentEncoder(pipe, torch.device("cpu"))(batch, gens)
    assert z.shape == (2, 4, 16, 16) and cond.context.shape == (2, 77, 64) and cond.y.shape == (2, 8 + 6 * 256)
    assert (uncond.context == 0).all() and (uncond.y[:, :8] == 0).all()
    torch.testing.assert_close(uncond.y[:1], sdxl_vector(torch.zeros(1, 8), (64, 48), (3, 0), (32, 32)))
    torch.testing.assert_close(cond.y[1:, 8:], uncond.y[1:, 8:])

#----------------------------------------------------------------------------
# Data: skipped samples, deterministic resumable order, rank slices, tars.

def _write_images(folder, n, bad=()):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        p = os.path.join(folder, f"{i}.png")
        if i in bad:
            open(p, "wb").write(b"not a png")
        else:
            Image.new("RGB", (40, 24), (i * 20, 0, 0)).save(p)
        open(os.path.join(folder, f"{i}.txt"), "w").write("" if i == 3 else f"image {i}")


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(tmp_path):
    _write_images(tmp_path, 6, bad=(1,))
    ds = TrainData(ImageFolder(str(tmp_path), resolution=16, crop="random"))
    items = [ds[k] for k in range(6)]
    assert sum(it["skipped"] for it in items) == 2                        # 1: corrupt, 3: empty caption
    assert {it["index"] for it in items} == {0, 2, 4, 5}
    assert all(it["image"].shape == (3, 16, 16) and it["original_size"] == (24, 40) for it in items)
    with open(tmp_path / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "0.png", "text": "from jsonl"}) + "\n")
    assert TrainData(ImageFolder(str(tmp_path), resolution=16))[0]["caption"] == "from jsonl"


def test_sampler_is_resumable_and_ranks_split_the_global_batch():
    one = StepSampler(10, 4, seed=3)
    ranks = [StepSampler(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in range(7):                                                     # crosses epoch boundaries
        assert one.keys(s) == ranks[0].keys(s) + ranks[1].keys(s)
    assert next(iter(StepSampler(10, 4, seed=3, start_step=5))) == one.keys(5)
    keys = [k for s in range(5) for k in one.keys(s)]
    assert sorted(k % 10 for k in keys[:10]) == list(range(10))            # each epoch is a permutation


def test_tar_shards(tmp_path):
    _write_images(tmp_path / "img", 3)
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tf:
        for i in range(3):
            tf.add(tmp_path / "img" / f"{i}.png", arcname=f"s{i:03d}.png")
            tf.add(tmp_path / "img" / f"{i}.txt", arcname=f"s{i:03d}.txt")
    ds = TrainData(TarShards(str(tmp_path / "shard-*.tar"), resolution=16))
    assert len(ds) == 3 and ds[0]["caption"] == "image 0" and ds[0]["image"].shape == (3, 16, 16)

#----------------------------------------------------------------------------
# The CLI: every experiment runs 2 steps; errors are one line; sweeps, SIGTERM, DDP (slow).

def _tiny_sd_checkpoint(tmp_path, family):
    from tests.oracle import tiny_clip, tiny_unet, tiny_vae, write_original
    path = str(tmp_path / f"tiny-{family}.safetensors")
    if family == "sd15":
        write_original(path, family, tiny_unet("sd15"), tiny_vae(), [tiny_clip(768, "quick_gelu")])
    else:
        te = [tiny_clip(768, "quick_gelu"), tiny_clip(1280, "gelu", projection=1280)]
        write_original(path, family, tiny_unet("sdxl"), tiny_vae(), te)
    return path


EXPERIMENTS = [pytest.param(n, marks=[] if n.startswith("smoke") else [pytest.mark.slow]) for n in
               sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "experiment")) if f.endswith(".yaml"))]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_two_steps(name, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import train as cli
    over = [f"experiment={name}", "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2",
            "validation.steps=[1]", "validation.teacher_steps=2", "logger=none", f"hydra.run.dir={tmp_path}/run"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("train", overrides=over, return_hydra_config=True)
        if OmegaConf.is_missing(cfg.model, "path"):                       # a real-model recipe: tiny stand-in
            family = "sdxl" if "sdxl" in name else "sd15"
            over += [f"model.path={_tiny_sd_checkpoint(tmp_path, family)}", "model.dtype=float32",
                     "model.device=cpu", "train.mixed_precision=no", f"data.root={TINY_DATA}",
                     "data.resolution=32", "train.gradient_checkpointing=true"]
            cfg = compose("train", overrides=over, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        HydraConfig.instance().set_config(cfg)
        if cfg.model.path and not os.path.exists(cfg.model.path):           # e.g. a demo asset not built yet
            pytest.skip(f"experiment={name} needs {cfg.model.path}")
        with open_dict(cfg):
            del cfg["hydra"]
        result = cli.run(cfg)
    assert result["status"] == "done" and os.path.isfile(result["export"])


def _cli(args, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    r = _cli(["experiment=smoke", "objective.loss=l1", f"hydra.run.dir={tmp_path}/a"])
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("train.py: error: objective.loss")
    r = _cli(["experiment=smoke", "train.no_such_key=1", f"hydra.run.dir={tmp_path}/b"])
    assert r.returncode != 0 and "no_such_key" in r.stderr


@pytest.mark.slow
def test_smoke_lora_loads_in_sample_py(tmp_path):
    r = _cli(["experiment=smoke", "validation.every=0", f"hydra.run.dir={tmp_path}/run"])
    assert r.returncode == 0 and r.stdout.strip().endswith("lcm.safetensors"), r.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    s = subprocess.run([sys.executable, "sample.py", f"model.path={tmp_path}/run/base.safetensors",
                        f"model.lora=[{{path: {tmp_path}/run/lcm.safetensors, name: lcm}}]", "steps=2",
                        f"out_dir={tmp_path}/samples"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert s.returncode == 0, s.stderr[-2000:]
    assert any(f.startswith("lcm-2steps") for f in os.listdir(tmp_path / "samples"))


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_dir(tmp_path):
    r = _cli(["-m", "experiment=smoke", "objective.k=10,50", "train.max_steps=2", "validation.every=0",
              f"hydra.sweep.dir={tmp_path}/sweep"])
    assert r.returncode == 0, r.stderr[-2000:]
    for job, k in (("0", 10), ("1", 50)):
        with open(tmp_path / "sweep" / job / "config.json") as f:
            assert json.load(f)["objective"]["k"] == k
        assert os.path.isfile(tmp_path / "sweep" / job / "lcm.safetensors")


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(tmp_path):
    run = str(tmp_path / "run")
    args = ["experiment=smoke", "train.max_steps=400", "train.checkpoint_every=1000", "validation.every=0",
            "train.log_every=1", f"hydra.run.dir={run}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    metrics_path = os.path.join(run, "metrics.jsonl")
    import time
    deadline = time.time() + 300
    while not (os.path.exists(metrics_path) and len(open(metrics_path).readlines()) >= 3):
        assert p.poll() is None and time.time() < deadline, p.stdout.read()[-2000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-2000:]
    (step, path), = run_ckpts.list_checkpoints(os.path.join(run, "checkpoints"))
    assert 3 <= step < 400 and run_state.load_state(os.path.join(path, run_state.STATE_FILE))["step"] == step
    r = _cli([*args[:1], f"train.max_steps={step + 2}", *args[2:], "resume=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s for s, _ in run_ckpts.list_checkpoints(os.path.join(run, "checkpoints"))][-1] == step + 2


@pytest.mark.slow
@pytest.mark.parametrize("objective,export,rtol", [
    (["objective.loss=l2"], "lcm.safetensors", 1e-5),
    # DMD2: G and F each reduced on their own steps (unused parameters), the GAN's batched pass. Its
    # step-3 loss (1/2|grad|^2 ~ 8e-4, a difference of two passes) reads Adam's amplified summation
    # noise of steps 1-2 (below): 0.7% apart, measured
    (["objective=dmd2", "objective.gen_every=2", "objective.gan=true"], "dmd2.safetensors", 2e-2)])
def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path, objective, export, rtol):
    from safetensors.torch import load_file
    common = ["experiment=smoke", "train.max_steps=3", "validation.every=0", "train.checkpoint_every=3",
              "train.log_every=1", *objective]
    r1 = _cli([*common, "train.batch_size=4", f"hydra.run.dir={tmp_path}/one"])
    assert r1.returncode == 0, r1.stderr[-2000:]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "train.py", *common, "train.batch_size=2", f"hydra.run.dir={tmp_path}/two"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / export), load_file(tmp_path / "two" / export)
    la, lb = ([m["loss"] for m in metrics(tmp_path / d)] for d in ("one", "two"))
    assert len(la) == len(lb) == 3                                         # same samples, same noise
    torch.testing.assert_close(torch.tensor(la[:2]), torch.tensor(lb[:2]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-6, rtol=rtol)
    assert a.keys() == b.keys()            # Adam turns summation-order noise on ~0 gradients (|g| ~ eps)
    va, vb = (torch.cat([t[k].flatten() for k in sorted(a)]) for t in (a, b))  # into up to lr per element
    assert (va - vb).abs().max() <= 1e-3 and (va - vb).norm() <= 1e-4 * va.norm()
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]                  # rank 1 made no dir of its own
