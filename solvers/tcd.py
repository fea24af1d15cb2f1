"""Strategic stochastic sampling of TCD (Zheng et al. 2024, arXiv 2402.19159, Sec. 4.3; docs/method.md, TCD).

From tau_i to tau_{i+1} (tau_{i+1} = 0 after the last grid point), with gamma in [0, 1]:
    s' = floor((1 - gamma) tau_{i+1})
    x_{s'} = alpha_{s'} x0_hat + sigma_{s'} eps_hat                       (TCF(1): DDIM from tau_i to s')
    x_{tau_{i+1}} = (alpha_{tau_{i+1}} / alpha_{s'}) x_{s'} + sqrt(1 - abar_{tau_{i+1}} / abar_{s'}) z
gamma = 0 is deterministic DDIM on the grid; gamma = 1 denoises fully and re-noises (LCM-like). The
last step returns x_{s'} at s' = 0 (abar[0], not a pure x0), as diffusers' TCDScheduler does; one
noise draw per non-final step when gamma > 0, none otherwise (its draw order).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .ddim import ddim_from_x0_eps
from .noise import randn
from .schedule import Schedule, TimeLike, as_t, expand_as

X0EpsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def tcd_s(t_prev: int, gamma: float) -> int:
    """The intermediate time s' = floor((1 - gamma) t_prev) the step denoises to."""
    return int(math.floor((1.0 - gamma) * int(t_prev)))


def tcd_step(x0: torch.Tensor, eps: torch.Tensor, t_prev: int, schedule: Schedule, gamma: float,
             noise: torch.Tensor | None) -> torch.Tensor:
    """(x0_hat, eps_hat) at tau_i (B, ...) -> x_{tau_{i+1}}; noise None: stop at s' (last step, gamma 0)."""
    s = tcd_s(t_prev, gamma)
    x_s = ddim_from_x0_eps(x0, eps, s, schedule)                       # TCF(1): alpha_s' x0 + sigma_s' eps
    if noise is None:
        return x_s
    r = schedule.alpha(t_prev) ** 2 / schedule.alpha(s) ** 2            # abar_{tau_{i+1}} / abar_{s'}
    return expand_as(r.sqrt(), x_s) * x_s + expand_as((1 - r).sqrt(), x_s) * noise   # forward s' -> tau_{i+1}


@torch.no_grad()
def sample_tcd(model_fn: X0EpsFn, z: torch.Tensor, timesteps: Sequence[TimeLike], schedule: Schedule,
               gamma: float = 0.3, generator=None, callback: Callable | None = None) -> torch.Tensor:
    """model_fn(z, t) -> (x0_hat, eps_hat) (B, ...); z (B, ...) noisy at timesteps[0] -> the sample."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD eta (gamma) must be in [0, 1], got {gamma}")
    if len(timesteps) == 0:
        raise ValueError("sample_tcd needs at least one timestep")
    for i, t in enumerate(timesteps):
        last = i + 1 == len(timesteps)
        t_prev = 0 if last else int(timesteps[i + 1])
        x0, eps = model_fn(z, as_t(t))
        noise = None
        if gamma > 0 and not last:
            noise = randn(z.shape, generator, device=z.device, dtype=z.dtype)
        z = tcd_step(x0, eps, t_prev, schedule, gamma, noise)
        if callback is not None:
            callback(i, as_t(t), z, x0)
    return z
