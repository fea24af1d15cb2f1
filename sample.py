"""Composition root for sampling: build the pipeline from config, generate, write PNGs.

    python sample.py                       # the bundled demo world, LCM-LoRA, 4 steps
    python sample.py from_png=PATH.png     # regenerate an image from its A1111 "parameters" chunk
    python sample.py --help                # every knob, with its meaning
"""
import copy
import json
import logging
import os
from dataclasses import dataclass

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lcm.cli import USER_ERRORS, help_text, preflight_message, run_or_exit
from lcm.sampling import infotext, samplers

log = logging.getLogger("sample")
DTYPES = ("float32", "float16", "bfloat16")
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


def lora_entries(cfg: DictConfig) -> list[dict]:
    """cfg.lora as [{path, name?, scale?}] dicts (a bare path is {path})."""
    items = OmegaConf.to_container(cfg.lora, resolve=True) if cfg.lora else []
    return [{"path": it} if isinstance(it, str) else dict(it) for it in items]


def build_pipeline(cfg: DictConfig):
    """The Pipeline of cfg.model with cfg.lora loaded (and vae.tiny, compile) -> (pipe, loras), loras
    = [{name, path, scale}] in load order."""
    import torch

    from lcm.pipeline import Pipeline
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {cfg.model.dtype!r}")
    tiny = (cfg.get("vae") or {}).get("tiny")
    if tiny is not None and not os.path.isfile(tiny):
        raise FileNotFoundError(f"vae.tiny not found: {tiny}")
    pipe = Pipeline.from_checkpoint(cfg.model.path, device=cfg.model.device,
                                    dtype=getattr(torch, cfg.model.dtype),
                                    prediction_type=cfg.model.prediction_type)
    entries = lora_entries(cfg)
    names = pipe.load_loras(entries)
    loras = [{"name": n, "path": e["path"], "scale": float(e.get("scale", 1.0))} for n, e in zip(names, entries)]
    if tiny is not None:
        pipe.load_tiny_vae(tiny)
        log.info("decoding with the tiny VAE %s", tiny)
    if cfg.get("compile", False):
        pipe.compile()
    return pipe, loras


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


def save_png(img, path: str, params: dict | str) -> None:
    """Write img as PNG with its A1111 infotext (a string, or a params dict for format_infotext) in the
    "parameters" text chunk, into a fresh path or one free_path reserved (empty); an existing
    non-empty file is never overwritten."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params if isinstance(params, str) else infotext.format_infotext(params))
    try:
        f = open(path, "xb")
    except FileExistsError:
        f = open(path, "r+b")                         # no truncation: checked empty (reserved) first
        if os.fstat(f.fileno()).st_size:
            f.close()
            raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
    with f:
        img.save(f, format="PNG", pnginfo=info)

#----------------------------------------------------------------------------
# from_png: the parameters of a PNG this script wrote -> the config that regenerates it.

def read_png(path: str) -> dict:
    """A PNG's "parameters" chunk, parsed (lcm.sampling.infotext.parse_infotext); one-line errors."""
    from PIL import Image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_png not found: {path}")
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("parameters")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"from_png={path}: not a readable image ({e})") from None
    if not text:
        raise ValueError(f"from_png={path} has no A1111 'parameters' text chunk (was it written by sample.py?)")
    info = infotext.parse_infotext(text)
    if "Grid rows" in info:
        raise ValueError(f"from_png={path} is a grid image; pass one of its cells' PNGs instead")
    if "Steps" not in info or "Seed" not in info:
        raise ValueError(f"from_png={path}: its parameters have no Steps/Seed line")
    return info


def png_solver(info: dict) -> str:
    """Our solver name from the PNG's `Solver:` field, else from A1111's sampler name."""
    if "Solver" in info:
        return info["Solver"]
    sampler = samplers.by_a1111(info.get("Sampler"))
    if sampler is None:
        raise ValueError(f"from_png: sampler {info.get('Sampler')!r} is not one this project runs "
                         f"({', '.join(s.a1111 for s in samplers.SAMPLERS.values())})")
    return sampler.name


def match_lora(name: str, entries: list[dict]) -> int | None:
    """Index of the config LoRA entry a PNG's <lora:name:w> means: by file stem, else by adapter name."""
    for key in (lambda e: infotext.stem(e["path"]), lambda e: e.get("name")):
        hits = [i for i, e in enumerate(entries) if key(e) == name]
        if hits:
            return hits[0]
    return None


