"""What an objective is to the training loop (lcm/training/loop.py), and the pieces objectives share.

An objective sets up its networks on a Pipeline (docs/users.md Sec. 6): the student (what the
optimizer trains), the target (what the loss compares against and what is sampled and exported:
the student itself, or an EMA copy) and the teacher (the frozen base, or None); it gives the
per-sample loss of a batch, updates its EMA after each optimizer step and writes its export.
Adding an objective = one module here + one conf/objective/*.yaml; the loop names none of them.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from lcm.consistency import ConsistencySpec
from lcm.objectives.ema import AdapterEMA, ema_update
from models import lora as lora_lib
from models import lora_io
from models.checkpoint import save_model_file
from solvers.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass
class LoRAConfig:
    name: str = "lcm"
    rank: int = 64
    alpha: float = 64
    targets: list | None = None         # regexes on LDM names; null: the 14 LCM-LoRA kinds
    dropout: float = 0.0
    init_from: str | None = None        # LCF / continue: start from this LoRA file


@dataclass
class OptimizerSpec:
    """One optimizer an objective declares (lcm/training/optim.py builds and steps it)."""
    name: str                                  # "student"; DMD2: "generator", "fake_score"
    params: list                               # the parameters this optimizer updates (fp32, requires_grad)
    every: int = 1                             # update on steps where step % every == 0
    rest: bool = False                         # instead on the steps that rule leaves out (DMD2's fake score)
    lr_scale: float = 1.0                      # this optimizer's lr = train.lr * lr_scale


def as_lora_config(lora) -> LoRAConfig | None:
    return lora if lora is None or isinstance(lora, LoRAConfig) else LoRAConfig(**lora)

#----------------------------------------------------------------------------
# The interface.

class Objective:
    """Base class: subclasses implement setup() and loss(); the rest has working defaults."""
    sampler = "lcm"                     # how the trained network is sampled: a record of lcm.sampling.samplers
    trains_text = False                 # the text towers are trainables (no text caching then)
    unused_parameters = False           # some trainables get no gradient on some steps (DDP must look for them)

    def __init__(self, lora=None, ema_decay: float | None = None):
        self.lora, self.ema_decay = as_lora_config(lora), ema_decay
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"EMA decay mu={ema_decay} must be in [0, 1) (objective.ema_decay)")
        self.student = self.target = self.teacher = None
        self.trainables: list = []
        self.lora_name: str | None = None
        self.ema = None                  # what a checkpoint keeps besides the trainables (or None)
        self._lora_ema: AdapterEMA | None = None
        self._teacher_ctx = self._target_ctx = contextlib.nullcontext
        self.pipe, self._schedule = None, None

    def setup(self, pipe) -> None:
        """Build student / target / teacher on `pipe` (LoRA injected or UNet copied)."""
        raise NotImplementedError

    def loss(self, student_call: nn.Module, z: torch.Tensor, cond, uncond, generator) -> tuple[torch.Tensor, dict]:
        """Per-sample loss (B,) of clean latents z and diagnostics; student_call may be DDP-wrapped."""
        raise NotImplementedError

    def check_lr(self, lr: float) -> None:
        """Warn about learning rates the references found useless or unstable for this objective."""

    def optimizers(self) -> list[OptimizerSpec]:
        """The optimizers the loop builds and steps: one over the trainables, every step (an objective
        with several networks, e.g. DMD2's generator and fake score, lists one per network)."""
        return [OptimizerSpec("student", [p for _, p in self.trainables])]

    def validation_runs(self, v) -> list[tuple[str, int, float]]:
        """(solver, steps, guidance scale) of each validation row of the trained network: its own
        few-step sampler at v.steps and v.guidance (default: a LoRA's distilled CFG [1.0, 1.5], a
        full LCM's w embedding [8.5])."""
        guidance = v.guidance or ([1.0, 1.5] if self.lora_name else [8.5])
        return [(self.sampler, int(n), float(s)) for s in guidance for n in v.steps]

    def schedule(self, device: torch.device) -> Schedule:
        """The pipeline's noise schedule with its table on the batch's device (the pipeline's own
        stays on the CPU for the samplers)."""
        if self._schedule is None or self._schedule.abar.device != torch.device(device):
            self._schedule = self.pipe.schedule.to(device)
        return self._schedule

    @property
    def spec(self) -> ConsistencySpec | None:
        """The consistency spec the export is sampled with (None: not a consistency model)."""
        return None

    def teacher_ctx(self):
        return self._teacher_ctx()

    def target_ctx(self):
        return self._target_ctx()

    def step_context(self, step: int, seed: int):
        """Around one step's forward and backward (e.g. a LoRA scale drawn per step)."""
        return contextlib.nullcontext()

    def after_step(self) -> None:
        """After each optimizer step: theta_minus <- mu theta_minus + (1 - mu) theta."""
        if self._lora_ema is not None:
            self._lora_ema.update(self.ema_decay)
        elif self.target is not self.student:
            ema_update(self.target, self.student, self.ema_decay)

    def metrics(self) -> dict:
        return {"lora_norm": lora_norm(self.student, self.lora_name)} if self.lora_name else {}

    @property
    def export_name(self) -> str:
        return f"{self.lora_name}.safetensors" if self.lora_name else "model.safetensors"

    def export(self, path: str, metadata: dict) -> None:
        """The LoRA in the released kohya layout (with an EMA target: the EMA adapter), or the full
        target model as an original-layout single file."""
        if self.lora_name:
            name = self._lora_ema.ema_name if self._lora_ema else self.lora_name
            lora_io.save_lora(self.student, path, name, "kohya", overwrite=True, metadata=metadata)
        else:
            p = self.pipe
            save_model_file(path, self.target, p.vae, p.text, p.file_config(self.target), metadata)

    def finish(self) -> None:
        """End of a finished run: the pipeline keeps what was exported (the EMA adapter's weights)."""
        if self._lora_ema is not None:
            self._lora_ema.copy_to_student()
            self._lora_ema.remove()
            self._lora_ema = self.ema = None
            self._target_ctx = contextlib.nullcontext

    #------------------------------------------------------------------------
    # Shared setups: a LoRA on the pipeline's UNet, or the full UNet.

    def _setup_lora(self, pipe, ema: bool) -> None:
        """student = target = teacher = pipe.unet with a fp32 LoRA; teacher = adapters off; with
        ema, the target is base + an EMA copy of the LoRA (lcm.objectives.ema.AdapterEMA)."""
        unet, lora = pipe.unet, self.lora
        if lora.init_from:
            lora_io.load_lora(unet, lora.init_from, name=lora.name, dtype=torch.float32)
        else:
            lora_lib.inject_lora(unet, lora.name, lora.rank, lora.alpha,
                                 tuple(lora.targets or lora_lib.LCM_LORA_TARGETS), lora.dropout, torch.float32)
        tag = (f".lora_down.{lora.name}.", f".lora_up.{lora.name}.")
        self.trainables = [(n, p) for n, p in unet.named_parameters() if any(t in n for t in tag)]
        for _, p in self.trainables:                       # fp32 whatever the base dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        self.student = self.target = self.teacher = unet   # one UNet in memory
        self.lora_name = lora.name
        if self.spec is not None:                          # the adapter carries its spec (as a loaded file would)
            pipe.adapter_specs[lora.name] = self.spec
        self._teacher_ctx = lambda: lora_lib.adapters_disabled(unet)
        if ema:
            self._lora_ema = self.ema = AdapterEMA(unet, lora.name)
            self._target_ctx = self._lora_ema.active

    def _setup_full(self, pipe, student: nn.Module, ema: bool) -> None:
        """student = the full UNet (fp32, all trainable); target = a frozen EMA copy if ema."""
        self.student = student.float().requires_grad_(True)
        self.trainables = list(self.student.named_parameters())
        if ema:
            self.target = self.ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        else:
            self.target = self.student

#----------------------------------------------------------------------------

def lora_norm(model: nn.Module, name: str) -> float:
    """||Delta W|| = sqrt(sum over layers of ||(alpha/r) B A||_F^2): 0 means 'learns nothing'."""
    with torch.no_grad():
        sq = sum(m.delta_weight(name).pow(2).sum() for _, m in lora_lib.lora_layers(model)
                 if hasattr(m, "delta_weight") and name in m.lora_down)
    return float(sq) ** 0.5
