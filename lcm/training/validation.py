"""Validation during training: grids of the student's sampler (and the teacher's rows) at fixed
prompts and seeds, and evaluation metrics (below)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch
from torch import nn

from lcm.evaluation.metrics import MetricSet, load_plugins
from lcm.evaluation.prompts import PromptSet, load_prompts
from lcm.evaluation.report import markdown
from lcm.evaluation.runner import Method, atomic_write, run_grid
from lcm.sampling import samplers



@contextlib.contextmanager
def sampling(pipe, unet: nn.Module, **components):
    """A view of the pipeline sampling with `unet` in eval mode (its mode restored on exit)."""
    mode = unet.training
    try:
        yield pipe.replace(unet=unet.eval(), **components)
    finally:
        unet.train(mode)


@torch.no_grad()
def validate(pipe, objective, cfg, prompts: list, size: int, teacher_rows: list):
    """Rows of images (N, 3, size, size) in [0,1] with labels; teacher rows are computed once."""
    def grid(p, **kw):
        return torch.cat([p(prompts, seed=int(s) * 1000, height=size, width=size, output="tensor",
                            progress=False, **kw) for s in cfg.val_seeds])
    ddim = dict(solver="ddim", steps=cfg.val_teacher_steps, guidance_scale=cfg.val_teacher_guidance)
    rows, spec = [], objective.spec or pipe.spec
    with sampling(pipe, objective.target, spec=spec) as p, objective.target_ctx():   # EMA, else the student
        if not samplers.get(objective.sampler).few_step:    # a diffusion objective: DDIM at the teacher's CFG
            rows.append((f"ddim {cfg.val_teacher_steps} s={cfg.val_teacher_guidance}", grid(p, **ddim)))
        else:
            guidance = cfg.val_guidance or ([1.0, 1.5] if objective.lora_name else [8.5])
            rows += [(f"{objective.sampler} {n} s={s}",
                      grid(p, solver=objective.sampler, steps=int(n), guidance_scale=float(s)))
                     for s in guidance for n in cfg.val_steps]
    if not teacher_rows and objective.teacher is not None:
        with sampling(pipe, objective.teacher) as p, objective.teacher_ctx():
            teacher_rows.append((f"teacher ddim {cfg.val_teacher_steps} s={cfg.val_teacher_guidance}",
                                 grid(p, **ddim)))
    return rows + teacher_rows


def grid_infotext(rows: list, prompts: list, cfg, size: int, step: int, model: str | None) -> str:
    """A1111 infotext of a validation grid (lcm/sampling/infotext.py): its first row's settings, every row's label,
    the prompts and seeds of its columns, the training step; the model by file name only."""
    from lcm.sampling.infotext import format_infotext, stem
    solver, steps, s = rows[0][0].removeprefix("teacher ").split()
    return format_infotext({"prompt": prompts[0], "Steps": int(steps), "Sampler": samplers.get(solver).a1111,
                            "CFG scale": float(s.removeprefix("s=")), "Seed": int(cfg.val_seeds[0]) * 1000,
                            "Size": f"{size}x{size}", "Model": stem(model) if model else None,
                            "Grid rows": " | ".join(lbl for lbl, _ in rows),
                            "Grid columns": " | ".join(f"seed {int(v) * 1000} {p}" for v in cfg.val_seeds for p in prompts),
                            "Training step": step})


def save_grid(rows: list, path: str, infotext: str | None = None) -> None:
    """Rows of images as one PNG (with an A1111 "parameters" chunk when given)."""
    from PIL import Image, PngImagePlugin
    img = torch.cat([torch.cat(list(r), dim=2) for _, r in rows], dim=1)   # (3, rows*H, cols*W)
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    Image.fromarray(arr).save(path, pnginfo=info)


#----------------------------------------------------------------------------
# Evaluation metrics during training (train.val_metrics): the student's (EMA target's) sampler at
# train.val_steps on a small prompt set, every validate_every steps, logged as scalars
# `val/<metric>_<n>steps` in metrics.jsonl / wandb, a wandb table, and validation/metrics_step_N.md.
#
#     train.val_metrics=[demo_accuracy,demo_fd]                       # the demo world (cheap)
#     train.val_metrics=[fid,clip_score] train.val_metric_options="{reference: /data/val_imgs,
#         inception_weights: /w/pt_inception-2015-12-05-6726825d.pth, clip_pretrained: /w/open_clip_pytorch_model.bin}"
#
# val_metric_options: plugins (modules registering metrics, e.g. [demo.metrics]), prompts (a .txt /
# .jsonl / registered set; null: the validation prompts), n_prompts, seeds_per_prompt, seed,
# batch_size, guidance (null: 1.0 for LoRAs, the first val_guidance otherwise), and the metrics'
# own options (as in conf/evaluate.yaml).
_SETS: dict[str, MetricSet] = {}                     # built once per process (weights, references)


def metric_set(names: list[str], options: dict) -> MetricSet:
    load_plugins(options.get("plugins"))
    key = json.dumps([list(names), options], sort_keys=True, default=str)
    if key not in _SETS:
        _SETS[key] = MetricSet(list(names), {k: v for k, v in options.items() if k != "plugins"}).build()
    return _SETS[key]


def validation_metrics(pipe, objective, cfg, prompts: list[str], size: int, logger=None, step: int = 0,
                       run_dir: str | None = None) -> tuple[dict, list[dict]]:
    """({'val/<metric>_<n>steps': value}, table rows) for the objective's sampler at cfg.val_steps."""
    opts = dict(getattr(cfg, "val_metric_options", None) or {})
    if run_dir:
        opts.setdefault("cache_dir", os.path.join(run_dir, "validation"))
    opts.setdefault("device", str(getattr(pipe, "device", "cpu")))
    ms = metric_set(list(cfg.val_metrics), opts)
    src = opts.get("prompts")
    ps = (load_prompts(src, opts.get("n_prompts"), int(opts.get("seeds_per_prompt", 1)), int(opts.get("seed", 0)))
          if src else PromptSet(tuple(p for p in prompts for _ in range(int(opts.get("seeds_per_prompt", 1)))),
                                int(opts.get("seed", 0))))
    if not samplers.get(objective.sampler).few_step:  # a diffusion objective: its own DDIM at the teacher's CFG
        method = Method("ddim", "ddim", [cfg.val_teacher_steps], float(cfg.val_teacher_guidance))
    else:
        s = opts.get("guidance") or (cfg.val_guidance or ([1.0] if objective.lora_name else [8.5]))[0]
        method = Method(objective.sampler, objective.sampler, [int(n) for n in cfg.val_steps], float(s))
    spec = objective.spec or pipe.spec
    with sampling(pipe, objective.target, spec=spec) as p, objective.target_ctx(), \
            tempfile.TemporaryDirectory(prefix="lcm-val-") as tmp:
        rows = run_grid(p, [method], ps, ms, tmp, batch_size=int(opts.get("batch_size", 64)), height=size,
                        width=size, progress=False)
    skip = ("method", "solver", "steps", "guidance_scale", "eta", "spacing", "lora_scales", "n_images")
    scalars = {f"val/{k}_{r['steps']}steps": v for r in rows for k, v in r.items()
               if k not in skip and isinstance(v, (int, float))}
    if logger is not None:
        logger.log(scalars, step)
        if getattr(logger, "wandb", None) is not None:
            import wandb
            cols = list(dict.fromkeys(k for r in rows for k in r if k != "lora_scales"))
            logger.wandb.log({"step": step, "val/metrics": wandb.Table(
                columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
    if run_dir:
        path = os.path.join(run_dir, "validation", f"metrics_step_{step:07d}.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = markdown(rows, f"Validation metrics, step {step}")

        def write(q):
            with open(q, "w") as f:
                f.write(text)
        atomic_write(path, write)
    return scalars, rows
