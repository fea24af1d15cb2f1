"""Latent Consistency Distillation as pure functions (LCM-LoRA report, Algorithm 1; PAPER Sec. 3-4).

Networks enter as functions net(x, t, cond, w) -> raw UNet output (eps, v or x0), x (B,4,h,w),
t (B,) int64, cond a UNetCond, w (B,) LCM guidance (used only by w-embedding students). The
trainer decides what they are:
    lcm_lora   student = LoRA UNet; target = the same UNet under no_grad (mu = 0);
               teacher = the same UNet with adapters disabled (one UNet in memory)
    lcd        student = full UNet with w-embedding; target = its EMA copy; teacher = frozen base
    lcf        as either, but z_hat_{t_n} is the same-noise estimate (no teacher, PAPER Sec. 4)
All randomness comes from `generator`: one torch.Generator, or one per sample (then a sample's
draws do not depend on the batch it is in, so 2 processes x B == 1 process x 2B).
The last section builds those networks for each mode on a Pipeline (`build_roles`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from lcm.consistency import f_theta, guidance_embedding
from models import lora as lora_lib
from models import lora_io
from solvers.ddim import ddim_from_x0_eps
from solvers.schedule import Schedule, expand_as
from solvers.wrappers import to_eps, to_x0


class UNetCond(NamedTuple):
    """What the UNet is conditioned on: context (B,77,D) and SDXL's vector y (B,2816) or None."""
    context: torch.Tensor
    y: torch.Tensor | None = None

    def cat(self, other: "UNetCond") -> "UNetCond":
        y = None if self.y is None else torch.cat([self.y, other.y])
        return UNetCond(torch.cat([self.context, other.context]), y)

    def where(self, mask: torch.Tensor, other: "UNetCond") -> "UNetCond":
        """Per sample: `other` where mask (B,) is True, else self (caption dropout)."""
        pick = lambda a, b: torch.where(expand_as(mask, a).bool(), b, a)
        return UNetCond(pick(self.context, other.context), None if self.y is None else pick(self.y, other.y))


NetFn = Callable[[torch.Tensor, torch.Tensor, UNetCond, torch.Tensor], torch.Tensor]
EstimateFn = Callable[..., torch.Tensor]

#----------------------------------------------------------------------------
# Random draws, per sample when given one generator per sample.

def _draw(generator, B: int, fn: Callable) -> torch.Tensor:
    """fn(n, g) -> (n, ...) CPU tensor; one call per sample for a list of generators."""
    if isinstance(generator, (list, tuple)):
        assert len(generator) == B, f"{len(generator)} generators for a batch of {B}"
        return torch.cat([fn(1, g) for g in generator])
    return fn(B, generator)


def draw_points(z: torch.Tensor, schedule: Schedule, k: int, generator):
    """Algorithm 1, sampling line: n ~ U on the grid, u ~ U[0,1) (for w), eps ~ N(0, I).

    Returns t_nk (B,), t_n (B,) int64, u (B,), eps like z. Draw order per sample: j, u, eps."""
    B, T = z.shape[0], schedule.T
    if k < 1 or T % k:
        raise ValueError(f"skipping step k={k} must divide T={T} (e.g. 1, 5, 10, 20, 50)")
    N = T // k                                               # grid t_j = j*k - 1, j = 1..N (PAPER Sec. 3 step 2)
    j = _draw(generator, B, lambda n, g: torch.randint(1, N + 1, (n,), generator=g))
    u = _draw(generator, B, lambda n, g: torch.rand(n, generator=g, dtype=torch.float64))
    eps = _draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g))
    t_nk = j * k - 1                                         # t_{n+k} in {k-1, ..., T-1}
    t_n = (t_nk - k).clamp(min=0)                            # t_n in {0, k-1, ...}; -1 clamped to 0
    return t_nk.to(z.device), t_n.to(z.device), u, eps.to(z.device, z.dtype)

#----------------------------------------------------------------------------
# "Produce z_hat_{t_n}": the swappable step (LCD: teacher DDIM; LCF: same-noise estimate).

