"""The one place that knows prediction_type (PAPER Sec. 2), classifier-free guidance (Sec. 3.1).

Solver contract: model_fn(x, t) -> eps_hat, x (B, ...), t a 0-dim CPU tensor: int64 on the
integer grid, float64 at DPM-Solver's continuous intermediate points. The network contract:

    net_fn(x, t, with_uncond) -> raw output (eps, v or x0)
        with_uncond=False: x (B, ...), conditional branch only        (one pass, s == 1)
        with_uncond=True:  x (2B, ...) = cat([x, x]); returns cat([cond, uncond])  (s != 1)
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedule import Schedule, TimeLike, expand_as

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NetFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r} "
                         "(SD2.x-768 checkpoints are 'v_prediction'; pass it explicitly)")


def _ab(x: torch.Tensor, t: TimeLike, schedule: Schedule):
    return expand_as(schedule.alpha(t), x), expand_as(schedule.sigma(t), x)

#----------------------------------------------------------------------------
# Output conversions (PAPER Sec. 2 table). t: () or (B,); pred, x: (B, ...).

def to_x0(pred: torch.Tensor, x: torch.Tensor, t: TimeLike, schedule: Schedule, prediction_type: str) -> torch.Tensor:
    """x0_hat from a raw network output at (x, t)."""
    _check(prediction_type)
    a, s = _ab(x, t, schedule)
    if prediction_type == "epsilon":
        return (x - s * pred) / a                                # x0 = (z - sigma eps) / alpha
    if prediction_type == "v_prediction":
        return a * x - s * pred                                  # x0 = alpha z - sigma v
    return pred


def to_eps(pred: torch.Tensor, x: torch.Tensor, t: TimeLike, schedule: Schedule, prediction_type: str) -> torch.Tensor:
    """eps_hat from a raw network output at (x, t)."""
    _check(prediction_type)
    a, s = _ab(x, t, schedule)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return s * x + a * pred                                  # eps = sigma z + alpha v
    return (x - a * pred) / s                                    # eps = (z - alpha x0) / sigma


def eps_to_x0(eps: torch.Tensor, x: torch.Tensor, t: TimeLike, schedule: Schedule) -> torch.Tensor:
    """x0_hat = (x - sigma_t eps_hat) / alpha_t."""
    return to_x0(eps, x, t, schedule, "epsilon")

#----------------------------------------------------------------------------
# Guidance. Imagen form with scale s; the LCM paper's w is s - 1 (PAPER Sec. 3.1).

def cfg(cond: torch.Tensor, uncond: torch.Tensor, s: float) -> torch.Tensor:
    """uncond + s * (cond - uncond); equals cond + w * (cond - uncond) with w = s - 1."""
    return uncond + s * (cond - uncond)


def lcm_w(guidance_scale: float) -> float:
    """LCM guidance weight w = s - 1 (the only place this conversion lives)."""
    return guidance_scale - 1.0


def guided_output(net_fn: NetFn, x: torch.Tensor, t: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
    """Raw output with CFG: one pass (B) at s == 1, one batched pass (2B) otherwise; (B, ...)."""
    if guidance_scale == 1.0:
        return net_fn(x, t, False)
    cond, uncond = net_fn(torch.cat([x, x]), t, True).chunk(2)  # CFG is linear, so it commutes
    return cfg(cond, uncond, guidance_scale)                   # with the affine conversions


def make_eps_fn(net_fn: NetFn, prediction_type: str, schedule: Schedule, guidance_scale: float = 1.0) -> ModelFn:
    """model_fn(x, t) -> guided eps_hat (B, ...), for DDIM and DPM-Solver(++)."""
    _check(prediction_type)
    return lambda x, t: to_eps(guided_output(net_fn, x, t, guidance_scale), x, t, schedule, prediction_type)


def make_x0_fn(net_fn: NetFn, prediction_type: str, schedule: Schedule, guidance_scale: float = 1.0) -> ModelFn:
    """model_fn(x, t) -> guided x0_hat (B, ...), the input of f_theta for LCM."""
    _check(prediction_type)
    return lambda x, t: to_x0(guided_output(net_fn, x, t, guidance_scale), x, t, schedule, prediction_type)
