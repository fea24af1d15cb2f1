"""One training loop for LCM-LoRA, full LCM (LCD), LCF and plain diffusion (PAPER Sec. 3-4).

Order of one step, as written below: batch -> latents/text -> loss -> NaN check -> backward ->
clip -> optimizer -> EMA -> log -> validate -> checkpoint -> SIGTERM check. Roles (USERS.md Sec. 6):
teacher = frozen base (adapters off), student = what the optimizer holds, target = EMA copy (full)
or the student under no_grad (LoRA). Every random draw of sample i at step s comes from a
generator seeded by (seed, s, global index of i), so resume and multi-process runs are exact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lcm import checkpointing as ck
from lcm.distill import LoRAConfig, Roles, build_roles, check_precision, ema_update, mode_loss
from lcm.consistency import ConsistencySpec
from lcm.data import LatentEncoder, hash_seed, make_loader
from models import lora as lora_lib
from models import lora_io
from models.storage import store_frozen

log = logging.getLogger(__name__)
MODES = ("lcm_lora", "lcd", "lcf", "diffusion")
PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    mode: str = "lcm_lora"              # lcm_lora | lcd | lcf | diffusion
    max_steps: int = 1000
    batch_size: int = 12                # per process
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0               # linear warmup, then constant
    grad_clip: float = 1.0
    optimizer: str = "adamw"            # adamw | adamw8bit (bitsandbytes)
    mixed_precision: str = "no"         # no | bf16 | fp16: autocast; trainables stay fp32
    gradient_checkpointing: bool = False
    frozen_storage: str | None = None   # null | float16 | bfloat16: frozen UNet weights kept so (models/storage.py)
    cache: bool = False                 # keep VAE moments + text embeddings per sample in memory
    vae_chunk: int = 0                  # encode images in chunks of this size (0: whole batch)
    k: int = 20                         # skipping step; grid t_j = j*k - 1 (num_ddim_timesteps = T/k)
    w_min: float = 5.0                  # LCM convention w = s - 1 (SD U[5,15], SDXL U[3,15])
    w_max: float = 15.0
    w_fixed: float | None = None        # e.g. 6.5 (= s 7.5 as the report states); null: uniform
    loss: str = "huber"                 # huber | l2
    huber_c: float = 1e-3
    ema_decay: float | None = 0.95      # full-model target mu; LoRA modes use the student (mu = 0)
    lora_ema_decay: float | None = None # LoRA modes: target = an EMA of the LoRA with this mu (exported)
    w_embedding_dim: int = 256          # lcd: time_cond_proj input width
    p_uncond: float = 0.1               # diffusion: caption dropout (for CFG)
    lora_scale: list | None = None      # diffusion LoRA: [lo, hi], the adapter's scale ~ U[lo, hi] per step
    train_text_encoder: bool = False    # diffusion from scratch: train the text towers too
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 10
    validate_every: int = 200           # 0: never
    val_prompts: list | None = None     # null: the first captions of the dataset
    val_seeds: list = field(default_factory=lambda: [0])
    val_steps: list = field(default_factory=lambda: [1, 2, 4, 8])
    val_guidance: list | None = None    # null: [1.0, 1.5] (LoRA), [8.5] (full LCM)
    val_teacher_steps: int = 25
    val_teacher_guidance: float = 7.5
    on_nan: str = "stop"                # stop | skip
    find_unused_parameters: bool = False


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def all_min(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([float(x)], device=self.device)
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MIN)
        return t.item()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str = "cpu") -> Dist:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)

def loss_kwargs(cfg: TrainConfig) -> dict:
    """The Algorithm 1 knobs (or the diffusion caption dropout) of a TrainConfig."""
    if cfg.mode == "diffusion":
        return dict(p_uncond=cfg.p_uncond)
    return dict(k=cfg.k, w_min=cfg.w_min, w_max=cfg.w_max, w_fixed=cfg.w_fixed, loss=cfg.loss, huber_c=cfg.huber_c)


def step_generators(seed: int, step: int, first: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, step, global sample index)."""
    return [torch.Generator().manual_seed(hash_seed(seed, step, first + i)) for i in range(n)]

#----------------------------------------------------------------------------
# Validation: prompts x seeds x {1,2,4,8} LCM steps (x guidance), plus the teacher's DDIM images.

