"""from_png: the parameters of a PNG sample.py wrote (lcm.sampling.png.read_png) applied to a sample
config, so that the run regenerates the image; keys given on the command line keep their value
(the rule: conf/sample.yaml, from_png). The config is a mapping (a dict, or sample.py's DictConfig)
with conf/sample.yaml's keys; it is copied, never changed in place."""
import copy
import json
import logging
import os
from collections.abc import MutableMapping

from lcm.sampling import infotext, samplers
from lcm.sampling.build import lora_entries

log = logging.getLogger(__name__)

#----------------------------------------------------------------------------

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

def apply_png(cfg: MutableMapping, info: dict, explicit: set[str]) -> MutableMapping:
    """A copy of cfg set to regenerate the PNG described by `info` (read_png); keys in `explicit`
    (given on the command line, dotted: 'seed', 'solver.eta'; 'solver' for the group) keep their value."""
    cfg = copy.deepcopy(cfg)
    solver_cfg, given = cfg["solver"], lambda *keys: any(k in explicit for k in keys)   # noqa: E731
    if not given("prompt"):
        cfg["prompt"] = info["prompt"]
    if not given("negative_prompt"):
        cfg["negative_prompt"] = info["negative_prompt"]
    if not given("seed"):
        cfg["seed"] = int(info["Seed"])
    if not given("images_per_prompt"):
        cfg["images_per_prompt"] = 1
    if "Size" in info and not given("height", "width"):
        w, h = (int(v) for v in info["Size"].split("x"))
        cfg["width"], cfg["height"] = w, h
    solver = png_solver(info)
    if not given("solver", "solver.name") or solver_cfg["name"] == solver:     # its settings come along
        solver_cfg["name"] = solver
        if not given("steps", "solver.steps", "timesteps"):
            cfg["steps"] = int(info["Steps"])
            cfg["timesteps"] = json.loads(info["Timesteps"]) if "Timesteps" in info else None
        if not given("guidance_scale", "solver.guidance_scale"):
            cfg["guidance_scale"] = float(info["CFG scale"])
        if not given("solver.eta"):
            solver_cfg["eta"] = float(info["Eta"]) if "Eta" in info else None
        if not given("solver.spacing"):
            solver_cfg["spacing"] = info.get("Spacing")
    if "Denoising strength" in info:
        if not given("strength"):
            cfg["strength"] = float(info["Denoising strength"])
        if cfg["init_image"] is None:
            raise ValueError(f"from_png: the PNG is img2img from {info.get('Init image', 'an init image')}; "
                             "pass init_image=PATH")
    vae = cfg.get("vae")
    if not given("vae.tiny"):
        if "VAE" in info and not (vae or {}).get("tiny"):
            raise ValueError(f"from_png: the PNG was decoded with the tiny VAE {info['VAE']}; pass vae.tiny=PATH")
        if "VAE" not in info and vae is not None:
            vae["tiny"] = None
    if vae and vae["tiny"] and "VAE" in info and os.path.basename(vae["tiny"]) != info["VAE"]:
        log.warning("from_png: the PNG was decoded with %s, this run uses vae.tiny=%s", info["VAE"], vae["tiny"])
    cfg["lora"] = png_loras(info["loras"], lora_entries(cfg["lora"]), given("lora", "model.lora"))
    model_hash, model_path = info.get("Model hash"), cfg["model"]["path"]
    if model_hash and infotext.short_hash(model_path) != model_hash:
        log.warning("from_png: the PNG was made with model %s (hash %s); model.path=%s has hash %s: the image "
                    "will differ", info.get("Model"), model_hash, model_path, infotext.short_hash(model_path))
    return cfg
