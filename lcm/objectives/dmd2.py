"""DMD2 as two LoRAs on one UNet (arXiv 2405.14867; docs/method.md Sec. 14).

generator G = base + LoRA "<name>" (what is exported), fake score F = base + LoRA "<name>_fake",
real score = the base with adapters off and CFG: one UNet in memory. Two time scales in FastGen's
alternating form: every gen_every-th step is a generator step (distribution matching, optionally
the GAN's generator term), the gen_every - 1 steps between are fake-score steps (the diffusion loss
on G's detached samples, optionally the GAN's discriminator term). One graph per step, so a step's
peak memory is an LCD step's. G samples on the LCM k-grid of `steps` points ([999, 749, 499, 249]
for 4), with backward simulation during training; its output is LCM's f_theta, so the LCM sampler
at the exported spec is DMD2's multi-step sampler exactly.
"""
from __future__ import annotations

import contextlib
import logging
import random

import torch
from torch import nn

from lcm.consistency import ConsistencySpec, f_theta
from lcm.data.order import hash_seed
from lcm.denoiser import guided, unet_net
from lcm.objectives.base import LoRAConfig, Objective, OptimizerSpec, lora_norm
from lcm.objectives.diffusion import model_target
from lcm.objectives.dmd import backward_simulation, dm_gradient, dm_loss, gan_discriminator_loss, gan_generator_loss
from lcm.objectives.losses import draw
from models import lora as lora_lib
from solvers.schedule import lcm_grid
from solvers.wrappers import to_x0

log = logging.getLogger(__name__)

#----------------------------------------------------------------------------
# The GAN's classifier: a small head on the fake score's bottleneck (the middle block's output).