@contextlib.contextmanager
def using_unet(pipe, unet: nn.Module):
    """Swap the pipeline's UNet (EMA / teacher) and eval mode; restored on exit, even on error."""
    old, mode = pipe.unet, unet.training
    pipe.unet = unet.eval()
    try:
        yield pipe
    finally:
        pipe.unet = old
        unet.train(mode)


@torch.no_grad()
def validate(pipe, roles: Roles, cfg: TrainConfig, prompts: list, size: int, teacher_rows: list):
    """Rows of images (N, 3, size, size) in [0,1] with labels; teacher rows are computed once."""
    def grid(**kw):
        return torch.cat([pipe(prompts, seed=int(s) * 1000, height=size, width=size, output="tensor",
                               progress=False, **kw) for s in cfg.val_seeds])
    rows = []
    with using_unet(pipe, roles.target), roles.target_ctx():   # the EMA (full model or adapter), else the student
        if cfg.mode == "diffusion":
            rows.append((f"ddim {cfg.val_teacher_steps} s={cfg.val_teacher_guidance}",
                         grid(solver="ddim", steps=cfg.val_teacher_steps, guidance_scale=cfg.val_teacher_guidance)))
        else:
            guidance = cfg.val_guidance or ([1.0, 1.5] if roles.lora_name else [8.5])
            rows += [(f"lcm {n} s={s}", grid(solver="lcm", steps=int(n), guidance_scale=float(s)))
                     for s in guidance for n in cfg.val_steps]
    if not teacher_rows and cfg.mode in ("lcm_lora", "lcd"):
        with using_unet(pipe, roles.teacher), roles.teacher_ctx():
            teacher_rows.append((f"teacher ddim {cfg.val_teacher_steps} s={cfg.val_teacher_guidance}",
                                 grid(solver="ddim", steps=cfg.val_teacher_steps,
                                      guidance_scale=cfg.val_teacher_guidance)))
    return rows + teacher_rows


def save_grid(rows: list, path: str) -> None:
    from PIL import Image
    img = torch.cat([torch.cat(list(r), dim=2) for _, r in rows], dim=1)   # (3, rows*H, cols*W)
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)

#----------------------------------------------------------------------------
# Optimizer.

def make_optimizer(params: list, cfg: TrainConfig):
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":                 # fused: one kernel per step (CPU: 3.5x the for-loop)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, **kw, fused=fused or None)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                             "or use train.optimizer=adamw") from None
        return bnb.optim.AdamW8bit(params, **kw)
    raise ValueError(f"train.optimizer must be adamw or adamw8bit, got {cfg.optimizer!r}")


#----------------------------------------------------------------------------
# The loop.