def apply_png(cfg: DictConfig, info: dict, explicit: set[str]) -> DictConfig:
    """A copy of cfg set to regenerate the PNG described by `info`; keys in `explicit` (given on the
    command line) keep their value (rule: conf/sample.yaml, from_png)."""
    cfg = copy.deepcopy(cfg)
    given = lambda *keys: any(k in explicit for k in keys)                       # noqa: E731
    if not given("prompt"):
        cfg.prompt = info["prompt"]
    if not given("negative_prompt"):
        cfg.negative_prompt = info["negative_prompt"]
    if not given("seed"):
        cfg.seed = int(info["Seed"])
    if not given("images_per_prompt"):
        cfg.images_per_prompt = 1
    if "Size" in info and not given("height", "width"):
        w, h = (int(v) for v in info["Size"].split("x"))
        cfg.width, cfg.height = w, h
    solver = png_solver(info)
    if not given("solver", "solver.name") or cfg.solver.name == solver:     # its settings come along
        cfg.solver.name = solver
        if not given("steps", "solver.steps", "timesteps"):
            cfg.steps = int(info["Steps"])
            cfg.timesteps = json.loads(info["Timesteps"]) if "Timesteps" in info else None
        if not given("guidance_scale", "solver.guidance_scale"):
            cfg.guidance_scale = float(info["CFG scale"])
        if not given("solver.eta"):
            cfg.solver.eta = float(info["Eta"]) if "Eta" in info else None
        if not given("solver.spacing"):
            cfg.solver.spacing = info.get("Spacing")
    if "Denoising strength" in info:
        if not given("strength"):
            cfg.strength = float(info["Denoising strength"])
        if cfg.init_image is None:
            raise ValueError(f"from_png: the PNG is img2img from {info.get('Init image', 'an init image')}; "
                             "pass init_image=PATH")
    if not given("vae.tiny"):
        if "VAE" in info and not (cfg.get("vae") or {}).get("tiny"):
            raise ValueError(f"from_png: the PNG was decoded with the tiny VAE {info['VAE']}; pass vae.tiny=PATH")
        if "VAE" not in info and cfg.get("vae") is not None:
            cfg.vae.tiny = None
    if cfg.get("vae") and cfg.vae.tiny and "VAE" in info and os.path.basename(cfg.vae.tiny) != info["VAE"]:
        log.warning("from_png: the PNG was decoded with %s, this run uses vae.tiny=%s", info["VAE"], cfg.vae.tiny)
    cfg.lora = png_loras(info["loras"], lora_entries(cfg), given("lora", "model.lora"))
    model_hash = info.get("Model hash")
    if model_hash and infotext.short_hash(cfg.model.path) != model_hash:
        log.warning("from_png: the PNG was made with model %s (hash %s); model.path=%s has hash %s: the image "
                    "will differ", info.get("Model"), model_hash, cfg.model.path, infotext.short_hash(cfg.model.path))
    return cfg


def png_loras(wanted: list, entries: list[dict], explicit: bool) -> list[dict]:
    """The config's LoRA entries with the PNG's weights: each LoRA the PNG names must be in the list
    (else a one-line error) and runs at the PNG's weight; one it does not name was off (scale 0). A
    `scale` written in a command-line lora entry (explicit) wins over both."""
    entries = [dict(e) for e in entries]
    keep = {i for i, e in enumerate(entries) if explicit and "scale" in e}
    for e in entries:
        e["scale"] = float(e.get("scale", 1.0))
    weights = {}
    for name, weight, h in wanted:
        i = match_lora(name, entries)
        if i is None:
            raise ValueError(f"from_png: the PNG uses LoRA {name!r}" + (f" (hash {h})" if h else "")
                             + f", which is not in this config's lora list; pass lora=[..., /path/to/{name}.safetensors]")
        weights[i] = float(weight)
        if h and infotext.lora_hash(entries[i]["path"]) != h:
            log.warning("from_png: LoRA %s has hash %s, the PNG's has %s: the image will differ",
                        entries[i]["path"], infotext.lora_hash(entries[i]["path"]), h)
    for i, e in enumerate(entries):
        if i not in keep:
            e["scale"] = weights.get(i, 0.0)
    return entries

