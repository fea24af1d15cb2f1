"""sCM: continuous-time consistency distillation (sCD) from the SD teacher into a LoRA (sCM, arXiv 2410.11081;
docs/method.md Sec. 15; the math: lcm.objectives.trigflow, the JVP: lcm.objectives.jvp).

teacher = the base with its adapters off (CFG at one fixed scale s), student = base + LoRA (theta), theta- =
sg(theta): the JVP runs on the online student weights, never on an EMA. target = the student, or with
ema_decay = mu an EMA adapter (validation and export only). One step (sigma_d = 1: TrigFlow = SD's VP):
  1. tau ~ truncated log-normal on sigma_d tan tau over SD's tau range; x = cos tau x0 + sin tau sigma_d z
  2. dx/dtau = sigma_d F~, F~ = the teacher's F with CFG (one batched cond / uncond pass at t_SD(tau))
  3. (F-, dF) = JVP of F_theta(x, tau) along (cos sin dx/dtau, cos sin), no grad, fp32
  4. F_theta(x, tau) with grad;  5. g, g / (||g|| + c), the loss (trigflow.scm_loss).
F_theta(x, tau) = F_from_raw(UNet(k x, t_SD(tau))): the continuous t_SD and the eps / v -> F conversion sit
inside the differentiated function. The export carries ConsistencySpec(objective="scm") and is sampled with
solver=scm (the LCM sampler in DDIM form at SD timesteps: f_theta = x0_hat for every sigma_d).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from lcm.consistency import ConsistencySpec
from lcm.denoiser import guided, unet_net
from lcm.objectives.base import Objective, OptimizerSpec
from lcm.objectives.jvp import JVP_METHODS, jvp
from lcm.objectives.losses import draw
from lcm.objectives.trigflow import F_from_raw, sample_tau, scm_loss, t_of_tau, tau_range, vp_scale
from models.storage import StoredConv2d, StoredLinear
from solvers.schedule import expand_as

log = logging.getLogger(__name__)

#----------------------------------------------------------------------------
# Adaptive weighting l(tau) (sCM Sec. 4; FastGen: Fourier features of c_noise, then a linear layer).

class LogvarHead(nn.Module):
    """l(tau) (B,): a zero-initialised linear over fixed random Fourier features of c = log(sigma_d tan tau) / 4
    (EDM2's MPFourier + linear, as FastGen's EDM networks); l = 0 at step 0, so the loss starts unweighted."""

    def __init__(self, features: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g, device="cpu"))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g, device="cpu"))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)                 # l(tau) = 0: the loss starts as the unweighted one
        nn.init.zeros_(self.linear.bias)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        feats = torch.cos(c_noise.float()[:, None] * self.freqs + self.phases) * math.sqrt(2)   # (B, features)
        return self.linear(feats).squeeze(1)


def casts_to_fp32(unet: nn.Module) -> bool:
    """Whether the UNet computes in fp32 outside autocast: every weight fp32, or in a layer that casts it to
    the input's dtype (models.storage: train.frozen_storage)."""
    return all(isinstance(m, (StoredLinear, StoredConv2d)) or
               all(p.dtype == torch.float32 for p in m.parameters(recurse=False) if p.is_floating_point())
               for m in unet.modules())

#----------------------------------------------------------------------------

