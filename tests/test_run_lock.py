"""Concurrency: output files created exclusively (real concurrent sample.py processes), the run-dir
lock (one live owner; a stale lock of a dead process is taken over), and resume=true on a run that
already finished (complete, re-exported if the export is missing)."""
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lcm.runs import checkpoints as run_ckpts
from lcm.runs import lock as run_lock
from lcm.runs import state as run_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid                                     # reaped: no process has this PID now (almost surely)

#----------------------------------------------------------------------------
# The run-directory lock.

def test_lock_holds_our_pid_and_is_released(tmp_path):
    run = str(tmp_path / "run")
    with run_lock.lock_run_dir(run) as path:
        owner = json.load(open(path))
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(run_lock.RunDirLocked) as e:        # a second owner, even in this process
            with run_lock.lock_run_dir(run):
                pass
        assert "\n" not in str(e.value) and run in str(e.value) and f"PID {os.getpid()}" in str(e.value)
        assert os.path.exists(path)                      # the refused attempt left our lock alone
    assert not os.path.exists(path)
    with run_lock.lock_run_dir(run):                           # free again
        pass


def test_second_live_process_is_refused_naming_the_dir_and_pid(tmp_path):
    run = str(tmp_path / "run")
    holder = _python(f"""
        import sys, time
        from lcm.runs.lock import lock_run_dir
        with lock_run_dir({run!r}):
            print("locked", flush=True)
            sys.stdin.readline()
        """, stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(run_lock.RunDirLocked) as e:
            with run_lock.lock_run_dir(run):
                pass
        msg = str(e.value)
        assert isinstance(e.value, FileExistsError) and "\n" not in msg
        assert run in msg and f"PID {holder.pid}" in msg and "in use" in msg
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0 and not os.path.exists(os.path.join(run, run_lock.LOCK_FILE))


@pytest.mark.parametrize("record", ["dead", "reused_pid", "unreadable"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog, record):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / run_lock.LOCK_FILE
    if record == "dead":                                 # kill -9 of the owner: its lock stays behind
        lock.write_text(json.dumps({"pid": _dead_pid(), "start": None, "host": socket.gethostname()}))
    elif record == "reused_pid":                         # the PID lives, but it is another process now
        lock.write_text(json.dumps({"pid": os.getppid(), "start": 1, "host": socket.gethostname()}))
    else:                                                # killed between creating and writing the lock
        lock.write_text("")
    with caplog.at_level(logging.WARNING), run_lock.lock_run_dir(str(run)):
        assert json.load(open(lock))["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(run) in caplog.text
    assert not lock.exists() and not list(run.iterdir())  # no tombstone left either


def test_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / run_lock.LOCK_FILE).write_text(json.dumps({"pid": 4242, "start": None, "host": "elsewhere"}))
    with pytest.raises(run_lock.RunDirLocked, match=r"PID 4242 on host elsewhere.*delete the lock file"):
        with run_lock.lock_run_dir(str(run)):
            pass


def test_processes_racing_for_one_run_dir_get_exactly_one_owner(tmp_path):
    run, n = str(tmp_path / "run"), 4
    go = time.time() + 3.0                               # all start the attempt at the same moment
    procs = [_python(f"""
        import time
        from lcm.runs.lock import RunDirLocked, lock_run_dir
        time.sleep(max(0.0, {go} - time.time()))
        try:
            with lock_run_dir({run!r}):
                time.sleep(1.0)
                print("owner")
        except RunDirLocked as e:
            print("refused", e)
        """) for _ in range(n)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sum(o == "owner" for o in outs) == 1 and sum(o.startswith("refused") for o in outs) == n - 1, outs

#----------------------------------------------------------------------------
# resume=true on a finished run.

def _fake_run(tmp_path, step: int, export: str = "lcm.safetensors") -> tuple[str, str]:
    from safetensors.torch import save_file
    run = str(tmp_path / "run")
    run_ckpts.write_checkpoint(os.path.join(run, "checkpoints"), step, {
        run_state.STATE_FILE: lambda p: run_state.save_state(p, {"step": step}),
        export: lambda p: save_file({"w": torch.arange(4.0) + step}, p, metadata={"step": str(step)})})
    return run, run_ckpts.latest_checkpoint(os.path.join(run, "checkpoints"))


def test_finished_run_is_complete_and_a_missing_export_is_restored(tmp_path, caplog):
    run, last = _fake_run(tmp_path, 12)
    assert run_ckpts.finish_completed_run(run, last, max_steps=13) is None         # more to train: the loop runs
    assert run_ckpts.finish_completed_run(run, None, max_steps=12) is None         # a fresh run
    with caplog.at_level(logging.WARNING):
        out = run_ckpts.finish_completed_run(run, last, max_steps=12)
    export = os.path.join(run, "lcm.safetensors")
    assert out["status"] == "done" and out["step"] == 12 and out["export"] == export and out["already_complete"]
    assert open(export, "rb").read() == open(os.path.join(last, "lcm.safetensors"), "rb").read()
    assert "restored" in caplog.text and not [f for f in os.listdir(run) if f.startswith(run_ckpts.TMP_PREFIX)]
    os.utime(export, (1, 1))
    assert run_ckpts.finish_completed_run(run, last, max_steps=12)["export"] == export   # present: left alone
    assert os.stat(export).st_mtime == 1
    assert run_ckpts.finish_completed_run(run, last, max_steps=8)["step"] == 12          # past max_steps: complete
    os.remove(export)
    assert run_ckpts.finish_completed_run(run, last, max_steps=12, write=False)["export"] == export  # rank > 0
    assert not os.path.exists(export)


def test_finished_run_without_an_export_in_its_checkpoint_says_so(tmp_path):
    run, last = _fake_run(tmp_path, 4)
    os.remove(os.path.join(last, "lcm.safetensors"))
    with pytest.raises(FileNotFoundError, match="expected one export"):
        run_ckpts.finish_completed_run(run, last, max_steps=4)

#----------------------------------------------------------------------------
# Exclusive output files: sample.py's free_path/save_png under real concurrency.

def _writer_code(out_dir: str, tag: str, n: int) -> str:
    return f"""
        from PIL import Image
        from lcm.sampling.png import free_path, save_png
        for i in range(n := {n}):
            img = Image.new("RGB", (8, 8), (i % 256, 0, 0))
            path = free_path({out_dir!r}, "img")
            save_png(img, path, dict(prompt="{tag} " + str(i), seed=i))
            print(path)
        """


@pytest.mark.slow
def test_concurrent_writers_never_share_or_overwrite_a_file(tmp_path):
    from PIL import Image
    writers, n = 3, 150
    procs = [_python(_writer_code(str(tmp_path), f"w{w}", n)) for w in range(writers)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    paths = [line for out, _ in outs for line in out.split()]
    assert len(paths) == writers * n == len(set(paths)) == len(os.listdir(tmp_path))
    seen = {Image.open(p).text["parameters"].split("\n")[0] for p in paths}     # every image survived
    assert seen == {f"w{w} {i}" for w in range(writers) for i in range(n)}


def test_save_png_never_overwrites_a_written_file(tmp_path):
    from PIL import Image

    from lcm.sampling import png as sample                         # sample.py's PNG writing
    path = sample.free_path(str(tmp_path), "x")
    assert os.path.getsize(path) == 0 and path.endswith("x-000.png")          # reserved, empty
    sample.save_png(Image.new("RGB", (4, 4)), path, {"prompt": "first"})
    assert sample.free_path(str(tmp_path), "x").endswith("x-001.png")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        sample.save_png(Image.new("RGB", (4, 4)), path, {"prompt": "second"})
    assert Image.open(path).text["parameters"].startswith("first")


@pytest.mark.slow
def test_two_sample_py_processes_on_one_folder(tmp_path):
    from PIL import Image
    n = 3                                                 # same seed: both want the same names
    args = [sys.executable, "sample.py", "prompt=a large red circle in the center on a blue background",
            f"images_per_prompt={n}", "steps=1", "height=32", "width=32", f"out_dir={tmp_path}"]
    procs = [subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    paths = [p for out, _ in outs for p in out.split() if p.endswith(".png")]
    assert len(paths) == 2 * (n + 1) == len(set(paths)) == len(os.listdir(tmp_path))   # n images + a grid each
    for p in paths:
        Image.open(p).load()                              # complete PNGs
    assert sum("grid" in os.path.basename(p) for p in paths) == 2

#----------------------------------------------------------------------------
# End to end through train.py: train() holds lock_run_dir and returns finish_completed_run's summary.


def _train(run: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "experiment=smoke", "logger=none", "validation.every=0",
                           "train.max_steps=4", "train.checkpoint_every=2", f"hydra.run.dir={run}", *extra],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _content(path: str) -> tuple[dict, dict]:
    """Tensors (as raw bytes) and metadata of a safetensors file."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                for k in f.keys()}, dict(f.metadata() or {})


@pytest.mark.slow
def test_train_py_resume_of_a_finished_run_is_complete_and_re_exports(tmp_path):
    run = str(tmp_path / "run")
    assert _train(run).returncode == 0
    export = os.path.join(run, "lcm.safetensors")
    first = _content(export)
    again = _train(run, "resume=true")
    assert again.returncode == 0 and again.stdout.strip().endswith("lcm.safetensors"), again.stderr[-2000:]
    os.remove(export)
    again = _train(run, "resume=true")                         # (safetensors orders header keys at random,
    assert again.returncode == 0 and _content(export) == first, again.stderr[-2000:]   # so compare content)
    assert [s for s, _ in run_ckpts.list_checkpoints(os.path.join(run, "checkpoints"))] == [2, 4]


@pytest.mark.slow
def test_train_py_second_run_on_a_busy_run_dir_is_refused(tmp_path):
    run = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "train.py", "experiment=smoke", "logger=none", "validation.every=0",
                              "train.max_steps=100000", "train.checkpoint_every=1000", f"hydra.run.dir={run}"],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(run, run_lock.LOCK_FILE)):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        second = _train(run, "resume=true")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"PID {first.pid}" in second.stderr and run in second.stderr, second.stderr[-2000:]
    finally:
        first.kill()
        first.wait()
    assert _train(run, "resume=true", "train.max_steps=2").returncode == 0    # kill -9 left a stale lock
