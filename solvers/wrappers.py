"""The one place that knows prediction_type and classifier-free guidance (docs/method.md Secs. 2.1 and 3.1).

Solver contract: model_fn(x, t) -> eps_hat or x0_hat, x (B, ...), t a 0-dim CPU tensor: int64 on
the integer grid, float64 at DPM-Solver's continuous intermediate points (or (B,) per sample in
training). The network contract (lcm.denoiser.unet_net builds it for a UNet):

    NetFn     net(x, t, cond, w) -> raw output (eps, v or x0) (B, ...); cond a models.text.Conditioning
              of the batch, w (B,) the LCM guidance of w-embedding networks (or None)
    BranchFn  net_fn(x, t, with_uncond) -> raw output, a NetFn with its cond / uncond bound (lcm.denoiser.guided)
        with_uncond=False: x (B, ...), conditional branch only        (one pass, s == 1)
        with_uncond=True:  x (2B, ...) = cat([x, x]); returns cat([cond, uncond])  (s != 1)

GuidedModel turns a net_fn into the solvers' eps / x0 functions: the Pipeline, the trainer's
validation and the LCD teacher all go through it, so the solver tests certify the product path.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .schedule import Schedule, TimeLike, expand_as

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NetFn = Callable[[torch.Tensor, torch.Tensor, Any, Any], torch.Tensor]    # net(x, t, cond, w), e.g. lcm.denoiser.unet_net
BranchFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]     # net_fn(x, t, with_uncond)
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r} "
                         "(SD2.x-768 checkpoints are 'v_prediction'; pass it explicitly)")


def _ab(x: torch.Tensor, t: TimeLike, schedule: Schedule):
    return expand_as(schedule.alpha(t), x), expand_as(schedule.sigma(t), x)

#----------------------------------------------------------------------------
# Output conversions (docs/method.md Sec. 2.1 table). t: () or (B,); pred, x: (B, ...).

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
# Guidance. Imagen form with scale s; the LCM paper's w is s - 1 (LCM arXiv 2310.04378, Eq. 9).

def cfg(cond: torch.Tensor, uncond: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """uncond + s * (cond - uncond); equals cond + w * (cond - uncond) with w = s - 1; s () or (B,)."""
    s = expand_as(torch.as_tensor(s, dtype=torch.float64, device=s.device), cond) if torch.is_tensor(s) else s
    return uncond + s * (cond - uncond)


def lcm_w(guidance_scale: float) -> float:
    """LCM guidance weight w = s - 1 (the only place this conversion lives)."""
    return guidance_scale - 1.0


def guided_output(net_fn: BranchFn, x: torch.Tensor, t: torch.Tensor, guidance_scale: float | torch.Tensor = 1.0
                  ) -> torch.Tensor:
    """Raw output with CFG (B, ...): one pass (B) at a scalar s == 1, one batched pass (2B) otherwise.
    t: () or (B,); guidance_scale: a float, or (B,) per sample (the LCD teacher's w + 1)."""
    if not torch.is_tensor(guidance_scale) and guidance_scale == 1.0:
        return net_fn(x, t, False)
    tt = torch.cat([t, t]) if t.ndim else t
    cond, uncond = net_fn(torch.cat([x, x]), tt, True).chunk(2)   # CFG is linear, so it commutes
    return cfg(cond, uncond, guidance_scale)                       # with the affine conversions

#----------------------------------------------------------------------------
# The one model adapter: a network + prediction type + schedule + guidance -> the solvers' eps / x0.

class GuidedModel:
    """What every solver and the LCD teacher call: eps_hat / x0_hat of the guided network at (x, t).
    x0 comes from the raw output directly (v: x0 = alpha z - sigma v), not through eps."""

    def __init__(self, net_fn: BranchFn, prediction_type: str, schedule: Schedule,
                 guidance_scale: float | torch.Tensor = 1.0):
        _check(prediction_type)
        self.net_fn, self.prediction_type, self.schedule, self.s = net_fn, prediction_type, schedule, guidance_scale

    def output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided raw output (eps, v or x0) (B, ...)."""
        return guided_output(self.net_fn, x, t, self.s)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """model_fn for DDIM / DPM-Solver: guided eps_hat (B, ...)."""
        return to_eps(self.output(x, t), x, t, self.schedule, self.prediction_type)

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """model_fn for f_theta (LCM): guided x0_hat (B, ...)."""
        return to_x0(self.output(x, t), x, t, self.schedule, self.prediction_type)

    def x0_eps(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from one guided pass (a DDIM step needs both)."""
        out = self.output(x, t)
        return (to_x0(out, x, t, self.schedule, self.prediction_type),
                to_eps(out, x, t, self.schedule, self.prediction_type))


def make_eps_fn(net_fn: BranchFn, prediction_type: str, schedule: Schedule, guidance_scale: float = 1.0) -> ModelFn:
    """model_fn(x, t) -> guided eps_hat (B, ...), for DDIM and DPM-Solver(++)."""
    return GuidedModel(net_fn, prediction_type, schedule, guidance_scale).eps


def make_x0_fn(net_fn: BranchFn, prediction_type: str, schedule: Schedule, guidance_scale: float = 1.0) -> ModelFn:
    """model_fn(x, t) -> guided x0_hat (B, ...), the input of f_theta for LCM."""
    return GuidedModel(net_fn, prediction_type, schedule, guidance_scale).x0
