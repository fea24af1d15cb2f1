"""Composition root for evaluation: methods x steps on a prompt set, FID / KID / CLIP score (or the
demo world's metrics), written to the run dir as results.json, results.md and results.png.

    python evaluate.py                       # the bundled demo: LCM-LoRA 1/2/4/8 steps vs the teacher
    python evaluate.py n_prompts=16          # quicker
    python evaluate.py --help                # every knob, with its meaning
    python evaluate.py hydra.run.dir=outputs/evaluate/<run>   # resume a killed run (same overrides)
    python evaluate.py baseline=DDIM         # + each method's paired difference to DDIM, with its interval

Every metric carries a 95% bootstrap interval (lcm/evaluation/stats.py, docs/statistics.md).

The work is the package's: lcm/evaluation/ (metrics, prompt sets, the resumable grid, the report),
lcm/sampling/build.py (the pipeline), lcm/sampling/outputs.py (the kept images' infotext fields).
"""
import hashlib
import os

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue

from lcm.cli import USER_ERRORS, help_text, preflight_message, run_or_exit
from lcm.sampling.build import build_pipeline

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
OPTION_KEYS = ("reference", "inception_weights", "kid_subsets", "kid_subset_size", "clip_model", "clip_pretrained",
               "aesthetic_weights", "aesthetic_clip_pretrained", "aesthetic_clip_model", "demo_evaluator", "demo_n_ref",
               "metric_batch", "fid_bootstrap", "hps_weights", "hps_clip_model", "image_reward_weights",
               "image_reward_med_config", "image_reward_tokenizer", "pickscore_model", "pickscore_processor")
DEMO_METRICS = ("demo_accuracy", "demo_fd", "demo_diversity")   # metrics=null with a model preset that names none
METHOD_KEYS = ("name", "solver", "steps", "guidance_scale", "eta", "spacing", "lora_scales", "teacher", "train_seed")


def preflight(cfg: DictConfig) -> None:
    """One-line errors before anything is built: a mandatory (???) value unset, CUDA where there is none."""
    from hydra.core.hydra_config import HydraConfig
    if msg := preflight_message(OmegaConf.missing_keys(cfg), HydraConfig.get().runtime.choices.get("model"),
                                cfg.model.device, "model.device=cpu model.dtype=float32"):
        raise ValueError(msg)


def knobs(*, _root_: DictConfig) -> str:
    """Resolver for the --help template (conf/hydra/help/evaluate.yaml): every knob with its yaml comment."""
    text = help_text(CONF, OmegaConf.to_container(_root_, resolve=False))
    return text.replace("$", "$$")


def methods_of(items: list) -> list:
    """Method objects from the config's list: preset values (conf/solver/<solver>.yaml) first, the
    method's own keys win."""
    from lcm.evaluation import Method
    from lcm.sampling.samplers import load_preset
    out = []
    for item in items:
        unknown = sorted(set(item) - set(METHOD_KEYS))
        if unknown or "solver" not in item or "steps" not in item:
            raise ValueError(f"methods entry {item}: needs name, solver and steps; allowed keys {', '.join(METHOD_KEYS)}"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        pre = load_preset(CONF, str(item["solver"]))
        steps = item["steps"] if isinstance(item["steps"], list) else [item["steps"]]
        pick = lambda k, d=None: item[k] if item.get(k) is not None else pre.get(k, d)   # noqa: E731
        out.append(Method(name=str(item.get("name") or item["solver"]), solver=pre["name"],
                          steps=[int(s) for s in steps], guidance_scale=float(pick("guidance_scale", 1.0)),
                          eta=pick("eta"), spacing=pick("spacing"), lora_scales=dict(item.get("lora_scales") or {}),
                          teacher=bool(item.get("teacher", False)),
                          train_seed=None if item.get("train_seed") is None else int(item["train_seed"])))
    names = [(m.name, m.train_seed) for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"methods need distinct names (or train_seed), got {[m.name for m in out]}")
    return out


def run(cfg: DictConfig) -> list[dict]:
    """Evaluate cfg's methods x steps, writing the report into the run dir; returns the result rows."""
    from hydra.core.hydra_config import HydraConfig

    from lcm.evaluation import MetricSet, load_plugins, load_prompts, run_grid
    from lcm.evaluation.report import write_report
    from lcm.evaluation.runner import check_grid
    from lcm.evaluation.stats import Bootstrap, compare
    from lcm.sampling.outputs import png_info
    with open_dict(cfg):                              # null: the model preset's evaluation defaults
        ev = cfg.model.get("evaluation") or {}
        cfg.prompts = cfg.prompts if cfg.prompts is not None else ev.get("prompts", "demo")
        cfg.metrics = cfg.metrics if cfg.metrics is not None else ev.get("metrics", DEMO_METRICS)
    metrics = list(cfg.metrics)
    plugins = list(cfg.metric_plugins or []) + list(ev.get("plugins") or [])
    if HydraConfig.get().runtime.choices.get("model") == "demo" or any(m.startswith("demo_") for m in metrics) \
            or cfg.prompts == "demo":
        plugins.append("demo.metrics")                # the demo world's metrics and prompt set
    load_plugins(list(dict.fromkeys(plugins)))
    methods = methods_of(OmegaConf.to_container(cfg.methods, resolve=True))
    prompts = load_prompts(str(cfg.prompts), cfg.n_prompts, int(cfg.seeds_per_prompt), int(cfg.seed))
    options = {k: cfg[k] for k in OPTION_KEYS} | {"device": cfg.model.device}
    out_dir = os.path.abspath(HydraConfig.get().runtime.output_dir)
    ms = MetricSet(metrics, options | {"cache_dir": out_dir}).build()   # weights and references first
    lora = OmegaConf.to_container(cfg.lora, resolve=True) if cfg.lora else []
    pipe = build_pipeline(cfg.model, lora, device=cfg.model.device)
    check_grid(out_dir, dict(model=os.path.abspath(cfg.model.path), dtype=cfg.model.dtype, lora=lora,
                             prompts=hashlib.sha1("\n".join(prompts.prompts).encode()).hexdigest(), n=len(prompts),
                             seed=prompts.seed, height=cfg.height, width=cfg.width))
    config = OmegaConf.to_container(cfg, resolve=True)
    title = f"Evaluation: {os.path.basename(cfg.model.path)}, {len(prompts)} images of prompts={cfg.prompts}"
    if cfg.baseline is not None and cfg.baseline not in [m.name for m in methods]:
        raise ValueError(f"baseline={cfg.baseline!r} names no method; methods: {', '.join(m.name for m in methods)}")
    boot = Bootstrap(int(cfg.bootstrap), int(cfg.bootstrap_seed)) if int(cfg.bootstrap) > 0 else None
    rows = run_grid(pipe, methods, prompts, ms, out_dir, batch_size=int(cfg.batch_size),
                    save_images=bool(cfg.save_images), height=cfg.height, width=cfg.width,
                    on_cell=lambda r: write_report(out_dir, r, config, title, with_plot=False),
                    png_info=png_info(cfg.model.path, pipe, lora) if cfg.save_images else None, boot=boot)
    comparisons = compare(rows, boot, str(cfg.baseline)) if cfg.baseline is not None and boot is not None else None
    for p in write_report(out_dir, rows, config, title, comparisons=comparisons):
        print(p)
    return rows


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit("evaluate.py", lambda: (preflight(cfg), run(cfg)), cfg.debug, USER_ERRORS + (MissingMandatoryValue,))


if __name__ == "__main__":
    OmegaConf.register_new_resolver("knobs", knobs)
    main()
