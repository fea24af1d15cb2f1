"""TrigFlow on SD's discrete VP schedule and the continuous-time consistency loss (sCM, arXiv 2410.11081;
docs/method.md Sec. 15; the formulas checked against FastGen `sCM.py` and NVlabs/rcm, cited by line). Pure functions.

    x_tau = cos tau x0 + sin tau z,  z ~ N(0, sigma_d^2 I),  tau in [0, pi/2] (t is the SD timestep)
    f(x, tau) = cos tau x - sigma_d sin tau F(x, tau)              (consistency function, f(x, 0) = x)
    VP: x_VP = k x at t_SD(tau), alpha_t = k cos tau, sigma_t = k sigma_d sin tau,
        k = 1 / sqrt(cos^2 tau + sigma_d^2 sin^2 tau)              (SNR matching: alpha_t / sigma_t = cot tau / sigma_d)

With sigma_d = 1 TrigFlow is SD's VP process (k = 1, alpha = cos tau, sigma = sin tau), F = v and f = x0_hat.
Here F(x, tau) takes the TrigFlow x itself (FastGen's network takes x / sigma_d; the same F).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lcm.objectives.losses import draw
from solvers.schedule import Schedule, TimeLike, expand_as

FFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]      # F(x, tau): x (B, ...), tau (B,) -> (B, ...)
JvpFn = Callable[[FFn, tuple, tuple], tuple]                     # jvp(fn, primals, tangents) -> (out, tangent_out)

#----------------------------------------------------------------------------
# Time: tau <-> t_SD. lambda_t = log(alpha_t / sigma_t) = log(cot tau / sigma_d) (SNR matching, FastGen L48-50).

def tau_of_t(t: TimeLike, schedule: Schedule, sigma_d: float = 1.0) -> torch.Tensor:
    """tau = atan2(sigma_t, sigma_d alpha_t), float64; sigma_d = 1: arccos sqrt(abar[t]) (FastGen L203)."""
    return torch.atan2(schedule.sigma(t), sigma_d * schedule.alpha(t))


def t_of_tau(tau: torch.Tensor, schedule: Schedule, sigma_d: float = 1.0) -> torch.Tensor:
    """Continuous t_SD (float64, shape of tau): the inverse of the schedule's lambda_t at log(cot tau / sigma_d),
    piecewise-linear in log alpha between integer knots (Schedule.inverse_lambda), exact at the knots, never
    rounded: the UNet's time input moves with tau, so the JVP's time tangent reaches its embedding."""
    tau = tau.to(device=schedule.abar.device, dtype=torch.float64)
    return schedule.inverse_lambda(torch.log(torch.cos(tau) / (sigma_d * torch.sin(tau))))


def tau_range(schedule: Schedule, sigma_d: float = 1.0) -> tuple[float, float]:
    """(tau(0), tau(T-1)): SD scaled_linear with sigma_d = 1 gives (0.02916, 1.50248)."""
    return float(tau_of_t(0, schedule, sigma_d)), float(tau_of_t(schedule.T - 1, schedule, sigma_d))


def vp_scale(tau: torch.Tensor, sigma_d: float = 1.0) -> torch.Tensor:
    """k = 1 / sqrt(cos^2 tau + sigma_d^2 sin^2 tau): x_VP = k x (FastGen L52-56); 1 for sigma_d = 1."""
    return torch.rsqrt(torch.cos(tau) ** 2 + sigma_d**2 * torch.sin(tau) ** 2)

#----------------------------------------------------------------------------
# F <-> the VP network's raw output (eps, v or x0) at (k x, t_SD(tau)). x, raw (B, ...); tau (B,).
# eps: x0_hat = (x - sigma_d sin eps) / cos, F = (cos x - x0_hat) / (sigma_d sin) = (sigma_d eps - sin x)/(sigma_d cos);
# v = alpha eps - sigma x0:  F = k v + sin cos (sigma_d^2 - 1) k^2 x / sigma_d  (= v for sigma_d = 1).

def F_from_raw(raw: torch.Tensor, x: torch.Tensor, tau: torch.Tensor, prediction_type: str,
               sigma_d: float = 1.0) -> torch.Tensor:
    """F (B, ...) from the VP network's raw output at (k x, t_SD(tau))."""
    c, s = expand_as(torch.cos(tau), x), expand_as(torch.sin(tau), x)
    if prediction_type == "epsilon":
        return (sigma_d * raw - s * x) / (sigma_d * c)
    if prediction_type == "v_prediction":
        k = expand_as(vp_scale(tau, sigma_d), x)
        return k * raw if sigma_d == 1 else k * raw + s * c * (sigma_d**2 - 1) * k**2 * x / sigma_d
    if prediction_type == "sample":
        return (c * x - raw) / (sigma_d * s)
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def raw_from_F(F: torch.Tensor, x: torch.Tensor, tau: torch.Tensor, prediction_type: str,
               sigma_d: float = 1.0) -> torch.Tensor:
    """The inverse of F_from_raw: the VP network output (eps, v or x0) whose F is F."""
    c, s = expand_as(torch.cos(tau), x), expand_as(torch.sin(tau), x)
    if prediction_type == "epsilon":
        return (sigma_d * c * F + s * x) / sigma_d
    if prediction_type == "v_prediction":
        k = expand_as(vp_scale(tau, sigma_d), x)
        return (F - s * c * (sigma_d**2 - 1) * k**2 * x / sigma_d) / k
    if prediction_type == "sample":
        return consistency_fn(F, x, tau, sigma_d)
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def consistency_fn(F: torch.Tensor, x: torch.Tensor, tau: torch.Tensor, sigma_d: float = 1.0) -> torch.Tensor:
    """f = cos tau x - sigma_d sin tau F (sCM's f_theta; = x0_hat of the VP network for any sigma_d)."""
    return expand_as(torch.cos(tau), x) * x - sigma_d * expand_as(torch.sin(tau), x) * F


