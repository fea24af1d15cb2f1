"""Atomic checkpoints and resume state, all in safetensors (docs/users.md Sec. 7).

A checkpoint is a folder `checkpoints/step_XXXXXXX/` written as `.tmp-step_XXXXXXX-<pid>/` and
renamed into place with os.replace, so a folder without the tmp prefix is always complete: a
kill -9 or a full disk mid-write leaves the previous checkpoints untouched. Nested states
(optimizer, scheduler, RNG) are flattened to tensors + a JSON skeleton in the file metadata, so
nothing the trainer writes or reads is a pickle.
"""
from __future__ import annotations

import json
import logging
import os
import random

import torch
from safetensors.torch import load_file, safe_open, save_file

from models.checkpoint import fsync

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"


def flatten_state(obj, prefix: str = "s") -> tuple[dict[str, torch.Tensor], object]:
    """Replace every tensor in a nested dict/list/tuple by a reference; returns (tensors, skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(x, dict):                            # keep key types (optimizer states use ints)
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            out = [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
            return {"__tuple__": out} if isinstance(x, tuple) else out
        assert x is None or isinstance(x, (bool, int, float, str)), f"cannot store {type(x).__name__} at {path}"
        return x

    return tensors, walk(obj, prefix)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton):
    """Inverse of flatten_state."""
    def walk(x):
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"]}
            return tuple(walk(v) for v in x["__tuple__"])
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x
    return walk(skeleton)


def save_state(path: str, state: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a nested state (dict of tensors / numbers / strings / lists) to one safetensors file."""
    tensors, skeleton = flatten_state(state)
    meta = {**(metadata or {}), "lcm.resume_state": json.dumps(skeleton)}
    save_file(tensors, path, metadata=meta)
    fsync(path)


def load_state(path: str) -> dict:
    """Read a state written by save_state (no pickle involved)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "lcm.resume_state" not in meta:
        raise ValueError(f"{path} is not a resume state written by this trainer")
    return unflatten_state(load_file(path), json.loads(meta["lcm.resume_state"]))


def make_readable(path: str) -> None:
    """safetensors writes 0600 files; give them the usual umask-based mode (0644 by default)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def rng_state() -> dict:
    import numpy as np
    st = np.random.get_state()
    out = dict(torch=torch.get_rng_state(), python=random.getstate(),
               numpy=[st[0], torch.from_numpy(st[1].astype("int64")), *st[2:]])
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(st: dict) -> None:
    import numpy as np
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state((st["numpy"][0], st["numpy"][1].numpy().astype("uint32"), *st["numpy"][2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _load_in_place(trainables: list, optimizer, ema):
    @torch.no_grad()
    def load(trainables_state: dict, optimizer_state: dict, ema_state: dict | None) -> None:
        for n, p in trainables:
            p.copy_(trainables_state[n])                    # in place: stays fp32, same Parameter
        if ema is not None:                                 # the EMA is restored, never reset or swapped in
            ema.load_state_dict(ema_state)
        optimizer.load_state_dict(optimizer_state)
    return load


def training_state(step: int, trainables: list, optimizer, scheduler, scaler, ema, rngs: list,
                   global_batch: int, wandb_id: str | None) -> dict:
    """Everything a resume needs (docs/users.md Sec. 7); `rngs` holds every rank's RNG state.
    optimizer / ema: the live objects or their state dicts (FSDP: gathered from the shards)."""
    def state(x):
        return x if x is None or isinstance(x, dict) else x.state_dict()
    return dict(step=step, trainables={n: p for n, p in trainables}, optimizer=state(optimizer),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                ema=state(ema), rng=rngs, world_size=len(rngs),
                data=dict(position=step * global_batch, global_batch=global_batch), wandb_id=wandb_id)


def restore_training_state(path: str, trainables: list, optimizer, scheduler, scaler, ema, rank: int,
                           world: int, load=None) -> tuple[int, str | None]:
    """Load a checkpoint folder into live objects; returns (step, wandb run id). load(trainables,
    optimizer_state, ema_state): how the networks and optimizer take their states (default: in
    place; sharded networks: lcm.training.fsdp.load_state)."""
    st = load_state(os.path.join(path, STATE_FILE))
    names = sorted(n for n, _ in trainables)
    if names != sorted(st["trainables"]):
        raise ValueError(f"{path} holds other trainables than this model ({len(st['trainables'])} vs "
                         f"{len(names)}): was it written with another lora/train config?")
    (load or _load_in_place(trainables, optimizer, ema))(st["trainables"], st["optimizer"], st["ema"])
    scheduler.load_state_dict(st["scheduler"])
    scaler.load_state_dict(st["scaler"])
    if st["world_size"] == world:
        set_rng_state(st["rng"][rank])
    else:
        log.warning("resuming on %d processes from a %d-process run: RNG states not restored", world, st["world_size"])
    log.info("resumed from %s at step %d", path, st["step"])
    return int(st["step"]), st["wandb_id"]