def teacher_ddim_estimate(teacher_fn: NetFn, schedule: Schedule, prediction_type: str) -> EstimateFn:
    """LCD: one guided DDIM step of the frozen teacher from t_{n+k} to t_n (PAPER Sec. 3 step 6)."""
    @torch.no_grad()
    def estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w):
        B = z_nk.shape[0]
        out = teacher_fn(torch.cat([z_nk, z_nk]), torch.cat([t_nk, t_nk]), cond.cat(uncond),
                         torch.cat([w, w])).float()          # [cond; uncond] in one batched pass
        zz, tt = torch.cat([z_nk, z_nk]), torch.cat([t_nk, t_nk])
        x0_c, x0_u = to_x0(out, zz, tt, schedule, prediction_type).split(B)      # by prediction type
        eps_c, eps_u = to_eps(out, zz, tt, schedule, prediction_type).split(B)   # (raw v is not eps)
        wb = expand_as(w, z_nk)
        x0_w = x0_c + wb * (x0_c - x0_u)                     # LCM CFG: cond + w (cond - uncond)
        eps_w = eps_c + wb * (eps_c - eps_u)
        return ddim_from_x0_eps(x0_w, eps_w, t_n, schedule)  # = z + (1+w)Psi(c) - w Psi(uncond)
    return estimate


def same_noise_estimate(schedule: Schedule) -> EstimateFn:
    """LCF: z_hat_{t_n} = alpha(t_n) z + sigma(t_n) eps with the eps of z_{t_{n+k}} (PAPER Sec. 4)."""
    def estimate(z_nk, t_nk, t_n, z, eps, cond, uncond, w):
        return schedule.add_noise(z, eps, t_n)
    return estimate

#----------------------------------------------------------------------------
# The loss (Algorithm 1, steps 2-8).

def distance(a: torch.Tensor, b: torch.Tensor, loss: str = "huber", huber_c: float = 1e-3) -> torch.Tensor:
    """Per-sample d(a, b) (B,): 'l2' mean squared error or 'huber' mean(sqrt((a-b)^2 + c^2) - c)."""
    if loss == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if loss == "huber":
        return ((a - b).pow(2) + huber_c**2).sqrt().sub(huber_c).flatten(1).mean(1)
    raise ValueError(f"loss must be 'l2' or 'huber', got {loss!r}")


def lcd_loss(student_fn: NetFn, target_fn: NetFn, estimate_fn: EstimateFn, z: torch.Tensor,
             cond: UNetCond, uncond: UNetCond | None, schedule: Schedule, generator, *,
             k: int = 20, w_min: float = 5.0, w_max: float = 15.0, w_fixed: float | None = None,
             loss: str = "huber", huber_c: float = 1e-3, prediction_type: str = "epsilon",
             sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, dict]:
    """LCD / LCF loss per sample (B,) for clean latents z (B,4,h,w) and a dict of diagnostics."""
    # Steps 2-4: grid point n, guidance w ~ U[w_min, w_max] (LCM convention, w = s - 1), noise.
    t_nk, t_n, u, eps = draw_points(z, schedule, k, generator)
    w = torch.full_like(u, w_fixed) if w_fixed is not None else w_min + (w_max - w_min) * u
    w = w.to(z.device, torch.float32)
    z_nk = schedule.add_noise(z, eps, t_nk)                  # z_{t_{n+k}} = alpha z + sigma eps

    # Step 6: z_hat_{t_n} (teacher DDIM step for LCD, same-noise estimate for LCF); no grad. The
    # no-grad passes run before the student's, so their activations are freed before its graph exists.
    with torch.no_grad():
        z_hat = estimate_fn(z_nk, t_nk, t_n, z, eps, cond, uncond, w).float()

        # Step 7: target f_theta_minus(z_hat_{t_n}, w, c, t_n); equals z_hat at t_n = 0.
        out_t = target_fn(z_hat, t_n, cond, w).float()
        x0_t = to_x0(out_t, z_hat, t_n, schedule, prediction_type)
        target = f_theta(z_hat, x0_t, t_n, sigma_data, timestep_scaling)

    # Step 5: student f_theta(z_{t_{n+k}}, w, c, t_{n+k}) = c_skip z + c_out x0_hat (with grad).
    out = student_fn(z_nk, t_nk, cond, w).float()
    x0_s = to_x0(out, z_nk, t_nk, schedule, prediction_type)
    pred = f_theta(z_nk, x0_s, t_nk, sigma_data, timestep_scaling)

    # Step 8: d(student, target), l2 or pseudo-Huber, per sample.
    per_sample = distance(pred, target.detach(), loss, huber_c)
    return per_sample, dict(t_nk=t_nk, t_n=t_n, w=w)

