"""Evaluation metrics during training (train.val_metrics): the student's (EMA target's) sampler at
train.val_steps on a small prompt set, every validate_every steps, logged as scalars
`val/<metric>_<n>steps` in metrics.jsonl / wandb, a wandb table, and validation/metrics_step_N.md.

    train.val_metrics=[demo_accuracy,demo_fd]                       # the demo world (cheap)
    train.val_metrics=[fid,clip_score] train.val_metric_options="{reference: /data/val_imgs,
        inception_weights: /w/pt_inception-2015-12-05-6726825d.pth, clip_pretrained: /w/open_clip_pytorch_model.bin}"

val_metric_options: plugins (modules registering metrics, e.g. [demo.metrics]), prompts (a .txt /
.jsonl / registered set; null: the validation prompts), n_prompts, seeds_per_prompt, seed,
batch_size, guidance (null: 1.0 for LoRAs, the first val_guidance otherwise), and the metrics'
own options (as in conf/evaluate.yaml).
"""
from __future__ import annotations

import json
import os
import tempfile

from lcm.evaluation.metrics import MetricSet, load_plugins
from lcm.evaluation.prompts import PromptSet, load_prompts
from lcm.evaluation.report import markdown
from lcm.evaluation.runner import Method, atomic_write, run_grid

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
    from lcm.trainer import sampling                  # the trainer's eval-mode view (no import cycle at load)
    opts = dict(getattr(cfg, "val_metric_options", None) or {})
    if run_dir:
        opts.setdefault("cache_dir", os.path.join(run_dir, "validation"))
    opts.setdefault("device", str(getattr(pipe, "device", "cpu")))
    ms = metric_set(list(cfg.val_metrics), opts)
    src = opts.get("prompts")
    ps = (load_prompts(src, opts.get("n_prompts"), int(opts.get("seeds_per_prompt", 1)), int(opts.get("seed", 0)))
          if src else PromptSet(tuple(p for p in prompts for _ in range(int(opts.get("seeds_per_prompt", 1)))),
                                int(opts.get("seed", 0))))
    if objective.sampler == "ddim":                   # a diffusion objective: its own DDIM at the teacher's CFG
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
