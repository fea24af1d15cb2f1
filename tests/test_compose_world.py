"""Compositional demo world: determinism, caption grammar, relation geometry in the rendered pixels,
held-out pairs, SDXL size/crop micro-conditioning, the bundled evaluator and its metrics."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import safetensors.torch
import torch

from demo.compose import (CANONICAL, CANVAS_MAX, DOMINANCE, GAP, HEADS, HELDOUT, RELATIONS, Attributes,
                          ComposeDataset, Object, all_attributes, caption, coverage, fixed_prompt_set,
                          parse_caption, real_batch, render_canvas, sample)
from demo.compose_evaluator import COLUMNS, ComposeEvaluator, correct, train_evaluator
from demo.evaluator import frechet_distance

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "compose_evaluator.safetensors"
R, FRESH_SEED = 64, 54321                  # the evaluator trained on world seed 0 and checks on 12345
needs_asset = pytest.mark.skipif(not ASSET.exists(), reason=f"no bundled evaluator {ASSET.name}: "
                                 "python -m demo.compose_evaluator --train --out assets/compose_evaluator.safetensors")


@pytest.fixture(scope="module")
def scenes():
    """200 samples of every split-'all' combination: (scene, image) with crops, and their centred twins."""
    return [sample(7, i, "all") for i in range(200)], [sample(7, i, "all", micro=False) for i in range(200)]


@pytest.fixture(scope="module")
def evaluator():
    return ComposeEvaluator.load(str(ASSET)) if ASSET.exists() else None


@pytest.fixture(scope="module")
def fresh():
    return real_batch(256, FRESH_SEED, "all")

#----------------------------------------------------------------------------
# Dataset, captions, splits

def test_samples_are_a_pure_function_of_seed_and_index():
    ds, again, other = ComposeDataset(50, seed=3), ComposeDataset(50, seed=3), ComposeDataset(50, seed=4)
    for i in (0, 7, 49):
        a, b = ds[i], again[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
        assert a["original_size"] == b["original_size"] and a["crop_top_left"] == b["crop_top_left"]
    assert not torch.equal(ds[0]["image"], ds[1]["image"]) and not torch.equal(ds[0]["image"], other[0]["image"])
    assert torch.stack([ds[i]["image"] for i in range(50)]).unique(dim=0).shape[0] == 50
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(ValueError, match="split"):
        ComposeDataset(split="test")
    with pytest.raises(ValueError, match="needs >= "):
        ComposeDataset(resolution=16)                            # two large objects cannot fit side by side


def test_dataset_item_format_and_collate():
    ds = ComposeDataset(length=8, seed=0, resolution=48, split="heldout")
    items = [ds[i] for i in range(8)]
    ids = ("original_size", "crop_top_left")                 # the trainer collates these as lists
    batch = torch.utils.data.default_collate([{k: v for k, v in it.items() if k not in ids} for it in items])
    assert batch["image"].shape == (8, 3, 48, 48) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert set(batch["labels"]) == set(HEADS) == set(COLUMNS) and set(batch["attrs"]) == set(COLUMNS)
    for it in items:                                          # SDXL ids: the (48, 48) crop lies inside the original
        (h, w), (top, left) = it["original_size"], it["crop_top_left"]
        assert all(isinstance(v, int) for v in (h, w, top, left))
        assert 48 <= h <= CANVAS_MAX * 48 and 48 <= w <= CANVAS_MAX * 48 and 0 <= top <= h - 48 and 0 <= left <= w - 48
        assert parse_caption(it["caption"]).flat() == it["attrs"]


def test_hydra_data_config_builds_the_dataset():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    ds = instantiate(OmegaConf.load(ROOT / "conf" / "data" / "compose.yaml"), length=4)
    assert isinstance(ds, ComposeDataset) and ds.split == "train" and ds.micro and len(ds) == 4
    assert ds[0]["image"].shape == (3, R, R)


def test_caption_round_trip_over_every_combination():
    every = all_attributes("all")
    assert len(every) == 48 * 47 * 4 and len(set(map(caption, every))) == len(every)
    assert all(parse_caption(caption(a)) == a for a in every)
    a = Attributes(Object("circle", "red", "small"), Object("square", "blue", "large"), "to the left of")
    assert caption(a) == "a small red circle to the left of a large blue square"
    assert parse_caption("  A small red circle to the left of a  large blue square ") == a
    assert a.canonical() == a and dataclasses.replace(a, relation="to the right of").canonical() == \
        Attributes(a.second, a.first, "to the left of")
    for bad in ("a small red circle", "a small red circle left of a large blue square",
                "a huge red circle above a large blue square"):
        with pytest.raises(ValueError, match="expected 'a <size> <colour> <shape> <relation>"):
            parse_caption(bad)
    with pytest.raises(ValueError, match="must differ"):
        parse_caption("a small red circle above a small red circle")


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    pairs = lambda a: {(a.first.shape, a.first.colour), (a.second.shape, a.second.colour)}   # noqa: E731
    ds = ComposeDataset(2000, seed=0, split="train")
    train = [parse_caption(ds[i]["caption"]) for i in range(2000)]
    assert not any(pairs(a) & set(HELDOUT) for a in train)
    assert {(o.shape, o.colour) for a in train for o in (a.first, a.second)} == \
        {(s, c) for s in HEADS["shape1"] for c in HEADS["colour1"]} - set(HELDOUT)   # every seen pair occurs
    held = fixed_prompt_set(2784, seed=0, split="heldout")
    assert len(set(held)) == 2784 and all(pairs(parse_caption(p)) & set(HELDOUT) for p in held)
    seen = fixed_prompt_set(64, seed=0)
    assert seen == fixed_prompt_set(64, seed=0) != fixed_prompt_set(64, seed=1)
    assert not any(pairs(parse_caption(p)) & set(HELDOUT) for p in fixed_prompt_set(6240))
    assert all(ComposeDataset(50, split="heldout")[i]["caption"] in set(held) for i in range(50))

#----------------------------------------------------------------------------
# Geometry in the rendered pixels

def _centroid(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.float().mean(), ys.float().mean()])


def test_relation_holds_in_the_pixels(scenes):
    n_colour = 0
    for scene, image in scenes[0]:
        a = scene.attrs
        axis = 0 if a.relation in RELATIONS[:2] else 1
        sign = -1 if a.relation in CANONICAL else 1              # object 1 before (left / above) or after
        cov = coverage(scene)                                      # (2, h, w) on the canvas
        (top, left) = scene.crop_top_left
        crop = cov[:, top:top + R, left:left + R]
        assert (cov[0] * cov[1]).max() == 0                        # never overlap
        torch.testing.assert_close(crop.sum((1, 2)), cov.sum((1, 2)))   # both whole inside the crop
        border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], 1)
        assert (border == image[:, :1, :1].reshape(3, 1)).all()    # the crop's border is pure background
        c1, c2 = _centroid(crop[0] > 0), _centroid(crop[1] > 0)
        assert sign * (c1 - c2)[axis] > 0 and (c1 - c2)[1 - axis].abs() <= DOMINANCE * (c1 - c2)[axis].abs() + 4
        span = [torch.nonzero(crop[i].amax(axis) > 0)[:, 0] for i in (0, 1)]   # occupied columns / rows
        first, second = (span[0], span[1]) if sign < 0 else (span[1], span[0])
        assert second.min() - first.max() > GAP * R                 # a clear gap along the axis
        if a.first.colour != a.second.colour:                      # the same, read from the colours alone
            n_colour += 1
            near = [(image - torch.tensor(c)[:, None, None]).abs().amax(0) < 0.1 for c in scene.rgb[:2]]
            d = _centroid(near[0]) - _centroid(near[1])
            assert sign * d[axis] > 0 and d[1 - axis].abs() <= DOMINANCE * d[axis].abs() + 4
    assert n_colour > 150


def test_crop_is_a_shift_of_the_centred_composition(scenes):
    for (scene, image), (flat, centred) in zip(*scenes):
        assert flat.original_size == (R, R) and flat.crop_top_left == (0, 0)
        assert dataclasses.replace(scene, original_size=(R, R), crop_top_left=(0, 0)) == flat
        assert torch.equal(centred, render_canvas(flat))           # original == target, crop 0: the frame
        (h, w), (top, left) = scene.original_size, scene.crop_top_left
        assert torch.equal(image, render_canvas(scene)[:, top:top + R, left:left + R])
        sy, sx = top - (h - R) // 2, left - (w - R) // 2            # the crop, in frame pixels
        y0, y1, x0, x1 = max(0, -sy), min(R, R - sy), max(0, -sx), min(R, R - sx)
        torch.testing.assert_close(image[:, y0:y1, x0:x1], centred[:, y0 + sy:y1 + sy, x0 + sx:x1 + sx],
                                   atol=1e-5, rtol=0)
    crops = torch.tensor([s.crop_top_left for s, _ in scenes[0]]).float()
    assert crops.std(0).min() > 2                                   # crops really vary

#----------------------------------------------------------------------------
# Evaluator and metrics

def test_correct_maps_canonical_heads_onto_caption_order():
    every = all_attributes("all")[::37]
    truth = {k: torch.tensor([a.labels()[k] for a in every]) for k in HEADS}
    assert correct(truth, every).all()
    mirrored = [Attributes(a.second, a.first, RELATIONS[RELATIONS.index(a.relation) ^ 1]) for a in every]
    assert correct(truth, mirrored).all()                          # 'A left of B' is 'B right of A'
    flipped = [dataclasses.replace(a, relation=RELATIONS[RELATIONS.index(a.relation) ^ 1]) for a in every]
    ok = correct(truth, flipped)                                   # objects on the wrong sides: relation only
    assert ok[:, :6].all() and not ok[:, 6].any()
    axis = [dataclasses.replace(a, relation=RELATIONS[(RELATIONS.index(a.relation) + 2) % 4]) for a in every]
    assert correct(truth, axis)[:, :6].all() and not correct(truth, axis)[:, 6].any()


@needs_asset
def test_bundled_evaluator_is_accurate_on_fresh_samples(evaluator, fresh):
    assert ASSET.stat().st_size < 3e6
    images, attrs = fresh
    pred = evaluator.predict(images)
    for k in HEADS:
        acc = (pred[k] == torch.tensor([a.labels()[k] for a in attrs])).float().mean().item()
        assert acc >= 0.99, (k, acc)
    assert evaluator.prompt_accuracy(images, attrs)["overall"] >= 0.95
    flipped = [dataclasses.replace(a, relation=RELATIONS[RELATIONS.index(a.relation) ^ 1]) for a in attrs]
    assert evaluator.prompt_accuracy(images, flipped)["relation"] < 0.05


@needs_asset
def test_frechet_distance_of_features(evaluator, fresh):
    f, x = evaluator.features(fresh[0]), real_batch(256, FRESH_SEED + 1, "all")[0]
    assert frechet_distance(f, f) < 1e-6 * f.var(0).sum().item()
    real = frechet_distance(f, evaluator.features(x))          # > 0: the small-N bias of two real sets
    noisy = frechet_distance(f, evaluator.features((x + 0.5 * torch.randn_like(x)).clamp(-1, 1)))
    assert noisy > 1.5 * real > 0


@needs_asset
def test_save_load_round_trip_and_world_check(evaluator, fresh, tmp_path):
    path = tmp_path / "ev.safetensors"
    evaluator.save(str(path))
    torch.testing.assert_close(ComposeEvaluator.load(str(path)).features(fresh[0][:8]),
                               evaluator.features(fresh[0][:8]), rtol=0, atol=0)
    with safetensors.safe_open(str(ASSET), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {"config", "world"} and str(ROOT) not in json.dumps(meta) and "/" not in json.dumps(meta)
    world = json.loads(meta["world"])
    world["gap"] += 0.01                                          # geometry changed: stale weights
    state = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file(state, str(path), metadata={**meta, "world": json.dumps(world)})
    with pytest.raises(ValueError, match="retrain"):
        ComposeEvaluator.load(str(path))


@needs_asset
def test_metrics_registration_scores_real_images(fresh):
    import demo.compose_metrics  # noqa: F401  (registers)
    from lcm.evaluation.metrics import MetricSet
    from lcm.evaluation.prompts import load_prompts
    assert load_prompts("compose", 5).prompts == tuple(fixed_prompt_set(5))
    assert load_prompts("compose_heldout", 5).prompts == tuple(fixed_prompt_set(5, split="heldout"))
    images, attrs = real_batch(128, FRESH_SEED + 2, "train", micro=False)
    prompts = [caption(a) for a in attrs]
    ms = MetricSet(["compose_accuracy", "compose_fd"], {"compose_n_ref": 128})
    feats = ms.features((images + 1) / 2, prompts)
    assert feats["compose_correct"].shape == (128, 7)
    out = ms.reduce(feats, prompts)
    assert out["compose_acc"] >= 0.95 and 0 < out["compose_fd"] < 0.5 * ms.reduce(
        ms.features(torch.rand_like(images), prompts), prompts)["compose_fd"]


def test_train_evaluator_smoke():
    model, loss = train_evaluator(steps=2, batch=4, log_every=0, resolution=32,
                                  model=ComposeEvaluator(32, channels=(8, 8), features=16))
    assert np.isfinite(loss) and not model.training
    assert model.predict(torch.zeros(3, 3, 32, 32))["relation"].shape == (3,)
