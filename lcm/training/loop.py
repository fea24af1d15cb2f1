"""One training loop for every objective (lcm/objectives/: LCM-LoRA, full LCD, LCF, diffusion).

Order of one step, as written below: batch -> latents/text -> objective loss -> NaN check ->
backward -> clip -> optimizer -> objective.after_step (EMA) -> log -> validate -> checkpoint ->
SIGTERM check. The objective owns the networks (student / target / teacher, docs/users.md Sec. 6);
the loop owns the optimizer, precision, data, logging and checkpoints. Every random draw of sample
i at step s comes from a generator seeded by (seed, s, global index of i), so resume and
multi-process runs are exact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass

import torch
from torch import nn

from lcm.data.build import first_captions, image_size, make_loader
from lcm.data.encoder import LatentEncoder
from lcm.data.order import hash_seed
from lcm.objectives.base import Objective
from lcm.runs import checkpoints, lock, logger as runlog, state as runstate
from lcm.training.distributed import Dist
from lcm.training.optim import Optimizers
from lcm.training.validation import ValidationConfig, grid_infotext, save_grid, validate, validation_metrics
from models.checkpoint import save_model_file
from models.storage import store_frozen

log = logging.getLogger(__name__)

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """The loop's settings (cfg.train). The objective's knobs are its constructor arguments (cfg.objective),
    validation has its ValidationConfig (cfg.validation), the optimizer its factory (cfg.optimizer)."""
    max_steps: int = 1000
    batch_size: int = 12                # per process
    lr: float = 1e-4                    # the optimizer's (conf/optimizer/) learning rate
    warmup_steps: int = 0               # linear warmup, then constant
    grad_clip: float = 1.0              # per optimizer
    mixed_precision: str = "no"         # no | bf16 | fp16: autocast; trainables stay fp32
    gradient_checkpointing: bool = False
    frozen_storage: str | None = None   # null | float16 | bfloat16: frozen UNet weights kept so (models/storage.py)
    cache: bool = False                 # keep VAE moments + text embeddings per sample in memory
    vae_chunk: int = 0                  # encode images in chunks of this size (0: whole batch)
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 10
    on_nan: str = "stop"                # stop | skip
    find_unused_parameters: bool = False
    distributed: str = "ddp"            # ddp | fsdp: shard full models over the torchrun ranks (lcm/training/fsdp.py)


def step_generators(seed: int, step: int, first: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, step, global sample index)."""
    return [torch.Generator().manual_seed(hash_seed(seed, step, first + i)) for i in range(n)]


def make_optimizer(objective: Objective, cfg: TrainConfig, factory=None) -> Optimizers:
    """The optimizers the objective declares, each built by `factory(params, lr=...)` (conf/optimizer/,
    a Hydra _partial_; None: AdamW with the reference's settings), with cfg's warmup."""
    return Optimizers(objective.optimizers(), factory, cfg.lr, cfg.warmup_steps)


def place(pipe, objective: Objective, cfg: TrainConfig, dist: Dist) -> nn.Module:
    """Build the objective's networks and put them on the device; returns what the loss calls
    (the student, DDP-wrapped with several processes; with train.distributed=fsdp the student,
    EMA target and teacher are sharded in place instead, lcm/training/fsdp.py)."""
    torch.manual_seed(cfg.seed)                            # LoRA A / w-projection init: equal on all ranks
    objective.setup(pipe)
    pipe.to(dist.device)
    nets = {id(m): m for m in (objective.student, objective.target, objective.teacher) if m is not None}
    for m in nets.values():
        m.to(dist.device)
    objective.student.train().set_gradient_checkpointing(cfg.gradient_checkpointing)
    if cfg.frozen_storage:                                 # fp32/autocast compute, half the frozen memory
        for m in {id(m): m for m in (objective.student, objective.teacher) if m is not None}.values():
            store_frozen(m, getattr(torch, cfg.frozen_storage))
    if dist.world == 1:
        return objective.student
    if objective.trains_text:
        raise ValueError("objective.train_text_encoder=true is single-process only (its gradients are not "
                         "synchronised); run without torchrun or freeze the text encoder")
    if cfg.distributed == "fsdp":
        from lcm.training import fsdp
        return fsdp.shard_objective(objective, dist.device, PRECISIONS[cfg.mixed_precision], cfg.frozen_storage)
    return nn.parallel.DistributedDataParallel(
        objective.student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        find_unused_parameters=cfg.find_unused_parameters or objective.unused_parameters)


