"""LCM-LoRA: latent consistency distillation into a LoRA (LCM-LoRA report, Algorithm 1).

teacher = the pipeline's UNet with its adapters off (one UNet in memory), student = the same UNet
with the trainable LoRA, target = the student under no_grad (mu = 0, the reference scripts) or, with
ema_decay = mu, base + an EMA copy of the LoRA (a second frozen adapter; what is then exported).
z_hat_{t_n} is one guided step of the teacher solver Psi (teacher_solver: DDIM, the reference, or
DPM-Solver-2 / DPM-Solver++(2S); docs/method.md Sec. 3, step 6 and Sec. 9).
"""
from __future__ import annotations

from lcm.objectives.consistency import ConsistencyObjective


class LCDLoRA(ConsistencyObjective):
    def __init__(self, lora=None, ema_decay: float | None = None, **kw):
        super().__init__(lora, ema_decay, **kw)
        if self.lora is None:
            raise ValueError("objective=lcd_lora needs a LoRA (objective.lora: {rank: .., alpha: ..}); "
                             "use objective=lcd to distil a full LCM")

    def setup(self, pipe) -> None:
        self.setup_spec(pipe)
        self._setup_lora(pipe, ema=self.ema_decay is not None)
