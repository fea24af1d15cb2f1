"""Multistep latent consistency sampling (LCM paper Algorithm 3; docs/method.md Sec. 7): denoise, re-noise."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .noise import randn
from .schedule import Schedule, TimeLike, as_t

#----------------------------------------------------------------------------
# z at tau_1 -> x0 = f_theta(z, tau_i); z = alpha(tau_{i+1}) x0 + sigma(tau_{i+1}) eps, fresh eps
# drawn from `generator` in step order; no noise after the last step (diffusers PR#5681).

@torch.no_grad()
def sample_lcm(denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
               timesteps: Sequence[TimeLike], schedule: Schedule, generator=None,
               callback: Callable | None = None) -> torch.Tensor:
    """denoise_fn(z, t) = f_theta(z, t) (B, ...); z (B, ...) noisy at timesteps[0] -> x0 (B, ...)."""
    if len(timesteps) == 0:
        raise ValueError("sample_lcm needs at least one timestep")
    for i, t in enumerate(timesteps):
        t = as_t(t)
        x0 = denoise_fn(z, t)                                    # f_theta(z, tau_i)
        if i + 1 < len(timesteps):                               # re-noise to tau_{i+1}
            eps = randn(z.shape, generator, device=z.device, dtype=z.dtype)
            z = schedule.add_noise(x0, eps, as_t(timesteps[i + 1]))
        if callback is not None:
            callback(i, t, z if i + 1 < len(timesteps) else x0, x0)
    return x0
