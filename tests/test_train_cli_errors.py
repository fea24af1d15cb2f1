"""train.py on the command line: one-line errors for a missing model.path / data.root and for CUDA
asked for where there is none (before anything is built); --help lists the knobs with their meanings."""
import os
import subprocess
import sys

import pytest

from tests.oracle import inline_comments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "demo_teacher.safetensors")
pytestmark = pytest.mark.slow


def run(*args, **env):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", **env}
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(res) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr
    line, = res.stderr.strip().splitlines()
    assert line.startswith("train.py: error: ")
    return line


@pytest.mark.parametrize("args,expected", [
    (["experiment=sd15_lcm_lora"], "model.path is not set: point it at an original single-file checkpoint"),
    (["experiment=sdxl_lcm_lora", "data.root=/x"], "e.g. model.path=/weights/sd_xl_base_1.0.safetensors"),
    (["experiment=sd15_lcm_lora", f"model.path={TEACHER}"], "data.root is not set"),
    (["experiment=sd15_lcm_lora", f"model.path={TEACHER}", "data.root=/x"],
     "CUDA is not available on this machine; to run on the CPU add: "
     "model.device=cpu model.dtype=float32 train.mixed_precision=no"),
])
def test_one_line_errors_before_anything_is_built(tmp_path, args, expected):
    res = run(*args, f"hydra.run.dir={tmp_path / 'run'}", CUDA_VISIBLE_DEVICES="")
    assert expected in one_error_line(res)
    assert not os.path.exists(tmp_path / "run" / "config.json")      # nothing was started


def test_help_shows_every_knob_with_its_meaning():
    """Each commented knob of conf/train.yaml and of the train preset in effect appears as
    `key: default  # comment` (a comment wrapped onto the next line continues it)."""
    res = run("--help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    top = inline_comments(os.path.join(ROOT, "conf", "train.yaml"))
    train = inline_comments(os.path.join(ROOT, "conf", "train", "lora_distill.yaml"))
    objective = inline_comments(os.path.join(ROOT, "conf", "objective", "lcd_lora.yaml"))
    assert "resume" in top and "grad_clip" in train and "k" in objective and "max_steps" in res.stdout
    for indent, comments in (("", top), ("  ", train), ("  ", objective)):
        for key, comment in comments.items():
            assert any(ln.startswith(f"{indent}{key}:") and f"# {comment}" in ln for ln in lines), \
                f"--help lacks `{indent}{key}: ...  # {comment}`"
    assert any(ln.startswith("experiment=null") for ln in lines)
