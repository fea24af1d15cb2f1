"""Latent pre-caching (task=encode, lcm/data/encode.py) and data=latents: the cache holds what the image
path computes, units split over ranks, and training N steps from the cache equals training from the
images on the smoke model (same samples, same per-step losses, same LoRA)."""
import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from lcm.data.build import latent_data
from lcm.data.encode import encode, write_manifest
from lcm.data.encoder import LatentEncoder
from lcm.data.order import TrainData
from lcm.data.sources import ImageFolder, LatentShards, SkipSample
from lcm.objectives.base import LoRAConfig
from lcm.objectives.lcd_lora import LCDLoRA
from lcm.training import loop
from lcm.training.loop import TrainConfig
from lcm.training.validation import ValidationConfig
from train import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = os.path.join(ROOT, "tests", "fixtures", "tiny_data")
SMOKE_MODEL = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """fp32 parity: max abs error <= 1e-4 * max(1, |a|max) (CONTRIBUTING.md)."""
    err, tol = (a - b).abs().max().item(), 1e-4 * max(1.0, a.abs().max().item())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny images plus a corrupt one (index 8), encoded by 2 'ranks' into units of 3 samples."""
    root = tmp_path_factory.mktemp("cache")
    data = root / "data"
    shutil.copytree(TINY_DATA, data)
    (data / "zz.png").write_bytes(b"not a png")                    # sorted last: source index 8
    (data / "zz.txt").write_text("a broken image")
    pipe, source, out = build_pipeline(SMOKE_MODEL), ImageFolder(str(data), resolution=32), str(root / "latents")
    stats = [encode(pipe, source, out, rank=r, world=2, shard_size=3, batch_size=2) for r in range(2)]
    manifest = write_manifest(out, source, pipe, shard_size=3)
    return dict(pipe=pipe, source=source, out=out, stats=stats, manifest=manifest, data=str(data))


def test_ranks_write_disjoint_units_that_cover_the_source(world):
    (s0, s1), m = world["stats"], world["manifest"]
    assert (s0["units"], s1["units"]) == (2, 1)                    # rank 0: units 0 and 2, rank 1: unit 1
    assert s0["samples"] + s1["samples"] == 8 and s0["skipped"] + s1["skipped"] == 1
    assert (m["n"], m["samples"], m["skipped"], m["shards"]) == (
        9, 8, 1, ["latents-000000.tar", "latents-000001.tar", "latents-000002.tar"])
    ds = LatentShards(world["out"])
    assert len(ds) == 9 and sorted(ds.where) == list(range(8))     # keys are the source indices
    with pytest.raises(SkipSample, match="skipped by the encode step"):
        ds.get(8)
    again = encode(world["pipe"], world["source"], world["out"], rank=0, world=2, shard_size=3)
    assert again["units"] == 0 and again["kept"] == 2              # a re-run keeps what is written


def test_cache_equals_what_the_image_path_computes(world):
    pipe, src = world["pipe"], TrainData(world["source"])
    lat = TrainData(LatentShards(world["out"]))
    enc = LatentEncoder(pipe, torch.device("cpu"))
    for i in range(8):
        a, b = src[i], lat[i]
        mean, std, ctx, pooled = enc.encode_images(a["image"][None], [a["caption"]])
        assert b["caption"] == a["caption"] and b["index"] == a["index"] == i and b["size"] == (32, 32)
        assert (b["original_size"], b["crop_top_left"]) == (a["original_size"], a["crop_top_left"])
        close(mean[0], b["mean"], "mean")
        close(std[0], b["std"], "std")
        close(ctx[0], b["context"], "context")
        assert pooled is None and b["pooled"] is None
    assert lat[8]["index"] == src[8]["index"] == 0 and lat[8]["skipped"] == src[8]["skipped"] == 1


def _train(dataset, run_dir: str, steps: int = 4):
    pipe = build_pipeline(SMOKE_MODEL)
    cfg = TrainConfig(max_steps=steps, batch_size=3, lr=1e-3, log_every=1, checkpoint_every=100)
    v = ValidationConfig(every=steps, steps=[1], teacher_steps=2, guidance=[1.0])
    out = loop.train(pipe, dataset, cfg, run_dir, LCDLoRA(lora=LoRAConfig(rank=4, alpha=4)), validation=v)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return out, rows, load_file(out["export"])


def test_training_from_the_cache_equals_training_from_the_images(world, tmp_path):
    """4 steps of batch 3 over 9 samples (an epoch boundary, the corrupt sample drawn and substituted)."""
    out_a, rows_a, lora_a = _train(world["source"], str(tmp_path / "images"))
    out_b, rows_b, lora_b = _train(latent_data(world["out"]), str(tmp_path / "latents"))
    assert out_a["status"] == out_b["status"] == "done"
    assert [r["skipped_samples"] for r in rows_a] == [r["skipped_samples"] for r in rows_b]
    assert sum(r["skipped_samples"] for r in rows_a) >= 1          # the same substitutes were taken
    close(torch.tensor([r["loss"] for r in rows_a]), torch.tensor([r["loss"] for r in rows_b]), "per-step losses")
    assert lora_a.keys() == lora_b.keys()
    va, vb = (torch.cat([t[k].flatten().float() for k in sorted(t)]) for t in (lora_a, lora_b))
    # Adam turns fp32 rounding (batch composition in the VAE/text passes, ~1e-6) on ~0 gradients
    # into up to lr per element; the weights agree to 1e-4 relative (as tests/test_trainer.py's DDP test).
    assert (va - vb).abs().max() <= 1e-3, (va - vb).abs().max().item()
    assert (va - vb).norm() <= 1e-4 * va.norm(), ((va - vb).norm() / va.norm()).item()
    assert os.path.isfile(tmp_path / "latents" / "validation" / "step_0000004.png")   # validation sized from the batch


def test_cli_encode_then_train_on_latents(world, tmp_path):
    """train.py task=encode and data=latents as the CLI composes them (in process)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import train as cli

    def cfg_of(over):
        with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=smoke", "logger=none", *over], return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
        return cfg
    out = str(tmp_path / "cli")
    cli.encode_task(cfg_of(["task=encode", f"encode.out={out}", f"data.root={world['data']}", "encode.shard_size=4",
                            f"hydra.run.dir={tmp_path}/enc"]))
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert (m["n"], m["samples"], m["skipped"], len(m["shards"]), m["family"]) == (9, 8, 1, 3, "demo")
    a, b = LatentShards(out), LatentShards(world["out"])              # other unit size, same samples
    for i in range(8):
        close(a.get(i)["mean"], b.get(i)["mean"], "mean")
    r = cli.run(cfg_of(["data=latents", f"data.urls={out}", "train.max_steps=2", "validation.every=0",
                        f"hydra.run.dir={tmp_path}/train"]))
    assert r["status"] == "done" and os.path.isfile(r["export"])
    with pytest.raises(ValueError, match="data.crop=center"):
        cli.encode_task(cfg_of(["task=encode", f"encode.out={tmp_path}/x", "data.crop=random",
                                f"hydra.run.dir={tmp_path}/enc2"]))
    other = dict(SMOKE_MODEL, seed=1)                                  # another model: its cache is refused
    from lcm.data.encode import check_latents
    with pytest.raises(ValueError, match="fingerprint"):
        check_latents(LatentShards(out), build_pipeline(other))



