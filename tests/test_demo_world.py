"""Demo world: deterministic dataset, caption grammar, bundled evaluator, Frechet distance."""

import dataclasses
import itertools
import json
import pathlib

import numpy as np
import pytest
import safetensors.torch
import torch

from demo.evaluator import DemoEvaluator, feature_stats, frechet_distance, train_batch, train_evaluator
from demo.world import (BACKGROUNDS, COLOURS, CONTENT, POSITIONS, VOCAB, Attributes, DemoDataset,
                            caption, fixed_prompt_set, parse_caption, real_batch, render, sample)

ASSET = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo_evaluator.safetensors"
FRESH_SEED = 12345                         # the evaluator was trained on world seed 0


@pytest.fixture(scope="module")
def evaluator():
    return DemoEvaluator.load(str(ASSET))


@pytest.fixture(scope="module")
def real():
    return real_batch(256, FRESH_SEED)[0], real_batch(256, FRESH_SEED + 1)[0]

#----------------------------------------------------------------------------
# Dataset

def test_samples_are_a_pure_function_of_seed_and_index():
    ds = DemoDataset(length=50, seed=3, style="both", style_word=True)
    again = DemoDataset(length=50, seed=3, style="both", style_word=True)
    for i in (0, 7, 49):
        a, b = ds[i], again[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    other_world = DemoDataset(length=50, seed=4, style="both", style_word=True)
    assert not torch.equal(ds[0]["image"], other_world[0]["image"])
    images = torch.stack([ds[i]["image"] for i in range(50)])
    assert images.unique(dim=0).shape[0] == 50         # jitter: no two samples alike
    with pytest.raises(IndexError):
        ds[50]


def test_dataset_item_format_and_collate():
    ds = DemoDataset(length=8, seed=0, style="outlined", resolution=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert all(a == "outlined" for a in batch["attrs"]["style"])
    assert not any("outlined" in c for c in batch["caption"])     # style LoRA data: content captions
    assert set(batch["labels"]) == set(VOCAB) and batch["labels"]["shape"].shape == (8,)
    with pytest.raises(ValueError, match="style_word"):
        DemoDataset(style="both")


def test_caption_round_trip_over_every_combination():
    n = 0
    for values in itertools.product(*VOCAB.values()):
        a = dict(zip(VOCAB, values))
        if a["background"] == a["colour"]:
            with pytest.raises(ValueError, match="vanish"):
                Attributes(**a)
            continue
        attrs = Attributes(**a)
        assert parse_caption(caption(attrs, style_word=True)) == attrs
        assert parse_caption(caption(attrs)) == dataclasses.replace(attrs, style="plain")
        n += 1
    assert n == 4 * 2 * 5 * (6 * 4 - 1) * 2             # shapes, sizes, positions, colour/bg pairs, styles
    assert caption(Attributes("circle", "red", "small", "top left", "blue")) == \
        "a small red circle at the top left on a blue background"
    with pytest.raises(ValueError, match="not a demo-world caption"):
        parse_caption("a small red circle")


def test_fixed_prompt_set_is_deterministic_distinct_and_parses():
    p = fixed_prompt_set(64, seed=0)
    assert p == fixed_prompt_set(64, seed=0) and p != fixed_prompt_set(64, seed=1)
    assert len(set(p)) == 64 and all(parse_caption(c).style == "plain" for c in p)
    assert len(set(fixed_prompt_set(920))) == 920 and fixed_prompt_set(921)[-1] == p[0]


def _shape_mask(attrs, image):
    bg = torch.tensor([c / 127.5 - 1 for c in BACKGROUNDS[attrs.background]])
    return (image - bg[:, None, None]).abs().amax(0) > 0.3          # (H, W) pixels not background


def test_rendered_attributes_are_unambiguous():
    areas = {}
    for i in range(400):
        attrs, image = sample(0, i, "both")
        assert attrs.background != attrs.colour
        mask = _shape_mask(attrs, image)
        border = torch.cat([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert mask.any() and not border.any()                   # whole shape inside the frame
        ys, xs = torch.nonzero(mask, as_tuple=True)              # bounding-box centre ~ position
        centre = torch.tensor([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / (2 * 64)
        assert (centre - torch.tensor(POSITIONS[attrs.position])).abs().max() < 0.06
        if attrs.style == "plain":                               # the shape is its colour
            fg = torch.tensor([c / 127.5 - 1 for c in COLOURS[attrs.colour]])
            centre_px = image[:, int(centre[1] * 64), int(centre[0] * 64)]
            assert (centre_px - fg).abs().max() < 0.1
        areas.setdefault((attrs.shape, attrs.style, attrs.size), []).append(mask.sum().item())
    for shape, style in itertools.product(VOCAB["shape"], VOCAB["style"]):
        small, large = areas[(shape, style, "small")], areas[(shape, style, "large")]
        assert max(small) < min(large)                           # sizes do not overlap


@pytest.mark.parametrize("shape", VOCAB["shape"])
def test_outlined_is_a_hollow_plain_shape(shape):
    for size in VOCAB["size"]:
        plain = Attributes(shape, "red", size, "center", "white")
        outlined = dataclasses.replace(plain, style="outlined")
        m_plain, m_out = _shape_mask(plain, render(plain)), _shape_mask(outlined, render(outlined))
        assert not (m_out & ~m_plain).any() and m_out.sum() < 0.9 * m_plain.sum()
        ys, xs = torch.nonzero(m_plain, as_tuple=True)           # centroid: inside the hole
        assert not m_out[ys.float().mean().round().long(), xs.float().mean().round().long()]


def test_render_resolution_is_a_parameter():
    attrs = Attributes("triangle", "green", "large", "center", "white", "outlined")
    small, big = render(attrs, 32), render(attrs, 128)
    assert small.shape == (3, 32, 32) and big.shape == (3, 128, 128)
    down = torch.nn.functional.avg_pool2d(big[None], 4)[0]      # same geometry at any resolution
    assert (down - small).abs().mean() < 0.05

#----------------------------------------------------------------------------
# Evaluator

def test_bundled_evaluator_is_accurate_on_fresh_samples(evaluator):
    assert ASSET.stat().st_size < 2e6
    x, y = train_batch(FRESH_SEED, 0, 256, 64)                   # both styles, unseen world seed
    pred = evaluator.predict(x)
    for k in VOCAB:
        assert (pred[k] == y[k]).float().mean() >= 0.97, k


def test_prompt_and_style_accuracy(evaluator):
    prompts = fixed_prompt_set(32, seed=5)
    attrs = [parse_caption(p) for p in prompts]
    images = torch.stack([render(a, 64) for a in attrs])
    acc = evaluator.prompt_accuracy(images, prompts)
    assert set(acc) == {*CONTENT, "overall"} and acc["overall"] >= 0.95
    assert evaluator.prompt_accuracy(images, attrs) == acc      # Attributes work as prompts too
    wrong = evaluator.prompt_accuracy(images, prompts[1:] + prompts[:1])
    assert wrong["overall"] < 0.2
    outlined = torch.stack([render(dataclasses.replace(a, style="outlined"), 64) for a in attrs])
    assert evaluator.style_accuracy(images, "plain") >= 0.95
    assert evaluator.style_accuracy(outlined, "outlined") >= 0.95
    big = torch.nn.functional.interpolate(images, size=128, mode="bilinear")
    assert evaluator.prompt_accuracy(big, prompts)["overall"] >= 0.95   # other sizes are resized


def test_save_load_round_trip_and_vocab_check(evaluator, tmp_path):
    path = tmp_path / "ev.safetensors"
    evaluator.save(str(path))
    x = real_batch(8, FRESH_SEED)[0]
    torch.testing.assert_close(DemoEvaluator.load(str(path)).features(x), evaluator.features(x),
                               rtol=0, atol=0)
    state = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    world = json.loads(meta["world"])
    world["sizes"]["large"] += 0.01                              # geometry changed: stale weights
    safetensors.torch.save_file(state, str(path), metadata={**meta, "world": json.dumps(world)})
    with pytest.raises(ValueError, match="retrain"):
        DemoEvaluator.load(str(path))


def test_train_evaluator_smoke():
    model, loss = train_evaluator(steps=2, batch=4, log_every=0,
                                  model=DemoEvaluator(32, channels=(8, 8), features=16))
    assert np.isfinite(loss) and not model.training
    assert model.predict(torch.zeros(3, 3, 32, 32))["colour"].shape == (3,)

#----------------------------------------------------------------------------
# Frechet distance

def _frechet_numpy(a, b):
    """Reference: d^2 with tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of S1 S2."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


def test_frechet_matches_numpy_reference_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    b = torch.randn(400, 16, generator=g) * 0.7 + 0.3
    d = frechet_distance(a, b)
    assert d == pytest.approx(_frechet_numpy(a.numpy(), b.numpy()), rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(d, rel=1e-8)
    assert frechet_distance(feature_stats(a), feature_stats(b)) == d
    mu = torch.randn(16, generator=g)                           # pure shift: |mu|^2 exactly
    assert frechet_distance(a, a + mu) == pytest.approx(mu.double().square().sum().item(), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8 * feature_stats(a).sigma.trace().item()


def test_frechet_distance_separates_real_from_corrupted(evaluator, real):
    a, b = (evaluator.features(x) for x in real)
    fd_real = frechet_distance(a, b)                            # two independent real sets
    assert frechet_distance(a, a) < 1e-6 * feature_stats(a).sigma.trace().item()
    perm = evaluator.features(real[1][:, [2, 0, 1]])            # colours shuffled: RGB -> BRG
    noise = evaluator.features(torch.randn(256, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert frechet_distance(a, perm) > 2 * fd_real              # measured 2.7x at n=256, 7x at 1024
    assert frechet_distance(a, noise) > 10 * fd_real            # measured 25x at n=256