def teacher_velocity(F_cond: torch.Tensor, F_uncond: torch.Tensor, guidance_scale: float | torch.Tensor,
                     sigma_d: float = 1.0) -> torch.Tensor:
    """dx/dtau = sigma_d (F_u + s (F_c - F_u)) (FastGen L209-217); F is affine in eps / v / x0 with weights
    summing to 1, so this equals CFG on the raw outputs, then F_from_raw."""
    s = expand_as(torch.as_tensor(guidance_scale, dtype=F_cond.dtype, device=F_cond.device), F_cond)
    return sigma_d * (F_uncond + s * (F_cond - F_uncond))

#----------------------------------------------------------------------------
# The tangent (docs/method.md Sec. 15; FastGen L240-275): the JVP with tangents (cos sin dx/dtau, cos sin)
# returns dF = cos tau sin tau dF-/dtau, dF-/dtau = d_x F- dx/dtau + d_tau F- (the total derivative along the ODE).

def tangent(F_minus: torch.Tensor, dF: torch.Tensor, x: torch.Tensor, tau: torch.Tensor, dxdt: torch.Tensor,
            r: float = 1.0, sigma_d: float = 1.0) -> torch.Tensor:
    """g = cos tau df-/dtau = -cos^2 tau (sigma_d F- - dx/dtau) - r (cos tau sin tau x + sigma_d dF) (B, ...);
    r: the tangent warm-up (FastGen's form: r multiplies the whole second term; r = 1 is the exact tangent)."""
    c, s = expand_as(torch.cos(tau), x), expand_as(torch.sin(tau), x)
    return -c**2 * (sigma_d * F_minus - dxdt) - r * (c * s * x + sigma_d * dF)


def normalize(g: torch.Tensor, c: float = 0.1, norm: str = "rms") -> tuple[torch.Tensor, torch.Tensor]:
    """(g / (||g|| + c), ||g||) per sample: 'rms' = ||g||_2 / sqrt(D) (FastGen's g_norm_spatial_invariance: the
    same c at every latent size) or 'l2' = ||g||_2 (SANA-Sprint, rCM L571)."""
    n = g.flatten(1).norm(dim=1)
    if norm == "rms":
        n = n / math.sqrt(g[0].numel())
    elif norm != "l2":
        raise ValueError(f"tangent norm must be 'rms' or 'l2', got {norm!r}")
    return g / expand_as(n + c, g), n

