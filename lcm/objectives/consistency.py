"""The consistency distillation objectives' base class (LCD, LCF, TCD, PCM): the one consistency loss
(lcm.objectives.losses) with the knobs of Algorithm 1 (LCM-LoRA report), the grid of the run (its
spec), the teacher solver Psi and the z_hat_{t_n} step (estimate); subclasses choose the networks
and, for TCD / PCM, the Jump."""
from __future__ import annotations

import logging

from lcm.consistency import ConsistencySpec
from lcm.denoiser import unet_net
from lcm.objectives.base import Objective
from lcm.objectives.losses import Jump, consistency_loss, lcm_jump
from lcm.objectives.teacher import EstimateFn, teacher_estimate
from lcm.sampling import samplers
from solvers.schedule import Schedule
from solvers.wrappers import NetFn

log = logging.getLogger(__name__)


class ConsistencyObjective(Objective):
    """The consistency loss with the knobs of Algorithm 1; subclasses choose the networks (setup)."""

    def __init__(self, lora=None, ema_decay: float | None = None,
                 teacher_solver: str | None = "ddim",  # Psi: a samplers record with a psi step; None: no teacher (LCF)
                 k: int = 20,                          # skipping step; grid {k-1, 2k-1, ..., T-1}
                 w_min: float = 5.0,                   # w ~ U[w_min, w_max], LCM convention w = s - 1
                 w_max: float = 15.0,
                 w_fixed: float | None = None,         # a fixed w instead
                 loss: str = "huber",                  # d: huber | l2
                 huber_c: float = 1e-3,
                 lora_scale: list | None = None):      # objective=diffusion only: must be null here
        super().__init__(lora, ema_decay)
        if lora_scale is not None:                         # not silently ignored
            raise ValueError(f"objective.lora_scale={lora_scale} is strength augmentation for objective=diffusion "
                             "with a LoRA; set it to null for consistency distillation")
        if loss not in ("huber", "l2"):
            raise ValueError(f"objective.loss must be one of huber, l2, got {loss!r}")
        if not w_min <= w_max:
            raise ValueError(f"objective.w_min={w_min} > objective.w_max={w_max}")
        self.teacher_solver = None if teacher_solver is None else samplers.teacher_solver(teacher_solver).name
        self.kw = dict(k=k, w_min=w_min, w_max=w_max, w_fixed=w_fixed, loss=loss, huber_c=huber_c)
        self._spec = None

    def setup_spec(self, pipe) -> None:
        """The grid of this run: N = T / k points, the pipeline's boundary scalings."""
        T, k = pipe.schedule.T, self.kw["k"]
        if k < 1 or T % k:
            raise ValueError(f"objective.k={k} must divide T={T} (e.g. 1, 5, 10, 20, 50)")
        self.pipe, self._spec = pipe, ConsistencySpec(T // k, pipe.spec.sigma_data, pipe.spec.timestep_scaling)

    @property
    def spec(self) -> ConsistencySpec:
        return self._spec

    def jump(self) -> Jump:
        """f and s of the loss: LCM's c_skip z + c_out x0_hat, to s = 0."""
        return lcm_jump(self.spec.sigma_data, self.spec.timestep_scaling)

    def estimate(self, schedule: Schedule) -> EstimateFn:
        """z_hat_{t_n} from z_{t_{n+k}}: one CFG-augmented step of Psi on the teacher (Algorithm 1, step 6)."""
        return teacher_estimate(self.teacher_net(), schedule, self.pipe.prediction_type, self.teacher_solver)

    def loss(self, student_call, z, cond, uncond, generator):
        schedule = self.schedule(z.device)
        return consistency_loss(self.jump(), unet_net(student_call), self.target_net(), self.estimate(schedule), z,
                                cond, uncond, schedule, generator, prediction_type=self.pipe.prediction_type,
                                **self.kw)

    def teacher_net(self) -> NetFn:
        """The teacher as net(x, t, cond, w), inside its context (adapters off for a LoRA run)."""
        return unet_net(self.teacher, self.teacher_ctx)

    def target_net(self) -> NetFn:
        """The target as net(x, t, cond, w), inside its context (the EMA adapter, if any)."""
        return unet_net(self.target, self.target_ctx)

    def check_lr(self, lr: float) -> None:
        if self.lora is not None and lr < 1e-5:
            log.warning("LoRA distillation with lr=%g < 1e-5 learns (almost) nothing; the reference uses 1e-4", lr)
        if self.lora is None and lr > 1e-5:
            log.warning("full-model distillation with lr=%g > 1e-5 tends to diverge; the reference uses 1e-6", lr)
