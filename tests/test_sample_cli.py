"""sample.py end to end: PNGs with parameters, never overwriting; one-line errors for bad input."""
import os
import subprocess
import sys

import pytest

from tests.oracle import tiny_clip, tiny_unet, tiny_vae, write_original

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "tiny.safetensors")
    write_original(path, "sd15", tiny_unet("sd15"), tiny_vae(), [tiny_clip(768, "quick_gelu", layers=1)])
    return path


def run(*args, cwd=ROOT):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_writes_pngs_with_parameters_and_never_overwrites(ckpt, tmp_path):
    from PIL import Image
    args = ["model=sd15", f"model.path={ckpt}", "prompt=a red circle", "steps=2", "height=32", "width=32",
            f"out_dir={tmp_path}"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    second = run(*args)
    assert second.returncode == 0, second.stderr
    paths = [p for p in (first.stdout + second.stdout).split() if p.endswith(".png")]
    assert len(paths) == 2 and len(set(paths)) == 2 and all(os.path.isfile(p) for p in paths)
    params = Image.open(paths[0]).text["parameters"]
    assert params.startswith("a red circle\n") and "solver: lcm" in params and "steps: 2" in params


@pytest.mark.parametrize("override,message", [
    ("model.path=/nonexistent/model.safetensors", "checkpoint not found: /nonexistent"),
    ("height=30", "multiples of"),
    ("steps=0", "steps must be a positive integer"),
    ("guidance_scale=-2", "guidance_scale must be"),
    ("model.dtype=float8", "model.dtype must be one of"),
])
def test_bad_input_is_one_line_no_traceback(ckpt, tmp_path, override, message):
    args = ["model=sd15", f"model.path={ckpt}", "height=32", "width=32", f"out_dir={tmp_path}"]
    key = override.split("=")[0]
    res = run(*[a for a in args if not a.startswith(key + "=")], override)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_out_dir_that_is_a_file(ckpt, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    res = run("model=sd15", f"model.path={ckpt}", f"out_dir={f}")
    assert res.returncode != 0 and "is a file" in res.stderr and f.read_text() == "keep me"


def test_unknown_solver_is_named(ckpt):
    res = run("model=sd15", f"model.path={ckpt}", "solver=euler")
    assert res.returncode != 0 and "euler" in res.stderr and "Traceback" not in res.stderr