def train(pipe, dataset, cfg: TrainConfig, run_dir: str, lora: LoRAConfig | None = None,
          logger: ck.LoggerConfig | None = None, resume=None, config: dict | None = None,
          dist: Dist | None = None, save_base: bool = False) -> dict:
    """Train `pipe` on `dataset` (items: image (3,H,W) in [-1,1], caption); returns a summary.

    save_base: also write the frozen base as base.safetensors (a model built from scratch, so that
    sample.py can load it together with the LoRA)."""
    dist, logger, config = dist or Dist(), logger or ck.LoggerConfig(mode="disabled"), config or {}
    check_config(cfg, lora, pipe)
    root = os.path.join(run_dir, "checkpoints")
    resume_path = ck.resolve_resume(run_dir, resume)
    if dist.rank == 0:
        ck.prepare_run_dir(run_dir, fresh=resume_path is None and not resume)
        base = os.path.join(run_dir, "base.safetensors")
        if save_base and lora is not None and not os.path.exists(base):
            ck.save_model_file(base, pipe.unet, pipe.vae, pipe.text, model_config(pipe, pipe.unet),
                               {"prediction_type": pipe.prediction_type})
            ck.make_readable(base)
    torch.manual_seed(cfg.seed)                            # LoRA A / w-projection init: equal on all ranks
    pipe.spec = ConsistencySpec(pipe.schedule.T // cfg.k, pipe.spec.sigma_data, pipe.spec.timestep_scaling)
    roles = build_roles(pipe, cfg.mode, lora, cfg.ema_decay, cfg.w_embedding_dim, cfg.train_text_encoder,
                        lora_ema=cfg.lora_ema_decay is not None)   # check_config: only with a distilled LoRA
    pipe.to(dist.device)
    for m in (roles.student, roles.target, roles.teacher):
        if m is not None:
            m.to(dist.device)
    pipe.schedule = pipe.schedule.to(dist.device) if dist.device.type == "cuda" else pipe.schedule
    roles.student.train().set_gradient_checkpointing(cfg.gradient_checkpointing)
    if cfg.frozen_storage:                                 # fp32/autocast compute, half the frozen memory
        for m in {id(m): m for m in (roles.student, roles.teacher) if m is not None}.values():
            store_frozen(m, getattr(torch, cfg.frozen_storage))
    student_call = roles.student
    if dist.world > 1:
        if cfg.train_text_encoder:
            raise ValueError("train.train_text_encoder=true is single-process only (its gradients are not "
                             "synchronised); run without torchrun or freeze the text encoder")
        student_call = nn.parallel.DistributedDataParallel(
            roles.student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    params = [p for _, p in roles.trainables]
    optimizer = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0)
    amp = PRECISIONS[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp is torch.float16)

    step, run_id = 0, None
    ema = roles.target if roles.ema else roles.lora_ema    # what a checkpoint keeps besides the trainables
    if resume_path is not None:                             # trainables, optimizer, EMA, RNG, step, run id
        step, run_id = ck.restore_training_state(resume_path, roles.trainables, optimizer, sched, scaler, ema,
                                                 dist.rank, dist.world)
        run_id = run_id if resume_path.startswith(os.path.abspath(run_dir)) else None
    check_precision(roles, optimizer)

    logr = None
    if dist.rank == 0:
        ck.truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), step)
        ck.write_config(run_dir, config)
        logr = ck.RunLogger(run_dir, logger, config, run_id)
    B, G = cfg.batch_size, cfg.batch_size * dist.world
    loader = iter(make_loader(dataset, B, cfg.seed, dist.rank, dist.world, step, cfg.num_workers))
    encoder = LatentEncoder(pipe, dist.device, cfg.cache, cfg.vae_chunk,
                            train_text=cfg.train_text_encoder and cfg.mode == "diffusion")
    meta = {"prediction_type": pipe.prediction_type, "lcm.train_config": json.dumps(ck.redact(config))}
    if cfg.mode != "diffusion":
        meta |= pipe.spec.to_metadata()

    def export(path):                                      # LoRA in the released kohya layout, or a full model
        if roles.lora_name:                                # (with an EMA target: the EMA adapter)
            name = roles.lora_ema.ema_name if roles.lora_ema else roles.lora_name
            lora_io.save_lora(roles.student, path, name, "kohya", overwrite=True, metadata=meta)
        else:
            ck.save_model_file(path, roles.target, pipe.vae, pipe.text, model_config(pipe, roles.target), meta)
    export_name = f"{roles.lora_name}.safetensors" if roles.lora_name else "model.safetensors"

    def save(step: int) -> None:
        rngs = [ck.rng_state()]
        if dist.world > 1:
            rngs = [None] * dist.world
            torch.distributed.all_gather_object(rngs, ck.rng_state())
        if dist.rank == 0:
            state = ck.training_state(step, roles.trainables, optimizer, sched, scaler, ema, rngs, G, logr.run_id)
            try:
                ck.write_checkpoint(root, step, {ck.STATE_FILE: lambda p: ck.save_state(p, state, meta),
                                                 export_name: export}, cfg.keep_checkpoints)
            except OSError as e:                           # e.g. disk full: older checkpoints stay intact
                if step == cfg.max_steps:
                    raise
                log.error("checkpoint at step %d NOT written (%s); training continues", step, e)
        dist.barrier()

    stop = {"sigterm": False}
    try:
        old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    except ValueError:                                     # not the main thread: no handler
        old_handler = None
    teacher_rows, prompts, status, saved_at = [], None, "done", -1
    t0, seen, loss_sum, n_loss, nan_skipped, skipped_samples = time.perf_counter(), 0, 0.0, 0, 0, 0
    try:
        while step < cfg.max_steps:
            batch = next(loader)
            skipped_samples += batch["skipped"]
            gens = step_generators(cfg.seed, step, dist.rank * B, B)
            if cfg.lora_scale:                             # strength augmentation: lambda ~ U[lo, hi] this step
                lo, hi = cfg.lora_scale
                u = torch.rand((), generator=torch.Generator().manual_seed(hash_seed(cfg.seed, step, "scale")))
                lora_lib.set_lora_scales(roles.student, {roles.lora_name: lo + (hi - lo) * u.item()})
            with torch.autocast(dist.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                z, cond, uncond = encoder(batch, gens)
                per_sample, diag = mode_loss(cfg.mode, pipe, roles, student_call, z, cond, uncond, gens,
                                             **loss_kwargs(cfg))
                loss = per_sample.mean()
            ok = dist.all_min(float(torch.isfinite(loss).item()))
            if ok:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                ok = scaler.is_enabled() or bool(torch.isfinite(grad_norm))
            if cfg.lora_scale:                             # validation, export (and a skipped step) see lambda = 1
                lora_lib.set_lora_scales(roles.student, {roles.lora_name: 1.0})
            if not ok:                                     # NaN/Inf: stop with the step number, or skip it
                optimizer.zero_grad(set_to_none=True)
                msg = f"non-finite loss or gradient at step {step} (loss={loss.item():.4g})"
                if cfg.on_nan == "stop":
                    raise FloatingPointError(msg + "; nothing was updated. Set train.on_nan=skip to skip such "
                                             "steps, or lower train.lr / use train.mixed_precision=bf16")
                log.warning("%s: step skipped (train.on_nan=skip)", msg)
                nan_skipped, step = nan_skipped + 1, step + 1
                continue
            scaler.step(optimizer)
            scaler.update()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            if roles.ema:                                  # theta_minus <- mu theta_minus + (1-mu) theta
                ema_update(roles.target, roles.student, cfg.ema_decay)
            elif roles.lora_ema:
                roles.lora_ema.update(cfg.lora_ema_decay)
            step, seen = step + 1, seen + G
            loss_sum, n_loss = loss_sum + loss.detach(), n_loss + 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:   # log
                mean_loss = (loss_sum / n_loss).reshape(1)
                if dist.world > 1:
                    torch.distributed.all_reduce(mean_loss)
                    mean_loss /= dist.world
                dt = time.perf_counter() - t0
                if dist.rank == 0:
                    metrics = dict(loss=mean_loss.item(), grad_norm=float(grad_norm), lr=sched.get_last_lr()[0],
                                   samples_per_s=seen / dt, peak_mem_mb=peak_memory_mb(dist.device),
                                   skipped_samples=skipped_samples, nan_skipped=nan_skipped)
                    if roles.lora_name:
                        metrics["lora_norm"] = lora_norm(roles.student, roles.lora_name)
                    logr.log(metrics, step)
                    log.info("step %d  loss %.5f  grad %.3g  %.2f samples/s", step, metrics["loss"],
                             metrics["grad_norm"], metrics["samples_per_s"])
                t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0

            pause = time.perf_counter()                    # validation and saving do not count as throughput
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.max_steps):   # validate
                if dist.rank == 0:
                    prompts = prompts or list(cfg.val_prompts or _first_captions(dataset, 2))
                    rows = validate(pipe, roles, cfg, prompts, batch["image"].shape[-1], teacher_rows)
                    path = os.path.join(run_dir, "validation", f"step_{step:07d}.png")
                    save_grid(rows, path)
                    logr.image("validation", path, step, " | ".join(lbl for lbl, _ in rows))
                dist.barrier()

            stop_now = dist.all_min(0.0 if stop["sigterm"] else 1.0) == 0.0
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop_now:   # checkpoint
                save(step)
                saved_at = step
            t0 += time.perf_counter() - pause
            if stop_now:
                status = "terminated"
                log.warning("SIGTERM: saved step %d and stopped; continue with resume=true", step)
                break
        if status == "done" and saved_at != step:
            save(step)
        if status == "done" and dist.rank == 0:            # the final LoRA / model beside the run
            tmp = os.path.join(run_dir, f".tmp-{export_name}")
            export(tmp)
            ck.make_readable(tmp)
            os.replace(tmp, os.path.join(run_dir, export_name))
        if status == "done" and roles.lora_ema:            # the pipeline keeps what was exported
            roles.lora_ema.copy_to_student()
            roles.lora_ema.remove()
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if logr is not None:
            logr.finish()
    return dict(step=step, status=status, run_dir=run_dir, nan_skipped=nan_skipped,
                skipped_samples=skipped_samples, export=os.path.join(run_dir, export_name))


