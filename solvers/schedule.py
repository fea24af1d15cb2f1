"""The discrete DDPM noise schedule (docs/method.md Sec. 0) and timestep selection (Secs. 7, 8).

t is the integer DDPM timestep 0..T-1; a continuous t in between interpolates log(alpha_t)
piecewise-linearly, as DPM-Solver's discrete NoiseScheduleVP does, so inverse_lambda is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

TimeLike = int | float | torch.Tensor

#----------------------------------------------------------------------------
# Betas -> abar (diffusers' beta_schedule names; the original SD code computes them in float64).

def _betas(kind: str, beta_start: float, beta_end: float, T: int) -> torch.Tensor:
    if kind == "scaled_linear":                                  # SD: linspace in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64, device="cpu") ** 2
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64, device="cpu")
    if kind == "squaredcos_cap_v2":                              # GLIDE cosine, beta capped at 0.999
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64, device="cpu")
    raise ValueError(f"unknown schedule kind {kind!r}: use 'scaled_linear', 'linear' or 'squaredcos_cap_v2'")


def as_t(t: TimeLike) -> torch.Tensor:
    """A timestep as the solvers pass it to model_fn: 0-dim int64 on the grid, float64 in between."""
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(t, (int, np.integer)):
        return torch.tensor(int(t), dtype=torch.int64, device="cpu")
    return torch.tensor(float(t), dtype=torch.float64, device="cpu")


def check_grid(t: torch.Tensor, T: int) -> None:
    """Integer timesteps in [0, T): a ValueError for CPU t; asserted on the device otherwise (no host sync)."""
    inside = (t >= 0) & (t < T)
    if t.device.type != "cpu" or torch.compiler.is_compiling():     # no graph break either
        torch._assert_async(inside.all(), f"integer timesteps must be in [0, {T - 1}]")
    elif not inside.all():
        raise ValueError(f"integer timesteps must be in [0, {T - 1}], got {t.tolist()}")


def expand_as(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Coefficient () or (B,) -> broadcastable against x (B, ...), in x's dtype and device."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c

#----------------------------------------------------------------------------
# The schedule: alpha_t, sigma_t, lambda_t and the inverse of lambda_t.

@dataclass(frozen=True, eq=False)
class Schedule:
    abar: torch.Tensor                                           # (T,) float64, cumprod(1 - beta)

    def __post_init__(self):
        assert self.abar.ndim == 1 and self.abar.dtype == torch.float64, "abar must be (T,) float64"
        object.__setattr__(self, "_la", 0.5 * self.abar.log())   # log alpha at the integer knots

    @staticmethod
    def make(kind: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012,
             num_train_timesteps: int = 1000) -> "Schedule":
        """Build the schedule of a diffusers/LDM beta_schedule; abar (T,) float64."""
        return Schedule(torch.cumprod(1 - _betas(kind, beta_start, beta_end, num_train_timesteps), 0))

    @property
    def T(self) -> int:
        return self.abar.shape[0]

    def to(self, device) -> "Schedule":
        """Same schedule with abar on `device` (kept float64; use on CPU/CUDA)."""
        return Schedule(self.abar.to(device))

    def log_alpha(self, t: TimeLike) -> torch.Tensor:
        """log(alpha_t), piecewise-linear in t between integer knots (linear extrapolation); shape of t."""
        t = t if torch.is_tensor(t) else torch.as_tensor(t, device="cpu")
        la = self._la
        if not t.is_floating_point():
            check_grid(t, self.T)
            return la[t.to(la.device)]                           # exact table value on the grid
        t = t.to(self.abar.device)
        t = t.double()
        i = t.floor().clamp(0, self.T - 2).long()
        f = t - i
        return la[i] * (1 - f) + la[i + 1] * f

    def alpha(self, t: TimeLike) -> torch.Tensor:
        """alpha_t = sqrt(abar[t]), float64, shape of t."""
        return self.log_alpha(t).exp()

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """sigma_t = sqrt(1 - abar[t]), float64, shape of t."""
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def lambda_(self, t: TimeLike) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t), half the log-SNR, float64."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def inverse_lambda(self, lam: float | torch.Tensor) -> torch.Tensor:
        """Continuous t (float64) with lambda_(t) = lam (DPM-Solver, NoiseScheduleVP.inverse_lambda)."""
        lam = torch.as_tensor(lam, dtype=torch.float64, device=self.abar.device)
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)   # log alpha from lambda
        xp = self._la.flip(0)                                       # ascending log alpha
        fp = torch.arange(self.T - 1, -1, -1, dtype=torch.float64, device=lam.device)
        i = torch.searchsorted(xp, la.reshape(-1)).clamp(1, self.T - 1).reshape(la.shape)
        x0, x1 = xp[i - 1], xp[i]
        return fp[i - 1] + (la - x0) * (fp[i] - fp[i - 1]) / (x1 - x0)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """z_t = alpha_t x0 + sigma_t eps (forward process); t () or (B,); (B, ...) -> (B, ...)."""
        return expand_as(self.alpha(t), x0) * x0 + expand_as(self.sigma(t), x0) * eps

#----------------------------------------------------------------------------
# Timestep spacings (Lin et al. 2023, Table 2), exactly as diffusers' set_timesteps.
# convention="ddim": DDIMScheduler (N points); "dpm": DPMSolverMultistepScheduler, which spaces
# N + 1 points and drops the last (it ends at sigma = 0 instead).

def spaced_timesteps(n: int, spacing: str = "leading", steps_offset: int = 0, T: int = 1000,
                     convention: str = "ddim") -> list[int]:
    """N descending integer timesteps of a DDIM / DPM-Solver(++) sampler."""
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, {T}], got {n}")
    if convention not in ("ddim", "dpm"):
        raise ValueError(f"convention must be 'ddim' or 'dpm', got {convention!r}")
    m = n + (convention == "dpm")                                # points spaced before dropping
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m).round()[::-1][:n]
    elif spacing == "leading":
        ts = (np.arange(0, m) * (T // m)).round()[::-1][:n] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use 'leading', 'trailing' or 'linspace'")
    ts = [int(t) for t in ts]
    if ts[0] >= T or ts[-1] < 0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{spacing!r} spacing with steps={n}, steps_offset={steps_offset} gives "
                         f"invalid timesteps {ts[:4]}...{ts[-2:]}; use fewer steps or 'trailing'")
    return ts

#----------------------------------------------------------------------------
# LCM origin grid and inference timesteps (docs/method.md Sec. 3, step 2 and Sec. 7; diffusers PR#5836 rule).

def lcm_grid(original_steps: int = 50, T: int = 1000) -> list[int]:
    """Ascending LCM training grid t_j = j*k - 1, k = T // original_steps: [19, 39, ..., 999]."""
    k = T // original_steps
    return [j * k - 1 for j in range(1, original_steps + 1)]


