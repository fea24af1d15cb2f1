"""One owner per run dir."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time

log = logging.getLogger(__name__)

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
