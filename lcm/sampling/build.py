"""A config's Pipeline: the one builder of train.py, sample.py and evaluate.py. The checkpoint (or,
without a path, the architecture) at model.dtype on a device, its LoRA list loaded, every weight
frozen; optionally a tiny VAE to decode with and torch.compile. Plain Python: `model` is the
config's model mapping (a dict, or the roots' DictConfig node)."""
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lcm.cli import missing_value_message

if TYPE_CHECKING:
    from lcm.pipeline import Pipeline

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
ARCH_KEYS = ("family", "text_family", "unet", "vae", "text", "default_size", "randomize")   # from_architecture

#----------------------------------------------------------------------------
# The LoRA list of a config: paths, or {path, name?, scale?}.

def lora_entries(items) -> list[dict]:
    """A config's LoRA list as [{path, name?, scale?}] dicts (a bare path is {path}); None: []."""
    items = [items] if isinstance(items, str) else items or []
    return [{"path": it} if isinstance(it, str) else dict(it) for it in items]


def lora_table(items) -> list[dict]:
    """[{name, path, scale}] of a config's LoRA list in load order, each named as Pipeline.load_lora
    names it (its `name`, else the file's or folder's stem, models/lora_io.py); passed to
    build_pipeline as the list to load, so the names are the adapters'."""
    table = []
    for e in lora_entries(items):
        if "path" not in e:
            raise ValueError(f"LoRA entries need a path, got {e}")
        path = os.fspath(e["path"])
        name = e.get("name") or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        table.append({"name": name, "path": e["path"], "scale": float(e.get("scale", 1.0))})
    return table

#----------------------------------------------------------------------------

def build_pipeline(model: Mapping, loras: list | None = None, *, device: str = "cpu", tiny: str | None = None,
                   compile: bool = False) -> "Pipeline":
    """A Pipeline from an original checkpoint (model.path) or from architecture kwargs (no path), at
    model.dtype on `device` (train.py builds on the CPU, its loop places the model), with `loras`
    (paths or {path, scale, name}; None: model.lora) loaded, every weight frozen. tiny: a TAESD
    decoder file to decode with (sample.py's vae.tiny); compile: torch.compile the UNet and VAE decoder."""
    import torch

    from lcm.pipeline import Pipeline
    if model.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {model['dtype']!r}")
    dtype = getattr(torch, model.get("dtype", "float32"))
    if tiny is not None and not os.path.isfile(tiny):
        raise FileNotFoundError(f"vae.tiny not found: {tiny}")
    if model.get("path") == "???":
        raise ValueError(missing_value_message("model.path"))
    if model.get("path"):
        pipe = Pipeline.from_checkpoint(model["path"], device=device, dtype=dtype,
                                        prediction_type=model.get("prediction_type"))
    else:
        missing = [k for k in ("family", "unet", "vae", "text") if not model.get(k)]
        if missing:
            raise ValueError(f"model.path is not set, so the model is built from its architecture, but "
                             f"model.{missing[0]} is missing: set model.path=/path/to/model.safetensors "
                             "or give model.family/unet/vae/text (see conf/experiment/smoke.yaml)")
        pipe = Pipeline.from_architecture(**{k: model[k] for k in ARCH_KEYS if k in model}, dtype=dtype,
                                          prediction_type=model.get("prediction_type"),
                                          seed=int(model.get("seed", 0))).to(device)
    pipe.load_loras(model.get("lora") if loras is None else loras)
    for p in [*pipe.unet.parameters(), *pipe.vae.parameters(), *pipe.text.parameters()]:
        p.requires_grad_(False)
    if tiny is not None:
        pipe.load_tiny_vae(tiny)
        log.info("decoding with the tiny VAE %s", tiny)
    if compile:
        pipe.compile()
    return pipe
