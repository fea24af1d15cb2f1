"""The images the roots write and their A1111 infotext fields (lcm.sampling.infotext): sample.py's
rows sampled into PNGs plus a labelled contact sheet, and the fields evaluate.py's kept images
share. Names and hashes, never paths. The config is a mapping (a dict, or sample.py's DictConfig)
with conf/sample.yaml's keys."""
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lcm.sampling import infotext, samplers
from lcm.sampling.grid import Row, contact_sheet, row_label
from lcm.sampling.png import free_path, save_png

if TYPE_CHECKING:
    from PIL import Image

    from lcm.pipeline import Pipeline

#----------------------------------------------------------------------------
# Infotext fields.

def image_params(cfg: Mapping, pipe: "Pipeline", loras: list[dict], row: Row, prompt: str, seed: int,
                 size: tuple[int, int], batch: tuple[int, int]) -> dict:
    """The A1111 infotext fields of one image (lcm.sampling.infotext.format_infotext); names, never paths."""
    tiny, model_path, timesteps = (cfg.get("vae") or {}).get("tiny"), cfg["model"]["path"], cfg["timesteps"]
    eta = row.eta
    if eta is None:
        eta = samplers.get(row.solver).eta
    p = {"prompt": prompt, "negative_prompt": cfg["negative_prompt"],
         "Steps": row.steps, "Sampler": samplers.get(row.solver).a1111,
         "CFG scale": row.guidance_scale, "Seed": seed, "Size": f"{size[0]}x{size[1]}",
         "Model hash": infotext.short_hash(model_path), "Model": infotext.stem(model_path),
         "VAE hash": infotext.short_hash(tiny) if tiny else None, "VAE": os.path.basename(tiny) if tiny else None,
         "Batch size": batch[0] if batch[0] > 1 else None, "Batch pos": batch[1] if batch[0] > 1 else None}
    if cfg["init_image"] is not None:
        p |= {"Denoising strength": float(cfg["strength"]), "Init image": os.path.basename(cfg["init_image"])}
    p["loras"] = [(infotext.stem(lo["path"]), row.scales[lo["name"]], infotext.lora_hash(lo["path"]))
                  for lo in loras if row.scales[lo["name"]] != 0.0]
    p |= {"Solver": row.solver, "Eta": eta, "Spacing": row.spacing,
          "Timesteps": list(timesteps) if timesteps is not None and cfg["grid"] is None else None}
    if samplers.get(row.solver).few_step:           # the consistency spec the sampler used
        sp = pipe.spec
        p |= {"LCM grid": sp.num_ddim_timesteps, "LCM k": pipe.schedule.T // sp.num_ddim_timesteps,
              "LCM sigma_data": sp.sigma_data, "LCM timestep_scaling": sp.timestep_scaling,
              "LCM objective": sp.objective if sp.objective != "lcm" else None, "LCM phases": sp.phases}
    return p


def png_info(model_path: str, pipe: "Pipeline", lora: list) -> dict:
    """The A1111 infotext fields every image evaluate.py keeps shares (lcm.evaluation.runner's
    png_info): model name and hash, LoRAs (no paths), their scales and which are LCM-style."""
    entries = [{"path": e} if isinstance(e, str) else dict(e) for e in lora]
    scales = pipe.adapter_scales()                       # adapters in load order, as load_loras named them
    names = list(scales)
    return {"Model": infotext.stem(model_path), "Model hash": infotext.short_hash(model_path),
            "loras": [(a, infotext.stem(e["path"]), infotext.lora_hash(e["path"])) for a, e in zip(names, entries)],
            "lora_scales": scales,
            "lcm_like": [a for a in names if pipe.is_lcm_style(a)]}

#----------------------------------------------------------------------------
# sample.py's run: every row's images as PNGs, then the contact sheet.

def write_rows(cfg: Mapping, pipe: "Pipeline", loras: list[dict], rows: list[Row], prompts: list[str],
               init: "Image.Image | None" = None) -> list[str]:
    """Sample each row (its adapter scales, solver, steps, CFG; image i with seed cfg.seed + i) and write
    every image as `<solver>-<steps>steps-seed<seed>-NNN.png` into cfg.out_dir, then, for more than one
    row or prompt, the labelled contact sheet `grid-NNN.png`; returns the paths written. The adapters
    are back at their configured scales afterwards. init: img2img's init image (PIL) or None."""
    out_dir, seed, grid = cfg["out_dir"], int(cfg["seed"]), cfg["grid"]
    os.makedirs(out_dir, exist_ok=True)
    written, sheet, first = [], [], None
    base = {lo["name"]: lo["scale"] for lo in loras}
    try:
        for row in rows:
            if loras:
                pipe.set_lora_scales(row.scales)
            images = pipe(prompts, negative_prompt=cfg["negative_prompt"], steps=row.steps,
                          guidance_scale=row.guidance_scale, solver=row.solver,
                          timesteps=cfg["timesteps"] if grid is None else None, height=cfg["height"],
                          width=cfg["width"], seed=seed, init_image=init, eta=row.eta, spacing=row.spacing,
                          strength=float(cfg["strength"]) if init is not None else 1.0)
            sheet.append(images)
            for i, (p, img) in enumerate(zip(prompts, images)):
                params = image_params(cfg, pipe, loras, row, p, seed + i, img.size, (len(prompts), i))
                first = first or params
                path = free_path(out_dir, f"{row.solver}-{row.steps}steps-seed{seed + i}")
                save_png(img, path, params)
                written.append(path)
    finally:
        if loras:
            pipe.set_lora_scales(base)                # the adapters as configured, after any grid row
    if len(sheet) > 1 or len(prompts) > 1:
        labels = [row_label(pipe, r) for r in rows]
        params = {**first, "Batch size": None, "Batch pos": None,
                  "Grid rows": " | ".join(lb.replace("\n", " ") for lb in labels),
                  "Grid columns": " | ".join(f"seed {seed + i} {p}" for i, p in enumerate(prompts))}
        path = free_path(out_dir, "grid")
        save_png(contact_sheet(sheet, labels), path, params)
        written.append(path)
    return written