class GANHead(nn.Module):
    """Conv-GN-SiLU twice, mean over space, a linear to one logit: DMD2's SD1.5 head (two strided
    4x4 convs to 1x1) made independent of the bottleneck's size (the demo's is 2x2)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        g = min(groups, channels)
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(g, channels), nn.SiLU(),
                                 nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(g, channels), nn.SiLU())
        self.out = nn.Linear(channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(h.float()).mean((2, 3)))            # (B, C, h, w) -> (B, 1)


def bottleneck_module(unet: nn.Module) -> nn.Module:
    """The module whose output the GAN head reads: the middle block (or the last input block)."""
    unet = getattr(unet, "module", unet)
    return unet.middle_block if unet.middle_block is not None else unet.input_blocks[-1]

#----------------------------------------------------------------------------

class DMD2(Objective):
    sampler = "lcm"
    unused_parameters = True                       # G's LoRA idles on fake-score steps and vice versa

    def __init__(self, lora=None, ema_decay: float | None = None,
                 steps: int = 4,                    # generator steps: the LCM k-grid of `steps` points
                 gen_every: int = 10,               # N: a generator step every N-th step, fake-score steps between
                 real_guidance: float = 1.75,       # s of the real score's CFG (DMD2 SD1.5: 1.75, SDXL: 8)
                 dm_t_min: int = 20,                # DM noise level t ~ U{dm_t_min..dm_t_max} (0.02 / 0.98 T)
                 dm_t_max: int = 980,
                 dm_weight: float = 1.0,            # lambda_DM
                 fake_rank: int | None = None,      # LoRA F's rank / alpha (null: G's)
                 fake_alpha: float | None = None,
                 fake_lr_scale: float = 1.0,        # F's lr = train.lr * this (DMD2: equal)
                 backward_simulation: bool = True,  # G's multi-step inputs from its own samples (DMD2 Sec. 4.4)
                 gan: bool = False,                 # the diffusion GAN on F's bottleneck
                 gan_gen_weight: float = 1e-3,      # lambda_G (DMD2 SD1.5 stage 2; SDXL 5e-3)
                 gan_disc_weight: float = 1e-2):    # lambda_D
        super().__init__(lora, ema_decay)
        if self.lora is None:
            raise ValueError("objective=dmd2 trains two LoRAs (objective.lora: {rank: .., alpha: ..}); "
                             "full-model DMD2 is not supported")
        if ema_decay is not None:
            raise ValueError("objective=dmd2 keeps no EMA (DMD2 has none; F must track the online G): "
                             "set objective.ema_decay=null")
        if not 1 <= steps <= 1000 or 1000 % steps:
            raise ValueError(f"objective.steps={steps} must divide 1000 (1, 2, 4, 5, 8, 10, ...)")
        if gen_every < 2:
            raise ValueError(f"objective.gen_every={gen_every} must be >= 2 (one generator step per "
                             "gen_every steps, fake-score steps between; DMD2: 5-10)")
        if not 0 <= dm_t_min <= dm_t_max <= 999:
            raise ValueError(f"objective.dm_t_min={dm_t_min}, dm_t_max={dm_t_max}: need 0 <= min <= max <= 999")
        self.steps, self.gen_every, self.s_real = steps, gen_every, real_guidance
        self.dm_t = (dm_t_min, dm_t_max)
        self.dm_weight, self.fake_lr_scale, self.backsim = dm_weight, fake_lr_scale, backward_simulation
        self.fake = LoRAConfig(f"{self.lora.name}_fake", fake_rank or self.lora.rank,
                               fake_alpha if fake_alpha is not None else self.lora.alpha, self.lora.targets)
        self.gan, self.gan_w = gan, (gan_gen_weight, gan_disc_weight)
        self.head: GANHead | None = None
        self._step, self._seed, self._stats = 0, 0, {}

    #------------------------------------------------------------------------
    # Networks: G, F and the teacher on one UNet, switched by adapter scales.

    def setup(self, pipe) -> None:
        self.pipe = pipe
        self._spec = ConsistencySpec(self.steps, pipe.spec.sigma_data, pipe.spec.timestep_scaling)
        self._setup_lora(pipe, ema=False)                    # G (from lora.init_from, or zero B)
        self.setup_fake(pipe)

    def setup_fake(self, pipe) -> None:
        """LoRA F (and the GAN head) beside the generator's adapter; trainables = G's + F's."""
        unet, F = pipe.unet, self.fake
        lora_lib.inject_lora(unet, F.name, F.rank, F.alpha, tuple(F.targets or lora_lib.LCM_LORA_TARGETS),
                             0.0, torch.float32)             # B = 0: the fake score starts as the teacher
        lora_lib.set_lora_scales(unet, {F.name: 0.0})        # off outside its own passes
        tag = (f".lora_down.{F.name}.", f".lora_up.{F.name}.")
        self.fake_params = [(n, p.requires_grad_(True)) for n, p in unet.named_parameters() if any(t in n for t in tag)]
        self.gen_params = list(self.trainables)
        if self.gan:
            ch = bottleneck_channels(unet)
            self.head = GANHead(ch).to(next(unet.parameters()).device)
            self.fake_params += [(f"gan_head.{n}", p) for n, p in self.head.named_parameters()]
        self.trainables = self.gen_params + self.fake_params

    @property
    def spec(self) -> ConsistencySpec | None:
        return getattr(self, "_spec", None)

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("generator", [p for _, p in self.gen_params], every=self.gen_every),
                OptimizerSpec("fake_score", [p for _, p in self.fake_params], every=self.gen_every, rest=True,
                              lr_scale=self.fake_lr_scale)]

    def fake_ctx(self):
        """Inside: base + LoRA F only (G's scale 0)."""
        return _scales(self.student, {self.lora_name: 0.0, self.fake.name: 1.0})

    def validation_runs(self, v) -> list[tuple[str, int, float]]:
        """G without CFG (DMD2 samples at s = 1) on its grid, at v.steps."""
        return [(self.sampler, int(n), float(s)) for s in (v.guidance or [1.0]) for n in v.steps]

    def step_context(self, step: int, seed: int):
        self._step, self._seed = step, seed
        return contextlib.nullcontext()

    def is_generator_step(self, step: int | None = None) -> bool:
        return (self._step if step is None else step) % self.gen_every == 0

    #------------------------------------------------------------------------
    # The loss of one step.

    def loss(self, student_call, z, cond, uncond, generator):
        schedule = self.schedule(z.device)
        draws = self.draw_generator_inputs(z, generator)
        x_in, t_in = self.generator_input(z, cond, draws, schedule)
        if self.is_generator_step():                                         # generator step
            x = self.generate(unet_net(student_call), cond, schedule)(x_in, t_in)   # with grad
            loss = self.dm_weight * self.dm_term(x, cond, uncond, draws, schedule)
            if self.gan:
                loss = loss + self.gan_w[0] * gan_generator_loss(self._logits_frozen(x, cond, generator))
            return loss, dict(t_in=t_in, t_dm=draws["t_dm"], k=draws["k"], generator_step=True)
        with torch.no_grad():                                                # fake-score step: G without grad
            x = self.generate(unet_net(self.student), cond, schedule)(x_in, t_in)
        loss, t = self.fake_score_loss(student_call, x, z, cond, generator, schedule)
        return loss, dict(t_in=t_in, t_fake=t, k=draws["k"], generator_step=False)

    def draw_generator_inputs(self, z: torch.Tensor, generator) -> dict:
        """Per-sample draws, all of them every step (order: x_T, re-noise eps per grid point, DM t and eps;
        the fake score's t, eps and the GAN's t', eps' follow in fake_score_loss); the backward-simulation
        depth k ~ U{0..steps-1}, one per step from (seed, step), equal on all ranks."""
        B, grid = z.shape[0], self.grid()
        randn = lambda: draw(generator, B, lambda n, g: torch.randn((n,) + tuple(z.shape[1:]), generator=g,
                                                                   device="cpu")).to(z)
        x_T, renoise = randn(), [randn() for _ in grid[1:]]
        t_dm = draw(generator, B, lambda n, g: torch.randint(self.dm_t[0], self.dm_t[1] + 1, (n,), generator=g,
                                                             device="cpu")).to(z.device)
        eps_dm = randn()
        k = random.Random(hash_seed(self._seed, self._step, "dmd2.k")).randrange(len(grid))   # no tensor: no host read
        return dict(x_T=x_T, renoise=renoise, t_dm=t_dm, eps_dm=eps_dm, k=k)

    def grid(self) -> list[int]:
        """G's descending timesteps: the LCM k-grid of `steps` points, e.g. [999, 749, 499, 249]."""
        return lcm_grid(self.steps, self.pipe.schedule.T)[::-1]

    def generate(self, net, cond, schedule):
        """G's sample at (x, t): LCM's f_theta = c_skip x + c_out x0_hat (the exported spec's boundary)."""
        model = guided(net, cond, None, None, schedule, self.pipe.prediction_type)
        return lambda x, t: f_theta(x, model.x0(x, t), t, self.spec)

    def generator_input(self, z, cond, draws: dict, schedule) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_in, t_in (B,)): G's k earlier steps without grad (backward simulation), or data noised to grid[k]."""
        grid, k, B = self.grid(), draws["k"], z.shape[0]
        if self.backsim:
            with torch.no_grad():
                x_in, t_in = backward_simulation(self.generate(unet_net(self.student), cond, schedule),
                                                 draws["x_T"], draws["renoise"], grid, k, schedule)
        else:                                                                # DMD2 without backsim
            x_in, t_in = (draws["x_T"] if k == 0 else schedule.add_noise(z, draws["x_T"], grid[k])), grid[k]
        return x_in, torch.full((B,), t_in, device=z.device, dtype=torch.long)

    def dm_term(self, x: torch.Tensor, cond, uncond, draws: dict, schedule) -> torch.Tensor:
        """The distribution-matching surrogate (B,) of G's samples x (with grad): real (teacher, CFG) and fake
        x0_hat of x noised to t_dm, in float64, without grad; dL/dx = the normalised real-minus-fake gradient."""
        pt, t = self.pipe.prediction_type, draws["t_dm"]
        x_t = schedule.add_noise(x.detach(), draws["eps_dm"], t)
        with torch.no_grad():
            teacher = guided(unet_net(self.student, self.teacher_ctx), cond, uncond, None, schedule, pt, self.s_real)
            fake = guided(unet_net(self.student, self.fake_ctx), cond, None, None, schedule, pt)
            mu_real = to_x0(teacher.output(x_t, t).double(), x_t.double(), t, schedule, pt)
            mu_fake = to_x0(fake.output(x_t, t).double(), x_t.double(), t, schedule, pt)
            grad = dm_gradient(x.detach(), mu_real, mu_fake)
        loss = dm_loss(x, grad)
        self._stats |= dict(dm_loss=loss.detach().mean(), dm_grad_norm=grad.flatten(1).norm(dim=1).mean(),
                            gen_mean=x.detach().mean(), gen_std=x.detach().std())
        return loss

    def fake_score_loss(self, student_call, x: torch.Tensor, z: torch.Tensor, cond, generator, schedule):
        """F's diffusion loss (B,) on G's detached samples x (the model's own eps / v target), with the GAN the
        discriminator's term on [x; data z] in the same batched pass (one DDP forward); and F's t."""
        B, pt = x.shape[0], self.pipe.prediction_type
        x_t, t, eps = self._noised(x, generator)
        inputs, ts, conds = [x_t], [t], [cond]
        if self.gan:                                                         # D on [G's samples; data], noised apart
            for v in (x, z):
                v_t, tv, _ = self._noised(v, generator)
                inputs, ts, conds = inputs + [v_t], ts + [tv], conds + [cond]
        with self.fake_ctx():
            out, feats = self._forward(student_call, torch.cat(inputs), torch.cat(ts), _cat(conds))
        loss = (out[:B] - model_target(x, eps, x_t, t, schedule, pt)).pow(2).flatten(1).mean(1)
        self._stats["fake_loss"] = loss.detach().mean()
        if self.gan:
            logits = self.head(feats[B:])
            d = gan_discriminator_loss(logits[:B], logits[B:])
            self._stats["disc_loss"] = d.detach().mean()
            loss = loss + self.gan_w[1] * d
        return loss, t

    #------------------------------------------------------------------------
    # The GAN terms: logits of the head on F's bottleneck at independently noised inputs.

    def _noised(self, x: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, eps): t ~ U{0..T-1}, eps ~ N(0, I) per sample (draw order t, eps)."""
        B = x.shape[0]
        t = draw(generator, B, lambda n, g: torch.randint(0, self.pipe.schedule.T, (n,), generator=g, device="cpu")).to(x.device)
        eps = draw(generator, B, lambda n, g: torch.randn((n,) + tuple(x.shape[1:]), generator=g, device="cpu")).to(x)
        return self.schedule(x.device).add_noise(x, eps, t), t, eps

    def _forward(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw output and, with the GAN, the bottleneck features of one pass."""
        if not self.gan:
            return unet_net(net)(x_t, t, cond, None), None
        feats = []
        hook = bottleneck_module(net).register_forward_hook(lambda m, i, o: feats.append(o))
        try:
            out = unet_net(net)(x_t, t, cond, None)
        finally:
            hook.remove()
        return out, feats[-1]

    def _logits_frozen(self, x: torch.Tensor, cond, generator) -> torch.Tensor:
        """D(G's sample noised) through F with F's LoRA and the head frozen: gradient to x only."""
        params = [p for _, p in self.fake_params]
        x_t, t, _ = self._noised(x, generator)
        for p in params:
            p.requires_grad_(False)
        try:
            with self.fake_ctx():
                return self.head(self._forward(self.student, x_t, t, cond)[1])
        finally:
            for p in params:
                p.requires_grad_(True)

    #------------------------------------------------------------------------

    def metrics(self) -> dict:
        out = {k: float(v) for k, v in self._stats.items()}
        return out | {"lora_norm": lora_norm(self.student, self.lora_name),
                      "fake_lora_norm": lora_norm(self.student, self.fake.name)}

    def finish(self) -> None:
        """The pipeline keeps G (what was exported); F and the head are dropped."""
        lora_lib.remove_lora(self.student, self.fake.name)
        self.head = None


def bottleneck_channels(unet: nn.Module) -> int:
    m = bottleneck_module(unet)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert convs, "no convolution in the bottleneck block"
    return convs[-1].out_channels


@contextlib.contextmanager
def _scales(unet: nn.Module, scales: dict[str, float]):
    old = {n: s for n, s in _current(unet).items() if n in scales}
    lora_lib.set_lora_scales(unet, scales)
    try:
        yield unet
    finally:
        lora_lib.set_lora_scales(unet, old)


def _current(unet: nn.Module) -> dict[str, float]:
    for _, m in lora_lib.lora_layers(unet):
        if hasattr(m, "lora_scale"):
            return dict(m.lora_scale)
    return {}


def _cat(conds: list):
    out = conds[0]
    for c in conds[1:]:
        out = out.cat(c)
    return out