def lcm_timesteps(n: int, original_steps: int = 50, T: int = 1000, strength: float = 1.0) -> list[int]:
    """N descending LCM timesteps: reversed grid at floor(linspace(0, len, N, endpoint=False))."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if n > original_steps:
        raise ValueError(f"LCM steps={n} exceeds original_inference_steps={original_steps}: the "
                         f"timesteps are a subset of the {original_steps}-point training grid")
    m = int(original_steps * strength)                           # img2img: keep the low grid points
    if n > m:
        raise ValueError(f"LCM img2img with strength={strength} leaves {m} of the "
                         f"original_inference_steps={original_steps} grid points; use steps <= {m} "
                         f"or strength >= {n / original_steps:g}")
    grid = lcm_grid(original_steps, T)[:m][::-1]
    idx = np.floor(np.linspace(0, m, num=n, endpoint=False)).astype(np.int64)
    return [grid[i] for i in idx]


def on_lcm_grid(timesteps, original_steps: int = 50, T: int = 1000) -> bool:
    """Whether every timestep lies on the LCM training grid (pipeline warns if not)."""
    return not off_grid(timesteps, original_steps, T)


def off_grid(timesteps, original_steps: int = 50, T: int = 1000) -> list[int]:
    """The timesteps not on the LCM training grid (empty if all are; the pipeline warns otherwise)."""
    grid = set(lcm_grid(original_steps, T))
    return [int(t) for t in timesteps if int(t) not in grid]

#----------------------------------------------------------------------------
# PCM phases (Wang et al. 2024, arXiv 2405.18407, Sec. 3.1; docs/method.md, PCM): M phases split the
# N-point grid at indices floor(linspace(0, N, M, endpoint=False)); a phase's lower edge is the grid
# point below its first index (0 for the first phase). M = 4, N = 50: edges 0, 239, 499, 739.

def pcm_phase_starts(phases: int, original_steps: int = 50) -> list[int]:
    """Grid indices where each of the M phases starts, ascending: M = 4 -> [0, 12, 25, 37]."""
    if not 1 <= phases <= original_steps:
        raise ValueError(f"PCM phases M={phases} must be in [1, {original_steps}] (the grid size)")
    return [int(i) for i in np.floor(np.linspace(0, original_steps, phases, endpoint=False))]


def pcm_edges(phases: int, original_steps: int = 50, T: int = 1000) -> list[int]:
    """Ascending phase edges s_0 = 0 < s_1 < ... < s_{M-1} (timesteps): M = 4 -> [0, 239, 499, 739]."""
    grid = lcm_grid(original_steps, T)
    return [0] + [grid[i - 1] for i in pcm_phase_starts(phases, original_steps)[1:]]


def pcm_timesteps(n: int, original_steps: int = 50, T: int = 1000) -> list[int]:
    """The phase-exact n-step grid: T - 1, then the upper edges of an n-phase split, descending:
    n = 4 -> [999, 739, 499, 239] (each step a DDIM jump to the next edge, the last one to 0)."""
    return [T - 1] + pcm_edges(n, original_steps, T)[1:][::-1]
