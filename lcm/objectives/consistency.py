"""The consistency distillation objectives' base class (LCD, LCF, TCD, PCM): Algorithm 1 of the
LCM-LoRA report with a swappable z_hat_{t_n} step (estimate) and the grid of the run (its spec)."""
from __future__ import annotations

import logging

from lcm.consistency import ConsistencySpec
from lcm.objectives.base import Objective
from lcm.objectives.distill import EstimateFn, lcd_loss, net_fn
from solvers.schedule import Schedule

log = logging.getLogger(__name__)


class ConsistencyObjective(Objective):
    """The LCD loss with the knobs of Algorithm 1; subclasses choose the networks and estimate()."""

    def __init__(self, lora=None, ema_decay: float | None = None, k: int = 20, w_min: float = 5.0,
                 w_max: float = 15.0, w_fixed: float | None = None, loss: str = "huber", huber_c: float = 1e-3,
                 lora_scale: list | None = None):
        super().__init__(lora, ema_decay)
        if lora_scale is not None:                         # not silently ignored
            raise ValueError(f"train.lora_scale={lora_scale} is strength augmentation for objective=diffusion "
                             "with a LoRA; set it to null for consistency distillation")
        if loss not in ("huber", "l2"):
            raise ValueError(f"train.loss must be one of huber, l2, got {loss!r}")
        if not w_min <= w_max:
            raise ValueError(f"train.w_min={w_min} > train.w_max={w_max}")
        self.kw = dict(k=k, w_min=w_min, w_max=w_max, w_fixed=w_fixed, loss=loss, huber_c=huber_c)
        self._spec = None

    def setup_spec(self, pipe) -> None:
        """The grid of this run: N = T / k points, the pipeline's boundary scalings."""
        T, k = pipe.schedule.T, self.kw["k"]
        if k < 1 or T % k:
            raise ValueError(f"train.k={k} must divide T={T} (e.g. 1, 5, 10, 20, 50)")
        self.pipe, self._spec = pipe, ConsistencySpec(T // k, pipe.spec.sigma_data, pipe.spec.timestep_scaling)

    @property
    def spec(self) -> ConsistencySpec:
        return self._spec

    def estimate(self, schedule: Schedule) -> EstimateFn:
        """z_hat_{t_n} from z_{t_{n+k}} (Algorithm 1, line 6)."""
        raise NotImplementedError

    def loss(self, student_call, z, cond, uncond, generator):
        p, schedule = self.pipe, self.schedule(z.device)
        return lcd_loss(net_fn(student_call), self.target_net(), self.estimate(schedule), z, cond, uncond, schedule,
                        generator, prediction_type=p.prediction_type, sigma_data=self.spec.sigma_data,
                        timestep_scaling=self.spec.timestep_scaling, **self.kw)

    @staticmethod
    def _in_context(module, ctx):
        """module as net(x, t, cond, w), each call inside ctx()."""
        base = net_fn(module)

        def net(*a):
            with ctx():
                return base(*a)
        return net

    def teacher_net(self):
        """The teacher as net(x, t, cond, w), inside its context (adapters off for a LoRA run)."""
        return self._in_context(self.teacher, self.teacher_ctx)

    def target_net(self):
        """The target as net(x, t, cond, w), inside its context (the EMA adapter, if any)."""
        return self._in_context(self.target, self.target_ctx)

    def check_lr(self, lr: float) -> None:
        if self.lora is not None and lr < 1e-5:
            log.warning("LoRA distillation with lr=%g < 1e-5 learns (almost) nothing; the reference uses 1e-4", lr)
        if self.lora is None and lr > 1e-5:
            log.warning("full-model distillation with lr=%g > 1e-5 tends to diverge; the reference uses 1e-6", lr)
