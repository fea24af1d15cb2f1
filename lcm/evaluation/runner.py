"""The evaluation grid: methods x steps, each cell = one (method, steps) over the whole prompt set.

A cell's images are generated in batches; each finished batch's per-image features (every
extractor the metrics need) are written atomically to <out>/cells/<cell>/batch_NNNNNN.safetensors
(with its generation seconds and UNet evaluations), and the images themselves too when
save_images. A killed run resumes where it stopped: finished batches, and so finished cells, are
read back, never regenerated. The cell folder name carries a hash of its settings, so changing a
method's guidance or LoRA scales makes new cells instead of mixing images. With a stats.Bootstrap,
each row also carries every metric's 95% interval (`<key>_ci`), computed from the stored features,
so a resumed run's intervals equal a fresh run's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time

import torch

from lcm.evaluation.metrics import MetricSet
from lcm.evaluation.prompts import PromptSet
from lcm.evaluation.stats import Bootstrap

log = logging.getLogger(__name__)
GRID_FILE = "grid.json"


@dataclasses.dataclass
class Method:
    """One row family of the table: a solver at its guidance, sampled at each of `steps`."""
    name: str
    solver: str                                       # the pipeline's solver (lcm, ddim, dpmsolver++, ...)
    steps: list
    guidance_scale: float = 1.0
    eta: float | None = None
    spacing: str | None = None
    lora_scales: dict = dataclasses.field(default_factory=dict)   # adapter -> scale for this method
    teacher: bool = False                             # LCM-style adapters at scale 0 (style LoRAs kept)
    train_seed: int | None = None                     # the training seed of its LoRA (rows of several: stats.seed_summary)

    def settings(self, steps: int) -> dict:
        seed = {} if self.train_seed is None else {"train_seed": int(self.train_seed)}   # old cell names unchanged
        return dict(solver=self.solver, steps=int(steps), guidance_scale=float(self.guidance_scale), eta=self.eta,
                    spacing=self.spacing, lora_scales=dict(sorted(self.lora_scales.items())), teacher=self.teacher,
                    **seed)


def cell_name(method: Method, steps: int) -> str:
    """<method>-<steps>steps-<hash of the settings>: a folder name."""
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", method.name).strip("_") or "method"
    slug += "" if method.train_seed is None else f"-seed{int(method.train_seed)}"
    h = hashlib.sha1(json.dumps(method.settings(steps), sort_keys=True).encode()).hexdigest()[:8]
    return f"{slug}-{int(steps)}steps-{h}"


def atomic_write(path: str, write) -> None:
    """write(tmp_path), then rename over `path`: a reader never sees a partial file."""
    tmp = f"{os.path.join(os.path.dirname(path), '.tmp-' + os.path.basename(path))}-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    def w(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, w)

#----------------------------------------------------------------------------
# LoRA scales per method and UNet evaluations per image.

def method_scales(pipe, base: dict, method: Method) -> dict:
    """Adapter scales for a method: the loaded ones, LCM-style adapters at 0 for a teacher, then its own."""
    scales = dict(base)
    if method.teacher:
        scales |= {n: 0.0 for n in scales if pipe.is_lcm_style(n)}
    unknown = sorted(set(method.lora_scales) - set(scales))
    if unknown:
        raise ValueError(f"method {method.name!r}: lora_scales names {unknown}, but the loaded adapters are "
                         f"{sorted(scales) or 'none'}")
    return scales | {k: float(v) for k, v in method.lora_scales.items()}


class UNetCounter:
    """Counts samples through pipe.unet (a CFG pass of 2B counts 2 per image): NFE = count / B."""

    def __init__(self, pipe):
        self.n, self.handle = 0, None
        unet = getattr(pipe, "unet", None)
        if isinstance(unet, torch.nn.Module):
            self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.n += int(x.shape[0])

    def close(self):
        if self.handle is not None:
            self.handle.remove()

#----------------------------------------------------------------------------
# The grid.

def _load_batch(path: str, needed: list[str]):
    """(features, meta) of a finished batch, or None if absent or lacking an extractor's features."""
    if not os.path.exists(path):
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    feats = {k.removeprefix("feat."): v for k, v in load_file(path).items()}
    if not set(needed) <= set(feats):
        log.info("%s lacks features %s: regenerating it", path, sorted(set(needed) - set(feats)))
        return None
    return feats, json.loads(meta["lcm.eval_batch"])


