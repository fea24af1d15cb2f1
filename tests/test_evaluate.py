"""lcm/evaluation + evaluate.py: FID/KID math (torch-fidelity) on random features, the metric plumbing,
resume without regenerating finished batches, results.json, the missing-weights one-line error."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lcm.evaluation import Method, MetricSet, PromptSet, register_extractor, register_metric, run_grid
from lcm.evaluation.metrics import fid_from_features, kid_from_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fid_and_kid_are_zero_on_the_same_set_and_grow_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    assert abs(fid_from_features(x, {"features": x})) < 1e-6
    fids = [fid_from_features(x + s * torch.randn(x.shape, generator=g), {"features": x}) for s in (0.3, 1.0, 3.0)]
    assert fids == sorted(fids) and fids[0] > 0
    kids = [kid_from_features(x + s * torch.randn(x.shape, generator=g), x, 10, 200)["kid"] for s in (0.0, 1.0, 3.0)]
    assert kids[0] < kids[1] < kids[2] and abs(kids[0]) < 0.3 * kids[2]   # unbiased: ~0 up to subset noise


def test_fid_matches_the_demo_frechet_distance():
    from demo.evaluator import frechet_distance
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 8, generator=g), 0.5 + 1.3 * torch.randn(300, 8, generator=g)
    assert fid_from_features(a, {"features": b}) == pytest.approx(frechet_distance(a, b), rel=1e-6)


register_extractor("tiny_mean", lambda o: lambda im, p: im.mean((2, 3)))
register_metric("tiny_fid", "tiny_mean", lambda o: lambda f, p: {"tiny_fid": fid_from_features(f, {"features": f + 1})})


def test_resume_does_not_regenerate_finished_batches(tmp_path):
    from lcm.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(os.path.join(ROOT, "assets", "demo_teacher.safetensors"))
    pipe.load_lora(os.path.join(ROOT, "assets", "demo_lcm_lora.safetensors"), name="lcm")
    calls, real = [], pipe.__class__.__call__

    class Counted:
        def __init__(self, limit=None):
            self.limit = limit
        def __getattr__(self, k):
            return getattr(pipe, k)
        def __call__(self, *a, **k):
            if self.limit is not None and len(calls) >= self.limit:
                raise KeyboardInterrupt
            calls.append(k["steps"])
            return real(pipe, *a, **k)
    methods = [Method("teacher", "ddim", [2], 3.0, teacher=True), Method("lcm", "lcm", [1, 2])]
    prompts = PromptSet(tuple(["a large red circle in the center on a blue background"] * 4), 0)
    ms = lambda: MetricSet(["tiny_fid"])                       # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run_grid(Counted(3), methods, prompts, ms(), str(tmp_path), batch_size=2, progress=False)
    assert len(calls) == 3
    calls.clear()
    rows = run_grid(Counted(), methods, prompts, ms(), str(tmp_path), batch_size=2, progress=False)
    assert len(calls) == 3                                     # 6 batches in all, 3 were on disk
    fresh = run_grid(Counted(), methods, prompts, ms(), str(tmp_path / "fresh"), batch_size=2, progress=False)
    assert [r["tiny_fid"] for r in rows] == pytest.approx([r["tiny_fid"] for r in fresh], rel=1e-6)
    assert [r["nfe"] for r in rows] == [4, 1, 2]
    assert pipe.adapter_scales()["lcm"] == 1.0                # restored after the teacher rows


@pytest.mark.slow
def test_cli_missing_weights_is_one_line_and_results_json(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run([sys.executable, "evaluate.py", "metrics=[fid]", f"reference={tmp_path}",
                          f"hydra.run.dir={tmp_path / 'a'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line, = res.stderr.strip().splitlines()
    assert "inception_weights" in line and "pt_inception-2015-12-05-6726825d.pth" in line
    res = subprocess.run([sys.executable, "evaluate.py", "n_prompts=4", "demo_n_ref=64", "batch_size=4",
                          "save_images=true", "methods=[{name: LCM-LoRA, solver: lcm, steps: [1]}, "
                          "{name: teacher, solver: ddim, steps: [2], teacher: true}]", f"hydra.run.dir={tmp_path / 'b'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = json.load(open(tmp_path / "b" / "results.json"))["rows"]
    for k in ("method", "solver", "steps", "guidance_scale", "nfe", "seconds_per_image", "demo_acc", "demo_fd",
              "demo_acc_ci", "demo_fd_ci", "demo_diversity", "demo_diversity_ci", "n_images", "n_prompts"):
        assert all(k in row for row in rows)                   # defaults: intervals, 2 seeds per prompt, diversity
    from PIL import Image
    from sd_parsers import ParserManager                       # kept images carry A1111 infotext
    for cell, sampler, lora in (("LCM-LoRA-1steps", "LCM", "<lora:demo_lcm_lora:1>"), ("teacher-2steps", "DDIM", None)):
        png, = [p for p in (tmp_path / "b" / "cells").glob(f"{cell}-*/images/000001.png")]
        text = Image.open(png).text["parameters"]
        assert str(ROOT) not in text and str(tmp_path) not in text
        assert (lora in text) if lora else "<lora:" not in text
        info = ParserManager().parse(Image.open(png))
        sm = info.samplers[0]
        assert sm.name == sampler and int(sm.parameters["steps"]) == int(cell[-6]) and int(sm.parameters["seed"]) == 1


def test_demo_grid_equals_demo_bench_on_the_same_prompts_and_seeds(tmp_path):
    """evaluate.py's demo metrics (accuracy, Frechet distance) are demo.bench's numbers, not a re-derivation."""
    import demo.metrics  # noqa: F401  (registers demo_accuracy, demo_fd, the demo prompt set)
    from demo import bench
    from demo.evaluator import DemoEvaluator
    from lcm.evaluation import load_prompts
    from lcm.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(os.path.join(ROOT, "assets", "demo_teacher.safetensors"))
    pipe.load_lora(os.path.join(ROOT, "assets", "demo_lcm_lora.safetensors"), name="lcm")
    n, n_ref = 12, 256
    prompts = load_prompts("demo", n, 1, 0)
    ms = MetricSet(["demo_accuracy", "demo_fd"], {"demo_n_ref": n_ref})
    rows = run_grid(pipe, [Method("LCM-LoRA", "lcm", [2])], prompts, ms, str(tmp_path), batch_size=5, progress=False)
    ev = DemoEvaluator.load(os.path.join(ROOT, "assets", "demo_evaluator.safetensors"))
    images, _ = bench.generate(pipe, list(prompts.prompts), 0, batch=5, solver="lcm", steps=2, guidance_scale=1.0)
    ref = bench.score(ev, images, list(prompts.prompts), ev.reference_stats(n_ref, seed=1, style="plain"))
    assert rows[0]["demo_acc"] == pytest.approx(ref["acc"], abs=1e-9)
    assert rows[0]["demo_fd"] == pytest.approx(ref["fd"], rel=1e-5)
    assert list(prompts.prompts) == bench.fixed_prompt_set(n, seed=0)


def test_clip_score_is_100_times_the_clamped_cosine_of_open_clip(tmp_path):
    """clip_score on a tiny random open_clip model (local weights file): 100 max(cos(image, text), 0)."""
    import open_clip
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "tiny-clip-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(cfg_dir))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    ms = MetricSet(["clip_score"], {"clip_model": "tiny-clip-test", "clip_pretrained": str(tmp_path / "tiny.pt")}).build()
    g = torch.Generator().manual_seed(0)
    images, prompts = torch.rand(3, 3, 32, 32, generator=g), ["a red circle", "a blue square", "a green star"]
    per_image = ms.features(images, prompts)["clip"][:, 0]
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test", pretrained=str(tmp_path / "tiny.pt"))
    from PIL import Image
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in images]
    with torch.no_grad():
        a = model.encode_image(torch.stack([preprocess(p) for p in pil]))
        b = model.encode_text(open_clip.get_tokenizer("tiny-clip-test")(prompts))
    want = 100 * torch.cosine_similarity(a, b).clamp(min=0)
    assert torch.allclose(per_image, want, atol=1e-3), (per_image, want)
    assert ms.reduce({"clip": per_image[:, None]}, prompts)["clip_score"] == pytest.approx(want.mean().item(), abs=1e-3)
    with pytest.raises(FileNotFoundError, match="clip_pretrained"):
        MetricSet(["clip_score"], {"clip_model": "ViT-g-14"}).build()
    div = MetricSet(["clip_diversity"], {"clip_model": "tiny-clip-test", "clip_pretrained": str(tmp_path / "tiny.pt"),
                                         "seeds_per_prompt": 3}).build()       # the same extractor's image embedding
    same = ["a red circle"] * 3
    assert div.reduce(div.features(images[:1].repeat(3, 1, 1, 1), same), same)["clip_diversity"] == pytest.approx(0, abs=1e-5)
    assert div.reduce(div.features(images, same), same)["clip_diversity"] > 1e-3


def test_validation_metrics_are_logged_against_the_training_step(tmp_path):
    """validation.metrics: the objective's sampler at validation.steps every validation.every steps -> metrics.jsonl."""
    from tests.test_trainer import LORA, data, metrics, small, tiny_pipe, train
    setup = small(max_steps=4, validation=dict(every=2, metrics=["tiny_fid"], steps=[1, 2],
                                               metric_options={"n_prompts": None, "batch_size": 2}))
    train(tiny_pipe(), data(), setup, str(tmp_path), LORA)
    logged = [m for m in metrics(str(tmp_path)) if "val/tiny_fid_1steps" in m]
    assert [m["step"] for m in logged] == [2, 4]
    assert all(m["val/tiny_fid_2steps"] > 0 for m in logged)
    assert os.path.isfile(tmp_path / "validation" / "metrics_step_0000004.md")


