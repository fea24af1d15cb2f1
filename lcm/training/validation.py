"""Validation during training: grids of the student's sampler (and the teacher's rows) at fixed
prompts and seeds, and evaluation metrics (below)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from lcm.evaluation.metrics import MetricSet, load_plugins
from lcm.evaluation.prompts import PromptSet, load_prompts
from lcm.evaluation.report import markdown
from lcm.evaluation.runner import Method, atomic_write, run_grid
from lcm.sampling import samplers


@dataclass
class ValidationConfig:
    """cfg.validation: what validation samples, when (conf/validation/default.yaml)."""
    every: int = 200                    # steps between validations (and at the end); 0: never
    prompts: list | None = None         # null: the model preset's prompts, else the first dataset captions
    seeds: list = field(default_factory=lambda: [0])
    steps: list = field(default_factory=lambda: [1, 2, 4, 8])
    guidance: list | None = None        # null: the objective's (LoRA [1.0, 1.5], full LCM [8.5])
    teacher_steps: int = 25             # the teacher's DDIM row (and a diffusion objective's own)
    teacher_guidance: float = 7.5
    metrics: list = field(default_factory=list)          # metric names (lcm/evaluation); []: off
    metric_options: dict = field(default_factory=dict)   # their options (below)


@contextlib.contextmanager
def sampling(pipe, unet: nn.Module, **components):
    """A view of the pipeline sampling with `unet` in eval mode (its mode restored on exit)."""
    mode = unet.training
    try:
        yield pipe.replace(unet=unet.eval(), **components)
    finally:
        unet.train(mode)


@torch.no_grad()
def validate(pipe, objective, v: ValidationConfig, prompts: list, size: int, teacher_rows: list):
    """Rows of images (N, 3, size, size) in [0,1] with labels: the objective's validation runs on its
    target, then the teacher's DDIM row (computed once)."""
    def grid(p, **kw):
        return torch.cat([p(prompts, seed=int(s) * 1000, height=size, width=size, output="tensor",
                            progress=False, **kw) for s in v.seeds])
    rows, spec = [], objective.spec or pipe.spec
    with sampling(pipe, objective.target, spec=spec) as p, objective.target_ctx():   # EMA, else the student
        rows += [(f"{solver} {n} s={s}", grid(p, solver=solver, steps=n, guidance_scale=s))
                 for solver, n, s in objective.validation_runs(v)]
    if not teacher_rows and objective.teacher is not None:
        with sampling(pipe, objective.teacher) as p, objective.teacher_ctx():
            teacher_rows.append((f"teacher ddim {v.teacher_steps} s={v.teacher_guidance}",
                                 grid(p, solver="ddim", steps=v.teacher_steps, guidance_scale=v.teacher_guidance)))
    return rows + teacher_rows


def grid_infotext(rows: list, prompts: list, v: ValidationConfig, size: int, step: int, model: str | None) -> str:
    """A1111 infotext of a validation grid (lcm/sampling/infotext.py): its first row's settings, every row's label,
    the prompts and seeds of its columns, the training step; the model by file name only."""
    from lcm.sampling.infotext import format_infotext, stem
    solver, steps, s = rows[0][0].removeprefix("teacher ").split()
    return format_infotext({"prompt": prompts[0], "Steps": int(steps), "Sampler": samplers.get(solver).a1111,
                            "CFG scale": float(s.removeprefix("s=")), "Seed": int(v.seeds[0]) * 1000,
                            "Size": f"{size}x{size}", "Model": stem(model) if model else None,
                            "Grid rows": " | ".join(lbl for lbl, _ in rows),
                            "Grid columns": " | ".join(f"seed {int(sd) * 1000} {p}" for sd in v.seeds for p in prompts),
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
# Evaluation metrics during training (validation.metrics): the student's (EMA target's) sampler at
# validation.steps on a small prompt set, every validation.every steps, logged as scalars
# `val/<metric>_<n>steps` in metrics.jsonl / wandb, a wandb table, and validation/metrics_step_N.md.
#
#     validation.metrics=[demo_accuracy,demo_fd]                       # the demo world (cheap)
#     validation.metrics=[fid,clip_score] validation.metric_options="{reference: /data/val_imgs,
#         inception_weights: /w/pt_inception-2015-12-05-6726825d.pth, clip_pretrained: /w/open_clip_pytorch_model.bin}"
#
# metric_options: plugins (modules registering metrics, e.g. [demo.metrics]), prompts (a .txt /
# .jsonl / registered set; null: the validation prompts), n_prompts, seeds_per_prompt, seed,
# batch_size, guidance (null: the first guidance of the objective's validation runs), and the metrics'
# own options (as in conf/evaluate.yaml).
_SETS: dict[str, MetricSet] = {}                     # built once per process (weights, references)


def metric_set(names: list[str], options: dict) -> MetricSet:
    load_plugins(options.get("plugins"))
    key = json.dumps([list(names), options], sort_keys=True, default=str)
    if key not in _SETS:
        _SETS[key] = MetricSet(list(names), {k: v for k, v in options.items() if k != "plugins"}).build()
    return _SETS[key]


def validation_metrics(pipe, objective, v: ValidationConfig, prompts: list[str], size: int, logger=None,
                       step: int = 0, run_dir: str | None = None) -> tuple[dict, list[dict]]:
    """({'val/<metric>_<n>steps': value}, table rows) for the objective's validation runs at their first
    guidance scale (metric_options.guidance overrides it)."""
    opts = dict(v.metric_options or {})
    if run_dir:
        opts.setdefault("cache_dir", os.path.join(run_dir, "validation"))
    opts.setdefault("device", str(getattr(pipe, "device", "cpu")))
    ms = metric_set(list(v.metrics), opts)
    src = opts.get("prompts")
    ps = (load_prompts(src, opts.get("n_prompts"), int(opts.get("seeds_per_prompt", 1)), int(opts.get("seed", 0)))
          if src else PromptSet(tuple(p for p in prompts for _ in range(int(opts.get("seeds_per_prompt", 1)))),
                                int(opts.get("seed", 0))))
    runs = objective.validation_runs(v)
    solver, s = runs[0][0], runs[0][2]
    method = Method(solver, solver, [n for sv, n, g in runs if (sv, g) == (solver, s)], float(opts.get("guidance") or s))
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
