"""Safe checkpoint reading, family detection from keys and shapes, and strict model building.

Nothing here can execute code from a file: safetensors, or torch.load(weights_only=True) for
pickles. Original single-file SD checkpoints load by stripping their prefixes; the architecture
is read from the keys and shapes, so pruned variants (SSD-1B) need no new code.
"""
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass

import torch
from torch import nn
from safetensors.torch import save_file

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Non-weight entries real files carry: EMA copies, the noise-schedule buffers, position ids, CLIP's
# logit scale. They are dropped (logged at debug level); anything else unexpected is an error.
IGNORED = re.compile(r"^(model_ema\.|betas$|alphas_cumprod|alphas_cumprod_prev$|sqrt_|log_one_minus_"
                     r"|posterior_|logvar$|lvlb_weights$|.*position_ids$|.*logit_scale$|.*\.attn_mask$)")

# Cross-attention width -> family (docs/users.md Sec. 4); SDXL and SSD-1B also carry label_emb.
CONTEXT_DIM_FAMILY = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
FAMILY_NAMES = {"sd15": "SD1.x", "sd21": "SD2.x", "sdxl": "SDXL", "ssd1b": "SSD-1B", "demo": "demo"}
# Head layout is not in the weights: SD1 uses 8 heads, SD2/SDXL 64 channels per head.
FAMILY_HEADS = {"sd15": dict(num_heads=8), "sd21": dict(num_head_channels=64),
                "sdxl": dict(num_head_channels=64), "ssd1b": dict(num_head_channels=64)}
VAE_SCALE = {"sd15": 0.18215, "sd21": 0.18215, "sdxl": 0.13025, "ssd1b": 0.13025}
SDXL_DEPTHS = [0, 0, 0, 0, 2, 2, 0, 10, 10]          # SDXL base: transformer depth per input block
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONFIG_KEY = "lcm.config"                            # the architecture a file written by this project carries

#----------------------------------------------------------------------------
# Reading files. Every error about a file's content is one line that names the file.


class FileMetadata(dict):
    """A file's metadata (str -> str) that remembers the file (`.path`), so errors found later name it."""

    def __init__(self, items=(), path: str | None = None):
        super().__init__(items)
        self.path = path


def named_error(path: str | None, e: Exception | str) -> ValueError:
    """A one-line ValueError about `path`, prefixed with it unless the message already names it."""
    msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return ValueError(msg if path is None or path in msg else f"{path}: {msg}")


def load_file(path: str) -> tuple[dict, dict]:
    """Read a checkpoint as (state_dict, FileMetadata), refusing anything that could run code."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; pass a single-file checkpoint (.safetensors or .ckpt). "
                         "diffusers-format folders are not supported for base models.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        sd, meta = _load_safetensors(path)
        return sd, FileMetadata(meta, path)
    if path.endswith(PICKLE_SUFFIXES):
        return _load_pickle(path), FileMetadata({}, path)
    raise ValueError(f"unknown checkpoint extension for {path}: expected .safetensors or one of "
                     f"{', '.join(PICKLE_SUFFIXES)}")


def _load_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    size = os.path.getsize(path)
    with open(path, "rb") as f:                      # check the header before safetensors parses it
        head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path} is not a safetensors file (only {size} bytes): truncated or corrupt")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, 100 * 2**20):
        raise ValueError(f"{path}: safetensors header claims {n} bytes but the file has {size}: "
                         "truncated or corrupt (re-download it)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                           # SafetensorsError and friends: say what it is
        raise named_error(None, f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return sd, meta


def _load_pickle(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refused to load {path}: it is a pickle that wants to run code or build "
                         f"objects other than tensors ({str(e).splitlines()[0][:200]}). Nothing was "
                         "executed. Convert it to .safetensors with a tool you trust.") from None
    except Exception as e:
        raise named_error(None, f"{path} could not be read as a weights-only checkpoint (truncated or "
                                f"corrupt?): {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a flat dict of named tensors (a state_dict)")
    return obj


def check_finite(sd: dict, what: str) -> None:
    """Warn (do not fail) when weights carry NaN or Inf: outputs would be garbage."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        log.warning("%s: %d tensors hold NaN/Inf values (first: %s); the file is probably damaged",
                    what, len(bad), ", ".join(bad[:3]))


#----------------------------------------------------------------------------
# Family detection and splitting.