def test_aesthetic_score_is_the_laion_head_on_the_normalised_clip_embedding(tmp_path):
    """aesthetic: Linear 768-1024-128-64-16-1 (the predictor's `layers.*` keys) on e / |e| of CLIP."""
    import open_clip
    from tests.oracle import tiny_open_clip_model
    torch.manual_seed(0)
    clip = tiny_open_clip_model(tmp_path / "cfg", "tiny-aesthetic-clip", 768)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    dims = [768, 1024, 128, 64, 16, 1]
    head = {f"layers.{j}.{k}": (torch.randn(dims[i + 1], dims[i]) / dims[i] ** 0.5 if k == "weight" else torch.randn(dims[i + 1]))
            for i, j in enumerate([0, 2, 4, 6, 7]) for k in ("weight", "bias")}
    torch.save(head, tmp_path / "head.pth")
    opts = {"aesthetic_clip_model": "tiny-aesthetic-clip", "aesthetic_clip_pretrained": str(tmp_path / "clip.pt"),
            "aesthetic_weights": str(tmp_path / "head.pth")}
    ms = MetricSet(["aesthetic"], opts).build()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = ms.features(images, ["a", "b"])["aesthetic"][:, 0]
    from PIL import Image
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-aesthetic-clip", pretrained=str(tmp_path / "clip.pt"))
    pil = [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in images]
    with torch.no_grad():
        e = clip.eval().encode_image(torch.stack([preprocess(p) for p in pil]))
        x = e / e.norm(dim=-1, keepdim=True)
        for j in (0, 2, 4, 6, 7):                              # no activations between the layers
            x = x @ head[f"layers.{j}.weight"].T + head[f"layers.{j}.bias"]
    assert torch.allclose(got, x[:, 0], atol=1e-4), (got, x[:, 0])
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="aesthetic_weights: expected the keys"):
        MetricSet(["aesthetic"], opts | {"aesthetic_weights": str(tmp_path / "bad.pth")}).build()
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        MetricSet(["aesthetic"], {}).build()