def check_precision(objective: Objective, optimizer=None) -> None:
    """Policy (docs/users.md Sec. 6): trainables and optimizer state fp32, whatever the base dtype."""
    bad = [n for n, p in objective.trainables if p.dtype != torch.float32 or not p.requires_grad]
    assert not bad, f"trainable parameters must be fp32 and require grad: {bad[:3]}"
    if optimizer is not None:
        for st in optimizer.state.values():
            for k, v in st.items():
                assert not (torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32
                            and k != "step"), f"optimizer state {k} is {v.dtype}, not fp32"
    if isinstance(objective.ema, nn.Module):
        assert not any(p.requires_grad for p in objective.ema.parameters()), "EMA must be frozen"


def check_config(cfg: TrainConfig, objective: Objective, pipe) -> None:
    """Clean errors (and the objective's lr warnings) before anything is built."""
    choices = dict(on_nan=("stop", "skip"), mixed_precision=tuple(PRECISIONS), distributed=("ddp", "fsdp"))
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise ValueError(f"train.{k} must be one of {', '.join(allowed)}, got {getattr(cfg, k)!r}")
    if cfg.frozen_storage not in (None, "float16", "bfloat16"):
        raise ValueError(f"train.frozen_storage must be null, float16 or bfloat16, got {cfg.frozen_storage!r}")
    if cfg.cache and objective.trains_text:
        raise ValueError("train.cache=true stores text embeddings, so it cannot be combined with "
                         "objective.train_text_encoder=true")
    base = {p.dtype for p in pipe.unet.parameters()}
    if cfg.mixed_precision == "no" and base != {torch.float32}:
        raise ValueError(f"the model is in {sorted(map(str, base))}: set train.mixed_precision=bf16 or fp16 "
                         "(the base runs under autocast, trainables stay fp32), or model.dtype=float32")
    if cfg.distributed == "fsdp" and objective.lora is not None:
        raise ValueError("train.distributed=fsdp shards full models (objective.lora=null); LoRA runs use "
                         "train.distributed=ddp (small trainables, the frozen base fits every GPU; docs/fsdp.md)")
    if cfg.distributed == "fsdp" and cfg.mixed_precision == "fp16":
        raise ValueError("train.distributed=fsdp trains in fp32 or bf16: use train.mixed_precision=bf16 "
                         "(fp16 loss scaling over sharded gradients is not supported)")
    objective.check_lr(cfg.lr)


def train(pipe, dataset, cfg: TrainConfig, run_dir: str, objective: Objective,
          logger: runlog.LoggerConfig | None = None, resume=None, config: dict | None = None,
          dist: Dist | None = None, save_base: bool = False, validation: ValidationConfig | None = None,
          optimizer=None) -> dict:
    """Train `objective` on `pipe` and `dataset` (items: image (3,H,W) in [-1,1], caption); returns a
    summary. save_base: also write the frozen base as base.safetensors (a model built from scratch,
    so that sample.py can load it together with a LoRA). The run dir is locked while it runs (a
    second trainer on it is refused; a dead one's stale lock is taken over). validation: None = off;
    optimizer: the factory of each declared optimizer (make_optimizer)."""
    dist = dist or Dist()
    check_config(cfg, objective, pipe)
    with lock.lock_run_dir(run_dir) if dist.rank == 0 else contextlib.nullcontext():
        return _train(pipe, dataset, cfg, run_dir, objective, logger, resume, config, dist, save_base,
                      validation or ValidationConfig(every=0), optimizer)


