"""The consistency distillation loss, once: LCD / LCF (LCM-LoRA report Algorithm 1), TCD (arXiv
2402.19159, TCF(1)) and PCM (arXiv 2405.18407, Eq. 3) as one pure function (docs/method.md Secs. 3, 11, 12).

    L = d( f_theta(z_{t_{n+k}}, t_{n+k}, s),  f_theta_minus(z_hat_{t_n}, t_n, s) ),   f(z_s, s, s) = z_s

The objectives differ only in their Jump: how f jumps from (z_t, t) to s and where s is
  LCD  f = c_skip z + c_out x0_hat, to s = 0 (the boundary is c_skip(0) = 1, c_out(0) = 0);
  TCD  f = alpha_s x0_hat + sigma_s eps_hat (one DDIM jump), s drawn on the grid at or below t_n;
  PCM  the same DDIM jump, s = the lower edge of t_{n+k}'s phase (M phases split the grid).
Comments name the steps of docs/method.md Sec. 3 (Algorithm 1 as the reference scripts run it).
Networks are solvers.wrappers.NetFn, net(x, t, cond, w) -> raw UNet output; z_hat_{t_n} comes from an
EstimateFn (lcm.objectives.teacher). All randomness comes from `generator`: one torch.Generator, or one
per sample (then a sample's draws do not depend on its batch, so 2 processes x B == 1 process x 2B).
Per-sample draw order: grid index, u (for w), eps, then TCD's r (for s) or PCM's dropout uniform.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lcm.consistency import f_theta
from lcm.denoiser import guided
from lcm.objectives.teacher import EstimateFn
from models.text import Conditioning
from solvers.ddim import ddim_from_x0_eps
from solvers.schedule import Schedule, expand_as, pcm_edges, pcm_phase_starts
from solvers.wrappers import GuidedModel, NetFn

#----------------------------------------------------------------------------
# Random draws, per sample when given one generator per sample.

def draw(generator, B: int, fn: Callable) -> torch.Tensor:
    """fn(n, g) -> (n, ...) CPU tensor; one call per sample for a list of B generators."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == B, f"{len(generator)} generators for a batch of {B}"
        return torch.cat([fn(1, g) for g in generator])
    return fn(B, generator)


def draw_points(z: torch.Tensor, schedule: Schedule, k: int, generator):
    """Steps 2-4: j ~ U{1..N} on the grid, u ~ U[0,1) (for w), eps ~ N(0, I).

    Returns t_nk (B,), t_n (B,) int64, u (B,) float64, eps like z. Draw order per sample: j, u, eps."""
    B, T = z.shape[0], schedule.T
    if k < 1 or T % k:
        raise ValueError(f"skipping step k={k} must divide T={T} (e.g. 1, 5, 10, 20, 50)")
    N = T // k                                               # grid t_j = j k - 1, j = 1..N (step 2)
    j = draw(generator, B, lambda n, g: torch.randint(1, N + 1, (n,), generator=g, device="cpu"))
    u = draw(generator, B, lambda n, g: torch.rand(n, generator=g, dtype=torch.float64, device="cpu"))
    eps = draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g, device="cpu"))
    t_nk = j * k - 1                                         # t_{n+k} in {k-1, ..., T-1}
    t_n = (t_nk - k).clamp(min=0)                            # t_n in {0, k-1, ...}; -1 clamped to 0
    return t_nk.to(z.device), t_n.to(z.device), u, eps.to(z.device, z.dtype)


def grid_index(t_nk: torch.Tensor, k: int) -> torch.Tensor:
    """i (B,) with t_{n+k} = grid[i] = (i + 1) k - 1, i in 0..N-1."""
    return torch.div(t_nk + 1, k, rounding_mode="floor") - 1


def draw_tcd_s(t_nk: torch.Tensor, k: int, generator) -> torch.Tensor:
    """TCD's s (B,) int64: j ~ U{0..i} for t_{n+k} = grid[i], s = max(grid[j] - k, 0); j = i gives s = t_n.
    One uniform r per sample, j = floor(r (i + 1)), so a sample's draw does not depend on its batch."""
    i = grid_index(t_nk, k)                                  # on t_nk's device: no host sync
    r = draw(generator, t_nk.shape[0], lambda n, g: torch.rand(n, generator=g, dtype=torch.float64, device="cpu"))
    j = torch.minimum(torch.floor(r.to(i.device) * (i + 1)).long(), i)    # j ~ U{0, ..., i} (float64: exact anywhere)
    return ((j + 1) * k - 1 - k).clamp(min=0)                # grid[j] - k = t_n of grid point j


