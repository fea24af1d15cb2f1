"""z_hat_{t_n} from z_{t_{n+k}}: the swappable step of the consistency loss (LCM-LoRA report Algorithm 1,
the teacher line; docs/method.md Sec. 3, step 6). LCD, TCD and PCM take one step of a teacher solver
Psi (the samplers table's `psi`: ddim, the reference, or dpmsolver / dpmsolver++, Sec. 9) on the
frozen teacher net(x, t, cond, w); LCF has no teacher and reuses the noise of z_{t_{n+k}}.

An EstimateFn is estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w) -> z_hat_{t_n} (B, ...).
"""
from __future__ import annotations

from typing import Callable

import torch

from lcm.denoiser import guided
from lcm.sampling import samplers
from solvers.schedule import Schedule
from solvers.wrappers import NetFn

EstimateFn = Callable[..., torch.Tensor]


def teacher_estimate(teacher: NetFn, schedule: Schedule, prediction_type: str, solver: str = "ddim",
                     cfg: bool = True) -> EstimateFn:
    """LCD: one step of Psi from t_{n+k} to t_n on the guided teacher (1 + w) out(c) - w out(uncond):
    z_hat_{t_n} = z_{t_{n+k}} + (1 + w) Psi(c) - w Psi(uncond) (Algorithm 1), CFG inside every solver
    evaluation, the midpoint's included. cfg=False: the conditional teacher alone (one pass of B)."""
    psi = samplers.teacher_solver(solver).psi

    @torch.no_grad()
    def estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w):
        if cfg:                                              # s = 1 + w: one batched pass of [cond; uncond]
            model = guided(teacher, cond, uncond, w, schedule, prediction_type, guidance_scale=1.0 + w)
        else:                                                # s = 1: cond only
            model = guided(teacher, cond, None, w, schedule, prediction_type)
        return psi(model, z_nk, t_nk, t_n, schedule)
    return estimate


def unguided_teacher_estimate(teacher: NetFn, schedule: Schedule, prediction_type: str,
                              solver: str = "ddim") -> EstimateFn:
    """PCM* (the reference's --not_apply_cfg_solver: uncond := cond): one step of Psi on the conditional
    teacher alone, one UNet pass of B per evaluation (ddim: 1, dpmsolver(++): 2)."""
    return teacher_estimate(teacher, schedule, prediction_type, solver, cfg=False)


def same_noise_estimate(schedule: Schedule) -> EstimateFn:
    """LCF: z_hat_{t_n} = alpha(t_n) z + sigma(t_n) eps with the eps of z_{t_{n+k}} (LCM arXiv 2310.04378,
    Sec. 4.4; docs/method.md Sec. 4)."""
    def estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w):
        return schedule.add_noise(z, eps, t_n)
    return estimate