def test_sdxl_batches_from_the_cache_condition_like_the_images(world, tmp_path):
    """An SDXL-style text stack (pooled output): the cached pooled vector, original size, crop and
    target size give the same z, y and zero uncond as encoding the images (same posterior noise)."""
    from lcm.data.order import collate
    from models.text import TextConditioner
    tower = dict(width=32, layers=1, heads=2, act="gelu", pad_token_id=0, layer="penultimate", final_norm=False)
    pipe = build_pipeline(SMOKE_MODEL)
    pipe.text = TextConditioner([{**tower, "proj_dim": None}, {**tower, "proj_dim": 8}], pooled_from=1)
    pipe.family = "sdxl"
    source = ImageFolder(world["data"], resolution=32)
    encode(pipe, source, str(tmp_path / "xl"), shard_size=4, batch_size=4)
    write_manifest(str(tmp_path / "xl"), source, pipe, shard_size=4)
    imgs, lats = TrainData(source), TrainData(latent_data(str(tmp_path / "xl")))
    enc = LatentEncoder(pipe, torch.device("cpu"))
    for keys in ([0, 5], [7, 2]):
        a, b = collate([imgs[k] for k in keys]), collate([lats[k] for k in keys])
        assert b["pooled"].shape == (2, 8) and b["size"] == (32, 32)
        gens = lambda: [torch.Generator().manual_seed(k) for k in keys]
        (za, ca, ua), (zb, cb, ub) = enc(a, gens()), enc(b, gens())
        close(za, zb, "z")
        close(ca.y, cb.y, "y")
        close(ca.context, cb.context, "context")
        assert (ub.context == 0).all() and torch.equal(ua.y[:, 8:], ub.y[:, 8:])
