"""Latent Consistency Distillation as pure functions (LCM-LoRA report Algorithm 1; docs/method.md Sec. 3-4).

Networks enter as functions net(x, t, cond, w) -> raw UNet output (eps, v or x0), x (B,4,h,w),
t (B,) int64, cond a Conditioning, w (B,) LCM guidance (used only by w-embedding students); every
conversion and the CFG go through the one model adapter, solvers.wrappers.GuidedModel (`guided`).
The objectives (lcm/objectives/) decide what the networks are: student (trained), target (the
student under no_grad, or an EMA copy) and teacher (the frozen base).
All randomness comes from `generator`: one torch.Generator, or one per sample (then a sample's
draws do not depend on the batch it is in, so 2 processes x B == 1 process x 2B).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lcm.consistency import f_theta
from lcm.denoiser import unet_net_fn
from lcm.sampling import samplers
from models.text import Conditioning
from solvers.schedule import Schedule
from solvers.wrappers import GuidedModel, to_x0


NetFn = Callable[[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor], torch.Tensor]
EstimateFn = Callable[..., torch.Tensor]


def net_fn(module: nn.Module) -> NetFn:
    """net(x, t, cond, w) -> raw output of a UNet; w enters through its w-embedding if it has one."""
    return lambda x, t, cond, w: unet_net_fn(module, cond, w=w)(x, t, False)


def guided(net: NetFn, cond: Conditioning, uncond: Conditioning | None, w: torch.Tensor, schedule: Schedule,
           prediction_type: str, guidance_scale: float | torch.Tensor = 1.0) -> GuidedModel:
    """A training network as the solvers see it (.x0 / .eps / .x0_eps), CFG over [cond; uncond]."""
    def net2(x, t, with_uncond):
        if with_uncond:
            return net(x, t, cond.cat(uncond), torch.cat([w, w]))
        return net(x, t, cond, w)
    return GuidedModel(net2, prediction_type, schedule, guidance_scale)

#----------------------------------------------------------------------------
# Random draws, per sample when given one generator per sample.

def _draw(generator, B: int, fn: Callable) -> torch.Tensor:
    """fn(n, g) -> (n, ...) CPU tensor; one call per sample for a list of generators."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == B, f"{len(generator)} generators for a batch of {B}"
        return torch.cat([fn(1, g) for g in generator])
    return fn(B, generator)


def draw_points(z: torch.Tensor, schedule: Schedule, k: int, generator):
    """Algorithm 1, sampling line: n ~ U on the grid, u ~ U[0,1) (for w), eps ~ N(0, I).

    Returns t_nk (B,), t_n (B,) int64, u (B,), eps like z. Draw order per sample: j, u, eps."""
    B, T = z.shape[0], schedule.T
    if k < 1 or T % k:
        raise ValueError(f"skipping step k={k} must divide T={T} (e.g. 1, 5, 10, 20, 50)")
    N = T // k                                               # grid t_j = j*k - 1, j = 1..N (Algorithm 1, line 2)
    j = _draw(generator, B, lambda n, g: torch.randint(1, N + 1, (n,), generator=g))
    u = _draw(generator, B, lambda n, g: torch.rand(n, generator=g, dtype=torch.float64))
    eps = _draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g))
    t_nk = j * k - 1                                         # t_{n+k} in {k-1, ..., T-1}
    t_n = (t_nk - k).clamp(min=0)                            # t_n in {0, k-1, ...}; -1 clamped to 0
    return t_nk.to(z.device), t_n.to(z.device), u, eps.to(z.device, z.dtype)

#----------------------------------------------------------------------------
# "Produce z_hat_{t_n}": the swappable step (LCD: a teacher solver step Psi; LCF: same-noise estimate).

def check_teacher_solver(solver: str) -> str:
    """A valid teacher solver Psi name (a record of lcm.sampling.samplers with a psi step), else a one-line error."""
    return samplers.teacher_solver(solver).name


def teacher_estimate(teacher_fn: NetFn, schedule: Schedule, prediction_type: str, solver: str = "ddim") -> EstimateFn:
    """LCD: one step of the PF-ODE solver Psi on the frozen teacher from t_{n+k} to t_n (Algorithm 1,
    line 6), integrating the guided model (1 + w) out(c) - w out(uncond) (docs/method.md Sec. 9): CFG
    is applied inside every solver evaluation, the midpoint's included. ddim is the reference."""
    psi = samplers.teacher_solver(solver).psi

    @torch.no_grad()
    def estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w):
        model = guided(teacher_fn, cond, uncond, w, schedule, prediction_type, guidance_scale=1.0 + w)
        return psi(model, z_nk, t_nk, t_n, schedule)
    return estimate


def teacher_ddim_estimate(teacher_fn: NetFn, schedule: Schedule, prediction_type: str) -> EstimateFn:
    """The reference Psi: one guided DDIM step of the teacher (= teacher_estimate(..., "ddim"))."""
    return teacher_estimate(teacher_fn, schedule, prediction_type, "ddim")


