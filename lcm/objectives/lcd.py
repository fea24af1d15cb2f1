"""Full LCM: latent consistency distillation of the whole UNet with a w-embedding (LCM arXiv
2310.04378, Algorithm 1; docs/method.md Sec. 3). student = a copy of the UNet plus time_cond_proj
(the guidance w enters as an embedding), target = its EMA (mu = ema_decay, 0.95 in the reference
scripts), teacher = the frozen original UNet; z_hat_{t_n} is one guided step of the teacher solver Psi
(teacher_solver).
"""
from __future__ import annotations

from lcm.objectives.consistency import ConsistencyObjective


class LCD(ConsistencyObjective):
    def __init__(self, lora=None, ema_decay: float | None = 0.95, w_embedding_dim: int = 256, **kw):
        super().__init__(lora, ema_decay, **kw)
        if self.lora is not None:
            raise ValueError("objective=lcd trains the full UNet with a w-embedding: set objective.lora=null "
                             "(or use objective=lcd_lora for LCM-LoRA)")
        if ema_decay is None:
            raise ValueError("objective=lcd needs objective.ema_decay (0.95 in the reference)")
        self.w_embedding_dim = w_embedding_dim

    def setup(self, pipe) -> None:
        from models.unet import UNetModel
        self.setup_spec(pipe)
        unet = pipe.unet
        if unet.time_cond_proj_dim is not None:
            raise ValueError("this model already has a w-embedding (a full LCM): fine-tune it with objective=lcf")
        student = UNetModel(**{**pipe.config["unet"], "time_cond_proj_dim": self.w_embedding_dim})
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        assert missing == ["time_cond_proj.weight"] and not unexpected, (missing, unexpected)
        self._setup_full(pipe, student, ema=True)
        self.teacher = unet
