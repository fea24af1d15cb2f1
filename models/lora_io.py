"""LoRA files in and out: kohya (diffusers or SGM paths), diffusers/PEFT, old diffusers, native.

docs/users.md Sec. 3-4. Every file is turned into ours, {ldm_module_name: (down, up, alpha)}, by matching
its module keys against candidate names built from *the model's own modules* (our LDM name ->
diffusers path via models.keymaps), so underscored kohya names are never parsed back and one
function serves SD1/SD2/SDXL/SSD-1B. Text-encoder LoRAs go onto open_clip towers as row deltas.
"""
import json
import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from models.checkpoint import CONTEXT_DIM_FAMILY, FAMILY_NAMES, check_finite, load_file, named_error
from models.keymaps import unet_module_ldm_to_diffusers
from models.lora import LoRAParamDelta, add_lora_weights, lora_names, lora_state

log = logging.getLogger(__name__)
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_META_KEY = "lora_adapter_metadata"              # diffusers' safetensors metadata key (JSON)
SDXL_TRANSFORMER_BLOCKS = 70                         # attn1 count of the full SDXL UNet
_UNSUPPORTED = re.compile(r"(hada_|lokr_|lora_mid|dora_scale|lora_magnitude_vector|\.diff(_b)?$)")
_TEXT_TOWER = {"lora_te_": 0, "lora_te1_": 0, "lora_te2_": 1, "text_encoder.": 0, "text_encoder_2.": 1}

#----------------------------------------------------------------------------
# Reading.


