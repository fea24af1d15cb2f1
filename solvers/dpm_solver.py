"""DPM-Solver (Lu et al. 2022, noise prediction) and DPM-Solver++ (Lu et al. 2022b, data prediction).

Exponential integrators in lambda = log(alpha/sigma); a step from s to t has h = lambda_t - lambda_s > 0
(docs/method.md Sec. 8). model_fn(x, t) -> eps_hat; x0_hat = (x - sigma eps_hat) / alpha. Run latents in fp32.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .schedule import Schedule, TimeLike, as_t, expand_as
from .wrappers import ModelFn, eps_to_x0


def _coefs(schedule: Schedule, t: TimeLike | None) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) as floats; t = None is the data end, sigma = 0."""
    if t is None:
        return 1.0, 0.0, math.inf
    return float(schedule.alpha(t)), float(schedule.sigma(t)), float(schedule.lambda_(t))

#----------------------------------------------------------------------------
# Singlestep DPM-Solver-1/2/3 (DPM-Solver paper Algorithms 1-2; r1 = 1/2 for order 2, 1/3 and
# 2/3 for order 3), with intermediate times s_i = inverse_lambda(lambda_s + r_i h) passed as float64.
# Times are () (the samplers) or (B,) per sample (the LCD teacher step Psi, lcm.objectives.teacher).

def _coefs_like(schedule: Schedule, t: torch.Tensor, x: torch.Tensor):
    """(alpha_t, sigma_t, lambda_t) as float64 tensors of t's shape, and `c`: coefficient -> x's dtype,
    broadcastable against x."""
    c = lambda v: expand_as(v, x)
    return schedule.alpha(t), schedule.sigma(t), schedule.lambda_(t), c


