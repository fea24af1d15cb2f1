"""Fully sharded data parallel training (`train.distributed=fsdp`, FSDP2 `fully_shard`; docs/fsdp.md).

What is sharded: every network of a full-model objective (objective=lcd, lcf or diffusion without a
LoRA): the student (fp32 parameters, gradients and AdamW states, each 1/N per rank), its EMA target
(sharded exactly as the student, so theta_minus <- mu theta_minus + (1 - mu) theta is a local
update of the shards, lcm/objectives/ema.py) and the frozen teacher (in its storage dtype, e.g.
train.frozen_storage=bfloat16). Each UNet block (input_blocks[i], middle_block, output_blocks[i])
is one FSDP unit, the rest (time embedding, conv_in/out) belongs to the root unit; every unit
reshards after its forward. LoRA runs stay on DDP (lcm/training/loop.py refuses fsdp with a LoRA).

Checkpoints keep the layout of lcm/runs/: rank 0 writes one state file gathered from the
shards (full state dicts, on the CPU), in the very format a single process writes (the optimizer
state keyed by parameter index), so a run resumes on any number of processes in either mode; the
export is the usual single file. All functions here are collective: every rank calls them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)   # gathered on rank 0, CPU tensors
LOAD = StateDictOptions(full_state_dict=True, strict=True)         # every rank passes full tensors

#----------------------------------------------------------------------------
# Sharding.

def blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: the UNet's input, middle and output blocks (none for others)."""
    out = list(getattr(model, "input_blocks", []))
    out += [model.middle_block] if getattr(model, "middle_block", None) is not None else []
    return out + list(getattr(model, "output_blocks", []))


def shard(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard each UNet block, then the root (in place; same module, parameters become DTensor
    shards). param_dtype: the dtype the units are all-gathered and computed in (gradients are
    reduced in fp32); None: the parameters' own dtype."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for b in blocks(model):
        fully_shard(b, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)   # the root too: no unit is
    return model                                                              # left gathered (EMA reads shards)


def shard_objective(objective, device: torch.device, amp: torch.dtype | None, frozen_storage: str | None) -> nn.Module:
    """Shard the objective's student, EMA target and teacher over all ranks (one 1-D mesh); returns
    the student. The trainables are re-read (fully_shard replaces the Parameters, names unchanged).
    amp: the train dtype (train.mixed_precision); the teacher keeps its storage dtype when
    train.frozen_storage is set (its layers cast per call, as without FSDP)."""
    if objective.lora_name is not None or not isinstance(objective.ema, (nn.Module, type(None))):
        raise ValueError("train.distributed=fsdp shards full models (objective.lora=null); LoRA runs use "
                         "train.distributed=ddp")
    mesh = init_device_mesh(device.type, (td.get_world_size(),))
    student, target, teacher = objective.student, objective.target, objective.teacher
    shard(student, mesh, amp)
    if target is not student:
        shard(target, mesh, amp)                           # the same units: shards line up with the student's
    if teacher is not None and teacher is not student and teacher is not target:
        shard(teacher, mesh, None if frozen_storage else amp)
    params = dict(student.named_parameters())
    objective.trainables = [(n, params[n]) for n, _ in objective.trainables]
    return student


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def _sharded(models) -> list[nn.Module]:
    return list({id(m): m for m in models if is_sharded(m)}.values())


def unshard(*models: nn.Module | None) -> None:
    """All-gather the (sharded) models' full parameters on every rank and keep them through forwards
    until reshard(), so one rank alone may run them (validation on rank 0). Collective."""
    for m in _sharded(models):
        m.set_reshard_after_forward(False)
        for unit in m.modules():
            if isinstance(unit, FSDPModule):
                unit.unshard()


def reshard(*models: nn.Module | None) -> None:
    """Back to the shards only (frees the gathered parameters; local, no communication)."""
    for m in _sharded(models):
        for unit in m.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()
        m.set_reshard_after_forward(True)

#----------------------------------------------------------------------------
# Full (gathered) state dicts for checkpoints and the export, in the single-process layout.

def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU on rank 0 ({} on the other ranks)."""
    return get_model_state_dict(model, options=FULL)


def optimizer_by_index(osd: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint) -> the index-keyed one
    `optimizer.state_dict()` gives (index = position in the optimizer's parameter list)."""
    idx = {n: i for i, n in enumerate(names)}
    assert set(osd["state"]) <= set(idx), sorted(set(osd["state"]) - set(idx))[:3]
    return dict(state={idx[n]: osd["state"][n] for n in sorted(osd["state"], key=idx.__getitem__)},
                param_groups=[{**g, "params": [idx[n] for n in g["params"]]} for g in osd["param_groups"]])


def optimizer_by_name(sd: dict, names: list[str]) -> dict:
    """Inverse of optimizer_by_index."""
    return dict(state={names[int(i)]: v for i, v in sd["state"].items()},
                param_groups=[{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]])


@dataclass
class FullState:
    """What rank 0 writes: full trainables (name, tensor), the optimizer state (index-keyed), the
    EMA's state dict (or None) and the exported network's state dict."""
    trainables: list
    optimizer: dict
    ema: dict | None
    target: dict


def gather_state(objective, optimizer) -> FullState | None:
    """Gather the sharded training state on rank 0 (None on the other ranks)."""
    student, names = objective.student, [n for n, _ in objective.trainables]
    sd = full_state_dict(student)
    osd = get_optimizer_state_dict(student, optimizer, options=FULL)
    ema = full_state_dict(objective.ema) if objective.ema is not None else None
    if td.get_rank() != 0:
        return None
    target = ema if objective.target is objective.ema and ema is not None else sd
    return FullState([(n, sd[n]) for n in names], optimizer_by_index(osd, names), ema, target)


def load_state(objective, optimizer):
    """A loader for lcm.runs.restore_training_state: full tensors from a state file (every
    rank reads it) into the shards of the student, the optimizer and the EMA target."""
    def load(trainables: dict, optimizer_state: dict, ema_state: dict | None) -> None:
        student, names = objective.student, [n for n, _ in objective.trainables]
        full = set(dict(student.named_parameters())) | {n for n, _ in student.named_buffers()}
        opts = LOAD if set(trainables) == full else StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(student, trainables, options=opts)
        set_optimizer_state_dict(student, optimizer, optimizer_by_name(optimizer_state, names),
                                 options=StateDictOptions(full_state_dict=True))
        if objective.ema is not None:                      # the EMA is restored, never reset
            set_model_state_dict(objective.ema, ema_state, options=LOAD)
    return load


def export(objective, path: str, metadata: dict, target: dict) -> None:
    """The full target model as an original-layout single file (Objective.export's full-model
    branch, from the gathered state dict `target`); rank 0 only."""
    from lcm.objectives.base import Objective
    from models.checkpoint import save_model_file
    assert objective.lora_name is None and type(objective).export is Objective.export, \
        "lcm.training.fsdp.export writes Objective.export's full-model file; this objective exports otherwise"
    p = objective.pipe
    save_model_file(path, target, p.vae, p.text, p.file_config(objective.target), metadata)
