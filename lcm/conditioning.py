"""Conditioning shared by sampling and training: SDXL's vector y and the unconditional branch."""
import torch

from models.text import Conditioning
from models.unet import timestep_embedding

SIZE_EMB_DIM = 256                                     # each SDXL micro-conditioning id: 256-dim sinusoid


def sdxl_vector(pooled: torch.Tensor, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL y (B, 1280 + 6*256) = [pooled, emb(orig_h, orig_w), emb(crop_top, crop_left), emb(h, w)]."""
    ids = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
    emb = timestep_embedding(ids, SIZE_EMB_DIM).reshape(1, -1)          # (1, 6*256), [cos, sin] each
    return torch.cat([pooled, emb.to(pooled).expand(pooled.shape[0], -1)], dim=1)


def zero_uncond(cond: Conditioning) -> Conditioning:
    """SDXL's unconditional branch: zero context and zero pooled vector (as the reference does)."""
    pooled = None if cond.pooled is None else torch.zeros_like(cond.pooled)
    return Conditioning(context=torch.zeros_like(cond.context), pooled=pooled)
