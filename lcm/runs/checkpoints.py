"""Checkpoint folders of a run dir: step_XXXXXXX/ written under a tmp name and renamed into place,
listing, keeping the newest, which one to resume, the run dir refusing to be reused."""
from __future__ import annotations

import logging
import os
import re
import shutil

from lcm.runs.state import STATE_FILE, make_readable
from models.checkpoint import fsync

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"


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


def load_step(ckpt_dir: str) -> int:
    """The step of a checkpoint folder (from its name)."""
    m = STEP_DIR.match(os.path.basename(os.path.normpath(ckpt_dir)))
    assert m, f"{ckpt_dir} is not a step_XXXXXXX checkpoint folder"
    return int(m.group(1))


def prepare_run_dir(run_dir: str, fresh: bool) -> None:
    """Create the run dir; a fresh run never reuses one that holds a run. Clears interrupted writes."""
    if fresh and any(os.path.exists(os.path.join(run_dir, f)) for f in ("checkpoints", "metrics.jsonl", "config.json")):
        raise FileExistsError(f"{run_dir} already holds a run: pass resume=true to continue it, "
                              "or choose a new run dir")
    os.makedirs(run_dir, exist_ok=True)
    clean_tmp(os.path.join(run_dir, "checkpoints"))


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
        fsync(tmp)
        os.replace(tmp, export)
        log.warning("%s is complete at step %d%s; its export was missing and is restored from %s",
                    run_dir, step, note, resume_path)
    return dict(step=step, status="done", run_dir=run_dir, nan_skipped=0, skipped_samples=0, export=export,
                already_complete=True)
