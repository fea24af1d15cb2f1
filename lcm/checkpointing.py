"""Atomic checkpoints and resume state, all in safetensors (docs/users.md Sec. 7).

A checkpoint is a folder `checkpoints/step_XXXXXXX/` written as `.tmp-step_XXXXXXX-<pid>/` and
renamed into place with os.replace, so a folder without the tmp prefix is always complete: a
kill -9 or a full disk mid-write leaves the previous checkpoints untouched. Nested states
(optimizer, scheduler, RNG) are flattened to tensors + a JSON skeleton in the file metadata, so
nothing the trainer writes or reads is a pickle.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time

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
    """UNet + VAE + text towers under the original prefixes (text in the family's layout); `unet` is
    a module or its state dict (e.g. gathered from FSDP shards, lcm/fsdp.py)."""
    from models.checkpoint import UNET_PREFIX, VAE_PREFIX
    from models.keymaps import clip_state_dict_open_clip_to_hf
    from models.lora import is_lora_key
    from models.text import SOURCES
    if text_family not in SOURCES:
        raise ValueError(f"text_family must be one of {sorted(SOURCES)} (the layout the text towers "
                         f"are stored in), got {text_family!r}")
    unet_sd = unet if isinstance(unet, dict) else unet.state_dict()
    sd = {UNET_PREFIX + k: v for k, v in unet_sd.items() if not is_lora_key(k)}
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


#----------------------------------------------------------------------------
# One owner per run dir: a lock file holding the owner's PID (created with O_EXCL); a lock whose
# process is gone (kill -9, power loss) is stale and taken over with a warning.

LOCK_FILE = "run.lock"


class RunDirLocked(FileExistsError):
    """Another live process owns the run dir (train.py prints it as one line, exit code 2)."""


def _process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux /proc; None elsewhere): tells a PID
    reused by another process from the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the lock's owner (same host) still runs."""
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:                            # alive, another user's
        pass
    start = _process_start(int(owner["pid"]))
    return owner.get("start") is None or start is None or start == owner["start"]


def _read_lock(path: str) -> dict | None:
    """The lock's owner record; None if unreadable (a crash between create and write)."""
    for _ in range(5):                                 # a writer may be between create and write
        try:
            with open(path) as f:
                owner = json.load(f)
            if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
                return owner
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def _create_lock(path: str, record: dict) -> bool:
    """Create the lock file exclusively with our record; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    return True


@contextlib.contextmanager
def lock_run_dir(run_dir: str):
    """Own `run_dir` for the duration (rank 0 only): a second live owner gets RunDirLocked naming the
    dir and the PID; a stale lock (its process is gone) is taken over with a warning."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname()}
    for _ in range(10):                                # each round: create, or judge the lock there
        if _create_lock(path, me):
            break
        try:
            owner = _read_lock(path)
        except FileNotFoundError:                      # released meanwhile: try again
            continue
        if owner is not None and owner.get("host") != me["host"]:
            raise RunDirLocked(f"{run_dir} is in use by PID {owner['pid']} on host {owner.get('host')} "
                               f"(lock {path}); if that run is gone, delete the lock file")
        if owner is not None and _alive(owner):
            raise RunDirLocked(f"{run_dir} is in use by another run (PID {owner['pid']}, lock {path}); "
                               "wait for it to finish or stop it, or choose another run dir")
        tomb = f"{path}.stale-{os.getpid()}"           # take over: one racer renames the stale file
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            continue
        if _read_lock(tomb) != owner:                  # we grabbed a lock taken over meanwhile: put it back
            os.rename(tomb, path)
            continue
        os.remove(tomb)
        log.warning("%s: taking over the stale lock of %s, which is no longer running",
                    run_dir, f"PID {owner['pid']}" if owner else "an unknown process (unreadable lock)")
    else:
        raise RunDirLocked(f"{run_dir}: could not take the lock {path} (contended); try again")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if _read_lock(path) == me:                 # never remove a lock that is not ours
                os.remove(path)

#----------------------------------------------------------------------------
# resume=true on a run that already reached max_steps: nothing to train; re-export if needed.

def finish_completed_run(run_dir: str, resume_path: str | None, max_steps: int, write: bool = True) -> dict | None:
    """None unless `resume_path` is at (or past) max_steps; then the run is complete: the export
    beside the run (lcm.safetensors / model.safetensors) is restored from that checkpoint's copy
    if it is missing (write=False on ranks > 0), and a train()-style summary is returned."""
    if resume_path is None or (step := load_step(resume_path)) < max_steps:
        return None
    exports = sorted(f for f in os.listdir(resume_path) if f != STATE_FILE and f.endswith(".safetensors"))
    if len(exports) != 1:
        raise FileNotFoundError(f"{resume_path}: expected one export beside {STATE_FILE}, found {exports}")
    export = os.path.join(run_dir, exports[0])
    note = f" (past train.max_steps={max_steps})" if step > max_steps else ""
    if os.path.exists(export):
        log.info("%s is complete at step %d%s: nothing to train; the export is %s", run_dir, step, note, export)
    elif write:                                        # the checkpoint holds the same export, bit for bit
        tmp = os.path.join(run_dir, f"{TMP_PREFIX}{exports[0]}")
        shutil.copyfile(os.path.join(resume_path, exports[0]), tmp)
        _fsync(tmp)
        os.replace(tmp, export)
        log.warning("%s is complete at step %d%s; its export was missing and is restored from %s",
                    run_dir, step, note, resume_path)
    return dict(step=step, status="done", run_dir=run_dir, nan_skipped=0, skipped_samples=0, export=export,
                already_complete=True)


def write_config(run_dir: str, config: dict) -> None:
    """The resolved config (credentials redacted), written once per run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(redact(config), f, indent=1)


WANDB_FILE = "wandb_run.json"         # the wandb run a run dir logged to (id, project, group, mode)


@dataclass
class LoggerConfig:
    mode: str = "offline"               # online | offline | disabled (env WANDB_MODE wins)
    project: str = "lcm-lora"
    entity: str | None = None
    name: str | None = None
    tags: list = field(default_factory=list)
    group: str | None = None            # wandb group; a Hydra multirun defaults it to the sweep folder's name


class RunLogger:
    def __init__(self, run_dir: str, cfg: LoggerConfig, config: dict, run_id: str | None):
        self.path, self.wandb = os.path.join(run_dir, "metrics.jsonl"), None
        mode = os.environ.get("WANDB_MODE") or cfg.mode
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        if mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags),
                                    group=cfg.group, dir=run_dir, mode=mode, id=run_id,
                                    resume="allow" if run_id else None, config=redact(config))
            self.wandb.define_metric("*", step_metric="step")   # our step axis; wandb's own stays monotonic
            with open(os.path.join(run_dir, WANDB_FILE), "w") as f:   # lets later tools add to this run
                json.dump(dict(id=self.wandb.id, project=cfg.project, entity=cfg.entity, group=cfg.group,
                               mode=mode), f)
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

    def summary(self, metrics: dict) -> None:
        """Final figures of the run: wandb's run summary and <run_dir>/summary.json."""
        with open(os.path.join(os.path.dirname(self.path), "summary.json"), "w") as f:
            json.dump(metrics, f)
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def log_summary(run_dir: str, metrics: dict) -> bool:
    """Add final figures (e.g. an evaluation made after training) to the run's wandb summary, resuming
    the run it logged to (offline: a new offline segment of the same run id, merged by `wandb sync`).
    Returns False when the run did not log to wandb."""
    path = os.path.join(run_dir, WANDB_FILE)
    if not os.path.exists(path) or os.environ.get("WANDB_MODE") == "disabled":
        return False
    import wandb
    with open(path) as f:
        info = json.load(f)
    run = wandb.init(id=info["id"], project=info["project"], entity=info["entity"], group=info["group"],
                     dir=run_dir, mode=info["mode"], resume="allow")
    run.summary.update(metrics)
    run.finish()
    return True


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
    place; sharded networks: lcm.fsdp.load_state)."""
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
