"""Reproducible Gaussian noise: drawn on the CPU from explicit generators (docs/conventions.md Sec. 5)."""
from __future__ import annotations

import torch

#----------------------------------------------------------------------------
# One draw per image when given one generator per image, so an image reproduces at any batch size.

def randn(shape, generator: torch.Generator | list[torch.Generator] | None = None,
          device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """N(0, I) of `shape` (B, ...): float32 drawn on the CPU, then moved to device/dtype."""
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        x = torch.cat([torch.randn((1,) + shape[1:], generator=g, device="cpu") for g in generator])
    else:
        x = torch.randn(shape, generator=generator, device="cpu")
    return x.to(device=device, dtype=dtype or torch.float32)
