"""Latent Consistency Fine-tuning (LCM arXiv 2310.04378, Sec. 4.4; docs/method.md Sec. 4): the
consistency loss without a teacher, z_hat_{t_n} = alpha(t_n) z + sigma(t_n) eps with the same eps as
z_{t_{n+k}}. On a LoRA (e.g. continuing an LCM-LoRA on new data: objective.lora.init_from=FILE; target
= the student, or an EMA adapter with ema_decay) or on the full model (target = its EMA, needed).
"""
from __future__ import annotations

from lcm.objectives.consistency import ConsistencyObjective
from lcm.objectives.teacher import same_noise_estimate


class LCF(ConsistencyObjective):
    def __init__(self, lora=None, ema_decay: float | None = None, lora_ema_decay: float | None = None, **kw):
        """ema_decay: the full model's target EMA; lora_ema_decay: a LoRA's (null: target = student)."""
        super().__init__(lora, ema_decay if lora is None else lora_ema_decay, teacher_solver=None, **kw)
        if self.lora is None and ema_decay is None:
            raise ValueError("objective=lcf with a full model needs objective.ema_decay (0.95 in the reference)")

    def setup(self, pipe) -> None:
        self.setup_spec(pipe)
        if self.lora is not None:
            self._setup_lora(pipe, ema=self.ema_decay is not None)
        else:
            self._setup_full(pipe, pipe.unet, ema=True)
        self.teacher = None                                # no teacher: nothing to compare against

    def estimate(self, schedule):
        """Same-noise z_hat_{t_n} (no teacher)."""
        return same_noise_estimate(schedule)