def same_noise_estimate(schedule: Schedule) -> EstimateFn:
    """LCF: z_hat_{t_n} = alpha(t_n) z + sigma(t_n) eps with the eps of z_{t_{n+k}} (LCM arXiv 2310.04378, Sec. 4.4; docs/method.md Sec. 4)."""
    def estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w):
        return schedule.add_noise(z, eps, t_n)
    return estimate

#----------------------------------------------------------------------------
# The loss (docs/method.md Sec. 3, steps 2-8).

def distance(a: torch.Tensor, b: torch.Tensor, loss: str = "huber", huber_c: float = 1e-3) -> torch.Tensor:
    """Per-sample d(a, b) (B,): 'l2' mean squared error or 'huber' mean(sqrt((a-b)^2 + c^2) - c)."""
    if loss == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if loss == "huber":
        return ((a - b).pow(2) + huber_c**2).sqrt().sub(huber_c).flatten(1).mean(1)
    raise ValueError(f"loss must be 'l2' or 'huber', got {loss!r}")


def lcd_loss(student_fn: NetFn, target_fn: NetFn, estimate_fn: EstimateFn, z: torch.Tensor,
             cond: Conditioning, uncond: Conditioning | None, schedule: Schedule, generator, *,
             k: int = 20, w_min: float = 5.0, w_max: float = 15.0, w_fixed: float | None = None,
             loss: str = "huber", huber_c: float = 1e-3, prediction_type: str = "epsilon",
             sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, dict]:
    """LCD / LCF loss per sample (B,) for clean latents z (B,4,h,w) and a dict of diagnostics."""
    # Steps 2-4: grid point n, guidance w ~ U[w_min, w_max] (LCM convention, w = s - 1), noise.
    t_nk, t_n, u, eps = draw_points(z, schedule, k, generator)
    w = torch.full_like(u, w_fixed) if w_fixed is not None else w_min + (w_max - w_min) * u
    w = w.to(z.device, torch.float32)
    z_nk = schedule.add_noise(z, eps, t_nk)                  # z_{t_{n+k}} = alpha z + sigma eps

    # Step 6: z_hat_{t_n} (teacher DDIM step for LCD, same-noise estimate for LCF); no grad. The
    # no-grad passes run before the student's, so their activations are freed before its graph exists.
    with torch.no_grad():
        z_hat = estimate_fn(z_nk, t_nk, t_n, z, eps, cond, uncond, w).float()

        # Step 7: target f_theta_minus(z_hat_{t_n}, w, c, t_n); equals z_hat at t_n = 0.
        x0_t = guided(target_fn, cond, None, w, schedule, prediction_type).x0(z_hat, t_n)
        target = f_theta(z_hat, x0_t, t_n, sigma_data, timestep_scaling)

    # Step 5: student f_theta(z_{t_{n+k}}, w, c, t_{n+k}) = c_skip z + c_out x0_hat (with grad).
    x0_s = guided(student_fn, cond, None, w, schedule, prediction_type).x0(z_nk, t_nk)
    pred = f_theta(z_nk, x0_s, t_nk, sigma_data, timestep_scaling)

    # Step 8: d(student, target), l2 or pseudo-Huber, per sample.
    per_sample = distance(pred, target.detach(), loss, huber_c)
    return per_sample, dict(t_nk=t_nk, t_n=t_n, w=w)

#----------------------------------------------------------------------------
# Plain diffusion training (eps or v target, caption dropout for CFG): the demo teacher and style LoRAs.

def model_target(x0: torch.Tensor, eps: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                 schedule: Schedule, prediction_type: str) -> torch.Tensor:
    """The raw output whose conversions give (x0, eps) at (z_t, t), by inverting the affine to_x0."""
    zd, x0d = z_t.double(), x0.double()                      # fp64: the inversion divides by sigma
    a0 = to_x0(torch.zeros_like(zd), zd, t, schedule, prediction_type)
    a1 = to_x0(torch.ones_like(zd), zd, t, schedule, prediction_type) - a0
    return ((x0d - a0) / a1).to(z_t.dtype)                   # eps: eps;  v: alpha eps - sigma x0


def diffusion_loss(model_fn: NetFn, z: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                   schedule: Schedule, generator, *, prediction_type: str = "epsilon",
                   p_uncond: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Denoising loss per sample (B,): t ~ U{0..T-1}, MSE on the eps or v target (DDPM / SD)."""
    B, T = z.shape[0], schedule.T
    t = _draw(generator, B, lambda n, g: torch.randint(0, T, (n,), generator=g)).to(z.device)
    drop = _draw(generator, B, lambda n, g: torch.rand(n, generator=g)) < p_uncond
    eps = _draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g))
    eps = eps.to(z.device, z.dtype)
    if uncond is not None and p_uncond > 0:                  # caption dropout: learn the uncond branch
        cond = cond.where(drop.to(z.device), uncond)
    z_t = schedule.add_noise(z, eps, t)
    out = model_fn(z_t, t, cond, torch.zeros(B, device=z.device)).float()
    target = model_target(z, eps, z_t, t, schedule, prediction_type)
    return (out - target).pow(2).flatten(1).mean(1), dict(t=t, dropped=drop)
