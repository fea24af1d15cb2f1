"""Conditioning shared by sampling and training: SDXL's vector y and the unconditional branch."""
from __future__ import annotations

import torch

from models.text import Conditioning
from models.unet import timestep_embedding

SIZE_EMB_DIM = 256                                     # each SDXL micro-conditioning id: 256-dim sinusoid
ZERO_UNCOND_FAMILIES = ("sdxl", "ssd1b")               # families whose reference uses a zero uncond branch


def sdxl_vector(pooled: torch.Tensor, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL y (B, 1280 + 6*256) = [pooled, emb(orig_h, orig_w), emb(crop_top, crop_left), emb(h, w)]."""
    ids = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32,
                       device="cpu")
    emb = timestep_embedding(ids, SIZE_EMB_DIM).reshape(1, -1)          # (1, 6*256), [cos, sin] each
    return torch.cat([pooled, emb.to(pooled).expand(pooled.shape[0], -1)], dim=1)


def with_vector(cond: Conditioning, original_sizes: list, crops: list, target_size: tuple[int, int]) -> Conditioning:
    """cond with y filled in per sample (SDXL: pooled + size/crop ids); unchanged without pooled."""
    if cond.pooled is None:
        return cond
    y = torch.cat([sdxl_vector(cond.pooled[i:i + 1], tuple(o), tuple(c), target_size)
                   for i, (o, c) in enumerate(zip(original_sizes, crops))])
    return Conditioning(cond.context, cond.pooled, y)


def unconditional(encode, family: str, cond: Conditioning, negative: list[str] | None = None,
                  empty: Conditioning | None = None) -> Conditioning:
    """The unconditional branch for a batch `cond`: the encoded negative prompts if given, else SDXL's
    zero context and pooled (as its reference pipeline does), else the encoded empty prompt ""
    (`empty`, a (1, 77, D) encoding of "" to reuse, saves the text pass). encode: prompts -> Conditioning.
    Returned without y (see with_vector)."""
    B = cond.context.shape[0]
    if negative is not None:
        if len(negative) != B:
            raise ValueError(f"negative_prompt has {len(negative)} entries for {B} prompts")
        return encode(list(negative))
    if family in ZERO_UNCOND_FAMILIES:
        return Conditioning(torch.zeros_like(cond.context),
                            None if cond.pooled is None else torch.zeros_like(cond.pooled))
    empty = empty if empty is not None else encode([""])
    return Conditioning(empty.context.expand(B, -1, -1), None if empty.pooled is None else empty.pooled.expand(B, -1))