class SCM(Objective):
    sampler = "scm"

    def __init__(self, lora=None, ema_decay: float | None = None,
                 guidance_scale: float = 5.0,           # the teacher's fixed CFG scale s (eps_u + s (eps_c - eps_u))
                 sigma_d: float = 1.0,                  # TrigFlow's data std; 1: TrigFlow = SD's VP, F = v
                 P_mean: float = -1.0,                  # log(sigma_d tan tau) ~ N(P_mean, P_std^2) on SD's tau range
                 P_std: float = 1.6,
                 tangent_warmup: int = 1000,            # W: r = min(1, step / W); 0: r = 1 from the start
                 tangent_c: float = 0.1,                # g / (||g|| + c)
                 tangent_norm: str = "rms",             # ||g||: rms (size-invariant) | l2
                 prior_weight: bool = False,            # w(tau) = 1 / (sigma_d tan tau)
                 adaptive_weight: bool = False,         # learn l(tau): w / e^l * L + l
                 jvp_method: str = "autograd",          # lcm.objectives.jvp: autograd (forward-mode) | fd
                 jvp_fd_eps: float = 1e-3,              # its finite-difference step (jvp_method=fd)
                 jvp_fp32: bool = True):                # the JVP without autocast (fp32 time embedding and tangent)
        super().__init__(lora, ema_decay)
        if self.lora is None:
            raise ValueError("objective=scm needs a LoRA (objective.lora: {rank: .., alpha: ..})")
        if tangent_norm not in ("rms", "l2"):
            raise ValueError(f"objective.tangent_norm must be rms or l2, got {tangent_norm!r}")
        if jvp_method not in JVP_METHODS:
            raise ValueError(f"objective.jvp_method must be one of {', '.join(sorted(JVP_METHODS))}, "
                             f"got {jvp_method!r}")
        if not (sigma_d > 0 and P_std > 0 and tangent_c >= 0 and tangent_warmup >= 0 and guidance_scale >= 0):
            raise ValueError(f"objective=scm needs sigma_d > 0, P_std > 0, tangent_c >= 0, tangent_warmup >= 0, "
                             f"guidance_scale >= 0; got {sigma_d}, {P_std}, {tangent_c}, {tangent_warmup}, "
                             f"{guidance_scale}")
        self.s, self.sigma_d, self.P_mean, self.P_std = float(guidance_scale), float(sigma_d), P_mean, P_std
        self.warmup, self.c, self.norm = tangent_warmup, tangent_c, tangent_norm
        self.prior_weight, self.adaptive_weight = prior_weight, adaptive_weight
        self.jvp_method, self.jvp_fd_eps, self.jvp_fp32 = jvp_method, jvp_fd_eps, jvp_fp32
        self.logvar: LogvarHead | None = None
        self._spec, self._step, self._last, self._fp32_ok = None, 0, {}, None

    def setup(self, pipe) -> None:
        self.pipe = pipe
        self._spec = ConsistencySpec(sigma_data=self.sigma_d, objective="scm")
        self._setup_lora(pipe, ema=self.ema_decay is not None)
        self._tau_range = tau_range(pipe.schedule, self.sigma_d)     # on the CPU once (no host read per step)
        if self.adaptive_weight:
            self.logvar = LogvarHead()
            self.trainables += [(f"scm_logvar.{n}", p) for n, p in self.logvar.named_parameters()]

    @property
    def spec(self) -> ConsistencySpec:
        return self._spec

    def optimizers(self) -> list[OptimizerSpec]:
        # The loop builds the optimizers after placing the networks: the head joins the UNet's device here,
        # before the optimizer (and a resumed optimizer state) sees its parameters.
        if self.logvar is not None:
            self.logvar.to(next(self.student.parameters()).device)
        return super().optimizers()

    def step_context(self, step: int, seed: int):
        self._step = step                                  # the warm-up's clock (a resumed run continues it)
        return contextlib.nullcontext()

    def tangent_r(self) -> float:
        return 1.0 if self.warmup == 0 else min(1.0, self._step / self.warmup)

    def F_net(self, net, cond, schedule):
        """F_theta(x, tau) of a net(x, t, cond, w): the UNet at (k x, t_SD(tau)), its output converted to F."""
        pt, sd = self.pipe.prediction_type, self.sigma_d

        def F(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            x_vp = x if sd == 1 else expand_as(vp_scale(tau, sd), x) * x
            return F_from_raw(net(x_vp, t_of_tau(tau, schedule, sd), cond, None), x, tau, pt, sd)
        return F

    def _jvp(self, fn, primals, tangents):
        """jvp of lcm.objectives.jvp; with jvp_fp32 outside autocast (fp32 time embedding, tangent and attention),
        which needs fp32 weights or ones cast to the input (train.frozen_storage); else under the loop's autocast."""
        if self._fp32_ok is None:                          # checked once, after the loop placed / stored the UNet
            self._fp32_ok = casts_to_fp32(self.student)
            if self.jvp_fp32 and not self._fp32_ok:
                log.warning("objective.jvp_fp32: the UNet holds half-precision weights, so the JVP runs under "
                            "the loop's autocast; use an fp32 model with train.frozen_storage for an fp32 JVP")
        off = self.jvp_fp32 and self._fp32_ok
        with torch.autocast(primals[0].device.type, enabled=False) if off else contextlib.nullcontext():
            return jvp(fn, primals, tangents, method=self.jvp_method, fd_eps=self.jvp_fd_eps)

    def loss(self, student_call, z, cond, uncond, generator):
        return self.scm_step(z, cond, uncond, generator, self.F_net(unet_net(student_call), cond, self.schedule(z.device)))

    def scm_step(self, z, cond, uncond, generator, F_fn) -> tuple[torch.Tensor, dict]:
        """The sCM loss (B,) of clean latents z; F_fn(x, tau) is the grad pass of the student (rCM batches its
        generator pass into it)."""
        schedule, pt, sd, B = self.schedule(z.device), self.pipe.prediction_type, self.sigma_d, z.shape[0]
        # Step 1: tau, then z per sample (draw order), x = cos tau x0 + sin tau sigma_d z.
        tau = sample_tau(B, generator, self.P_mean, self.P_std, *self._tau_range, sd).to(z.device)
        eps = draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g, device="cpu")).to(z)
        x = expand_as(torch.cos(tau), z) * z + sd * expand_as(torch.sin(tau), z) * eps
        # Step 2: the teacher's velocity with CFG (CFG on the raw output = CFG on F: F is affine in it).
        with torch.no_grad():
            teacher = guided(unet_net(self.teacher, self.teacher_ctx), cond, uncond, None, schedule, pt, self.s)
            dxdt = sd * self.F_net(lambda x_vp, t, c, w: teacher.output(x_vp, t), cond, schedule)(x, tau).float()
        # Steps 3-5: JVP on the unwrapped student (no DDP under forward AD), grad pass through student_call.
        logvar = None
        if self.logvar is not None:
            if self.logvar.linear.weight.device != z.device:
                self.logvar.to(z.device)
            logvar = self.logvar(torch.log(sd * torch.tan(tau)) / 4)
        r = self.tangent_r()
        loss, diag = scm_loss(F_fn, self._jvp, x, tau, dxdt, sigma_d=sd, r=r, c=self.c, norm=self.norm,
                              prior_weight=self.prior_weight, logvar=logvar,
                              F_jvp=self.F_net(unet_net(self.student), cond, schedule))
        self._last = dict(g_norm=diag["g_norm"].detach().mean(), tangent_r=r)
        return loss, diag | dict(r=r)

    def metrics(self) -> dict:
        """lora_norm, the mean ||g|| before normalisation (the sCM loss value tracks it) and the warm-up r."""
        m = {k: float(v) for k, v in self._last.items()}
        return super().metrics() | m

    def check_lr(self, lr: float) -> None:
        if lr < 1e-5:
            log.warning("LoRA distillation with lr=%g < 1e-5 learns (almost) nothing", lr)
