"""Atomic checkpoints and resume state, all in safetensors (USERS.md Sec. 7).

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
import re
import shutil

from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, safe_open, save_file

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"

#----------------------------------------------------------------------------
# Nested Python state <-> (flat tensors, JSON skeleton).

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
    _fsync(path)


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


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

#----------------------------------------------------------------------------
# Checkpoint folders.

def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under root as (step, path), oldest first (tmp folders ignored)."""
    if not os.path.isdir(root):
        return []
    out = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := STEP_DIR.match(d))]
    return sorted(o for o in out if os.path.isfile(os.path.join(o[1], STATE_FILE)))


def latest_checkpoint(root: str) -> str | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def clean_tmp(root: str) -> None:
    """Remove leftovers of interrupted writes or deletions (folders named .tmp-*)."""
    if os.path.isdir(root):
        for d in os.listdir(root):
            if d.startswith(TMP_PREFIX):
                log.warning("removing the incomplete checkpoint write %s", os.path.join(root, d))
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def write_checkpoint(root: str, step: int, writers: dict, keep: int | None = None) -> str:
    """Atomically create root/step_XXXXXXX holding one file per writer (name -> fn(path)).

    Refuses to replace an existing checkpoint of the same step. On any error the partial folder
    is removed and the error re-raised; older checkpoints are untouched. Keeps the newest `keep`.
    """
    final = step_dir(root, step)
    if os.path.exists(final):
        raise FileExistsError(f"checkpoint {final} exists; refusing to overwrite it")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f"{TMP_PREFIX}{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name in sorted(writers, key=lambda n: n == STATE_FILE):   # state last: marks completeness
            writers[name](os.path.join(tmp, name))
            make_readable(os.path.join(tmp, name))
        os.replace(tmp, final)                              # atomic on POSIX (same filesystem)
        dfd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None and keep > 0:
        for s, path in list_checkpoints(root)[:-keep]:
            if s < step:                                    # never delete the one just written or newer
                gone = os.path.join(root, f"{TMP_PREFIX}old-{os.path.basename(path)}")
                os.replace(path, gone)                      # first out of sight, so never half-listed
                shutil.rmtree(gone, ignore_errors=True)
    return final

#----------------------------------------------------------------------------
# Full models as original-layout single files (loadable by Pipeline.from_checkpoint).

def original_state_dict(unet, vae, text, text_family: str) -> dict[str, torch.Tensor]:
    """UNet + VAE + text towers under the original prefixes (text in the family's layout)."""
    from models.checkpoint import UNET_PREFIX, VAE_PREFIX
    from models.keymaps import clip_state_dict_open_clip_to_hf
    from models.lora import is_lora_key
    from models.text import SOURCES
    if text_family not in SOURCES:
        raise ValueError(f"text_family must be one of {sorted(SOURCES)} (the layout the text towers "
                         f"are stored in), got {text_family!r}")
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items() if not is_lora_key(k)}
    sd |= {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    assert len(SOURCES[text_family]) == len(text.towers), f"{text_family} has {len(SOURCES[text_family])} towers"
    for (prefix, layout), tower in zip(SOURCES[text_family], text.towers):
        part = {k: v for k, v in tower.state_dict().items() if not is_lora_key(k)}
        part = clip_state_dict_open_clip_to_hf(part) if layout == "hf" else part
        sd |= {prefix + k: v for k, v in part.items()}
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_model_file(path: str, unet, vae, text, config: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a full model as one safetensors file; config = dict(family, text_family, unet, vae)
    (UNetModel / AutoencoderKL kwargs) is stored as `lcm.config` so the file rebuilds itself."""
    config = _jsonable(dict(config, text=text.config))
    meta = {**(metadata or {}), "lcm.config": json.dumps(config)}
    save_file(original_state_dict(unet, vae, text, config["text_family"]), path, metadata=meta)
    _fsync(path)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def load_step(ckpt_dir: str) -> int:
    """The step of a checkpoint folder (from its name)."""
    m = STEP_DIR.match(os.path.basename(os.path.normpath(ckpt_dir)))
    assert m, f"{ckpt_dir} is not a step_XXXXXXX checkpoint folder"
    return int(m.group(1))

#----------------------------------------------------------------------------
# The run directory: refuse to overwrite a run, the config, metrics.jsonl and wandb (rank 0 only).

def prepare_run_dir(run_dir: str, fresh: bool) -> None:
    """Create the run dir; a fresh run never reuses one that holds a run. Clears interrupted writes."""
    if fresh and any(os.path.exists(os.path.join(run_dir, f)) for f in ("checkpoints", "metrics.jsonl", "config.json")):
        raise FileExistsError(f"{run_dir} already holds a run: pass resume=true to continue it, "
                              "or choose a new run dir")
    os.makedirs(run_dir, exist_ok=True)
    clean_tmp(os.path.join(run_dir, "checkpoints"))


def write_config(run_dir: str, config: dict) -> None:
    """The resolved config (credentials redacted), written once per run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(redact(config), f, indent=1)


@dataclass
class LoggerConfig:
    mode: str = "offline"               # online | offline | disabled (env WANDB_MODE wins)
    project: str = "lcm-lora"
    entity: str | None = None
    name: str | None = None
    tags: list = field(default_factory=list)


class RunLogger:
    def __init__(self, run_dir: str, cfg: LoggerConfig, config: dict, run_id: str | None):
        self.path, self.wandb = os.path.join(run_dir, "metrics.jsonl"), None
        mode = os.environ.get("WANDB_MODE") or cfg.mode
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        if mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags),
                                    dir=run_dir, mode=mode, id=run_id, resume="allow" if run_id else None,
                                    config=redact(config))
            self.wandb.define_metric("*", step_metric="step")   # our step axis; wandb's own stays monotonic
        self.run_id = self.wandb.id if self.wandb is not None else run_id

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({"step": step, **metrics})

    def image(self, key: str, path: str, step: int, caption: str) -> None:
        if self.wandb is not None:
            import wandb
            self.wandb.log({"step": step, key: wandb.Image(path, caption=caption)})

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def redact(config, keys=("token", "key", "secret", "password")):
    """A copy of a nested config with values of credential-like keys replaced by '***'."""
    if isinstance(config, dict):
        return {k: "***" if any(s in str(k).lower() for s in keys) and v else redact(v, keys)
                for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v, keys) for v in config]
    return config

