"""Plain diffusion training (DDPM / SD): t ~ U{0..T-1}, MSE on the eps or v target, caption dropout
so CFG works. Trains the demo teacher from scratch (full model, optional EMA, optionally the text
towers) and style LoRAs (optionally with the LoRA's scale drawn per step: strength augmentation).
"""
from __future__ import annotations

import contextlib

import torch

from lcm.data.order import hash_seed
from lcm.objectives.base import Objective
from lcm.objectives.distill import diffusion_loss, net_fn
from models import lora as lora_lib


class Diffusion(Objective):
    sampler = "ddim"

    def __init__(self, lora=None, ema_decay: float | None = None, p_uncond: float = 0.1,
                 lora_scale: list | None = None, train_text_encoder: bool = False,
                 lora_ema_decay: float | None = None):
        super().__init__(lora, ema_decay)
        if lora_ema_decay is not None:
            raise ValueError(f"train.lora_ema_decay={lora_ema_decay}: an EMA target is for LoRA distillation "
                             "(objective=lcd_lora or lcf); null for objective=diffusion")
        if lora_scale is not None and (self.lora is None or len(lora_scale) != 2
                                       or not 0 < lora_scale[0] <= lora_scale[1]):
            raise ValueError(f"train.lora_scale={lora_scale}: a range [lo, hi] with 0 < lo <= hi, for "
                             "objective=diffusion with a LoRA (e.g. a style LoRA); null for everything else")
        if ema_decay is not None and self.lora is not None:
            raise ValueError("objective=diffusion with a LoRA keeps no EMA: set train.ema_decay=null")
        self.p_uncond, self.lora_scale = p_uncond, lora_scale
        self.trains_text = train_text_encoder

    def setup(self, pipe) -> None:
        self.pipe = pipe
        if self.lora is not None:
            self._setup_lora(pipe, ema=False)
            self.teacher = None
        else:
            self._setup_full(pipe, pipe.unet, ema=self.ema_decay is not None)
        if self.trains_text:
            pipe.text.float().requires_grad_(True)
            self.trainables += [(f"text.{n}", p) for n, p in pipe.text.named_parameters()]

    def loss(self, student_call, z, cond, uncond, generator):
        return diffusion_loss(net_fn(student_call), z, cond, uncond, self.schedule(z.device), generator,
                              prediction_type=self.pipe.prediction_type, p_uncond=self.p_uncond)

    @contextlib.contextmanager
    def step_context(self, step: int, seed: int):
        """Strength augmentation: the LoRA's scale ~ U[lo, hi] for this step, seeded by (seed, step);
        back to 1 on exit (so validation, export and a skipped step see scale 1)."""
        if not self.lora_scale:
            yield
            return
        lo, hi = self.lora_scale
        u = torch.rand((), generator=torch.Generator().manual_seed(hash_seed(seed, step, "scale")))
        lora_lib.set_lora_scales(self.student, {self.lora_name: lo + (hi - lo) * u.item()})
        try:
            yield
        finally:
            lora_lib.set_lora_scales(self.student, {self.lora_name: 1.0})
