"""Composition root for sampling: build the pipeline from config, generate, write PNGs.

    python sample.py                       # the bundled demo world, LCM-LoRA, 4 steps
    python sample.py --help                # every knob, with its meaning
"""
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lcm.cli import cuda_message, help_text, missing_value_message

log = logging.getLogger("sample")
DTYPES = ("float32", "float16", "bfloat16")
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def preflight(cfg: DictConfig) -> None:
    """One-line errors before anything is built: a mandatory (???) value unset, CUDA where there is none."""
    from hydra.core.hydra_config import HydraConfig
    missing = sorted(OmegaConf.missing_keys(cfg), key=lambda k: (k != "model.path", k))
    if missing:
        raise ValueError(missing_value_message(missing[0], HydraConfig.get().runtime.choices.get("model")))
    if msg := cuda_message(cfg.model.device, "model.device=cpu model.dtype=float32"):
        raise ValueError(msg)


def knobs(*, _root_: DictConfig) -> str:
    """Resolver for the --help template (conf/hydra/help/): every knob with its yaml comment."""
    text = help_text(CONF, OmegaConf.to_container(_root_, resolve=False))
    return text.replace("$", "$$")                    # the template then goes through string.Template


def build_pipeline(cfg: DictConfig):
    import torch

    from lcm.pipeline import Pipeline
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}")
    pipe = Pipeline.from_checkpoint(cfg.model.path, device=cfg.model.device,
                                    dtype=getattr(torch, cfg.model.dtype),
                                    prediction_type=cfg.model.prediction_type)
    pipe.load_loras(OmegaConf.to_container(cfg.lora, resolve=True) if cfg.lora else [])
    if cfg.get("compile", False):
        pipe.compile()
    return pipe


def free_path(out_dir: str, stem: str) -> str:
    """Reserve a new file name in out_dir, `stem-NNN.png`: the file is created empty and exclusively
    (O_EXCL), so two processes writing into one folder never get the same name; taken names are
    skipped. The caller writes the image into it (save_png, or PIL's save)."""
    i = 0
    while True:
        path = os.path.join(out_dir, f"{stem}-{i:03d}.png")
        try:
            with open(path, "xb"):                    # atomic: fails if anyone (any process) has the name
                return path
        except FileExistsError:
            i += 1


def save_png(img, path: str, params: dict) -> None:
    """Write img as PNG with its parameters, into a fresh path or one free_path reserved (empty);
    an existing non-empty file is never overwritten."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()                   # A1111-style "parameters" text chunk
    text = f"{params.pop('prompt')}\n" + ", ".join(f"{k}: {v}" for k, v in params.items())
    info.add_text("parameters", text)
    try:
        f = open(path, "xb")
    except FileExistsError:
        f = open(path, "r+b")                         # no truncation: checked empty (reserved) first
        if os.fstat(f.fileno()).st_size:
            f.close()
            raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
    with f:
        img.save(f, format="PNG", pnginfo=info)


def run(cfg: DictConfig) -> list[str]:
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"out_dir={cfg.out_dir} exists and is a file; choose a folder")
    prompts = cfg.prompt if cfg.prompt is not None else cfg.model.prompts
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = [p for p in prompts for _ in range(int(cfg.images_per_prompt))]
    pipe = build_pipeline(cfg)
    if "lcm" in (cfg.grid or {}).get("solvers", [cfg.solver.name]):
        sp = pipe.spec                               # the active LCM-style adapter's, else the model's own
        log.info("LCM spec: %d-point grid (k = %d), sigma_data %g, timestep_scaling %g", sp.num_ddim_timesteps,
                 pipe.schedule.T // sp.num_ddim_timesteps, sp.sigma_data, sp.timestep_scaling)
    grid = cfg.grid or {"solvers": [cfg.solver.name], "steps": [cfg.steps]}
    init = None
    if cfg.init_image is not None:
        from PIL import Image
        if not os.path.isfile(cfg.init_image):
            raise FileNotFoundError(f"init_image not found: {cfg.init_image}")
        try:
            init = Image.open(cfg.init_image).convert("RGB")
        except Image.DecompressionBombError as e:      # not an OSError: would be a traceback
            raise ValueError(f"init_image={cfg.init_image}: {e}") from None
    os.makedirs(cfg.out_dir, exist_ok=True)
    written, rows = [], []
    for solver in grid["solvers"]:
        for steps in grid["steps"]:
            s = cfg.guidance_scale if cfg.grid is None else (1.0 if solver == "lcm" else 7.5)
            images = pipe(prompts, negative_prompt=cfg.negative_prompt, steps=int(steps),
                          guidance_scale=float(s), solver=solver, timesteps=cfg.timesteps,
                          height=cfg.height, width=cfg.width, seed=int(cfg.seed), init_image=init,
                          strength=float(cfg.strength) if init is not None else 1.0)
            rows.append(images)
            for i, (p, img) in enumerate(zip(prompts, images)):
                params = dict(prompt=p, negative_prompt=cfg.negative_prompt, solver=solver,
                              steps=steps, guidance_scale=s, seed=int(cfg.seed) + i,
                              size=f"{img.width}x{img.height}", model=os.path.basename(cfg.model.path),
                              lora=OmegaConf.to_container(cfg.lora, resolve=True) if cfg.lora else None)
                path = free_path(cfg.out_dir, f"{solver}-{steps}steps-seed{int(cfg.seed) + i}")
                save_png(img, path, params)
                written.append(path)
    if len(rows) > 1 or len(prompts) > 1:
        path = free_path(cfg.out_dir, "grid")
        contact_sheet(rows).save(path)
        written.append(path)
    for p in written:
        print(p)
    return written


def contact_sheet(rows):
    """Rows of PIL images -> one image (a row per solver/steps setting)."""
    from PIL import Image
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            sheet.paste(img, (c * w, r * h))
    return sheet


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        preflight(cfg)
        run(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError, OSError, MissingMandatoryValue) as e:
        if cfg.debug:
            raise
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        print(f"sample.py: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    OmegaConf.register_new_resolver("knobs", knobs)
    main()
