"""DDIM (Song et al. 2020, Eq. 12; docs/method.md Sec. 8): the first-order PF-ODE step, also LCD's teacher Psi.

Ends: t_prev = 0 lands on abar[0] = 0.99915 (the original SD sampler; diffusers set_alpha_to_one=False),
t_prev = None lands on sigma = 0 and returns x0_hat. prev_t always comes from the timestep list.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .noise import randn
from .schedule import Schedule, TimeLike, as_t, expand_as
from .wrappers import ModelFn, eps_to_x0

#----------------------------------------------------------------------------
# Closed form shared with the trainer: z_{t_prev} = sqrt(abar[t_prev]) x0 + sqrt(1 - abar[t_prev]) eps.

def ddim_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, t_prev: TimeLike | None, schedule: Schedule) -> torch.Tensor:
    """DDIM (eta = 0) landing at t_prev () or (B,), from combined (x0_hat, eps_hat) (B, ...)."""
    if t_prev is None:
        return x0
    return expand_as(schedule.alpha(t_prev), x0) * x0 + expand_as(schedule.sigma(t_prev), x0) * eps

#----------------------------------------------------------------------------
# One DDIM step from t to t_prev, eta in [0, 1] (eta = 1 is DDPM-like ancestral sampling).

def ddim_step(x: torch.Tensor, eps: torch.Tensor, t: TimeLike, t_prev: TimeLike | None, schedule: Schedule,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t (B, ...) and eps_hat(x_t, t) -> x_{t_prev} (B, ...)."""
    x0 = eps_to_x0(eps, x, t, schedule)
    if t_prev is None:
        return x0
    if eta == 0:
        return ddim_from_x0_eps(x0, eps, t_prev, schedule)
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    ab_t, ab_p = schedule.alpha(t) ** 2, schedule.alpha(t_prev) ** 2
    var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)            # DDIM Eq. 16, sigma_t(eta)^2 / eta^2
    std = eta * var.sqrt()
    dir_ = (1 - ab_p - std**2).clamp(min=0).sqrt()               # direction pointing to x_t
    return expand_as(ab_p.sqrt(), x) * x0 + expand_as(dir_, x) * eps + expand_as(std, x) * noise

#----------------------------------------------------------------------------
# The sampler: a loop over the given timesteps, then one step to t_final.

@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, timesteps: Sequence[TimeLike], schedule: Schedule,
                eta: float = 0.0, generator=None, callback: Callable | None = None,
                t_final: TimeLike | None = 0) -> torch.Tensor:
    """DDIM from x at timesteps[0] (B, ...) to t_final (0: abar[0]; None: sigma 0, x0) -> (B, ...)."""
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else t_final
        t = as_t(t)
        eps = model_fn(x, t)
        noise = None
        if eta > 0 and t_prev is not None:
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x_new = ddim_step(x, eps, t, None if t_prev is None else as_t(t_prev), schedule, eta, noise)
        if callback is not None:
            callback(i, t, x_new, eps_to_x0(eps, x, t, schedule))
        x = x_new
    return x