def check_config(cfg: TrainConfig, lora: LoRAConfig | None, pipe) -> None:
    """Clean errors (and the USERS.md Sec. 6 lr warnings) before anything is built."""
    choices = dict(mode=MODES, loss=("huber", "l2"), on_nan=("stop", "skip"), mixed_precision=tuple(PRECISIONS))
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise ValueError(f"train.{k} must be one of {', '.join(allowed)}, got {getattr(cfg, k)!r}")
    if cfg.frozen_storage not in (None, "float16", "bfloat16"):
        raise ValueError(f"train.frozen_storage must be null, float16 or bfloat16, got {cfg.frozen_storage!r}")
    if cfg.cache and cfg.train_text_encoder:
        raise ValueError("train.cache=true stores text embeddings, so it cannot be combined with "
                         "train.train_text_encoder=true")
    if cfg.lora_scale is not None and (cfg.mode != "diffusion" or lora is None or len(cfg.lora_scale) != 2
                                       or not 0 < cfg.lora_scale[0] <= cfg.lora_scale[1]):
        raise ValueError(f"train.lora_scale={cfg.lora_scale}: a range [lo, hi] with 0 < lo <= hi, for "
                         "train.mode=diffusion with a LoRA (e.g. a style LoRA); null for everything else")
    if cfg.lora_ema_decay is not None and (lora is None or cfg.mode == "diffusion" or not 0 <= cfg.lora_ema_decay < 1):
        raise ValueError(f"train.lora_ema_decay={cfg.lora_ema_decay}: a mu in [0, 1) for LoRA distillation "
                         "(mode=lcm_lora or lcf with a LoRA); null = the student is the target (the reference)")
    if not cfg.w_min <= cfg.w_max:
        raise ValueError(f"train.w_min={cfg.w_min} > train.w_max={cfg.w_max}")
    base = {p.dtype for p in pipe.unet.parameters()}
    if cfg.mixed_precision == "no" and base != {torch.float32}:
        raise ValueError(f"the model is in {sorted(map(str, base))}: set train.mixed_precision=bf16 or fp16 "
                         "(the base runs under autocast, trainables stay fp32), or model.dtype=float32")
    if cfg.mode != "diffusion" and lora is not None and cfg.lr < 1e-5:
        log.warning("LoRA distillation with lr=%g < 1e-5 learns (almost) nothing; the reference uses 1e-4", cfg.lr)
    if cfg.mode in ("lcd", "lcf") and lora is None and cfg.lr > 1e-5:
        log.warning("full-model distillation with lr=%g > 1e-5 tends to diverge; the reference uses 1e-6", cfg.lr)


def model_config(pipe, unet: nn.Module) -> dict:
    """What a saved full model needs to rebuild itself (stored as its `lcm.config`)."""
    cfg = dict(family=pipe.family, text_family=pipe.config.get("text_family", pipe.family),
               unet={**pipe.config["unet"], "time_cond_proj_dim": unet.time_cond_proj_dim},
               vae=pipe.config["vae"])
    return cfg | ({"default_size": pipe.config["default_size"]} if "default_size" in pipe.config else {})


def lora_norm(model: nn.Module, name: str) -> float:
    """||Delta W|| = sqrt(sum over layers of ||(alpha/r) B A||_F^2): 0 means 'learns nothing'."""
    with torch.no_grad():
        sq = sum(m.delta_weight(name).pow(2).sum() for _, m in lora_lib.lora_layers(model)
                 if hasattr(m, "delta_weight") and name in m.lora_down)
    return float(sq) ** 0.5


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


def _first_captions(dataset, n: int) -> list[str]:
    from lcm.data import TrainData
    data = TrainData(dataset)
    return [data[i]["caption"] for i in range(min(n, len(data)))]
