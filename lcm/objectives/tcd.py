"""TCD-LoRA: trajectory consistency distillation into a LoRA (Zheng et al. 2024, arXiv 2402.19159;
docs/method.md Sec. 11; the loss: lcm.objectives.losses with tcd_jump).

The networks are LCM-LoRA's (lcd_lora.py): teacher = the UNet with its adapters off, student = the
same UNet with the trainable LoRA, target = the student under no_grad (ema_decay null, the default:
what the public re-implementation does) or base + an EMA copy of the LoRA (ema_decay = mu, exported).
z_hat_{t_n} is LCD's CFG-augmented teacher step Psi (teacher_solver). The student is TCF(1),
f_theta(z_t, t, s) = alpha_s x0_hat + sigma_s eps_hat with s drawn on the grid below t_n; the export
carries ConsistencySpec(objective="tcd") and is sampled with solver=tcd (gamma = eta).
"""
from __future__ import annotations

from lcm.consistency import ConsistencySpec
from lcm.objectives.consistency import ConsistencyObjective
from lcm.objectives.losses import Jump, tcd_jump


class DDIMFormObjective(ConsistencyObjective):
    """Shared by TCD and PCM: a LoRA student in DDIM form (no c_skip / c_out), LCM-LoRA's networks."""
    name = ""                           # the objective's conf name (error messages, the spec's objective)

    def __init__(self, lora=None, ema_decay: float | None = None, **kw):
        super().__init__(lora, ema_decay, **kw)
        if self.lora is None:
            raise ValueError(f"objective={self.name} needs a LoRA (objective.lora: {{rank: .., alpha: ..}}); "
                             "full-model distillation is objective=lcd (LCM) only")

    def make_spec(self, N: int) -> ConsistencySpec:
        """The spec the export carries (grid size N = T / k, the objective, PCM's phases)."""
        raise NotImplementedError

    def setup(self, pipe) -> None:
        self.setup_spec(pipe)                              # checks k | T
        self._spec = self.make_spec(self._spec.num_ddim_timesteps)
        self._setup_lora(pipe, ema=self.ema_decay is not None)

#----------------------------------------------------------------------------

class TCD(DDIMFormObjective):
    sampler = "tcd"
    name = "tcd"

    def make_spec(self, N: int) -> ConsistencySpec:
        return ConsistencySpec(num_ddim_timesteps=N, objective="tcd")

    def jump(self) -> Jump:
        """TCF(1) to s drawn on the grid at or below t_n."""
        return tcd_jump(self.kw["k"])
