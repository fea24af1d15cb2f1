"""The optimizers an objective declares (one or more, each with its update schedule), built from
one optimizer factory (conf/optimizer/*.yaml, a Hydra `_partial_`) and stepped by the loop.

An objective lists `OptimizerSpec(name, params, every, rest)`: the loop backpropagates the objective's
one loss each step and updates an optimizer on the steps where `step % every == 0`, or with rest on
the others (DMD2's two time-scale rule in the alternating form: the generator every N-th step, the
fake score on the N - 1 steps between). One optimizer keeps the
state-dict layout of a bare torch optimizer, so resume files stay what they were.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from lcm.objectives.base import OptimizerSpec


def default_factory(params: list, lr: float) -> torch.optim.Optimizer:
    """AdamW as conf/optimizer/adamw.yaml builds it (a test or notebook without Hydra)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)


class Optimizers:
    """The objective's optimizers with their linear-warmup schedules, as one object for the loop."""

    def __init__(self, specs: list[OptimizerSpec], factory: Callable | None, lr: float, warmup_steps: int = 0):
        if not specs or len({s.name for s in specs}) != len(specs):
            raise ValueError(f"an objective declares one or more optimizers with distinct names, got "
                             f"{[s.name for s in specs]}")
        factory = factory or default_factory
        self.specs = specs
        self.opts = [factory(s.params, lr=lr * s.lr_scale) for s in specs]
        warm = (lambda s: min(1.0, (s + 1) / warmup_steps)) if warmup_steps > 0 else (lambda s: 1.0)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, warm) for o in self.opts]

    @property
    def single(self) -> torch.optim.Optimizer:
        """The only optimizer (FSDP's gather and load take a torch optimizer)."""
        if len(self.opts) != 1:
            raise ValueError(f"this path takes one optimizer; the objective declares {len(self.opts)}")
        return self.opts[0]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.opts for k, v in o.state.items()}

    def due(self, step: int) -> list[int]:
        """Indices of the optimizers that update at this (0-based) step."""
        return [i for i, s in enumerate(self.specs) if (step % s.every == 0) != s.rest]

    def unscale_clip_(self, scaler, step: int, max_norm: float) -> torch.Tensor:
        """Unscale the due optimizers' gradients and clip them per optimizer; the largest norm."""
        norms, due = [], self.due(step)
        assert due, f"no optimizer is due at step {step}: {[(s.name, s.every, s.rest) for s in self.specs]}"
        for i in due:
            scaler.unscale_(self.opts[i])
            norms.append(torch.nn.utils.clip_grad_norm_(self.specs[i].params, max_norm if max_norm > 0 else math.inf))
        return torch.stack(norms).max() if len(norms) > 1 else norms[0]

    def step(self, scaler, step: int) -> None:
        """Update the due optimizers and advance their schedules (scaler.update() is the caller's)."""
        for i in self.due(step):
            scaler.step(self.opts[i])
            self.scheds[i].step()

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def last_lr(self) -> float:
        return self.scheds[0].get_last_lr()[0]

    def state_dict(self) -> dict:
        if len(self.opts) == 1:
            return self.opts[0].state_dict()
        return {s.name: o.state_dict() for s, o in zip(self.specs, self.opts)}

    def load_state_dict(self, state: dict) -> None:
        if len(self.opts) == 1:
            return self.opts[0].load_state_dict(state)
        for s, o in zip(self.specs, self.opts):
            o.load_state_dict(state[s.name])

    @property
    def schedulers(self) -> "_Schedulers":
        """The warmup schedules as one state_dict / load_state_dict pair (the resume state)."""
        return _Schedulers(self)


class _Schedulers:
    def __init__(self, o: Optimizers):
        self.o = o

    def state_dict(self) -> dict:
        if len(self.o.scheds) == 1:
            return self.o.scheds[0].state_dict()
        return {s.name: sc.state_dict() for s, sc in zip(self.o.specs, self.o.scheds)}

    def load_state_dict(self, state: dict) -> None:
        if len(self.o.scheds) == 1:
            return self.o.scheds[0].load_state_dict(state)
        for s, sc in zip(self.o.specs, self.o.scheds):
            sc.load_state_dict(state[s.name])