def read_lora_file(path: str) -> tuple[dict, dict]:
    """(state_dict, metadata) of a LoRA file or of a folder holding one; never runs pickled code."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    meta_extra = {}
    if os.path.isdir(path):
        cands = [os.path.join(path, n) for n in (DIFFUSERS_WEIGHT_NAME, "adapter_model.safetensors")]
        found = [c for c in cands if os.path.isfile(c)]
        if not found:
            raise FileNotFoundError(f"{path} is a folder without {DIFFUSERS_WEIGHT_NAME} or "
                                    "adapter_model.safetensors")
        cfg = os.path.join(path, "adapter_config.json")     # a raw PEFT save: alpha lives here
        if os.path.isfile(cfg):
            with open(cfg) as f:
                meta_extra[PEFT_META_KEY] = f.read()
        path = found[0]
    sd, meta = load_file(path)                       # safetensors, or torch.load(weights_only=True)
    check_finite(sd, f"LoRA {path}")
    return sd, {**meta, **meta_extra}

#----------------------------------------------------------------------------
# Key parsing: file key -> (tower, module key, part); tower 'unet' or a text-encoder index.

_PARTS = [(r"\.lora_down\.weight", "down"), (r"\.lora_up\.weight", "up"), (r"\.alpha", "alpha"),
          (r"\.lora_A(\.[^.]+)?\.weight", "down"), (r"\.lora_B(\.[^.]+)?\.weight", "up"),
          (r"\.lora(_linear_layer)?\.down\.weight", "down"), (r"\.lora(_linear_layer)?\.up\.weight", "up")]
_OLD_PROC = re.compile(r"(.*)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight")


def parse_key(key: str) -> tuple[str | int, str, str]:
    """Split a LoRA file key into (tower, module key, 'down'|'up'|'alpha')."""
    k = key.removeprefix("base_model.model.")
    if _UNSUPPORTED.search(k):
        raise ValueError(f"{key!r}: LyCORIS/DoRA/full-diff LoRAs (LoHa, LoKr, Tucker, DoRA) are not "
                         "supported; only plain LoRA (down/up[/alpha]) is")
    tower: str | int = "unet"
    for p, i in _TEXT_TOWER.items():
        if k.startswith(p):
            tower, k = i, k[len(p):]
    k = k.removeprefix("unet.")
    if m := _OLD_PROC.fullmatch(k):                  # old diffusers attention processors
        return tower, f"{m.group(1)}.{'to_out.0' if m.group(2) == 'to_out' else m.group(2)}", m.group(3)
    for pat, part in _PARTS:
        if m := re.fullmatch(rf"(.+?){pat}", k):
            return tower, m.group(1), part
    raise ValueError(f"{key!r} is not a LoRA weight key (expected .lora_down/.lora_up/.alpha, "
                     ".lora_A/.lora_B or .processor.to_*_lora)")


def _peft_meta(metadata: dict, tower: str) -> dict:
    raw = (metadata or {}).get(PEFT_META_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{PEFT_META_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{PEFT_META_KEY} metadata must be a JSON object, got {type(cfg).__name__}")
    pref = {k[len(tower) + 1:]: v for k, v in cfg.items() if k.startswith(tower + ".")}
    return pref or {k: v for k, v in cfg.items() if "." not in k}


def _alpha_from_peft(cfg: dict, module: str, rank: int) -> float:
    try:
        for pat, a in (cfg.get("alpha_pattern") or {}).items():   # peft's own pattern rule
            if re.match(rf"(.*\.)?({pat})$", module):
                return float(a)
        return float(cfg.get("lora_alpha", rank))                 # no alpha anywhere: alpha = rank
    except (AttributeError, TypeError, re.error) as e:            # junk metadata: say where
        raise ValueError(f"{PEFT_META_KEY} metadata: unusable alpha_pattern / lora_alpha ({e})") from None

#----------------------------------------------------------------------------
# Candidate names from the model.


def layers_per_block(model: nn.Module) -> int:
    """Res blocks per level (UNetModel.num_res_blocks, else from output blocks = levels * (R + 1))."""
    if isinstance(getattr(model, "num_res_blocks", None), int):
        return model.num_res_blocks
    names = [n for n, _ in model.named_modules()]
    n_out = len({m.group(1) for n in names if (m := re.match(r"output_blocks\.(\d+)$", n))})
    n_up = sum(bool(re.fullmatch(r"output_blocks\.\d+\.[12]\.conv", n)) for n in names)
    assert n_out and n_out % (n_up + 1) == 0, f"not an LDM UNet: {n_out} output blocks, {n_up} upsamplers"
    return n_out // (n_up + 1) - 1


def unet_candidates(model: nn.Module) -> dict[str, str]:
    """Every spelling a file may use for each Linear/Conv2d of the UNet -> our LDM name."""
    lpb, cand = layers_per_block(model), {}
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        try:
            d = unet_module_ldm_to_diffusers(n, lpb)
        except KeyError:
            d = None
        for c in (n, "lora_unet_" + n.replace(".", "_")) + ((d, "lora_unet_" + d.replace(".", "_")) if d else ()):
            assert cand.get(c, n) == n, f"ambiguous LoRA name {c}: {cand[c]} and {n}"
            cand[c] = n
    return cand


_HF_TEXT = {"self_attn.q_proj": ("attn", "in_proj_weight", 0), "self_attn.k_proj": ("attn", "in_proj_weight", 1),
            "self_attn.v_proj": ("attn", "in_proj_weight", 2), "self_attn.out_proj": ("attn.out_proj", "weight", 0),
            "mlp.fc1": ("mlp.c_fc", "weight", 0), "mlp.fc2": ("mlp.c_proj", "weight", 0)}


def text_candidates(encoder: nn.Module) -> dict[str, tuple[nn.Module, str, int, str]]:
    """HF CLIP LoRA names (dotted and kohya) -> (open_clip module, parameter, first row, tag)."""
    cand = {}
    for n, blk in encoder.named_modules():
        if not (m := re.search(r"(^|\.)resblocks\.(\d+)$", n)):
            continue
        C = blk.attn.embed_dim
        for hf, (sub, param, third) in _HF_TEXT.items():
            target = (blk.get_submodule(sub), param, third * C, hf.split(".")[-1])
            for name in (f"text_model.encoder.layers.{m.group(2)}.{hf}", f"encoder.layers.{m.group(2)}.{hf}"):
                cand[name] = cand[name.replace(".", "_")] = target   # transformers 5 drops `text_model.`
    return cand

#----------------------------------------------------------------------------
# Families, for errors that name the fix (docs/users.md Sec. 3).


@dataclass
class LoadReport:
    name: str
    matched: int = 0                                  # modules installed (UNet + text)
    unmatched: list = field(default_factory=list)     # module keys no model module answers to
    mismatched: list = field(default_factory=list)    # "key: file shape vs model shape"
    skipped_text: int = 0                             # text-encoder modules with no encoder given
    file_family: str = "unknown"                      # from the file's cross-attention width
    model_family: str = "unknown"
    file_ctx: int | None = None
    metadata: dict = field(default_factory=dict)      # the file's safetensors metadata (e.g. lcm.spec)
    model_ctx: int | None = None
    file_blocks: int = 0                              # transformer blocks (attn1.to_q count)
    model_blocks: int = 0
    shallower: bool = False                           # full-coverage LoRA of a pruned SDXL (SSD-1B)

    def family_error(self) -> str | None:
        """A sentence naming both families, or None when the families do not explain the misfit."""
        deeper = self.unmatched and self.file_ctx == self.model_ctx == 2048 and self.file_blocks > self.model_blocks
        if not (self.shallower or deeper or (self.file_ctx and self.model_ctx and self.file_ctx != self.model_ctx)):
            return None
        def desc(fam, ctx, n):
            return f"{FAMILY_NAMES.get(fam, 'an unknown family')} (context {ctx}, {n} transformer blocks)"
        msg = (f"this LoRA was trained for {desc(self.file_family, self.file_ctx, self.file_blocks)}; "
               f"the model is {desc(self.model_family, self.model_ctx, self.model_blocks)}.")
        if "ssd1b" in (self.file_family, self.model_family):
            msg += (" SSD-1B needs its own LoRAs (for LCM: lcm-lora-ssd-1b); SDXL LoRAs do not fit it, "
                    "nor its LoRAs SDXL.")
        return msg


def _depths(names) -> dict[str, int]:
    """Transformer depth of each SpatialTransformer, from LDM module names."""
    d: dict[str, int] = {}
    for x in names:
        if m := re.match(r"(.*)\.transformer_blocks\.(\d+)\.attn1\.to_q$", x):
            d[m.group(1)] = max(d.get(m.group(1), 0), int(m.group(2)) + 1)
    return d


def _families(rep: LoadReport, groups: dict, unet: dict, model: nn.Module) -> None:
    """Fill the family fields: widths name SD1/SD2/SDXL; depths tell SSD-1B from SDXL."""
    names = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    rep.model_ctx = next((mods[n].in_features for n in names if n.endswith("attn2.to_k")), None)
    rep.model_blocks = sum(n.endswith("attn1.to_q") for n in names)
    rep.file_ctx = next((g["down"].shape[1] for k, g in groups.items()
                         if k[0] == "unet" and re.search(r"attn2[._]to_k$", k[1])), None)
    rep.file_blocks = sum(bool(re.search(r"attn1[._]to_q$", k[1])) for k in groups if k[0] == "unet")
    rep.file_family = CONTEXT_DIM_FAMILY.get(rep.file_ctx, "unknown")
    rep.model_family = CONTEXT_DIM_FAMILY.get(rep.model_ctx, "unknown")
    if rep.model_family == "sdxl" and rep.model_blocks < SDXL_TRANSFORMER_BLOCKS:
        rep.model_family = "ssd1b"                    # a pruned SDXL (SSD-1B and relatives)
    resnets = [n for n in names if n.endswith("in_layers.2")]
    if rep.file_family == "sdxl" and resnets and all(r in unet for r in resnets):
        fd, md = _depths(unet), _depths(names)        # every resnet covered, yet shallower stacks
        rep.shallower = any(fd.get(s, md[s]) < md[s] for s in md)
        rep.file_family = "ssd1b" if rep.shallower else rep.file_family

#----------------------------------------------------------------------------
# Matching and loading.


def _group(sd: dict) -> dict:
    groups: dict = {}
    for key, v in sd.items():
        tower, mod, part = parse_key(key)
        groups.setdefault((tower, mod), {})[part] = v
    bad = [f"{t}:{m}" for (t, m), g in groups.items() if not {"down", "up"} <= g.keys()]
    if bad:
        raise ValueError(f"{len(bad)} LoRA modules lack their down or up weight (first: {bad[:3]})")
    def usable(part, v):                              # down (r, in[, kh, kw]), up (out, r[, 1, 1]), r >= 1
        if part == "alpha":
            return v.numel() == 1 and v.dtype != torch.bool
        return v.is_floating_point() and v.ndim in (2, 4) and v.shape[part == "up"] >= 1
    odd = [f"{m}.{p} {str(v.dtype).removeprefix('torch.')}{tuple(v.shape)}" for (_, m), g in groups.items()
           for p, v in g.items() if not usable(p, v)]
    if odd:                                           # before anything is installed: no half-loaded adapter
        raise ValueError(f"{len(odd)} LoRA tensors are neither floating-point down/up matrices of rank >= 1 "
                         f"nor a scalar alpha (first: {odd[:3]})")
    return groups


def _fits(w: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> bool:
    r = down.shape[0]                                 # a 1x1 conv LoRA fits a Linear and back
    return up.shape[0] == w.shape[0] and up.numel() == w.shape[0] * r and down.numel() == r * w[0].numel()


def match_lora(model: nn.Module, sd: dict, metadata: dict | None = None,
               text_encoders=None) -> tuple[dict, list, LoadReport]:
    """Convert a LoRA state dict to ours: ({ldm_name: (down, up, alpha)}, text deltas, report)."""
    groups, rep = _group(sd), LoadReport(name="")
    cand, mods, lpb = unet_candidates(model), dict(model.named_modules()), layers_per_block(model)
    tcand = [text_candidates(e) for e in (text_encoders or [])]
    unet, text = {}, []
    for (tower, key), g in groups.items():
        down, up = g["down"], g["up"]
        if tower == "unet":
            if (ours := cand.get(key)) is None:
                rep.unmatched.append(key)
            elif not _fits(w := mods[ours].weight, down, up):
                rep.mismatched.append(f"{key}: file {tuple(down.shape)}/{tuple(up.shape)} vs model {tuple(w.shape)}")
            else:                                     # peft patterns name diffusers paths
                alpha = g.get("alpha", None)
                alpha = float(alpha) if alpha is not None else _alpha_from_peft(
                    _peft_meta(metadata, "unet"), unet_module_ldm_to_diffusers(ours, lpb), down.shape[0])
                unet[ours] = (down, up, alpha)
        elif text_encoders is None:
            rep.skipped_text += 1
        elif tower >= len(tcand) or key not in tcand[tower]:
            rep.unmatched.append(f"text_encoder{'_2' if tower else ''}:{key}")
        else:
            owner, param, row, tag = tcand[tower][key]
            W = getattr(owner, param)
            rows = W.shape[1] if param == "in_proj_weight" else W.shape[0]
            if up.numel() != rows * down.shape[0] or down.numel() != down.shape[0] * W.shape[1]:
                rep.mismatched.append(f"{key}: file {tuple(down.shape)}/{tuple(up.shape)} vs model {tuple(W.shape)}")
                continue
            tmeta = _peft_meta(metadata, "text_encoder" + ("_2" if tower else ""))
            alpha = float(g["alpha"]) if "alpha" in g else _alpha_from_peft(tmeta, key, down.shape[0])
            text.append((owner, param, row, tag, down.flatten(1), up.flatten(1), alpha))
    rep.matched = len(unet) + len(text)
    _families(rep, groups, unet, model)
    return unet, text, rep


def load_lora(model: nn.Module, source, name: str | None = None, scale: float = 1.0,
              strict: bool = True, text_encoders=None, dtype: torch.dtype | None = None) -> LoadReport:
    """Load a LoRA (path, folder, or (state_dict, metadata)) as adapter `name` onto the UNet `model`.

    `text_encoders`: the open_clip towers [te1, te2] for `lora_te*` / `text_encoder*` keys; None
    skips those keys (counted in the report). Any unmatched or mis-shaped module, or a LoRA of
    another family, raises unless strict=False, which loads what fits and warns with the counts.
    """
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        sd, metadata = read_lora_file(path)
        name = name or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    else:
        sd, metadata = source if isinstance(source, tuple) else (source, {})
        name = name or "lora"
    if name in lora_names(model) or any(name in lora_names(e) for e in text_encoders or []):
        raise ValueError(f"an adapter named {name!r} is already loaded; pick another name or remove_lora it")
    try:                                              # a problem with the file's content names the file
        unet, text, rep = match_lora(model, sd, metadata, text_encoders)
    except ValueError as e:
        raise named_error(path, e) from None
    rep.name, rep.metadata = name, dict(metadata or {})
    if rep.unmatched or rep.mismatched or rep.shallower:
        msg = (f"LoRA {name!r}: {rep.matched} modules matched, {len(rep.unmatched)} unmatched (first: "
               f"{rep.unmatched[:3]}), {len(rep.mismatched)} with the wrong shape (first: {rep.mismatched[:2]}).")
        msg = (rep.family_error() + " " if rep.family_error() else "") + msg
        if strict:
            raise named_error(path, msg + " Pass strict=False to load only what fits.")
        log.warning("%s Loading the %d modules that fit (strict=False).", msg, rep.matched)
    add_lora_weights(model, name, unet, scale, dtype)
    for owner, param, row, tag, down, up, alpha in text:
        host = getattr(owner, f"lora_delta_{param}", None)
        if host is None:
            host = LoRAParamDelta(owner, param)
            owner.add_module(f"lora_delta_{param}", host)
        host.add(name, tag, row, down.to(host.w0), up.to(host.w0), alpha, scale)
    if rep.skipped_text:
        log.warning("LoRA %r: skipped %d text-encoder modules (no text encoders given)", name, rep.skipped_text)
    return rep

#----------------------------------------------------------------------------
# Writing.


def export_lora(model: nn.Module, name: str, format: str = "kohya") -> tuple[dict, dict]:
    """(state_dict, metadata) of adapter `name` as trained (rank, alpha, weights; no scale).

    kohya: the released LCM-LoRA layout `lora_unet_<diffusers_path_underscored>.lora_down/up.weight`
    + 0-d `.alpha`; peft: diffusers `unet.<path>.lora_A/B.weight`, alpha in `lora_adapter_metadata`;
    native: our LDM names `<ldm>.lora_down/up.weight` + `.alpha`.
    """
    if format not in ("kohya", "peft", "native"):
        raise ValueError(f"unknown LoRA format {format!r}: 'kohya', 'peft' or 'native'")
    st, lpb = lora_state(model, name), layers_per_block(model)
    ranks = [d.shape[0] for d, _, _ in st.values()]
    alphas = [a for _, _, a in st.values()]
    r0, a0 = max(set(ranks), key=ranks.count), max(set(alphas), key=alphas.count)
    dpath = {ours: unet_module_ldm_to_diffusers(ours, lpb) for ours in st}
    cfg = dict(rank=r0, alpha=a0, targets=sorted(dpath.values()), adapter=name, format=format)
    out, meta = {}, {"format": "pt", "lora_rank": str(r0), "lora_alpha": f"{a0:g}",
                     "lora_config": json.dumps(cfg)}
    for ours, (down, up, alpha) in st.items():
        down, up = down.contiguous().cpu(), up.contiguous().cpu()
        if format == "peft":
            out[f"unet.{dpath[ours]}.lora_A.weight"], out[f"unet.{dpath[ours]}.lora_B.weight"] = down, up
            continue
        k = "lora_unet_" + dpath[ours].replace(".", "_") if format == "kohya" else ours
        out[f"{k}.lora_down.weight"], out[f"{k}.lora_up.weight"] = down, up
        out[f"{k}.alpha"] = torch.tensor(alpha, dtype=down.dtype, device="cpu")
    if format == "peft":                               # LoraConfig kwargs, as diffusers packs them
        peft = {"r": r0, "lora_alpha": a0, "target_modules": sorted(dpath.values()),
                "rank_pattern": {dpath[o]: d.shape[0] for o, (d, _, _) in st.items() if d.shape[0] != r0},
                "alpha_pattern": {dpath[o]: a for o, (_, _, a) in st.items() if a != a0}}
        meta[PEFT_META_KEY] = json.dumps({f"unet.{k}": v for k, v in peft.items()}, sort_keys=True)
    return out, meta


def save_lora(model: nn.Module, path: str, name: str, format: str = "kohya",
              overwrite: bool = False, metadata: dict | None = None) -> str:
    """Write adapter `name` as safetensors (a folder gets pytorch_lora_weights.safetensors)."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, DIFFUSERS_WEIGHT_NAME)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: LoRAs are written as .safetensors only")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    sd, meta = export_lora(model, name, format)
    save_file(sd, path, metadata={**meta, **{k: str(v) for k, v in (metadata or {}).items()}})
    return path