def dpm_solver_step(model_fn: ModelFn, x: torch.Tensor, s: TimeLike, t: TimeLike, schedule: Schedule,
                    order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One order-k noise-prediction step x_s -> x_t (k model calls); returns (x_t, x0_hat(x_s, s))."""
    s, t = as_t(s), as_t(t)
    a_s, sg_s, l_s, c = _coefs_like(schedule, s, x)
    a_t, sg_t, l_t, _ = _coefs_like(schedule, t, x)
    h = l_t - l_s
    e_s = model_fn(x, s)
    x_t = c(a_t / a_s) * x - c(sg_t * torch.expm1(h)) * e_s     # order 1 = DDIM (noise form)
    if order == 2:
        r1 = 0.5
        s1 = schedule.inverse_lambda(l_s + r1 * h)
        a_1, sg_1 = schedule.alpha(s1), schedule.sigma(s1)
        u = c(a_1 / a_s) * x - c(sg_1 * torch.expm1(r1 * h)) * e_s
        x_t = x_t - c((sg_t / (2 * r1)) * torch.expm1(h)) * (model_fn(u, s1) - e_s)
    elif order == 3:
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = schedule.inverse_lambda(l_s + r1 * h), schedule.inverse_lambda(l_s + r2 * h)
        a_1, sg_1 = schedule.alpha(s1), schedule.sigma(s1)
        a_2, sg_2 = schedule.alpha(s2), schedule.sigma(s2)
        u1 = c(a_1 / a_s) * x - c(sg_1 * torch.expm1(r1 * h)) * e_s
        D1 = model_fn(u1, s1) - e_s
        u2 = (c(a_2 / a_s) * x - c(sg_2 * torch.expm1(r2 * h)) * e_s
              - c((sg_2 * r2 / r1) * (torch.expm1(r2 * h) / (r2 * h) - 1)) * D1)
        D2 = model_fn(u2, s2) - e_s
        x_t = x_t - c((sg_t / r2) * (torch.expm1(h) / h - 1)) * D2
    elif order != 1:
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    return x_t, eps_to_x0(e_s, x, s, schedule)


def dpmpp_2s_step(model_fn: ModelFn, x: torch.Tensor, s: TimeLike, t: TimeLike, schedule: Schedule,
                  order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """One singlestep DPM-Solver++(1S/2S) step x_s -> x_t (data form); returns (x_t, x0_hat(x_s, s))."""
    s, t = as_t(s), as_t(t)
    a_s, sg_s, l_s, c = _coefs_like(schedule, s, x)
    a_t, sg_t, l_t, _ = _coefs_like(schedule, t, x)
    h = l_t - l_s
    D_s = eps_to_x0(model_fn(x, s), x, s, schedule)
    x_t = c(sg_t / sg_s) * x - c(a_t * torch.expm1(-h)) * D_s   # order 1 = DDIM (data form)
    if order == 2:
        r1 = 0.5
        s1 = schedule.inverse_lambda(l_s + r1 * h)
        a_1, sg_1 = schedule.alpha(s1), schedule.sigma(s1)
        u = c(sg_1 / sg_s) * x - c(a_1 * torch.expm1(-r1 * h)) * D_s
        D_1 = eps_to_x0(model_fn(u, s1), u, s1, schedule)
        x_t = x_t - c((a_t / (2 * r1)) * torch.expm1(-h)) * (D_1 - D_s)
    elif order != 1:
        raise ValueError(f"singlestep DPM-Solver++ order must be 1 or 2, got {order}")
    return x_t, D_s


@torch.no_grad()
def sample_dpm_solver(model_fn: ModelFn, x: torch.Tensor, timesteps: Sequence[TimeLike], schedule: Schedule,
                      order: int = 2, algorithm: str = "dpmsolver", t_final: TimeLike | None = 0,
                      callback: Callable | None = None) -> torch.Tensor:
    """Singlestep DPM-Solver(++): one order-k step per interval (k model calls each) -> (B, ...).

    Intervals are timesteps[i] -> timesteps[i + 1], then -> t_final (0: abar[0], as the original
    DPM-Solver's discrete end t = 1/N; None: sigma = 0, a first-order step returning x0_hat).
    """
    step = {"dpmsolver": dpm_solver_step, "dpmsolver++": dpmpp_2s_step}.get(algorithm)
    if step is None:
        raise ValueError(f"algorithm must be 'dpmsolver' or 'dpmsolver++', got {algorithm!r}")
    for i, s in enumerate(timesteps):
        t = timesteps[i + 1] if i + 1 < len(timesteps) else t_final
        s = as_t(s)
        if t is None:                                            # lambda_t = inf: x_t = x0_hat
            x = x0 = eps_to_x0(model_fn(x, s), x, s, schedule)
        elif float(t) == float(s):                               # zero-length interval
            continue
        else:
            x, x0 = step(model_fn, x, s, as_t(t), schedule, order)
        if callback is not None:
            callback(i, s, x, x0)
    return x

#----------------------------------------------------------------------------
# Multistep DPM-Solver++(2M) (DPM-Solver++ paper Algorithm 2), as diffusers'
# DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint").

@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, timesteps: Sequence[TimeLike], schedule: Schedule,
                    t_final: TimeLike | None = None, lower_order_final: bool = True,
                    callback: Callable | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), one model call per step, ending at t_final (None: sigma 0, returns x0) -> (B, ...).

    First step first-order; the last step is first-order when it lands on sigma = 0, or when
    lower_order_final and fewer than 15 steps (diffusers' rule).
    """
    n = len(timesteps)
    D_prev = h_prev = None
    for i, s in enumerate(timesteps):
        t = timesteps[i + 1] if i + 1 < n else t_final
        s = as_t(s)
        a_s, sg_s, l_s = _coefs(schedule, s)
        a_t, sg_t, l_t = _coefs(schedule, t)
        h = l_t - l_s
        D0 = eps_to_x0(model_fn(x, s), x, s, schedule)          # data prediction at x_s
        first = i == 0 or (i == n - 1 and (t is None or (lower_order_final and n < 15)))
        if t is None:
            x = D0                                               # sigma_t = 0, exp(-h) = 0
        else:
            D = D0
            if not first:
                r = h_prev / h                                   # r_i = h_{i-1} / h_i
                D = (1 + 1 / (2 * r)) * D0 - (1 / (2 * r)) * D_prev
            x = (sg_t / sg_s) * x - a_t * math.expm1(-h) * D
        if callback is not None:
            callback(i, s, x, D0)
        D_prev, h_prev = D0, h
    return x
