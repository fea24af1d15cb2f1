"""CLIP text encoders of SD1 / SD2 / SDXL on open_clip's building blocks, and their tokenization.

SD1: OpenAI CLIP ViT-L/14 (QuickGELU), last layer + final LayerNorm, 77x768, pad = end-of-text.
SD2: OpenCLIP ViT-H/14 (GELU), penultimate layer + final LayerNorm, 77x1024, pad = 0.
SDXL: CLIP-L and OpenCLIP bigG penultimate layers, no final LayerNorm, concatenated to 77x2048,
      plus bigG's projected pooled output (1280). Weights use open_clip names; SD1/SDXL-L files
      store HF names and go through models.keymaps.clip_state_dict_hf_to_open_clip.
"""
import functools
import logging
import re
import warnings
from dataclasses import dataclass

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

from models.keymaps import clip_state_dict_hf_to_open_clip

log = logging.getLogger(__name__)

SOT, EOT = 49406, 49407                               # <start_of_text>, <end_of_text>
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}

#----------------------------------------------------------------------------
# Tokenization: SOT, byte-level BPE, EOT, padding. The BPE vocabulary ships with open_clip.


@functools.lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(prompts: list[str], pad_token_id: int, context_length: int = 77,
             warn: bool = True) -> torch.Tensor:
    """Prompts -> token ids (B, context_length): SOT, BPE, EOT, then pad_token_id.

    Too-long prompts keep their first context_length - 2 tokens and end with EOT (as HF's
    CLIPTokenizer(truncation=True) and open_clip.tokenize do), with one warning per call.
    Text cleaning is OpenAI CLIP's (ftfy, HTML unescape, whitespace, lower case), as SD1's slow
    HF CLIPTokenizer with ftfy and open_clip.tokenize did.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    out = torch.full((len(prompts), context_length), pad_token_id, dtype=torch.long, device="cpu")
    dropped = {}
    for i, prompt in enumerate(prompts):
        ids = [SOT] + _bpe().encode(prompt) + [EOT]
        if len(ids) > context_length:
            dropped[i] = len(ids) - context_length
            ids = ids[:context_length - 1] + [EOT]
        out[i, :len(ids)] = torch.tensor(ids, device="cpu")
    if dropped and warn:
        warnings.warn(f"{len(dropped)} prompt(s) exceed the {context_length}-token text context; "
                      f"tokens dropped from the end (prompt index: count): {dropped}", stacklevel=2)
    return out

#----------------------------------------------------------------------------
# One CLIP text transformer, open_clip layout (token_embedding, positional_embedding,
# transformer.resblocks.*, ln_final, text_projection (width, proj_dim)).


class TextTower(nn.Module):
    def __init__(self,
                 width: int = 768,
                 layers: int = 12,
                 heads: int = 12,
                 vocab_size: int = 49408,
                 context_length: int = 77,
                 act: str = "quick_gelu",         # OpenAI CLIP-L: quick_gelu; OpenCLIP H / bigG: gelu
                 proj_dim: int | None = None,     # text_projection (width, proj_dim); None: none
                 pad_token_id: int = EOT,         # SD1 / HF CLIP-L: EOT; OpenCLIP: 0
                 layer: str = "last",             # "last" | "penultimate": which block's output
                 final_norm: bool = True):        # apply ln_final to that output
        super().__init__()
        assert act in ACTIVATIONS, f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}"
        assert layer in ("last", "penultimate"), f"layer must be 'last' or 'penultimate', got {layer!r}"
        self.config = dict(width=width, layers=layers, heads=heads, vocab_size=vocab_size,
                           context_length=context_length, act=act, proj_dim=proj_dim,
                           pad_token_id=pad_token_id, layer=layer, final_norm=final_norm)
        self.context_length, self.pad_token_id, self.layer, self.final_norm = \
            context_length, pad_token_id, layer, final_norm
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, act_layer=ACTIVATIONS[act], batch_first=True)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, proj_dim)) if proj_dim else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)       # open_clip's init
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, tokens: torch.Tensor, return_pooled: bool = True):
        """tokens (B, L<=77) -> (hidden (B, L, width), pooled (B, proj_dim) or None).

        pooled = ln_final(last block output)[EOT position] @ text_projection; EOT = argmax(tokens).
        """
        B, L = tokens.shape
        if L > self.context_length:
            raise ValueError(f"{L} tokens exceed the text context of {self.context_length}")
        blocks = self.transformer.resblocks
        stop = len(blocks) - (self.layer == "penultimate")            # blocks before `hidden`
        pooled_wanted = return_pooled and self.text_projection is not None
        x = self.token_embedding(tokens) + self.positional_embedding[:L]          # (B, L, C)
        mask = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu(1)  # causal
        hidden = x
        for i, block in enumerate(blocks[:len(blocks) if pooled_wanted else stop]):
            x = block(x, attn_mask=mask)
            if i + 1 == stop:
                hidden = x
        hidden = self.ln_final(hidden) if self.final_norm else hidden
        if not pooled_wanted:
            return hidden, None
        eot = self.ln_final(x)[torch.arange(B, device=x.device), tokens.argmax(dim=-1)]  # (B, C)
        return hidden, eot @ self.text_projection                                 # (B, proj_dim)

#----------------------------------------------------------------------------
# The conditioner: 1 (SD1/SD2) or 2 (SDXL) towers; context is their concatenation.


@dataclass
class Conditioning:
    """What a prompt conditions the UNet on; the one conditioning type of sampling and training."""
    context: torch.Tensor                  # (B, 77, D): 768 SD1, 1024 SD2, 2048 SDXL
    pooled: torch.Tensor | None = None     # (B, 1280) SDXL (bigG's projected EOT feature), else None
    y: torch.Tensor | None = None          # (B, 2816) SDXL UNet vector [pooled, size/crop ids], else None

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Batch concatenation [self; other] (one UNet pass over cond and uncond)."""
        join = lambda a, b: None if a is None else torch.cat([a, b])
        return Conditioning(join(self.context, other.context), join(self.pooled, other.pooled), join(self.y, other.y))

    def where(self, mask: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Per sample: `other` where mask (B,) is True, else self (caption dropout)."""
        def pick(a, b):
            return None if a is None else torch.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)).bool(), b, a)
        return Conditioning(pick(self.context, other.context), pick(self.pooled, other.pooled), pick(self.y, other.y))


class TextConditioner(nn.Module):
    def __init__(self, towers: list[dict], pooled_from: int | None = None):
        super().__init__()
        self.towers = nn.ModuleList(TextTower(**kw) for kw in towers)
        self.pooled_from = pooled_from                    # index of the tower giving `pooled`

    @property
    def config(self) -> dict:
        return dict(towers=[t.config for t in self.towers], pooled_from=self.pooled_from)

    def encode(self, prompts: list[str]) -> Conditioning:
        """Prompts -> Conditioning(context (B, 77, sum of widths), pooled (B, proj) or None)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        contexts, pooled = [], None
        for i, tower in enumerate(self.towers):
            tokens = tokenize(prompts, tower.pad_token_id, tower.context_length, warn=i == 0)
            hidden, p = tower(tokens.to(tower.token_embedding.weight.device), return_pooled=i == self.pooled_from)
            contexts.append(hidden)
            pooled = p if i == self.pooled_from else pooled
        return Conditioning(torch.cat(contexts, dim=-1), pooled)

#----------------------------------------------------------------------------
# Family presets (full size) and where the weights live in original checkpoints.

CLIP_L = dict(width=768, layers=12, heads=12, act="quick_gelu", proj_dim=None, pad_token_id=EOT)
OPENCLIP_H = dict(width=1024, layers=24, heads=16, act="gelu", proj_dim=1024, pad_token_id=0)
OPENCLIP_BIGG = dict(width=1280, layers=32, heads=20, act="gelu", proj_dim=1280, pad_token_id=0)
_SDXL = dict(towers=[{**CLIP_L, "layer": "penultimate", "final_norm": False},
                     {**OPENCLIP_BIGG, "layer": "penultimate", "final_norm": False}], pooled_from=1)
PRESETS = {
    "sd15": dict(towers=[{**CLIP_L, "layer": "last", "final_norm": True}], pooled_from=None),
    "sd21": dict(towers=[{**OPENCLIP_H, "layer": "penultimate", "final_norm": True}], pooled_from=None),
    "sdxl": _SDXL,
    "ssd1b": _SDXL,
}
SOURCES = {                                            # (prefix, layout) per tower
    "sd15": [("cond_stage_model.transformer.", "hf")],
    "sd21": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")],
    "ssd1b": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")],
}
OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")        # CLIP's contrastive temperature; a buffer


def infer_text_config(sd: dict) -> dict:
    """Tower sizes from an open_clip-layout text state dict (act, pad, layer come from the family)."""
    for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if key not in sd:
            raise ValueError(f"not an open_clip text state dict: missing {key!r} (first keys: {sorted(sd)[:3]})")
    vocab_size, width = sd["token_embedding.weight"].shape
    if sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] != 4 * width:
        raise ValueError(f"text MLP width {sd['transformer.resblocks.0.mlp.c_fc.weight'].shape[0]} is not "
                         f"4 x {width}: not a CLIP text tower")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    proj = sd.get("text_projection")
    return dict(width=width, layers=layers, heads=max(1, width // 64), vocab_size=vocab_size,
                context_length=sd["positional_embedding"].shape[0],
                proj_dim=None if proj is None else proj.shape[1])


def text_state_dicts(family: str, sd: dict) -> list[dict]:
    """One open_clip-layout state dict per tower, sliced from a full original checkpoint."""
    if family not in SOURCES:
        raise ValueError(f"no text encoder layout for family {family!r}; known: {sorted(SOURCES)}")
    out = []
    for prefix, layout in SOURCES[family]:
        part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not part:
            raise ValueError(f"{family}: no text encoder weights under {prefix!r} (first keys: {sorted(sd)[:3]})")
        if layout == "hf":
            part = clip_state_dict_hf_to_open_clip(part)
        ignored = [k for k in part if k in OPEN_CLIP_IGNORED]
        if ignored:
            log.debug("%s text encoder: ignoring %s", family, ignored)
        out.append({k: v for k, v in part.items() if k not in OPEN_CLIP_IGNORED})
    return out


def build_text_conditioner(family: str, sd: dict, dtype: torch.dtype = torch.float32,
                           config: dict | None = None) -> TextConditioner:
    """Slice, convert and strictly load the text encoder(s) of a full checkpoint state dict.

    Sizes are inferred from the weights (act, pad, layer choice from the family preset), unless a
    saved `config` (TextConditioner.config) is given.
    """
    parts = text_state_dicts(family, sd)
    if config is None:
        preset = PRESETS[family]
        config = dict(towers=[{**kw, **infer_text_config(p)} for kw, p in zip(preset["towers"], parts)],
                      pooled_from=preset["pooled_from"])
    assert len(config["towers"]) == len(parts), f"{len(config['towers'])} tower configs for {len(parts)} towers"
    with torch.device("meta"):
        cond = TextConditioner(**config)
    for i, (tower, part) in enumerate(zip(cond.towers, parts)):
        ours = tower.state_dict()
        missing = [f"{k} {tuple(v.shape)}" for k, v in ours.items() if k not in part]
        extra = [f"{k} {tuple(v.shape)}" for k, v in part.items() if k not in ours]
        bad = [f"{k}: file {tuple(part[k].shape)} vs model {tuple(ours[k].shape)}"
               for k in ours.keys() & part.keys() if ours[k].shape != part[k].shape]
        if missing or extra or bad:
            raise ValueError(f"{family} text encoder {i} ({SOURCES[family][i][0]}) does not load strictly: "
                             f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                             f"(e.g. {extra[:3]}), {len(bad)} wrong shape (e.g. {bad[:3]})")
        tower.load_state_dict(part, strict=True, assign=True)
    left = [n for n, t in cond.named_parameters() if t.is_meta]
    assert not left, f"text parameters left uninitialised: {left[:3]}"
    return cond.to(dtype)
