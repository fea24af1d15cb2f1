"""Composition root for sampling: build the pipeline from config, generate, write PNGs.

    python sample.py                       # the bundled demo world, LCM-LoRA, 4 steps
    python sample.py from_png=PATH.png     # regenerate an image from its A1111 "parameters" chunk
    python sample.py --help                # every knob, with its meaning

The work is lcm/sampling/'s: build.py (the pipeline), from_png.py (a PNG's parameters -> this config),
grid.py (the rows: one solver, or solvers x steps), outputs.py (the PNGs, their infotext, the contact
sheet), png.py (PNG files).
"""
import os
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lcm.cli import USER_ERRORS, help_text, preflight_message, run_or_exit
from lcm.sampling import build
from lcm.sampling.from_png import apply_png
from lcm.sampling.grid import plan_rows, prompt_list
from lcm.sampling.outputs import write_rows
from lcm.sampling.png import check_out_dir, load_init_image, read_png

if TYPE_CHECKING:
    from lcm.pipeline import Pipeline

CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def preflight(cfg: DictConfig) -> None:
    """One-line errors before anything is built: a mandatory (???) value unset, CUDA where there is none."""
    from hydra.core.hydra_config import HydraConfig
    if msg := preflight_message(OmegaConf.missing_keys(cfg), HydraConfig.get().runtime.choices.get("model"),
                                cfg.model.device, "model.device=cpu model.dtype=float32"):
        raise ValueError(msg)


def knobs(*, _root_: DictConfig) -> str:
    """Resolver for the --help template (conf/hydra/help/): every knob with its yaml comment."""
    text = help_text(CONF, OmegaConf.to_container(_root_, resolve=False))
    return text.replace("$", "$$")                    # the template then goes through string.Template


def command_line_keys() -> set[str]:
    """The keys given as key=value on this run's command line ('solver' for a group choice)."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def build_pipeline(cfg: DictConfig) -> tuple["Pipeline", list[dict]]:
    """The Pipeline of cfg.model with cfg.lora loaded (and vae.tiny, compile) -> (pipe, loras), loras
    = [{name, path, scale}] in load order (lcm.sampling.build)."""
    loras = build.lora_table(cfg.lora)
    pipe = build.build_pipeline(cfg.model, loras, device=cfg.model.device, tiny=(cfg.get("vae") or {}).get("tiny"),
                                compile=cfg.get("compile", False))
    return pipe, loras


def run(cfg: DictConfig, explicit: set[str] | None = None) -> list[str]:
    """Sample cfg (or regenerate cfg.from_png) and write the PNGs; returns their paths. explicit: the
    keys given on the command line (default: read from Hydra), which win over from_png's values."""
    check_out_dir(cfg.out_dir)
    if cfg.get("from_png"):
        cfg = apply_png(cfg, read_png(cfg.from_png), command_line_keys() if explicit is None else explicit)
    prompts = prompt_list(cfg.prompt if cfg.prompt is not None else cfg.model.prompts, cfg.images_per_prompt)
    pipe, loras = build_pipeline(cfg)
    rows = plan_rows(cfg, pipe, loras, CONF)
    written = write_rows(cfg, pipe, loras, rows, prompts, init=load_init_image(cfg.init_image))
    for p in written:
        print(p)
    return written


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit("sample.py", lambda: (preflight(cfg), run(cfg)), cfg.debug, USER_ERRORS + (MissingMandatoryValue,))


if __name__ == "__main__":
    OmegaConf.register_new_resolver("knobs", knobs)
    main()
