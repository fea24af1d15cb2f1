"""PCM-LoRA: phased consistency distillation into a LoRA (Wang et al. 2024, arXiv 2405.18407;
docs/method.md Sec. 12; the loss: lcm.objectives.losses with pcm_jump).

M phases (`phases`) split the grid at solvers.schedule.pcm_phase_starts; the student learns the DDIM
jump from t_{n+k} to the lower edge of its phase (PCM Eq. 3), the target is the target net's jump from
z_hat_{t_n} to the same edge (z_hat itself at a phase start). Networks as LCM-LoRA (lcd_lora.py): the
teacher is the UNet with adapters off, the target the student under no_grad (ema_decay null: the
reference code and the paper's LoRA settings) or an EMA adapter. cfg_solver=false is PCM*: no CFG in
the teacher step (one teacher pass) and, by default, caption dropout p_uncond = 0.1. No adversarial
loss (PCM Eqs. 8-9) here. The export carries ConsistencySpec(objective="pcm", phases=M), sampled
with solver=pcm (DDIM between phase edges).
"""
from __future__ import annotations

import logging

from lcm.consistency import ConsistencySpec
from lcm.objectives.losses import Jump, pcm_jump
from lcm.objectives.tcd import DDIMFormObjective
from lcm.objectives.teacher import unguided_teacher_estimate

log = logging.getLogger(__name__)


class PCM(DDIMFormObjective):
    sampler = "pcm"
    name = "pcm"

    def __init__(self, lora=None, ema_decay: float | None = None, phases: int = 4, cfg_solver: bool = True,
                 p_uncond: float | None = None, **kw):
        """phases: M; cfg_solver: CFG in the teacher step (False: PCM*); p_uncond: caption dropout
        (None: 0.1 without cfg_solver, as the reference's PCM* script, else 0)."""
        super().__init__(lora, ema_decay, **kw)
        if type(phases) is not int or phases < 1:
            raise ValueError(f"objective.phases={phases!r} must be an integer >= 1 (PCM's M; 4 in the paper)")
        if p_uncond is None:
            p_uncond = 0.0 if cfg_solver else 0.1
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"objective.p_uncond={p_uncond} must be in [0, 1]")
        self.phases, self.cfg_solver, self.p_uncond = phases, bool(cfg_solver), float(p_uncond)
        self.kw["p_uncond"] = self.p_uncond
        if not self.cfg_solver:                            # uncond := cond: w = 0 is no guidance
            self.kw["w_fixed"] = 0.0

    def make_spec(self, N: int) -> ConsistencySpec:
        if self.phases > N:
            raise ValueError(f"objective.phases={self.phases} exceeds the grid size N = T / k = {N} (objective.k)")
        return ConsistencySpec(num_ddim_timesteps=N, objective="pcm", phases=self.phases)

    def jump(self) -> Jump:
        """The DDIM jump to the lower edge of t_{n+k}'s phase (PCM Eq. 3)."""
        return pcm_jump(self.kw["k"], self.phases, self.pipe.schedule.T)

    def estimate(self, schedule):
        """With cfg_solver the guided teacher step; else PCM*'s conditional teacher alone."""
        if self.cfg_solver:
            return super().estimate(schedule)
        return unguided_teacher_estimate(self.teacher_net(), schedule, self.pipe.prediction_type, self.teacher_solver)

    def check_lr(self, lr: float) -> None:
        if lr < 1e-6:
            log.warning("PCM-LoRA with lr=%g < 1e-6 learns (almost) nothing; the reference uses 5e-6", lr)