#----------------------------------------------------------------------------
# Rows: one (solver, steps) setting each. A grid is fair: solvers that are not LCM-style run as the
# teacher (LCM-style adapters at 0, style LoRAs kept, their preset's CFG / eta / spacing).

@dataclass
class Row:
    solver: str
    steps: int
    guidance_scale: float
    eta: float | None
    spacing: str | None
    scales: dict          # adapter name -> scale for this row
    teacher: bool         # LCM-style adapters switched off


def solver_preset(solver: str) -> dict:
    """guidance_scale / eta / spacing of the solver's preset, conf/solver/<solver>.yaml."""
    p = samplers.load_preset(CONF, solver)
    return dict(guidance_scale=float(p["guidance_scale"]), eta=p.get("eta"), spacing=p.get("spacing"))


def plan_rows(cfg: DictConfig, pipe, loras: list[dict]) -> list[Row]:
    """The rows to sample: the configured solver alone, or the grid's solvers x steps."""
    base = {lo["name"]: lo["scale"] for lo in loras}
    own = dict(guidance_scale=float(cfg.guidance_scale), eta=cfg.solver.get("eta"), spacing=cfg.solver.get("spacing"))
    if cfg.grid is None:
        steps = int(cfg.steps) if cfg.timesteps is None else len(cfg.timesteps)   # explicit timesteps win
        return [Row(cfg.solver.name, steps, **own, scales=base, teacher=False)]
    if cfg.timesteps is not None:
        raise ValueError("timesteps= and grid= conflict: the grid sets the steps of each row; drop timesteps")
    lcm_style = {n for n in base if pipe.is_lcm_style(n)}
    rows = []
    for solver in cfg.grid["solvers"]:
        teacher = not samplers.get(solver).few_step
        scales = {n: (0.0 if teacher and n in lcm_style else s) for n, s in base.items()}
        preset = own if solver == cfg.solver.name else solver_preset(solver)
        rows += [Row(solver, int(steps), **preset, scales=scales, teacher=teacher and bool(lcm_style))
                 for steps in cfg.grid["steps"]]
    return rows


def nfe(pipe, row: Row) -> int:
    """UNet evaluations per image: steps x solver order (singlestep DPM-Solver-2: 2) x 2 with CFG."""
    cfg_passes = 2 if row.guidance_scale != 1.0 and not pipe.is_full_lcm else 1
    return row.steps * samplers.get(row.solver).nfe_per_step * cfg_passes


def row_label(pipe, row: Row) -> str:
    """The grid's left-margin label of a row."""
    return "\n".join([row.solver, f"{row.steps} step" + ("s" if row.steps != 1 else ""), f"NFE {nfe(pipe, row)}",
                      f"CFG {infotext.number(row.guidance_scale)}"] + (["no LCM-LoRA"] if row.teacher else []))


def image_params(cfg: DictConfig, pipe, loras: list[dict], row: Row, prompt: str, seed: int,
                 size: tuple[int, int], batch: tuple[int, int]) -> dict:
    """The A1111 infotext fields of one image (lcm.sampling.infotext.format_infotext); names, never paths."""
    tiny = (cfg.get("vae") or {}).get("tiny")
    eta = row.eta
    if eta is None:
        eta = samplers.get(row.solver).eta
    p = {"prompt": prompt, "negative_prompt": cfg.negative_prompt,
         "Steps": row.steps, "Sampler": samplers.get(row.solver).a1111,
         "CFG scale": row.guidance_scale, "Seed": seed, "Size": f"{size[0]}x{size[1]}",
         "Model hash": infotext.short_hash(cfg.model.path), "Model": infotext.stem(cfg.model.path),
         "VAE hash": infotext.short_hash(tiny) if tiny else None, "VAE": os.path.basename(tiny) if tiny else None,
         "Batch size": batch[0] if batch[0] > 1 else None, "Batch pos": batch[1] if batch[0] > 1 else None}
    if cfg.init_image is not None:
        p |= {"Denoising strength": float(cfg.strength), "Init image": os.path.basename(cfg.init_image)}
    p["loras"] = [(infotext.stem(lo["path"]), row.scales[lo["name"]], infotext.lora_hash(lo["path"]))
                  for lo in loras if row.scales[lo["name"]] != 0.0]
    p |= {"Solver": row.solver, "Eta": eta, "Spacing": row.spacing,
          "Timesteps": list(cfg.timesteps) if cfg.timesteps is not None and cfg.grid is None else None}
    if samplers.get(row.solver).few_step:           # the consistency spec the sampler used
        sp = pipe.spec
        p |= {"LCM grid": sp.num_ddim_timesteps, "LCM k": pipe.schedule.T // sp.num_ddim_timesteps,
              "LCM sigma_data": sp.sigma_data, "LCM timestep_scaling": sp.timestep_scaling,
              "LCM objective": sp.objective if sp.objective != "lcm" else None, "LCM phases": sp.phases}
    return p