#----------------------------------------------------------------------------
# The time proposal: log(sigma_d tan tau) ~ N(P_mean, P_std^2) truncated to [tau_min, tau_max] (inverse CDF).

def sample_tau(B: int, generator, P_mean: float = -1.0, P_std: float = 1.6,
               tau_min: float = 0.0, tau_max: float = math.pi / 2, sigma_d: float = 1.0) -> torch.Tensor:
    """tau (B,) float64 on the CPU, one uniform per sample (a list of B generators: one each)."""
    log_sigma = lambda t: (-math.inf if t <= 0 else math.inf if t >= math.pi / 2 else math.log(sigma_d * math.tan(t)))
    lo, hi = (torch.special.ndtr(torch.tensor((log_sigma(t) - P_mean) / P_std, dtype=torch.float64, device="cpu"))
              for t in (tau_min, tau_max))                           # the proposal's CDF at the ends
    u = draw(generator, B, lambda n, g: torch.rand(n, generator=g, dtype=torch.float64, device="cpu"))
    n = P_mean + P_std * torch.special.ndtri(lo + (hi - lo) * u)
    return torch.atan(torch.exp(n) / sigma_d).clamp(tau_min, tau_max)   # clamp: ndtri rounding at the edges

#----------------------------------------------------------------------------
# The loss (FastGen L240-285; docs/method.md Sec. 15 steps 3-5). Its value is ||g_hat||^2 (F - sg(F) = 0): it
# tracks the tangent, not progress; its gradient is -2 w / (D e^l) g_hat^T dF_theta/dtheta.

def scm_loss(F_fn: FFn, jvp: JvpFn, x: torch.Tensor, tau: torch.Tensor, dxdt: torch.Tensor, *,
             sigma_d: float = 1.0,                 # TrigFlow's data std
             r: float = 1.0,                       # tangent warm-up factor in [0, 1]
             c: float = 0.1,                       # normalisation g / (||g|| + c)
             norm: str = "rms",                    # ||g||: 'rms' or 'l2'
             prior_weight: bool = False,           # w(tau) = 1 / (sigma_d tan tau); else w = 1
             logvar: torch.Tensor | None = None,   # (B,) adaptive weighting l(tau): w / e^l * L + l
             F_jvp: FFn | None = None,             # what the JVP differentiates (default F_fn; e.g. without DDP)
             ) -> tuple[torch.Tensor, dict]:
    """Per-sample sCM loss (B,) at TrigFlow x (B, ...), tau (B,), teacher velocity dxdt = dx/dtau (B, ...).
    F_fn(x, tau) is the student (theta); the JVP (theta- = sg(theta), the online weights, no EMA) runs without
    grad and must return detached tensors; the grad pass is a second, ordinary F_fn call."""
    cs = torch.cos(tau) * torch.sin(tau)                              # (B,) float64
    with torch.no_grad():
        F_minus, dF = jvp(F_jvp or F_fn, (x, tau), (expand_as(cs, dxdt) * dxdt, cs))   # dF = cos sin dF-/dtau
        g = tangent(F_minus.to(x.dtype), dF.to(x.dtype), x, tau, dxdt, r, sigma_d)
        g_hat, g_norm = normalize(g, c, norm)
    F = F_fn(x, tau)
    loss = (F - F.detach() - g_hat).pow(2).flatten(1).mean(1)         # ||F - sg(F) - g_hat||^2 / D
    w = 1 / (sigma_d * torch.tan(tau)).to(loss) if prior_weight else torch.ones_like(loss)
    if logvar is not None:
        loss = w * torch.exp(-logvar) * loss + logvar
    else:
        loss = w * loss
    return loss, dict(g_norm=g_norm, tau=tau, F_minus=F_minus)
