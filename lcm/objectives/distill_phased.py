"""TCD and PCM distillation losses as pure functions (docs/method.md Secs. 11-12): consistency to an
intermediate time s, in DDIM form.

Both train f_theta(z_t, t, s) = alpha_s x0_hat + sigma_s eps_hat, one DDIM jump from t down to s built
from the network's one output at t (TCD's TCF(1), arXiv 2402.19159; PCM's Eq. 3 = Theorem 3, arXiv
2405.18407): no c_skip / c_out, and f(z_s, s, s) = z_s. They differ in where s is:
  TCD  s is drawn on the grid at or below t_n, so the network learns every jump along the trajectory;
  PCM  s is the lower edge of t_{n+k}'s phase (M phases split the grid), so it learns M short ODE pieces.
Everything else is LCD's (lcm/objectives/distill.py, docs/method.md Sec. 3): the grid and k, w ~ U[w_min, w_max]
in the LCM convention, the teacher step Psi (an EstimateFn), the target net under no_grad, the
distance d, and the draws: one torch.Generator, or one per sample (then 2 processes x B == 1 process
x 2B). Per-sample draw order: LCD's (grid index, u, eps), then TCD's r (for s) or PCM's dropout u.
"""
from __future__ import annotations

import torch

from lcm.objectives.distill import EstimateFn, NetFn, _draw, distance, draw_points, guided
from lcm.sampling import samplers
from models.text import Conditioning
from solvers.ddim import ddim_from_x0_eps
from solvers.schedule import Schedule, expand_as, pcm_edges, pcm_phase_starts
from solvers.wrappers import GuidedModel

#----------------------------------------------------------------------------
# The DDIM-form consistency function and its boundary condition.

def ddim_jump(model: GuidedModel, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
              schedule: Schedule) -> torch.Tensor:
    """f(z_t, t, s) = alpha_s x0_hat(z_t, t) + sigma_s eps_hat(z_t, t) (TCF(1); PCM Eq. 3); z (B,...), t, s (B,)."""
    x0, eps = model.x0_eps(z, t)                             # one pass at t gives both
    return ddim_from_x0_eps(x0, eps, s, schedule)


def boundary(z: torch.Tensor, f: torch.Tensor, at_boundary: torch.Tensor) -> torch.Tensor:
    """f(z_s, s, s) = z_s exactly: z where at_boundary (B,) is True, else f (TCD j = i; PCM phase starts)."""
    return torch.where(expand_as(at_boundary, z).bool(), z, f)


def grid_index(t_nk: torch.Tensor, k: int) -> torch.Tensor:
    """i (B,) with t_{n+k} = grid[i] = (i + 1) k - 1, i in 0..N-1 (docs/method.md Sec. 3, step 2)."""
    return torch.div(t_nk + 1, k, rounding_mode="floor") - 1

#----------------------------------------------------------------------------
# TCD (arXiv 2402.19159): s ~ U on the grid points at or below t_n (docs/method.md Sec. 11).

def draw_tcd_s(t_nk: torch.Tensor, k: int, generator) -> torch.Tensor:
    """s (B,) int64: j ~ U{0..i} for t_{n+k} = grid[i], s = max(grid[j] - k, 0); j = i gives s = t_n.
    One uniform r per sample, j = floor(r (i + 1)), so a sample's draw does not depend on its batch."""
    i = grid_index(t_nk, k).cpu()
    r = _draw(generator, t_nk.shape[0], lambda n, g: torch.rand(n, generator=g, dtype=torch.float64))
    j = torch.minimum(torch.floor(r * (i + 1)).long(), i)    # j ~ U{0, ..., i}
    return ((j + 1) * k - 1 - k).clamp(min=0).to(t_nk.device)   # grid[j] - k = t_n of grid point j


def tcd_loss(student_fn: NetFn, target_fn: NetFn, estimate_fn: EstimateFn, z: torch.Tensor,
             cond: Conditioning, uncond: Conditioning | None, schedule: Schedule, generator, *,
             k: int = 20, w_min: float = 5.0, w_max: float = 15.0, w_fixed: float | None = None,
             loss: str = "huber", huber_c: float = 1e-3, prediction_type: str = "epsilon"
             ) -> tuple[torch.Tensor, dict]:
    """TCD loss per sample (B,) for clean latents z (B,4,h,w): d(f_theta(z_{t_{n+k}}, t_{n+k}, s),
    f_theta_minus(z_hat_{t_n}, t_n, s)), and diagnostics (t_nk, t_n, s, w)."""
    # 1. LCD's draws: grid point t_{n+k}, t_n = t_{n+k} - k, guidance w, noise; then s <= t_n on the grid.
    t_nk, t_n, u, eps = draw_points(z, schedule, k, generator)
    s = draw_tcd_s(t_nk, k, generator)
    w = torch.full_like(u, w_fixed) if w_fixed is not None else w_min + (w_max - w_min) * u
    w = w.to(z.device, torch.float32)
    z_nk = schedule.add_noise(z, eps, t_nk)                  # z_{t_{n+k}} = alpha z + sigma eps

    with torch.no_grad():                                    # no-grad passes first (their memory is freed)
        # 2. Teacher: z_hat_{t_n} = one CFG-augmented step of Psi from t_{n+k} (exactly LCD's step 6).
        z_hat = estimate_fn(z_nk, t_nk, t_n, z, eps, cond, uncond, w).float()
        # 3. Target: f_theta_minus(z_hat_{t_n}, t_n, s), = z_hat at s = t_n (the boundary condition).
        target = ddim_jump(guided(target_fn, cond, None, w, schedule, prediction_type), z_hat, t_n, s, schedule)
        target = boundary(z_hat, target, s == t_n)

    # 4. Student (with grad): f_theta(z_{t_{n+k}}, t_{n+k}, s) = alpha_s x0_hat + sigma_s eps_hat.
    pred = ddim_jump(guided(student_fn, cond, None, w, schedule, prediction_type), z_nk, t_nk, s, schedule)

    # 5. d(student, target): l2 or pseudo-Huber, per sample.
    return distance(pred, target.detach(), loss, huber_c), dict(t_nk=t_nk, t_n=t_n, s=s, w=w)

