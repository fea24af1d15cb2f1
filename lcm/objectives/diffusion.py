"""Plain diffusion training (DDPM / SD): t ~ U{0..T-1}, MSE on the eps or v target, caption dropout
so CFG works. Trains the demo teacher from scratch (full model, optional EMA, optionally the text
towers) and style LoRAs (optionally with the LoRA's scale drawn per step: strength augmentation).
The loss is a pure function, diffusion_loss, over a net(x, t, cond, w) (solvers.wrappers.NetFn).
"""
from __future__ import annotations

import contextlib

import torch

from lcm.data.order import hash_seed
from lcm.denoiser import unet_net
from lcm.objectives.base import Objective
from lcm.objectives.losses import draw
from models import lora as lora_lib
from models.text import Conditioning
from solvers.schedule import Schedule
from solvers.wrappers import NetFn, to_x0

#----------------------------------------------------------------------------
# The loss: eps or v target, caption dropout for CFG.

def model_target(x0: torch.Tensor, eps: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                 schedule: Schedule, prediction_type: str) -> torch.Tensor:
    """The raw output whose conversions give (x0, eps) at (z_t, t), by inverting the affine to_x0."""
    zd, x0d = z_t.double(), x0.double()                      # fp64: the inversion divides by sigma
    a0 = to_x0(torch.zeros_like(zd), zd, t, schedule, prediction_type)
    a1 = to_x0(torch.ones_like(zd), zd, t, schedule, prediction_type) - a0
    return ((x0d - a0) / a1).to(z_t.dtype)                   # eps: eps;  v: alpha eps - sigma x0


def diffusion_loss(model_fn: NetFn, z: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                   schedule: Schedule, generator, *, prediction_type: str = "epsilon",
                   p_uncond: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Denoising loss per sample (B,): t ~ U{0..T-1}, MSE on the eps or v target (DDPM / SD)."""
    B, T = z.shape[0], schedule.T
    t = draw(generator, B, lambda n, g: torch.randint(0, T, (n,), generator=g, device="cpu")).to(z.device)
    drop = draw(generator, B, lambda n, g: torch.rand(n, generator=g, device="cpu")) < p_uncond
    eps = draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g, device="cpu"))
    eps = eps.to(z.device, z.dtype)
    if uncond is not None and p_uncond > 0:                  # caption dropout: learn the uncond branch
        cond = cond.where(drop.to(z.device), uncond)
    z_t = schedule.add_noise(z, eps, t)
    out = model_fn(z_t, t, cond, torch.zeros(B, device=z.device)).float()
    target = model_target(z, eps, z_t, t, schedule, prediction_type)
    return (out - target).pow(2).flatten(1).mean(1), dict(t=t, dropped=drop)

#----------------------------------------------------------------------------

class Diffusion(Objective):
    sampler = "ddim"

    def __init__(self, lora=None, ema_decay: float | None = None, p_uncond: float = 0.1,
                 lora_scale: list | None = None, train_text_encoder: bool = False,
                 lora_ema_decay: float | None = None):
        super().__init__(lora, ema_decay)
        if lora_ema_decay is not None:
            raise ValueError(f"objective.lora_ema_decay={lora_ema_decay}: an EMA target is for LoRA distillation "
                             "(objective=lcd_lora or lcf); null for objective=diffusion")
        if lora_scale is not None and (self.lora is None or len(lora_scale) != 2
                                       or not 0 < lora_scale[0] <= lora_scale[1]):
            raise ValueError(f"objective.lora_scale={lora_scale}: a range [lo, hi] with 0 < lo <= hi, for "
                             "objective=diffusion with a LoRA (e.g. a style LoRA); null for everything else")
        if ema_decay is not None and self.lora is not None:
            raise ValueError("objective=diffusion with a LoRA keeps no EMA: set objective.ema_decay=null")
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

    def validation_runs(self, v) -> list[tuple[str, int, float]]:
        """A diffusion model is validated as the teacher is sampled: DDIM at the teacher's steps and CFG."""
        return [(self.sampler, int(v.teacher_steps), float(v.teacher_guidance))]

    def loss(self, student_call, z, cond, uncond, generator):
        return diffusion_loss(unet_net(student_call), z, cond, uncond, self.schedule(z.device), generator,
                              prediction_type=self.pipe.prediction_type, p_uncond=self.p_uncond)

    @contextlib.contextmanager
    def step_context(self, step: int, seed: int):
        """Strength augmentation: the LoRA's scale ~ U[lo, hi] for this step, seeded by (seed, step);
        back to 1 on exit (so validation, export and a skipped step see scale 1)."""
        if not self.lora_scale:
            yield
            return
        lo, hi = self.lora_scale
        u = torch.rand((), device="cpu", generator=torch.Generator().manual_seed(hash_seed(seed, step, "scale")))
        lora_lib.set_lora_scales(self.student, {self.lora_name: lo + (hi - lo) * u.item()})
        try:
            yield
        finally:
            lora_lib.set_lora_scales(self.student, {self.lora_name: 1.0})