#----------------------------------------------------------------------------
# Resume helpers: RNG of a process, which checkpoint to resume, metrics after the resume point.

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


def resolve_resume(run_dir: str, resume) -> str | None:
    """resume: false | true/'latest' (this run's newest checkpoint, if any) | a checkpoint folder."""
    root = os.path.join(run_dir, "checkpoints")
    if resume in (None, False, "false", "none"):
        return None
    if resume in (True, "true", "latest"):
        return latest_checkpoint(root)
    path = os.path.abspath(str(resume))
    if os.path.isdir(os.path.join(path, "checkpoints")):           # a run folder: its newest checkpoint
        path = latest_checkpoint(os.path.join(path, "checkpoints")) or path
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"resume={resume}: no checkpoint there (expected {STATE_FILE})")
    newer = [p for s, p in list_checkpoints(root) if s > load_step(path)]
    if newer:
        raise FileExistsError(f"{run_dir} has checkpoints newer than {path} ({newer[-1]}); resuming "
                              "from an older one would overwrite them. Use a new run dir or resume=latest")
    return path


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint (they will be logged again)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)


def training_state(step: int, trainables: list, optimizer, scheduler, scaler, ema, rngs: list,
                   global_batch: int, wandb_id: str | None) -> dict:
    """Everything a resume needs (USERS.md Sec. 7); `rngs` holds every rank's RNG state."""
    return dict(step=step, trainables={n: p for n, p in trainables}, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                ema=None if ema is None else ema.state_dict(), rng=rngs, world_size=len(rngs),
                data=dict(position=step * global_batch, global_batch=global_batch), wandb_id=wandb_id)


def restore_training_state(path: str, trainables: list, optimizer, scheduler, scaler, ema, rank: int,
                           world: int) -> tuple[int, str | None]:
    """Load a checkpoint folder into live objects; returns (step, wandb run id)."""
    st = load_state(os.path.join(path, STATE_FILE))
    names = sorted(n for n, _ in trainables)
    if names != sorted(st["trainables"]):
        raise ValueError(f"{path} holds other trainables than this model ({len(st['trainables'])} vs "
                         f"{len(names)}): was it written with another lora/train config?")
    with torch.no_grad():
        for n, p in trainables:
            p.copy_(st["trainables"][n])                    # in place: stays fp32, same Parameter
        if ema is not None:                                 # the EMA is restored, never reset or swapped in
            ema.load_state_dict(st["ema"])
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    scaler.load_state_dict(st["scaler"])
    if st["world_size"] == world:
        set_rng_state(st["rng"][rank])
    else:
        log.warning("resuming on %d processes from a %d-process run: RNG states not restored", world, st["world_size"])
    log.info("resumed from %s at step %d", path, st["step"])
    return int(st["step"]), st["wandb_id"]
