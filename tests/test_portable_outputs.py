"""What the project writes for others names files, never directories (lcm.runs.logger.portable): the
LoRA and the full model a 2-step smoke run exports, its validation grid, a sample.py PNG, evaluate.py's
results.json / results.md and kept PNGs hold neither the run dir, the checkout, nor tmp_path. A run
dir's own records (config.json, the resume state) may keep paths and are not checked."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from safetensors import safe_open

from lcm.runs.logger import portable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}

#----------------------------------------------------------------------------


def test_portable_keeps_file_names_of_a_nested_config(tmp_path):
    run = str(tmp_path / "run")
    cfg = {"model": {"path": "/weights/sd15/v1-5.safetensors", "dtype": "float32",
                     "lora": [{"path": "~/loras/papercut.safetensors", "scale": 0.8}, f"{run}/lcm.safetensors"]},
           "data": {"root": "/data/imgs/", "local": "tests/fixtures/tiny_data",      # relative, under the checkout
                    "urls": "pipe:curl -s https://host/shards/{000..009}.tar", "win": "C:\\Users\\me\\m.safetensors"},
           "overrides": [f"hydra.run.dir={run}", "lora=[/w/a.safetensors,/w/b.safetensors]", "objective.k=20",
                         "model.lora=[{path: /w/lcm.safetensors, name: lcm}]"],
           "note": f"resumed from {run}/checkpoints/step_0000002",
           "prompts": ["a red circle / a blue square", "outputs/not/a/file"], "steps": [1, 2], "seed": None}
    out = portable(cfg, (run,))
    assert out == {"model": {"path": "v1-5.safetensors", "dtype": "float32",
                             "lora": [{"path": "papercut.safetensors", "scale": 0.8}, "lcm.safetensors"]},
                   "data": {"root": "imgs", "local": "tiny_data",
                            "urls": "pipe:curl -s https://host/shards/{000..009}.tar", "win": "m.safetensors"},
                   "overrides": ["hydra.run.dir=run", "lora=[a.safetensors,b.safetensors]", "objective.k=20",
                                 "model.lora=[{path: lcm.safetensors, name: lcm}]"],
                   "note": "resumed from checkpoints/step_0000002",
                   "prompts": ["a red circle / a blue square", "outputs/not/a/file"], "steps": [1, 2], "seed": None}
    assert cfg["model"]["path"] == "/weights/sd15/v1-5.safetensors"            # a copy: the input is untouched
    assert portable(out, (run,)) == out                                         # idempotent

#----------------------------------------------------------------------------


def _run(*args: str) -> None:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.mark.slow
def test_shared_outputs_name_no_directories(tmp_path):
    sweep, images = tmp_path / "sweep", tmp_path / "images"   # job 0: smoke (LoRA + base), job 1: smoke_lcd (full)
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "tiny_data"), images)
    _run("train.py", "-m", "experiment=smoke,smoke_lcd", "train.max_steps=2", "train.batch_size=2",
         "train.checkpoint_every=2", "validation.every=2", "validation.steps=[1]", "validation.teacher_steps=2",
         "logger=none", "data=tiny", f"data.root={images}", f"hydra.sweep.dir={sweep}")
    lora_run, full_run = sweep / "0", sweep / "1"
    lora, base = lora_run / "lcm.safetensors", lora_run / "base.safetensors"
    _run("sample.py", f"model.path={base}", f"model.lora=[{{path: {lora}, name: lcm}}]", "steps=1",
         f"out_dir={tmp_path / 'samples'}")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    _run("evaluate.py", f"model.path={base}", f"lora=[{{path: {lora}, name: lcm}}]",
         f"prompts={tmp_path / 'prompts.txt'}", "n_prompts=2", "batch_size=2", "metrics=[]", "save_images=true",
         "methods=[{name: LCM, solver: lcm, steps: [1]}]", f"hydra.run.dir={tmp_path / 'eval'}")

    texts = {str(p): json.dumps(_metadata(p)) for p in (lora, base, full_run / "model.safetensors",
                                                         lora_run / "checkpoints" / "step_0000002" / "lcm.safetensors")}
    pngs = [*(tmp_path / "samples").glob("*.png"), *sweep.glob("*/validation/*.png"),
            *(tmp_path / "eval" / "cells").glob("*/images/*.png")]
    assert len(pngs) >= 5, pngs                       # sample.py's image and grid, 2 validation grids, 2 kept images
    texts |= {str(p): Image.open(p).text["parameters"] for p in pngs}
    texts |= {str(p): p.read_text() for p in (tmp_path / "eval" / "results.json", tmp_path / "eval" / "results.md")}
    forbidden = {str(tmp_path), os.path.realpath(tmp_path), str(lora_run), ROOT, os.path.realpath(ROOT)}
    bad = {f: sorted(d for d in forbidden if d in t) for f, t in texts.items() if any(d in t for d in forbidden)}
    assert not bad, bad

    config = json.loads(_metadata(lora)["lcm.train_config"])   # the names are kept
    assert config["data"]["root"] == "images" and "data.root=images" in config["overrides"]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["config"]
    assert results["model"]["path"] == "base.safetensors"
    assert results["lora"] == [{"path": "lcm.safetensors", "name": "lcm"}]
    assert results["prompts"] == "prompts.txt" and results["demo_evaluator"] == "demo_evaluator.safetensors"