def split_prefix(sd: dict, prefix: str) -> dict:
    """The sub-dict under `prefix`, with the prefix stripped."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def context_dim(unet_sd: dict) -> int:
    """Cross-attention width of a prefix-stripped UNet state dict."""
    for k, v in unet_sd.items():
        if k.endswith("attn2.to_k.weight"):
            return v.shape[1]
    raise ValueError("no cross-attention weights (attn2.to_k) found: not a Stable Diffusion UNet")


def detect_family(sd: dict) -> str:
    """'sd15' | 'sd21' | 'sdxl' | 'ssd1b' from the UNet's keys and shapes."""
    unet = split_prefix(sd, UNET_PREFIX)
    if not unet:
        raise ValueError(f"no UNet weights under '{UNET_PREFIX}': not an original-layout SD checkpoint "
                         f"(first keys: {sorted(sd)[:3]})")
    d = context_dim(unet)
    if d not in CONTEXT_DIM_FAMILY:
        raise ValueError(f"cross-attention width {d} matches no known family (768 SD1.x, 1024 SD2.x, "
                         "2048 SDXL/SSD-1B)")
    family = CONTEXT_DIM_FAMILY[d]
    if family == "sdxl":
        if "label_emb.0.0.weight" not in unet:
            raise ValueError("context width 2048 but no label_emb: an unknown SDXL variant")
        if transformer_depths(unet) != SDXL_DEPTHS:
            family = "ssd1b"                         # a pruned SDXL (SSD-1B and relatives)
    return family