def _save_images(images: torch.Tensor, folder: str, start: int, infotexts: list[str]) -> None:
    """Images as <folder>/<index>.png, each with its A1111 infotext (lcm/sampling/infotext.py) in "parameters"."""
    from PIL import Image, PngImagePlugin
    os.makedirs(folder, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for j, (a, text) in enumerate(zip(arr, infotexts)):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        atomic_write(os.path.join(folder, f"{start + j:06d}.png"),
                     lambda p, a=a, info=info: Image.fromarray(a).save(p, format="PNG", pnginfo=info))


def image_infotext(method: Method, steps: int, prompt: str, seed: int, size: tuple[int, int], png_info: dict) -> str:
    """One evaluation image's A1111 infotext: its sampler settings, seed and size, plus png_info
    (what every image shares: Model, Model hash, loras as (name, scale, hash))."""
    from lcm.sampling.infotext import format_infotext
    from lcm.sampling.samplers import get
    scales = dict(png_info.get("lora_scales") or {}) | {k: float(v) for k, v in method.lora_scales.items()}
    loras = [(n, scales.get(a, 1.0), h) for a, n, h in png_info.get("loras", [])
             if scales.get(a, 1.0) != 0.0 and not (method.teacher and a in png_info.get("lcm_like", ()))]
    return format_infotext({"prompt": prompt, "Steps": steps, "Sampler": get(method.solver).a1111,
                            "CFG scale": method.guidance_scale, "Seed": seed, "Size": f"{size[0]}x{size[1]}",
                            "Model hash": png_info.get("Model hash"), "Model": png_info.get("Model"),
                            "loras": loras, "Solver": method.solver, "Eta": method.eta, "Spacing": method.spacing,
                            "Evaluation method": method.name})


def check_grid(out_dir: str, fingerprint: dict) -> None:
    """The run dir's grid.json must describe the same model, adapters and prompts (else refuse)."""
    path = os.path.join(out_dir, GRID_FILE)
    fp = json.loads(json.dumps(fingerprint))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        if diff:
            raise ValueError(f"{out_dir} holds an evaluation of another setup (differs in {', '.join(diff)}): "
                             "choose a new run dir (hydra.run.dir=...) or repeat that run's settings")
        return
    os.makedirs(out_dir, exist_ok=True)
    write_json(path, fp)


def run_grid(pipe, methods: list[Method], prompts: PromptSet, metrics: MetricSet, out_dir: str,
             batch_size: int = 64, save_images: bool = False, height: int | None = None,
             width: int | None = None, progress: bool = True, on_cell=None, png_info: dict | None = None,
             boot: Bootstrap | None = None) -> list[dict]:
    """Evaluate every (method, steps) cell; returns one row per cell (settings, NFE, seconds per image,
    every metric). on_cell(rows) is called after each finished cell (e.g. to write the report).
    png_info: the infotext fields saved images share (image_infotext). boot: intervals per metric
    (`<key>_ci`), the replicates kept in boot.cells for paired comparisons (stats.compare)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    needed = metrics.extractor_names
    metrics.options.setdefault("cache_dir", out_dir)
    metrics.options["seeds_per_prompt"] = prompts.per_prompt   # diversity groups images by prompt
    metrics.build()                                   # weights and references load before any sampling
    N, B = len(prompts), int(batch_size)
    base = pipe.adapter_scales() if hasattr(pipe, "adapter_scales") else {}
    cells = [(m, int(s)) for m in methods for s in m.steps]
    bar = tqdm(total=len(cells) * ((N + B - 1) // B), desc="evaluate", disable=not progress)
    rows = []
    try:
        for m, steps in cells:
            cdir = os.path.join(out_dir, "cells", cell_name(m, steps))
            os.makedirs(cdir, exist_ok=True)
            write_json(os.path.join(cdir, "cell.json"), dict(method=m.name, **m.settings(steps), n_images=N))
            feats, seconds, nfe, scaled = {e: [] for e in needed}, 0.0, [], False
            for start in range(0, N, B):
                path = os.path.join(cdir, f"batch_{start:06d}.safetensors")
                got = _load_batch(path, needed)
                if got is None:
                    if not scaled and hasattr(pipe, "set_lora_scales") and base:
                        pipe.set_lora_scales(method_scales(pipe, base, m))
                    scaled = True
                    p = list(prompts.prompts[start:start + B])
                    kw = dict(steps=steps, guidance_scale=float(m.guidance_scale), solver=m.solver)
                    kw |= {k: v for k, v in (("eta", m.eta), ("spacing", m.spacing)) if v is not None}
                    kw |= {k: v for k, v in (("height", height), ("width", width)) if v is not None}
                    counter = UNetCounter(pipe)
                    t0 = time.perf_counter()
                    try:
                        images = pipe(p, seed=prompts.seed + start, output="tensor", progress=False, **kw)
                    finally:
                        counter.close()
                    dt = time.perf_counter() - t0
                    f = metrics.features(images, p)
                    info = dict(n=len(p), seconds=dt, nfe=counter.n / len(p) if counter.handle else None)
                    if save_images:
                        size = (images.shape[-1], images.shape[-2])
                        texts = [image_infotext(m, steps, q, prompts.seed + start + j, size, png_info or {})
                                 for j, q in enumerate(p)]
                        _save_images(images, os.path.join(cdir, "images"), start, texts)
                    atomic_write(path, lambda q, f=f, info=info: save_file(
                        {f"feat.{k}": v.contiguous() for k, v in f.items()}, q,
                        metadata={"lcm.eval_batch": json.dumps(info)}))
                    got = f, info
                for e in needed:
                    feats[e].append(got[0][e])
                seconds += got[1]["seconds"]
                nfe.append(got[1]["nfe"])
                bar.update(1)
            if scaled and base:
                pipe.set_lora_scales(base)
            cat = {e: torch.cat(v) for e, v in feats.items()}
            row = dict(method=m.name, **{k: v for k, v in m.settings(steps).items() if k != "teacher"},
                       nfe=None if None in nfe else round(sum(nfe) / len(nfe), 3),
                       seconds_per_image=seconds / N, n_images=N, n_prompts=prompts.n_prompts,
                       **metrics.reduce(cat, list(prompts.prompts)))
            if boot is not None:
                t0 = time.perf_counter()
                reps = metrics.replicates(cat, list(prompts.prompts), boot.resample(prompts.n_prompts, prompts.per_prompt))
                ci = boot.intervals((m.name, steps, m.train_seed), row, reps)
                row = {k2: v2 for k, v in row.items() for k2, v2 in ((k, v), (f"{k}_ci", ci.get(f"{k}_ci")))
                       if k2 == k or f"{k}_ci" in ci}                        # each interval beside its estimate
                log.debug("bootstrap of %s %d steps: %.2fs", m.name, steps, time.perf_counter() - t0)
            rows.append(row)
            log.info("%s %d steps: %s", m.name, steps, ", ".join(
                f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and k not in ("guidance_scale",)))
            if on_cell is not None:
                on_cell(list(rows))
    finally:
        bar.close()
        if base and hasattr(pipe, "set_lora_scales"):
            pipe.set_lora_scales(base)
    return rows