def pcm_phase_edge(t_nk: torch.Tensor, k: int, phases: int, T: int = 1000) -> torch.Tensor:
    """PCM's s (B,) int64: the lower edge s_m of the phase holding t_{n+k} = grid[i] (grid[idx - 1] for
    the phase's first index idx, 0 for the first phase); s_m = t_n exactly where i is a phase start."""
    N = T // k
    starts = torch.tensor(pcm_phase_starts(phases, N), device=t_nk.device)   # M = 4, N = 50: 0, 12, 25, 37
    edges = torch.tensor(pcm_edges(phases, N, T), device=t_nk.device)        # 0, 239, 499, 739
    m = (grid_index(t_nk, k)[:, None] >= starts[None, :]).sum(1) - 1         # the phase of i: the last start <= i
    return edges[m]

#----------------------------------------------------------------------------
# Jumps: the consistency function f(z_t, t, s) from one network pass at t, and the draw of s.

@dataclass(frozen=True)
class Jump:
    """What LCD, TCD and PCM do differently: how f lands at s (f) and where s is (draw_s)."""
    f: Callable[[GuidedModel, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (model, z_t, t, s) -> f
    draw_s: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]   # (t_{n+k}, t_n, generator) -> s <= t_n


def ddim_jump(model: GuidedModel, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """f(z_t, t, s) = alpha_s x0_hat(z_t, t) + sigma_s eps_hat(z_t, t) (TCF(1); PCM Eq. 3); z (B,...), t, s (B,)."""
    x0, eps = model.x0_eps(z, t)                             # one pass at t gives both
    return ddim_from_x0_eps(x0, eps, s, model.schedule)


def boundary(z: torch.Tensor, f: torch.Tensor, at_boundary: torch.Tensor) -> torch.Tensor:
    """f(z_s, s, s) = z_s: z where at_boundary (B,) is True, else f."""
    return torch.where(expand_as(at_boundary, z).bool(), z, f)


def lcm_jump(sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> Jump:
    """LCD / LCF: f_theta(z_t, t) = c_skip(t) z + c_out(t) x0_hat (docs/method.md Sec. 2.2), always to s = 0."""
    return Jump(lambda model, z, t, s: f_theta(z, model.x0(z, t), t, sigma_data, timestep_scaling),
                lambda t_nk, t_n, generator: torch.zeros_like(t_n))


def tcd_jump(k: int) -> Jump:
    """TCD: the DDIM jump to s ~ U on the grid points at or below t_n (docs/method.md Sec. 11)."""
    return Jump(ddim_jump, lambda t_nk, t_n, generator: draw_tcd_s(t_nk, k, generator))


def pcm_jump(k: int, phases: int, T: int = 1000) -> Jump:
    """PCM: the DDIM jump to the lower edge s_m of t_{n+k}'s phase (docs/method.md Sec. 12)."""
    return Jump(ddim_jump, lambda t_nk, t_n, generator: pcm_phase_edge(t_nk, k, phases, T))

#----------------------------------------------------------------------------
# The loss (docs/method.md Sec. 3, steps 2-8).

def distance(a: torch.Tensor, b: torch.Tensor, loss: str = "huber", huber_c: float = 1e-3) -> torch.Tensor:
    """Per-sample d(a, b) (B,): 'l2' mean squared error or 'huber' mean(sqrt((a-b)^2 + c^2) - c)."""
    if loss == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if loss == "huber":
        return ((a - b).pow(2) + huber_c**2).sqrt().sub(huber_c).flatten(1).mean(1)
    raise ValueError(f"loss must be 'l2' or 'huber', got {loss!r}")


def consistency_loss(jump: Jump, student: NetFn, target: NetFn, estimate_fn: EstimateFn, z: torch.Tensor,
                     cond: Conditioning, uncond: Conditioning | None, schedule: Schedule, generator, *,
                     k: int = 20,                       # skipping step: grid t_j = j k - 1
                     w_min: float = 5.0,                # w ~ U[w_min, w_max], LCM convention w = s - 1
                     w_max: float = 15.0,
                     w_fixed: float | None = None,      # a fixed w instead (s = 7.5 is w = 6.5)
                     loss: str = "huber",               # d: 'huber' or 'l2'
                     huber_c: float = 1e-3,
                     prediction_type: str = "epsilon",
                     p_uncond: float | None = None,     # caption dropout of all three networks (PCM*); None: no draw
                     ) -> tuple[torch.Tensor, dict]:
    """d(f_theta(z_{t_{n+k}}, t_{n+k}, s), f_theta_minus(z_hat_{t_n}, t_n, s)) per sample (B,) for clean
    latents z (B,4,h,w), and diagnostics (t_nk, t_n, s, w, and `dropped` with p_uncond)."""
    # Steps 2-4: grid point t_{n+k}, t_n = t_{n+k} - k, u (for w), noise; then s (TCD: one more uniform).
    t_nk, t_n, u, eps = draw_points(z, schedule, k, generator)
    s = jump.draw_s(t_nk, t_n, generator)
    diag = dict(t_nk=t_nk, t_n=t_n, s=s)
    if p_uncond is not None:                                 # drawn even at 0: the stream does not depend on it
        drop = draw(generator, z.shape[0], lambda n, g: torch.rand(n, generator=g, dtype=torch.float64, device="cpu")) < p_uncond
        if p_uncond > 0:
            if uncond is None:
                raise ValueError("caption dropout (p_uncond > 0) needs the unconditional branch")
            cond = cond.where(drop.to(z.device), uncond)
        diag["dropped"] = drop
    w = torch.full_like(u, w_fixed) if w_fixed is not None else w_min + (w_max - w_min) * u
    diag["w"] = w = w.to(z.device, torch.float32)            # step 3: w ~ U[w_min, w_max]
    z_nk = schedule.add_noise(z, eps, t_nk)                  # step 4: z_{t_{n+k}} = alpha z + sigma eps
    net = lambda fn: guided(fn, cond, None, w, schedule, prediction_type)     # conditional branch only

    # The no-grad passes run before the student's, so their activations are freed before its graph exists.
    with torch.no_grad():
        # Step 6: z_hat_{t_n} = z_{t_{n+k}} + (1 + w) Psi(c) - w Psi(uncond) (LCF: same-noise estimate).
        z_hat = estimate_fn(z_nk, t_nk, t_n, z, eps, cond, uncond, w).float()
        # Step 7: f_theta_minus(z_hat_{t_n}, t_n, s), and f(z_s, s, s) = z_s exactly where s = t_n.
        f_target = boundary(z_hat, jump.f(net(target), z_hat, t_n, s), s == t_n)

    # Step 5: f_theta(z_{t_{n+k}}, t_{n+k}, s), with grad.
    f_student = jump.f(net(student), z_nk, t_nk, s)
    return distance(f_student, f_target, loss, huber_c), diag   # step 8: d, per sample

#----------------------------------------------------------------------------
# The named losses (tests, notebooks, benchmarks): consistency_loss with each objective's Jump.

def lcd_loss(student: NetFn, target: NetFn, estimate_fn: EstimateFn, z: torch.Tensor, cond: Conditioning,
             uncond: Conditioning | None, schedule: Schedule, generator, *, sigma_data: float = 0.5,
             timestep_scaling: float = 10.0, **kw) -> tuple[torch.Tensor, dict]:
    """LCD / LCF loss (B,): f_theta = c_skip z + c_out x0_hat; kw: consistency_loss's knobs."""
    return consistency_loss(lcm_jump(sigma_data, timestep_scaling), student, target, estimate_fn, z, cond, uncond,
                            schedule, generator, **kw)


def tcd_loss(student: NetFn, target: NetFn, estimate_fn: EstimateFn, z: torch.Tensor, cond: Conditioning,
             uncond: Conditioning | None, schedule: Schedule, generator, *, k: int = 20, **kw
             ) -> tuple[torch.Tensor, dict]:
    """TCD loss (B,): the DDIM jump to s on the grid at or below t_n; kw: consistency_loss's knobs."""
    return consistency_loss(tcd_jump(k), student, target, estimate_fn, z, cond, uncond, schedule, generator,
                            k=k, **kw)


def pcm_loss(student: NetFn, target: NetFn, estimate_fn: EstimateFn, z: torch.Tensor, cond: Conditioning,
             uncond: Conditioning | None, schedule: Schedule, generator, *, phases: int = 4, k: int = 20,
             p_uncond: float = 0.0, **kw) -> tuple[torch.Tensor, dict]:
    """PCM loss (B,), PCM Eq. 5 without lambda(t_n): the DDIM jump to the phase edge s_m; p_uncond: PCM*'s
    caption dropout; kw: consistency_loss's knobs."""
    return consistency_loss(pcm_jump(k, phases, schedule.T), student, target, estimate_fn, z, cond, uncond,
                            schedule, generator, k=k, p_uncond=p_uncond, **kw)