#----------------------------------------------------------------------------

def run(cfg: DictConfig, explicit: set[str] | None = None) -> list[str]:
    """Sample cfg (or regenerate cfg.from_png) and write the PNGs; returns their paths. explicit: the
    keys given on the command line (default: read from Hydra), which win over from_png's values."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"out_dir={cfg.out_dir} exists and is a file; choose a folder")
    if cfg.get("from_png"):
        cfg = apply_png(cfg, read_png(cfg.from_png), command_line_keys() if explicit is None else explicit)
    prompts = cfg.prompt if cfg.prompt is not None else cfg.model.prompts
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts = [p for p in prompts for _ in range(int(cfg.images_per_prompt))]
    pipe, loras = build_pipeline(cfg)
    if "lcm" in (cfg.grid or {}).get("solvers", [cfg.solver.name]):
        sp = pipe.spec                               # the active LCM-style adapter's, else the model's own
        log.info("LCM spec: %d-point grid (k = %d), sigma_data %g, timestep_scaling %g", sp.num_ddim_timesteps,
                 pipe.schedule.T // sp.num_ddim_timesteps, sp.sigma_data, sp.timestep_scaling)
    rows = plan_rows(cfg, pipe, loras)
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
    written, sheet, first = [], [], None
    base = {lo["name"]: lo["scale"] for lo in loras}
    try:
        for row in rows:
            if loras:
                pipe.set_lora_scales(row.scales)
            images = pipe(prompts, negative_prompt=cfg.negative_prompt, steps=row.steps,
                          guidance_scale=row.guidance_scale, solver=row.solver,
                          timesteps=cfg.timesteps if cfg.grid is None else None, height=cfg.height,
                          width=cfg.width, seed=int(cfg.seed), init_image=init, eta=row.eta, spacing=row.spacing,
                          strength=float(cfg.strength) if init is not None else 1.0)
            sheet.append(images)
            for i, (p, img) in enumerate(zip(prompts, images)):
                params = image_params(cfg, pipe, loras, row, p, int(cfg.seed) + i, img.size, (len(prompts), i))
                first = first or params
                path = free_path(cfg.out_dir, f"{row.solver}-{row.steps}steps-seed{int(cfg.seed) + i}")
                save_png(img, path, params)
                written.append(path)
    finally:
        if loras:
            pipe.set_lora_scales(base)                # the adapters as configured, after any grid row
    if len(sheet) > 1 or len(prompts) > 1:
        labels = [row_label(pipe, r) for r in rows]
        grid = {**first, "Batch size": None, "Batch pos": None,
                "Grid rows": " | ".join(lb.replace("\n", " ") for lb in labels),
                "Grid columns": " | ".join(f"seed {int(cfg.seed) + i} {p}" for i, p in enumerate(prompts))}
        path = free_path(cfg.out_dir, "grid")
        save_png(contact_sheet(sheet, labels), path, grid)
        written.append(path)
    for p in written:
        print(p)
    return written


def contact_sheet(rows, labels: list[str] | None = None):
    """Rows of PIL images -> one image (a row per solver/steps setting), with each row's label drawn in
    a left margin (PIL's default font) when labels are given."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = rows[0][0].size
    font, margin = ImageFont.load_default(), 0
    if labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = 8 + max(probe.multiline_textbbox((0, 0), lb, font=font, spacing=1)[2] for lb in labels)
    sheet = Image.new("RGB", (margin + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, images in enumerate(rows):
        if labels:
            draw.multiline_text((4, r * h + 2), labels[r], fill="black", font=font, spacing=1)
        for c, img in enumerate(images):
            sheet.paste(img, (margin + c * w, r * h))
    return sheet


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_or_exit("sample.py", lambda: (preflight(cfg), run(cfg)), cfg.debug, USER_ERRORS + (MissingMandatoryValue,))


if __name__ == "__main__":
    OmegaConf.register_new_resolver("knobs", knobs)
    main()