#----------------------------------------------------------------------------
# Plain diffusion training (eps or v target, caption dropout for CFG): the demo teacher and style LoRAs.

def model_target(x0: torch.Tensor, eps: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor,
                 schedule: Schedule, prediction_type: str) -> torch.Tensor:
    """The raw output whose conversions give (x0, eps) at (z_t, t), by inverting the affine to_x0."""
    zd, x0d = z_t.double(), x0.double()                      # fp64: the inversion divides by sigma
    a0 = to_x0(torch.zeros_like(zd), zd, t, schedule, prediction_type)
    a1 = to_x0(torch.ones_like(zd), zd, t, schedule, prediction_type) - a0
    return ((x0d - a0) / a1).to(z_t.dtype)                   # eps: eps;  v: alpha eps - sigma x0


def diffusion_loss(model_fn: NetFn, z: torch.Tensor, cond: UNetCond, uncond: UNetCond | None,
                   schedule: Schedule, generator, *, prediction_type: str = "epsilon",
                   p_uncond: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Denoising loss per sample (B,): t ~ U{0..T-1}, MSE on the eps or v target (DDPM / SD)."""
    B, T = z.shape[0], schedule.T
    t = _draw(generator, B, lambda n, g: torch.randint(0, T, (n,), generator=g)).to(z.device)
    drop = _draw(generator, B, lambda n, g: torch.rand(n, generator=g)) < p_uncond
    eps = _draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g))
    eps = eps.to(z.device, z.dtype)
    if uncond is not None and p_uncond > 0:                  # caption dropout: learn the uncond branch
        cond = cond.where(drop.to(z.device), uncond)
    z_t = schedule.add_noise(z, eps, t)
    out = model_fn(z_t, t, cond, torch.zeros(B, device=z.device)).float()
    target = model_target(z, eps, z_t, t, schedule, prediction_type)
    return (out - target).pow(2).flatten(1).mean(1), dict(t=t, dropped=drop)

#----------------------------------------------------------------------------
# The networks of each mode (USERS.md Sec. 6): student (trained), target (EMA copy, or the student
# under no_grad), teacher (frozen base: the same UNet with adapters off, or the original UNet).

@dataclass
class LoRAConfig:
    name: str = "lcm"
    rank: int = 64
    alpha: float = 64
    targets: list | None = None         # regexes on LDM names; null: the 14 LCM-LoRA kinds
    dropout: float = 0.0
    init_from: str | None = None        # LCF / continue: start from this LoRA file


@dataclass
class Roles:
    student: nn.Module
    target: nn.Module
    teacher: nn.Module | None
    teacher_ctx: object                 # () -> context manager around teacher calls
    trainables: list                    # [(name, Parameter)], fp32
    lora_name: str | None
    ema: bool                           # target is a separate EMA copy of a full model
    target_ctx: object = contextlib.nullcontext    # () -> context manager around target calls
    lora_ema: "AdapterEMA | None" = None           # LoRA modes with mu > 0: the EMA adapter


def build_roles(pipe, mode: str, lora: LoRAConfig | None, ema_decay: float | None = None,
                w_embedding_dim: int = 256, train_text_encoder: bool = False, lora_ema: bool = False) -> Roles:
    """The networks of `mode` on a Pipeline: inject the LoRA or copy the UNet; everything else frozen.
    ema_decay: a full model's target; lora_ema: a LoRA's target is an EMA adapter (else the student)."""
    unet = pipe.unet
    if lora is not None:
        if mode == "lcd":
            raise ValueError("mode=lcd trains the full UNet with a w-embedding: use lora=none "
                             "(or mode=lcm_lora for LCM-LoRA)")
        if lora.init_from:
            lora_io.load_lora(unet, lora.init_from, name=lora.name, dtype=torch.float32)
        else:
            lora_lib.inject_lora(unet, lora.name, lora.rank, lora.alpha,
                                 tuple(lora.targets or lora_lib.LCM_LORA_TARGETS), lora.dropout, torch.float32)
        tag = (f".lora_down.{lora.name}.", f".lora_up.{lora.name}.")
        trainables = [(n, p) for n, p in unet.named_parameters() if any(t in n for t in tag)]
        for _, p in trainables:                            # fp32 whatever the base dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        teacher_ctx = lambda: lora_lib.adapters_disabled(unet)       # one UNet in memory
        if not lora_ema:                                   # the reference: target = the student (mu = 0)
            return Roles(unet, unet, unet, teacher_ctx, trainables, lora.name, False)
        ema = AdapterEMA(unet, lora.name)                  # target = base + EMA of the LoRA (mu > 0)
        return Roles(unet, unet, unet, teacher_ctx, trainables, lora.name, False, ema.active, ema)
    if mode == "lcm_lora":
        raise ValueError("mode=lcm_lora needs a LoRA (lora=lcm); use mode=lcd to distil a full LCM")
    teacher = None
    if mode == "lcd":
        from models.unet import UNetModel
        if unet.time_cond_proj_dim is not None:
            raise ValueError("this model already has a w-embedding (a full LCM): fine-tune it with mode=lcf")
        student = UNetModel(**{**pipe.config["unet"], "time_cond_proj_dim": w_embedding_dim})
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        assert missing == ["time_cond_proj.weight"] and not unexpected, (missing, unexpected)
        teacher = unet
    else:
        student = unet
    student = student.float().requires_grad_(True)
    if mode == "diffusion" and train_text_encoder:
        pipe.text.float().requires_grad_(True)
    trainables = list(student.named_parameters())
    if mode == "diffusion" and train_text_encoder:
        trainables += [(f"text.{n}", p) for n, p in pipe.text.named_parameters()]
    ema = mode in ("lcd", "lcf") or ema_decay is not None
    if ema and ema_decay is None:
        raise ValueError(f"mode={mode} with a full model needs train.ema_decay (0.95 in the reference)")
    target = copy.deepcopy(student).requires_grad_(False).eval() if ema else student
    return Roles(student, target, teacher, contextlib.nullcontext, trainables, None, ema)


def check_precision(roles: Roles, optimizer=None) -> None:
    """Policy (USERS.md Sec. 6): trainables and optimizer state fp32, whatever the base dtype."""
    bad = [n for n, p in roles.trainables if p.dtype != torch.float32 or not p.requires_grad]
    assert not bad, f"trainable parameters must be fp32 and require grad: {bad[:3]}"
    if optimizer is not None:
        for st in optimizer.state.values():
            for k, v in st.items():
                assert not (torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32
                            and k != "step"), f"optimizer state {k} is {v.dtype}, not fp32"
    assert not roles.ema or not any(p.requires_grad for p in roles.target.parameters()), "EMA must be frozen"


class AdapterEMA:
    """theta_minus of a LoRA run with mu > 0: an EMA copy of adapter `name`, kept as a second adapter
    `<name>_ema` on the same layers at scale 0, so the student and the teacher never see it and the
    target pass (`active`) swaps it in for the student's. One UNet in memory, 2x the LoRA."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.name, self.ema_name = model, name, f"{name}_ema"
        self.layers = {n: m for n, m in lora_lib.lora_layers(model) if name in getattr(m, "lora_down", {})}
        with torch.random.fork_rng(devices=[]):            # its init is overwritten: leave the RNG as it was
            self._add()

    def _add(self) -> None:
        name = self.name
        for m in self.layers.values():
            r = m.lora_down[name].weight.shape[0]
            for p, src in zip(m.add_adapter(self.ema_name, r, m.lora_alpha[name], 0.0, torch.float32, scale=0.0),
                              (m.lora_down[name].weight, m.lora_up[name].weight)):
                p.data.copy_(src.detach())
                p.requires_grad_(False)

    def _pairs(self) -> tuple[list, list]:
        ema, online = [], []
        for m in self.layers.values():
            ema += [m.lora_down[self.ema_name].weight, m.lora_up[self.ema_name].weight]
            online += [m.lora_down[self.name].weight.detach(), m.lora_up[self.name].weight.detach()]
        return ema, online

    @torch.no_grad()
    def update(self, mu: float) -> None:
        """theta_minus <- mu theta_minus + (1 - mu) theta, adapter weights only."""
        ema, online = self._pairs()
        torch._foreach_lerp_(ema, online, 1.0 - mu)

    @contextlib.contextmanager
    def active(self):
        """Inside: the model is base + EMA adapter (the student's adapter off, its scale kept)."""
        m0 = next(iter(self.layers.values()))
        old = {self.name: m0.lora_scale[self.name], self.ema_name: 0.0}
        lora_lib.set_lora_scales(self.model, {self.name: 0.0, self.ema_name: old[self.name]})
        try:
            yield self.model
        finally:
            lora_lib.set_lora_scales(self.model, old)

    @torch.no_grad()
    def copy_to_student(self) -> None:
        """End of training: the student adapter takes the EMA weights (what is exported)."""
        ema, online = self._pairs()                        # online: detached views of the student's
        torch._foreach_copy_(online, ema)

    def remove(self) -> None:
        for m in self.layers.values():
            m.remove_adapter(self.ema_name)

    def _named(self) -> dict[str, torch.Tensor]:
        ema, _ = self._pairs()                             # (down, up) per layer, in layer order
        return dict(zip((f"{n}.{part}" for n in self.layers for part in ("down", "up")), ema))

    def state_dict(self) -> dict:
        return {k: p.detach().clone() for k, p in self._named().items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        named = self._named()
        assert sorted(sd) == sorted(named), "EMA adapter state does not match this LoRA"
        for k, p in named.items():
            p.copy_(sd[k])


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, mu: float) -> None:
    """theta_minus <- mu theta_minus + (1 - mu) theta (Algorithm 1, last line)."""
    t, o = list(target.parameters()), list(online.parameters())
    torch._foreach_lerp_(t, [p.detach() for p in o], 1.0 - mu)
    for bt, bo in zip(target.buffers(), online.buffers()):
        bt.copy_(bo)

#----------------------------------------------------------------------------
# The objective: networks as functions of (x, t, cond, w), then the pure losses of lcm.

def net_fn(module: nn.Module, w_dim: int | None):
    """net(x, t, cond, w) -> raw output; w enters through the w-embedding only if the UNet has one."""
    def net(x, t, cond: UNetCond, w):
        emb = None if w_dim is None else guidance_embedding(w, w_dim).to(x.device)
        return module(x, t, cond.context, y=cond.y, timestep_cond=emb)
    return net


def mode_loss(mode: str, pipe, roles: Roles, student_call: nn.Module, z, cond, uncond, generator,
              p_uncond: float = 0.1, **lcd_kw) -> tuple[torch.Tensor, dict]:
    """Per-sample loss (B,) of `mode`; student_call may be the DDP-wrapped student."""
    w_dim = getattr(roles.student, "time_cond_proj_dim", None)
    student = net_fn(student_call, w_dim)
    if mode == "diffusion":
        return diffusion_loss(student, z, cond, uncond, pipe.schedule, generator,
                              prediction_type=pipe.prediction_type, p_uncond=p_uncond)
    if mode == "lcf":
        estimate = same_noise_estimate(pipe.schedule)
    else:
        base = net_fn(roles.teacher, None)

        def teacher(*a):
            with roles.teacher_ctx():
                return base(*a)
        estimate = teacher_ddim_estimate(teacher, pipe.schedule, pipe.prediction_type)
    target_net = net_fn(roles.target, w_dim)

    def target(*a):
        with roles.target_ctx():
            return target_net(*a)
    return lcd_loss(student, target, estimate, z, cond, uncond, pipe.schedule, generator,
                    prediction_type=pipe.prediction_type, sigma_data=pipe.spec.sigma_data,
                    timestep_scaling=pipe.spec.timestep_scaling, **lcd_kw)