def transformer_depths(unet_sd: dict) -> list[int]:
    """Transformer depth of each input block (0 = no attention)."""
    depth: dict[int, int] = {}
    for k in unet_sd:
        if m := re.match(r"input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.", k):
            depth[int(m.group(1))] = max(depth.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    n = 1 + max(int(m.group(1)) for k in unet_sd if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    return [depth.get(i, 0) for i in range(n)]


#----------------------------------------------------------------------------
# Strict loading with evidence.


def load_strict(module: nn.Module, sd: dict, what: str, family: str) -> None:
    """Strict load (assigning the file's tensors to a meta-built module) with one readable error."""
    ours = module.state_dict()
    missing = [k for k in ours if k not in sd]
    extra = [k for k in sd if k not in ours]
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(ours[k].shape)}"
           for k in sd.keys() & ours.keys() if sd[k].shape != ours[k].shape]
    bad += [f"{k}: file dtype {sd[k].dtype} vs model {ours[k].dtype}" for k in sd.keys() & ours.keys()
            if sd[k].is_floating_point() != ours[k].is_floating_point()]
    if missing or extra or bad:
        fam = FAMILY_NAMES.get(family, family)
        raise ValueError(f"{what} weights do not fit the detected {fam} architecture: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                         f"(e.g. {extra[:3]}), {len(bad)} wrong shape (e.g. {bad[:3]})")
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    assert not left, f"{what}: tensors left uninitialised after loading: {left[:3]}"


def drop_ignored(sd: dict) -> dict:
    """Remove the non-weight entries real checkpoints carry, saying so at debug level."""
    dropped = [k for k in sd if IGNORED.match(k)]
    if dropped:
        log.debug("ignoring %d non-weight entries (e.g. %s)", len(dropped), dropped[:3])
    return {k: v for k, v in sd.items() if not IGNORED.match(k)}


@dataclass
class Components:
    unet: nn.Module
    vae: nn.Module
    text: nn.Module
    family: str
    config: dict
    metadata: dict


def build_components(sd: dict, metadata: dict, dtype: torch.dtype = torch.float32) -> Components:
    """Build UNet, VAE and text conditioner from a full original-layout state dict, strictly.

    Every problem with the file's content is one ValueError naming the file (`metadata.path`, as
    load_file returns it)."""
    try:
        return _build_components(sd, metadata, dtype)
    except ValueError as e:
        raise named_error(getattr(metadata, "path", None), e) from None


def _build_components(sd: dict, metadata: dict, dtype: torch.dtype) -> Components:
    from models.text import build_text_conditioner
    from models.unet import UNetModel, infer_unet_config
    from models.vae import AutoencoderKL, infer_vae_config
    sd = drop_ignored(sd)
    check_finite(sd, getattr(metadata, "path", None) or "checkpoint")
    saved = saved_config(metadata)
    if "prediction_type" in metadata and metadata["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type metadata {metadata['prediction_type'][:40]!r} is not one of "
                         f"{PREDICTION_TYPES}")
    if saved:
        family = saved["family"]
    else:
        try:
            family = detect_family(sd)
        except ValueError as e:
            raise ValueError(f"{e}; and the file has no {CONFIG_KEY} metadata, which files this project "
                             "writes carry (was it stripped or re-saved by another tool?)") from None
    unet_sd, vae_sd = split_prefix(sd, UNET_PREFIX), split_prefix(sd, VAE_PREFIX)
    leftover = [k for k in sd if not k.startswith((UNET_PREFIX, VAE_PREFIX) + TEXT_PREFIXES)]
    if leftover:
        raise ValueError(f"unexpected entries in a {FAMILY_NAMES.get(family, family)} checkpoint: "
                         f"{leftover[:5]}")
    if not vae_sd:
        raise ValueError(f"no VAE weights under '{VAE_PREFIX}' (a UNet-only file?). Pass a full "
                         "single-file checkpoint.")
    if saved:
        unet_cfg, vae_cfg = saved["unet"], saved["vae"]
        _check_against_weights("unet", unet_cfg, _guard("the UNet weights", lambda: infer_unet_config(
            unet_sd, **{k: unet_cfg[k] for k in ("num_heads", "num_head_channels") if k in unet_cfg})))
        _check_against_weights("vae", vae_cfg, _guard("the VAE weights", lambda: infer_vae_config(vae_sd)))
        _check_text_against_weights(saved, sd)
    else:
        unet_cfg = _guard("the UNet weights", lambda: infer_unet_config(unet_sd, **FAMILY_HEADS[family]))
        unet_cfg["upcast_attention"] = family == "sd21"   # SD2.x attention overflows in fp16
        vae_cfg = {**_guard("the VAE weights", lambda: infer_vae_config(vae_sd)), "scale_factor": VAE_SCALE[family]}
    what = f"{CONFIG_KEY} metadata" if saved else "the weights"
    with torch.device("meta"):
        unet = _guard(f"a UNet from {what}", lambda: UNetModel(**unet_cfg))
        vae = _guard(f"a VAE from {what}", lambda: AutoencoderKL(**vae_cfg))
    load_strict(unet, unet_sd, "UNet", family)
    load_strict(vae, vae_sd, "VAE", family)
    text = _guard(f"the text encoder from {what}", lambda: build_text_conditioner(
        saved["text_family"] if saved else family, sd, dtype=torch.float32,
        **({"config": saved["text"]} if saved else {})))
    config = {"family": family, "unet": unet_cfg, "vae": vae_cfg,
              **{k: saved[k] for k in ("default_size", "text_family", "prediction_type") if k in (saved or {})}}
    return Components(unet.to(dtype), vae, text.to(dtype), family, config, metadata)

#----------------------------------------------------------------------------
# The saved architecture (`lcm.config`) is untrusted input too: parsed, typed, checked against the
# weights before anything is built from it (a junk depth of 10**6 would otherwise build for minutes).

# Sizes that the weights determine; a saved config must agree with them.
_STRUCTURE = {"unet": ("in_channels", "out_channels", "model_channels", "num_res_blocks", "channel_mult",
                       "transformer_depth", "transformer_depth_middle", "transformer_depth_output",
                       "context_dim", "use_linear_in_transformer", "adm_in_channels", "time_cond_proj_dim"),
              "vae": ("ch", "ch_mult", "num_res_blocks", "in_channels", "out_ch", "z_channels", "embed_dim")}


def json_object(metadata: dict, key: str, where: str = "") -> dict:
    """metadata[key] parsed as a JSON object, else one ValueError (prefixed with `where`)."""
    try:
        obj = json.loads(metadata[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}{key} metadata is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}{key} metadata must be a JSON object, got {type(obj).__name__}")
    return obj


def saved_config(metadata: dict) -> dict | None:
    """The parsed `lcm.config` of a file (None when absent), its top-level fields type-checked."""
    if CONFIG_KEY not in metadata:
        return None
    cfg = json_object(metadata, CONFIG_KEY)
    kinds = {"family": str, "text_family": str, "unet": dict, "vae": dict, "text": dict}
    wrong = [f"{k} ({'missing' if k not in cfg else type(cfg[k]).__name__})" for k, t in kinds.items()
             if not isinstance(cfg.get(k), t)]
    if wrong:
        raise ValueError(f"{CONFIG_KEY} metadata lacks or mistypes {', '.join(wrong)} (expected "
                         f"{', '.join(f'{k}: {t.__name__}' for k, t in kinds.items())})")
    if cfg["family"] not in FAMILY_NAMES:
        raise ValueError(f"{CONFIG_KEY} metadata names an unknown family {cfg['family'][:40]!r}; known: "
                         f"{sorted(FAMILY_NAMES)}")
    size = cfg.get("default_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= 2**16:
        raise ValueError(f"{CONFIG_KEY} metadata: default_size must be a positive integer, got {size!r:.40}")
    scale = cfg["vae"].get("scale_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"{CONFIG_KEY} metadata: vae.scale_factor must be a positive number, got {scale!r:.40}")
    if cfg.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ValueError(f"{CONFIG_KEY} metadata: prediction_type must be one of {PREDICTION_TYPES}, got "
                         f"{cfg['prediction_type']!r:.40}")
    return cfg


def _check_against_weights(part: str, saved: dict, inferred: dict) -> None:
    """Raise when the saved sizes of `part` disagree with what its weights show."""
    def norm(x):
        return list(x) if isinstance(x, (list, tuple)) else x
    off = [f"{k} {norm(saved[k])!r:.40} (weights: {norm(inferred[k])!r})" for k in _STRUCTURE[part]
           if k in saved and k in inferred and not (k == "transformer_depth_output" and saved[k] is None)
           and norm(saved[k]) != norm(inferred[k])]
    if off:
        raise ValueError(f"{CONFIG_KEY} metadata does not match the {part.upper()} weights: {', '.join(off[:3])}")


def _check_text_against_weights(saved: dict, sd: dict) -> None:
    """Raise when the saved text towers disagree in number or size with the text weights."""
    from models.text import infer_text_config, text_state_dicts
    towers = saved["text"].get("towers")
    parts = text_state_dicts(saved["text_family"], sd)
    if not isinstance(towers, list) or len(towers) != len(parts) or not all(isinstance(t, dict) for t in towers):
        raise ValueError(f"{CONFIG_KEY} metadata: text.towers must be a list of {len(parts)} tower configs "
                         f"for the {len(parts)} text encoders in the file, got {str(towers)[:60]}")
    for i, (tower, part) in enumerate(zip(towers, parts)):
        inferred = _guard(f"text encoder {i} from its weights", lambda: infer_text_config(part))
        off = [f"{k} {tower[k]!r:.40} (weights: {inferred[k]!r})" for k in
               ("width", "layers", "vocab_size", "context_length", "proj_dim") if k in tower and tower[k] != inferred[k]]
        if off:
            raise ValueError(f"{CONFIG_KEY} metadata does not match text encoder {i}'s weights: {', '.join(off[:3])}")


def _guard(what: str, build):
    """Run build() on file-given sizes; any failure becomes one ValueError saying what was built."""
    try:
        return build()
    except ValueError:
        raise
    except Exception as e:                           # assert/TypeError/ZeroDivisionError on junk sizes
        raise ValueError(f"cannot build {what} ({type(e).__name__}: {e})") from None

#----------------------------------------------------------------------------
# Writing full models as original-layout single files (the reader is above).

def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def original_state_dict(unet, vae, text, text_family: str) -> dict[str, torch.Tensor]:
    """UNet + VAE + text towers under the original prefixes (text in the family's layout); `unet` is
    a module or its state dict (e.g. gathered from FSDP shards, lcm/training/fsdp.py)."""
    from models.checkpoint import UNET_PREFIX, VAE_PREFIX
    from models.keymaps import clip_state_dict_open_clip_to_hf
    from models.lora import is_lora_key
    from models.text import SOURCES
    if text_family not in SOURCES:
        raise ValueError(f"text_family must be one of {sorted(SOURCES)} (the layout the text towers "
                         f"are stored in), got {text_family!r}")
    unet_sd = unet if isinstance(unet, dict) else unet.state_dict()
    sd = {UNET_PREFIX + k: v for k, v in unet_sd.items() if not is_lora_key(k)}
    sd |= {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    assert len(SOURCES[text_family]) == len(text.towers), f"{text_family} has {len(SOURCES[text_family])} towers"
    for (prefix, layout), tower in zip(SOURCES[text_family], text.towers):
        part = {k: v for k, v in tower.state_dict().items() if not is_lora_key(k)}
        part = clip_state_dict_open_clip_to_hf(part) if layout == "hf" else part
        sd |= {prefix + k: v for k, v in part.items()}
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

def save_model_file(path: str, unet, vae, text, config: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a full model as one safetensors file; config = dict(family, text_family, unet, vae)
    (UNetModel / AutoencoderKL kwargs) is stored as `lcm.config` so the file rebuilds itself."""
    config = _jsonable(dict(config, text=text.config))
    meta = {**(metadata or {}), "lcm.config": json.dumps(config)}
    save_file(original_state_dict(unet, vae, text, config["text_family"]), path, metadata=meta)
    fsync(path)

def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