#----------------------------------------------------------------------------
# PCM (arXiv 2405.18407): s = the lower edge of t_{n+k}'s phase (docs/method.md Sec. 12).

def pcm_phase_edge(t_nk: torch.Tensor, k: int, phases: int, T: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge (B,) int64, is_start (B,) bool): the lower edge s_m of the phase holding t_{n+k} = grid[i]
    (grid[idx - 1] for the phase's first index idx, 0 for the first phase) and whether i = idx."""
    N = T // k
    starts = torch.tensor(pcm_phase_starts(phases, N), device=t_nk.device)   # M = 4, N = 50: 0, 12, 25, 37
    edges = torch.tensor(pcm_edges(phases, N, T), device=t_nk.device)        # 0, 239, 499, 739
    i = grid_index(t_nk, k)
    m = (i[:, None] >= starts[None, :]).sum(1) - 1           # the phase of i: the last start <= i
    return edges[m], starts[m] == i


def unguided_teacher_estimate(teacher_fn: NetFn, schedule: Schedule, prediction_type: str,
                              solver: str = "ddim") -> EstimateFn:
    """PCM without CFG in the solver (the reference's --not_apply_cfg_solver: uncond := cond): one step of
    Psi on the conditional teacher alone, one UNet pass of B per evaluation (ddim: 1, dpmsolver(++): 2)."""
    psi = samplers.teacher_solver(solver).psi

    @torch.no_grad()
    def estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w):
        model = guided(teacher_fn, cond, None, w, schedule, prediction_type)   # s = 1: cond only
        return psi(model, z_nk, t_nk, t_n, schedule)
    return estimate


def pcm_loss(student_fn: NetFn, target_fn: NetFn, estimate_fn: EstimateFn, z: torch.Tensor,
             cond: Conditioning, uncond: Conditioning | None, schedule: Schedule, generator, *,
             phases: int = 4, k: int = 20, w_min: float = 5.0, w_max: float = 15.0,
             w_fixed: float | None = None, p_uncond: float = 0.0, loss: str = "huber", huber_c: float = 1e-3,
             prediction_type: str = "epsilon") -> tuple[torch.Tensor, dict]:
    """PCM loss per sample (B,) for clean latents z (B,4,h,w), PCM Eq. 5 without lambda(t_n):
    d(f^m_theta(z_{t_{n+k}}, t_{n+k}), f^m_theta_minus(z_hat_{t_n}, t_n)), f^m = DDIM jump to the edge s_m;
    p_uncond: the caption dropout of PCM* (cond := uncond per sample, for all three networks)."""
    # 1. LCD's draws (grid point, w, noise), then the per-sample caption-dropout draw.
    t_nk, t_n, u, eps = draw_points(z, schedule, k, generator)
    drop = _draw(generator, z.shape[0], lambda n, g: torch.rand(n, generator=g, dtype=torch.float64)) < p_uncond
    if p_uncond > 0:
        if uncond is None:
            raise ValueError("PCM caption dropout (p_uncond > 0) needs the unconditional branch")
        cond = cond.where(drop.to(z.device), uncond)
    w = torch.full_like(u, w_fixed) if w_fixed is not None else w_min + (w_max - w_min) * u
    w = w.to(z.device, torch.float32)
    edge, is_start = pcm_phase_edge(t_nk, k, phases, schedule.T)   # s_m <= t_n < t_{n+k}
    z_nk = schedule.add_noise(z, eps, t_nk)                  # z_{t_{n+k}} = alpha z + sigma eps

    with torch.no_grad():
        # 2. Teacher: z_hat_{t_n}, one step of Psi on cond + w (cond - uncond) (or on cond alone).
        z_hat = estimate_fn(z_nk, t_nk, t_n, z, eps, cond, uncond, w).float()
        # 3. Target: the target net's DDIM jump from (z_hat_{t_n}, t_n) to the same edge; z_hat itself
        #    where i is a phase start (t_n is the edge: f^m(z_{s_m}, s_m) = z_{s_m}).
        target = ddim_jump(guided(target_fn, cond, None, w, schedule, prediction_type), z_hat, t_n, edge, schedule)
        target = boundary(z_hat, target, is_start)

    # 4. Online (with grad): DDIM jump from (z_{t_{n+k}}, t_{n+k}) to the phase edge s_m.
    pred = ddim_jump(guided(student_fn, cond, None, w, schedule, prediction_type), z_nk, t_nk, edge, schedule)

    # 5. d: pseudo-Huber (the shipped scripts) or l2, per sample.
    return distance(pred, target.detach(), loss, huber_c), dict(t_nk=t_nk, t_n=t_n, edge=edge, w=w, dropped=drop)
