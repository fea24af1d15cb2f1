"""EMA targets theta_minus <- mu theta_minus + (1 - mu) theta (LCM-LoRA report Algorithm 1, last line):
of a full model (a frozen deep copy), or of a LoRA (a second, frozen adapter on the same layers)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from models import lora as lora_lib

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:                                                      # a torch built without distributed: no shards
    DTensor = ()


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


def _shards(target: list, online: list) -> tuple[list, list]:
    """The tensors the EMA updates: the parameters themselves, or with FSDP (DTensor parameters,
    lcm/training/fsdp.py) each rank's local shards, which must line up (same mesh, placements, shapes)."""
    assert len(target) == len(online), f"EMA target has {len(target)} parameters, the model {len(online)}"
    t, o = [], []
    for pt, po in zip(target, online):
        if isinstance(pt, DTensor) or isinstance(po, DTensor):
            assert (isinstance(pt, DTensor) and isinstance(po, DTensor) and pt.device_mesh == po.device_mesh
                    and pt.placements == po.placements and pt.to_local().shape == po.to_local().shape), \
                "EMA target and model must be sharded alike (both resharded, same FSDP units)"
            pt, po = pt.to_local(), po.to_local()          # under no_grad: the shards themselves, no copy
        t.append(pt)
        o.append(po.detach())
    return t, o


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, mu: float) -> None:
    """theta_minus <- mu theta_minus + (1 - mu) theta (Algorithm 1, last line); sharded models
    (FSDP) update their local shards, no communication."""
    t, o = _shards(list(target.parameters()), list(online.parameters()))
    torch._foreach_lerp_(t, o, 1.0 - mu)
    for bt, bo in zip(target.buffers(), online.buffers()):
        bt.copy_(bo)
