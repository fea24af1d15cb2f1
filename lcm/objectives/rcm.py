"""rCM: sCM plus a DMD regulariser (arXiv 2510.08431; NVlabs/rcm; docs/method.md Sec. 16), as LoRAs on one UNet.

The student (LoRA <name>, exported, sampled with solver=scm) takes on its steps the sCM loss on data
(lcm/objectives/scm.py) plus dmd_weight x DMD2's distribution-matching term on the x0_hat of its own
last sampling step after a backward simulation (lcm/objectives/dmd2.py); the fake score (LoRA
<name>_fake) trains on the gen_every - 1 steps between, on the student's detached samples. The two
student passes with grad (sCM's F_theta at (x, tau) and the generator at (x_in, t_in)) run as one
batched pass. Weights: the reference sums per sample, 100 x L_sCM + 1 x L_DMD; both sums scale with D
as this trainer's means do, so the same balance here is L_sCM + 0.01 x L_DMD (dmd_weight).
"""
from __future__ import annotations

import torch

from lcm.denoiser import guided, unet_net
from lcm.objectives.dmd2 import DMD2
from lcm.objectives.scm import SCM
from lcm.objectives.trigflow import F_from_raw, t_of_tau, vp_scale
from solvers.schedule import expand_as, spaced_timesteps
from solvers.wrappers import to_x0


class RCM(SCM):
    sampler = "scm"
    unused_parameters = True

    def __init__(self, lora=None, ema_decay: float | None = None,
                 steps: int = 4,                   # the student's grid for the DMD term: trailing [999, 749, 499, 249]
                 gen_every: int = 5,               # R: a student step every R-th step, fake-score steps between (rCM 5)
                 dmd_weight: float = 0.01,         # lambda: L_sCM + lambda L_DMD (the reference's 100 : 1 on sums)
                 dmd_start: int = 0,               # student steps before the DMD term joins (rCM: the tangent warm-up)
                 fake_rank: int | None = None, fake_alpha: float | None = None, fake_lr_scale: float = 1.0,
                 **scm):
        super().__init__(lora, ema_decay, **scm)
        if ema_decay is not None:
            raise ValueError("objective=rcm keeps no EMA target (its fake score must track the online student): "
                             "set objective.ema_decay=null")
        self.dmd = DMD2(lora, steps=steps, gen_every=gen_every, real_guidance=self.s, fake_rank=fake_rank,
                        fake_alpha=fake_alpha, fake_lr_scale=fake_lr_scale)
        self.dmd.generate = self._generate                    # the student's sample is x0_hat (sCM's f)
        self.dmd.grid = lambda: spaced_timesteps(steps, "trailing")           # solver=scm's grid
        self.dmd_weight, self.dmd_start = dmd_weight, dmd_start

    def setup(self, pipe) -> None:
        super().setup(pipe)                                   # the student LoRA, sCM's spec and tau range
        d = self.dmd
        d.pipe, d._spec, d.student, d.target, d.teacher = pipe, self.spec, self.student, self.target, self.teacher
        d.trainables, d.lora_name, d._teacher_ctx = list(self.trainables), self.lora_name, self._teacher_ctx
        DMD2.setup_fake(d, pipe)                              # + LoRA <name>_fake, off outside its passes
        self.trainables = d.trainables

    def optimizers(self):
        super().optimizers()                                  # places the logvar head, if any
        return self.dmd.optimizers()

    def step_context(self, step: int, seed: int):
        self.dmd.step_context(step, seed)
        return super().step_context(step, seed)

    def _generate(self, net, cond, schedule):
        model = guided(net, cond, None, None, schedule, self.pipe.prediction_type)
        return model.x0

    def loss(self, student_call, z, cond, uncond, generator):
        d, schedule, B = self.dmd, self.schedule(z.device), z.shape[0]
        if not d.is_generator_step():                         # fake-score step (draws as DMD2's, then F's)
            return d.loss(student_call, z, cond, uncond, generator)
        with_dmd = self._step // d.gen_every >= self.dmd_start and self.dmd_weight > 0
        draws = d.draw_generator_inputs(z, generator)
        x_in, t_in = d.generator_input(z, cond, draws, schedule)
        pt, sd, stash = self.pipe.prediction_type, self.sigma_d, {}

        def F_and_generate(x, tau):                           # sCM's grad pass and the generator's: one batch
            if not with_dmd:
                return self.F_net(unet_net(student_call), cond, schedule)(x, tau)
            t = t_of_tau(tau, schedule, sd)
            x_vp = x if sd == 1 else expand_as(vp_scale(tau, sd), x) * x
            out = unet_net(student_call)(torch.cat([x_vp, x_in]), torch.cat([t, t_in.to(t.dtype)]),
                                         cond.cat(cond), None)
            stash["x"] = to_x0(out[B:], x_in, t_in, schedule, pt)
            return F_from_raw(out[:B], x, tau, pt, sd)

        loss, diag = self.scm_step(z, cond, uncond, generator, F_and_generate)
        if with_dmd:
            loss = loss + self.dmd_weight * d.dm_term(stash["x"], cond, uncond, draws, schedule)
        return loss, diag | dict(generator_step=True, t_in=t_in, k=draws["k"])

    def metrics(self) -> dict:
        return super().metrics() | {k: v for k, v in self.dmd.metrics().items() if k != "lora_norm"}

    def finish(self) -> None:
        self.dmd.finish()
        super().finish()