def _train(pipe, dataset, cfg: TrainConfig, run_dir: str, objective: Objective, logger, resume, config,
           dist: Dist, save_base: bool, vcfg: ValidationConfig, factory) -> dict:
    logger, config = logger or runlog.LoggerConfig(mode="disabled"), config or {}
    root = os.path.join(run_dir, "checkpoints")
    resume_path = checkpoints.resolve_resume(run_dir, resume)
    if (done := checkpoints.finish_completed_run(run_dir, resume_path, cfg.max_steps, write=dist.rank == 0)) is not None:
        return done                                        # resume=true on a finished run: it is complete
    if dist.rank == 0:
        checkpoints.prepare_run_dir(run_dir, fresh=resume_path is None and not resume)
        base = os.path.join(run_dir, "base.safetensors")
        if save_base and objective.lora is not None and not os.path.exists(base):
            save_model_file(base, pipe.unet, pipe.vae, pipe.text, pipe.file_config(),
                               {"prediction_type": pipe.prediction_type})
            runstate.make_readable(base)
    student_call = place(pipe, objective, cfg, dist)
    fsdp = None
    if cfg.distributed == "fsdp" and dist.world > 1:      # sharded networks: gathered for saving and sampling
        from lcm.training import fsdp
    optimizer = make_optimizer(objective, cfg, factory)
    sched = optimizer.schedulers
    amp = PRECISIONS[cfg.mixed_precision]
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp is torch.float16)

    step, run_id = 0, None
    if resume_path is not None:                             # trainables, optimizer, EMA, RNG, step, run id
        step, run_id = runstate.restore_training_state(resume_path, objective.trainables, optimizer, sched, scaler,
                                                 objective.ema, dist.rank, dist.world,
                                                 fsdp and fsdp.load_state(objective, optimizer.single))
        run_id = run_id if resume_path.startswith(os.path.abspath(run_dir)) else None
    check_precision(objective, optimizer)

    logr = None
    if dist.rank == 0:
        runlog.truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), step)
        runlog.write_config(run_dir, config)
        logr = runlog.RunLogger(run_dir, logger, config, run_id)
    B, G = cfg.batch_size, cfg.batch_size * dist.world
    with torch.device("cpu"):                              # DataLoader's base seed is a default-device tensor
        loader = iter(make_loader(dataset, B, cfg.seed, dist.rank, dist.world, step, cfg.num_workers))
    encoder = LatentEncoder(pipe, dist.device, cfg.cache, cfg.vae_chunk, train_text=objective.trains_text)
    meta = {"prediction_type": pipe.prediction_type,       # exported: file names, no directories
            "lcm.train_config": json.dumps(runlog.portable(runlog.redact(config), (run_dir,)))}
    meta |= objective.spec.to_metadata() if objective.spec is not None else {}
    export_name = objective.export_name

    def save(step: int) -> None:
        rngs = [runstate.rng_state()]
        if dist.world > 1:
            rngs = [None] * dist.world
            torch.distributed.all_gather_object(rngs, runstate.rng_state())
        full = fsdp and fsdp.gather_state(objective, optimizer.single)   # FSDP: full tensors on rank 0
        if dist.rank == 0:
            tr, opt, ema = (full.trainables, full.optimizer, full.ema) if full else \
                (objective.trainables, optimizer, objective.ema)
            state = runstate.training_state(step, tr, opt, sched, scaler, ema, rngs, G, logr.run_id)
            export = (lambda p: fsdp.export(objective, p, meta, full.target)) if full else \
                (lambda p: objective.export(p, meta))
            try:
                checkpoints.write_checkpoint(root, step, {runstate.STATE_FILE: lambda p: runstate.save_state(p, state, meta),
                                                 export_name: export},
                                    cfg.keep_checkpoints)
            except OSError as e:                           # e.g. disk full: older checkpoints stay intact
                if step == cfg.max_steps:
                    raise
                log.error("checkpoint at step %d NOT written (%s); training continues", step, e)
        dist.barrier()

    stop = {"sigterm": False}
    from lcm.training.cluster import preempt_signal       # SLURM's pre-timeout signal via submitit (USR2)
    try:
        old_handlers = {s: signal.signal(s, lambda *_: stop.update(sigterm=True))
                        for s in dict.fromkeys((signal.SIGTERM, preempt_signal()))}
    except ValueError:                                     # not the main thread: no handler
        old_handlers = {}
    teacher_rows, prompts, status, saved_at, last_loss = [], None, "done", -1, None
    t0, seen, loss_sum, n_loss, nan_skipped, skipped_samples = time.perf_counter(), 0, 0.0, 0, 0, 0
    try:
        while step < cfg.max_steps:
            batch = next(loader)
            skipped_samples += batch["skipped"]
            gens = step_generators(cfg.seed, step, dist.rank * B, B)
            with objective.step_context(step, cfg.seed):
                with torch.autocast(dist.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    z, cond, uncond = encoder(batch, gens)
                    loss = objective.loss(student_call, z, cond, uncond, gens)[0].mean()
                scaler.scale(loss).backward()              # also at a NaN loss: every rank joins DDP's all-reduce
                grad_norm = optimizer.unscale_clip_(scaler, step, cfg.grad_clip)
                finite = torch.isfinite(loss.detach())     # fp16: inf gradients are the scaler's to skip
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP: a DTensor
                finite = finite if scaler.is_enabled() else finite & torch.isfinite(gn)
                go = finite.new_full((), not stop["sigterm"])       # SIGTERM: every rank stops at the same step
                ok, go = (v > 0 for v in dist.all_min_tensor(torch.stack([finite, go])))   # the step's one host read
            if not ok:                                     # NaN/Inf: stop with the step number, or skip it
                optimizer.zero_grad()
                if scaler.is_enabled():                    # unscale_ ran: reset the scaler's per-step state
                    scaler.update()
                msg = f"non-finite loss or gradient at step {step} (loss={loss.item():.4g})"
                if cfg.on_nan == "stop":
                    raise FloatingPointError(msg + "; nothing was updated. Set train.on_nan=skip to skip such "
                                             "steps, or lower train.lr / use train.mixed_precision=bf16")
                log.warning("%s: step skipped (train.on_nan=skip)", msg)
                nan_skipped, step = nan_skipped + 1, step + 1
                continue
            optimizer.step(scaler, step)                   # the optimizers due at this step (objective.optimizers)
            scaler.update()
            optimizer.zero_grad()
            objective.after_step()                         # theta_minus <- mu theta_minus + (1-mu) theta
            step, seen = step + 1, seen + G
            loss_sum, n_loss = loss_sum + loss.detach(), n_loss + 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:   # log
                mean_loss = (loss_sum / n_loss).reshape(1)
                if dist.world > 1:
                    torch.distributed.all_reduce(mean_loss)
                    mean_loss /= dist.world
                dt = time.perf_counter() - t0
                if dist.rank == 0:
                    metrics = dict(loss=mean_loss.item(), grad_norm=float(grad_norm), lr=optimizer.last_lr(),
                                   samples_per_s=seen / dt, peak_mem_mb=peak_memory_mb(dist.device),
                                   skipped_samples=skipped_samples, nan_skipped=nan_skipped) | objective.metrics()
                    logr.log(metrics, step)
                    last_loss = metrics["loss"]
                    log.info("step %d  loss %.5f  grad %.3g  %.2f samples/s", step, metrics["loss"],
                             metrics["grad_norm"], metrics["samples_per_s"])
                t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0

            pause = time.perf_counter()                    # validation and saving do not count as throughput
            if vcfg.every and (step % vcfg.every == 0 or step == cfg.max_steps):   # validate
                if fsdp:                                   # rank 0 samples with the full networks
                    fsdp.unshard(objective.target, objective.teacher)
                if dist.rank == 0:
                    prompts = prompts or list(vcfg.prompts or first_captions(dataset, 2))
                    rows = validate(pipe, objective, vcfg, prompts, image_size(batch), teacher_rows)
                    path = os.path.join(run_dir, "validation", f"step_{step:07d}.png")
                    save_grid(rows, path, grid_infotext(rows, prompts, vcfg, image_size(batch), step,
                                                        ((config or {}).get("model") or {}).get("path")))
                    logr.image("validation", path, step, " | ".join(lbl for lbl, _ in rows))
                    if vcfg.metrics:                       # FID / CLIP / demo metrics (lcm/evaluation)
                        validation_metrics(pipe, objective, vcfg, prompts, image_size(batch), logr, step, run_dir)
                dist.barrier()
                if fsdp:
                    fsdp.reshard(objective.target, objective.teacher)

            stop_now = not go or (dist.world == 1 and stop["sigterm"])
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
            if fsdp:                                       # sharded: the export just saved at this step
                shutil.copyfile(os.path.join(checkpoints.step_dir(root, step), export_name), tmp)
            else:
                objective.export(tmp, meta)
            runstate.make_readable(tmp)
            os.replace(tmp, os.path.join(run_dir, export_name))
        if status == "done":
            objective.finish()                             # the pipeline keeps what was exported
            if logr is not None:
                logr.summary(dict(final_step=step, final_loss=last_loss, nan_skipped=nan_skipped,
                                  skipped_samples=skipped_samples))
    finally:
        for s, h in old_handlers.items():                  # e.g. submitit's requeue handler
            if h is not None:
                signal.signal(s, h)
        if logr is not None:
            logr.finish()
    return dict(step=step, status=status, run_dir=run_dir, nan_skipped=nan_skipped,
                skipped_samples=skipped_samples, export=os.path.join(run_dir, export_name))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB
