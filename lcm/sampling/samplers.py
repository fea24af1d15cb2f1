"""The samplers table: one record per solver, read by the Pipeline, sample.py, evaluate.py, the grid,
the infotext and the trainer (its validation sampler and the teacher solvers Psi of distillation).

Adding a sampler = one `Sampler` record in SAMPLERS + one conf/solver/<name>.yaml preset. Nothing
else in the project compares a solver name.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from lcm.consistency import ConsistencySpec
from solvers import ddim, dpm_solver
from solvers import lcm as lcm_solver
from solvers import tcd as tcd_solver
from solvers.ddim import ddim_from_x0_eps
from solvers.dpm_solver import dpm_solver_step, dpmpp_2s_step
from solvers.schedule import Schedule, lcm_timesteps, pcm_timesteps, spaced_timesteps
from solvers.wrappers import GuidedModel

log = logging.getLogger(__name__)

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class Options:
    """What one sampling call passes to a sampler besides the model, noise, grid and schedule."""
    spec: ConsistencySpec                      # the active consistency spec (grid, scalings, phases)
    eta: float = 0.0                           # DDIM's eta / TCD's gamma (0 where a sampler has none)
    spacing: str | None = None
    generator: object = None                   # a CPU torch.Generator or one per image
    callback: Callable | None = None           # called after every step


RunFn = Callable[[GuidedModel, torch.Tensor, list, Schedule, Options], torch.Tensor]
GridFn = Callable[[int, ConsistencySpec, "str | None", float], list]       # (steps, spec, spacing, strength)
PsiFn = Callable[[GuidedModel, torch.Tensor, torch.Tensor, torch.Tensor, Schedule], torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    name: str
    run: RunFn                                 # (model, x_T, timesteps, schedule, options) -> x_0
    grid: GridFn                               # the default descending timesteps for `steps`
    a1111: str                                 # A1111's sampler name (PNG infotext)
    few_step: bool = False                     # samples distilled weights: its grid comes from the spec
    eta: float | None = None                   # default eta; None: the sampler takes no eta
    nfe_per_step: int = 1                      # UNet evaluations per step (times 2 under CFG)
    k_grid: bool = False                       # its grid is the LCM k-grid (explicit timesteps checked on it)
    steps_hint: int | None = None              # more steps than this with a distilled adapter rarely helps
    guidance_hint: float | None = None         # a distilled adapter burns above this guidance scale
    start: Callable | None = None              # (noise, t_0, schedule, spacing) -> z_T for text-to-image
    psi: PsiFn | None = None                   # as a teacher solver Psi of LCD: one step z_{t_{n+k}} -> z_{t_n}
    psi_calls: int = 0                         # guided teacher UNet calls of one Psi step (cond + uncond)

    @property
    def preset(self) -> str:
        """Its conf/solver/<name>.yaml (guidance, eta, spacing, steps defaults)."""
        return f"conf/solver/{self.name}.yaml"

#----------------------------------------------------------------------------
# Run functions: the solvers' free functions over the one model adapter (solvers.wrappers.GuidedModel).

def _run_lcm(model, x, ts, schedule, o: Options):
    """Multistep consistency sampling: f_theta(z, t) = c_skip z + c_out x0_hat, then re-noise."""
    return lcm_solver.sample_lcm(o.spec.consistency_fn(model.x0), x, ts, schedule, generator=o.generator,
                                 callback=o.callback)


def _run_tcd(model, x, ts, schedule, o: Options):
    """TCF(1) to s' = floor((1 - gamma) tau_{i+1}), re-noise (TCD's strategic stochastic sampling)."""
    return tcd_solver.sample_tcd(model.x0_eps, x, ts, schedule, gamma=o.eta, generator=o.generator,
                                 callback=o.callback)


def _run_scm(model, x, ts, schedule, o: Options):
    """sCM's multistep sampler (FastGen `_student_sample_loop`): f_theta(x, tau_i) = cos x - sigma_d sin F = x0_hat
    at t_SD(tau_i) for any sigma_d, re-noised to tau_{i+1}: the LCM sampler in DDIM form (no c_skip / c_out)."""
    return lcm_solver.sample_lcm(model.x0, x, ts, schedule, generator=o.generator, callback=o.callback)


def _run_ddim(model, x, ts, schedule, o: Options):
    """DDIM (eta); PCM samples with it: deterministic jumps between phase edges."""
    return ddim.sample_ddim(model.eps, x, ts, schedule, eta=o.eta, generator=o.generator, callback=o.callback)


def _run_euler(model, x, ts, schedule, o: Options):
    """Euler in sigma-space = DDIM ending at sigma = 0."""
    return ddim.sample_ddim(model.eps, x, ts, schedule, callback=o.callback, t_final=None)


def _euler_start(noise, t, schedule, spacing):
    """diffusers' Euler starts trailing / linspace grids at z_T = sigma_T eps (not at unit variance)."""
    return noise * schedule.sigma(t).float() if spacing in ("trailing", "linspace") else noise


def _run_dpmpp_2m(model, x, ts, schedule, o: Options):
    return dpm_solver.sample_dpmpp_2m(model.eps, x, ts, schedule, callback=o.callback)


def _run_dpm_solver(model, x, ts, schedule, o: Options):
    return dpm_solver.sample_dpm_solver(model.eps, x, ts, schedule, order=2, callback=o.callback)

#----------------------------------------------------------------------------
# Timestep rules.

def _k_grid(steps, spec, spacing, strength):
    """The LCM / TCD schedulers' rule on the k-grid (img2img: strength cuts inside the rule)."""
    return lcm_timesteps(steps, spec.num_ddim_timesteps, strength=strength)


def _pcm_grid(steps, spec, spacing, strength):
    """The phase-exact grid: [999, 739, 499, 239] for 4 steps."""
    if (m := spec.phases) and steps % m and m % steps:
        log.warning("PCM weights with %d phases sampled in %d steps cross phase edges mid-phase", m, steps)
    return pcm_timesteps(steps, spec.num_ddim_timesteps)


def _scm_grid(steps, spec, spacing, strength):
    """sCM: trailing SD timesteps from tau_max = tau(999) (pure noise, SNR > 0): [999, 499] (tau_mid = 1.016),
    [999, 749, 499, 249] for 4 steps (DMD2's grid, so rCM's backward simulation and the sampler agree)."""
    return spaced_timesteps(steps, "trailing")


def _ddim_grid(steps, spec, spacing, strength):
    """The SD release's DDIM config (leading, offset 1); trailing: Hyper-SD / SDXL-Lightning cards."""
    if spacing == "trailing":
        return spaced_timesteps(steps, "trailing")
    return spaced_timesteps(steps, spacing or "leading", steps_offset=1 if spacing in (None, "leading") else 0)


def _dpm_grid(steps, spec, spacing, strength):
    """DPM-Solver(++) as diffusers' multistep scheduler (linspace by default)."""
    if spacing == "trailing":
        return spaced_timesteps(steps, "trailing")
    return spaced_timesteps(steps, spacing or "linspace", convention="dpm")

#----------------------------------------------------------------------------
# Teacher solver steps Psi (LCM-LoRA report Algorithm 1, line 6): z_{t_{n+k}} -> z_{t_n} on the guided teacher.

def _psi_ddim(model, z, t, s, schedule):
    """One batched pass over [cond; uncond], then the DDIM step (the reference Psi)."""
    x0, eps = model.x0_eps(z, t)
    return ddim_from_x0_eps(x0, eps, s, schedule)


def _psi_dpm_solver(model, z, t, s, schedule):
    """DPM-Solver-2 (singlestep, r1 = 1/2): CFG applied at the midpoint too."""
    return dpm_solver_step(model.eps, z, t, s, schedule, order=2)[0]


def _psi_dpmpp_2s(model, z, t, s, schedule):
    """DPM-Solver++(2S) (data form, r1 = 1/2)."""
    return dpmpp_2s_step(model.eps, z, t, s, schedule, order=2)[0]

#----------------------------------------------------------------------------
# The table.

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("lcm", _run_lcm, _k_grid, "LCM", few_step=True, k_grid=True, steps_hint=8, guidance_hint=2.0),
    Sampler("tcd", _run_tcd, _k_grid, "TCD", few_step=True, eta=0.3, k_grid=True, steps_hint=8),
    Sampler("pcm", _run_ddim, _pcm_grid, "PCM", few_step=True),
    Sampler("scm", _run_scm, _scm_grid, "sCM", few_step=True, steps_hint=4, guidance_hint=2.0),
    Sampler("ddim", _run_ddim, _ddim_grid, "DDIM", eta=0.0, psi=_psi_ddim, psi_calls=2),
    Sampler("euler", _run_euler, _ddim_grid, "Euler", start=_euler_start),
    Sampler("dpmsolver", _run_dpm_solver, _dpm_grid, "DPM2", nfe_per_step=2, psi=_psi_dpm_solver, psi_calls=4),
    Sampler("dpmsolver++", _run_dpmpp_2m, _dpm_grid, "DPM++ 2M", psi=_psi_dpmpp_2s, psi_calls=4),
)}
TEACHER_SOLVERS = {name: s.psi_calls for name, s in SAMPLERS.items() if s.psi is not None}   # Psi -> UNet calls


def load_preset(conf_dir: str, name: str) -> dict:
    """conf/solver/<name>.yaml resolved (name, steps, guidance_scale, eta, spacing), else a one-line error."""
    from omegaconf import OmegaConf
    path = os.path.join(conf_dir, "solver", f"{name}.yaml")
    if not os.path.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir, "solver")) if f.endswith(".yaml"))
        raise ValueError(f"solver={name!r} is not a preset in conf/solver/; choose one of {', '.join(presets)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def get(name: str) -> Sampler:
    """The record of solver `name`, else a one-line error listing the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def by_a1111(name: str) -> Sampler | None:
    """The record whose A1111 sampler name is `name` (PNG infotext), if any."""
    return next((s for s in SAMPLERS.values() if s.a1111 == name), None)


def teacher_solver(name: str) -> Sampler:
    """A solver usable as the teacher step Psi of distillation (objective.teacher_solver), else a one-line error."""
    if name not in TEACHER_SOLVERS:
        raise ValueError(f"objective.teacher_solver must be one of {', '.join(TEACHER_SOLVERS)}, got {name!r}")
    return SAMPLERS[name]
