"""data=tars through webdataset (lcm/data/): brace lists, pipe: commands, node and worker splits,
resampling, LAION columns and filters, corrupt samples skipped and counted, and the resume
position of the streamed path (batch j after a resume is batch j of an uninterrupted run)."""
import io
import itertools
import json
import os

import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from lcm.data.build import first_captions, make_loader, tar_data
from lcm.data.order import hash_seed
from lcm.data.sources import ImageColumns, SkipSample, TarShards, expand_urls
from lcm.data.webshards import WebShards
from lcm.training import loop
from lcm.training.validation import ValidationConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(fmt="PNG", size=(24, 20), color=(200, 0, 0)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _shard(path, samples: list[dict]) -> str:
    """A webdataset tar written with webdataset's TarWriter; samples: {__key__, ext: bytes | str}."""
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write({k: v.encode() if isinstance(v, str) else v for k, v in s.items() if k != "__key__"}
                    | {"__key__": s["__key__"]})
    return str(path)


def _shards(folder, n_shards: int, per_shard: int) -> list[str]:
    """shard-000.tar ... with samples s{shard}-{i} (png + txt 'caption {shard}-{i}')."""
    os.makedirs(folder, exist_ok=True)
    return [_shard(os.path.join(folder, f"shard-{s:03d}.tar"),
                   [{"__key__": f"s{s}-{i}", "png": _image(color=(s * 40, i * 20, 0)), "txt": f"caption {s}-{i}"}
                    for i in range(per_shard)]) for s in range(n_shards)]


def _captions(batches) -> list[str]:
    return [c for b in batches for c in b["caption"]]


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]

#----------------------------------------------------------------------------
# URL forms.

def test_brace_lists_pipe_commands_and_globs(tmp_path):
    paths = _shards(tmp_path, 4, 2)
    braces = str(tmp_path / "shard-{000..003}.tar")
    assert expand_urls(braces) == paths == expand_urls(str(tmp_path / "shard-*.tar"))
    assert expand_urls(f"{paths[0]}::{paths[1]}") == paths[:2]
    assert expand_urls(f"pipe:cat {braces}") == [f"pipe:cat {p}" for p in paths]
    local = tar_data(braces, resolution=16)                      # local: indexed (exact resume, any world size)
    assert isinstance(local, TarShards) and len(local) == 8
    for urls in (f"pipe:cat {braces}", [braces]):                # pipe: streamed; local forced with streaming=true
        ws = tar_data(urls, resolution=16, shuffle_buffer=0, streaming=True if isinstance(urls, list) else "auto")
        assert isinstance(ws, WebShards)
        assert sorted(_captions(_take(make_loader(ws, 2, shuffle=False), 4))) == sorted(
            f"caption {s}-{i}" for s in range(4) for i in range(2))
    assert first_captions(ws, 3) == ["caption 0-0", "caption 0-1", "caption 1-0"]
    with pytest.raises(ValueError, match="not a local path"):
        tar_data(f"pipe:cat {braces}", streaming=False)


def test_hydra_data_tars_composes_to_the_right_path(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    _shards(tmp_path, 2, 1)
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        for urls, cls in ((f"{tmp_path}/shard-{{000..001}}.tar", TarShards),
                          (f"pipe:cat {tmp_path}/shard-{{000..001}}.tar", WebShards)):
            cfg = compose("train", overrides=["data=tars", f"data.urls='{urls}'", "data.resolution=16"])
            assert isinstance(instantiate(cfg.data, _convert_="all"), cls)
        cfg = compose("train", overrides=["data=tars", f"data.urls='{tmp_path}/shard-*.tar'", "data.resampled=true"])
        assert instantiate(cfg.data, _convert_="all").resampled

#----------------------------------------------------------------------------
# What each rank and worker reads.

def _epoch0(ws, rank, world, worker, workers) -> list[str]:
    """The shards of (rank, worker) in epoch 0."""
    ws = ws.configured(1, seed=5, rank=rank, world=world)
    out = []
    for epoch, url, split in ws.plan(worker, workers):
        if epoch != 0:
            return out
        out.append(url)


def test_node_and_worker_splits_are_disjoint_and_cover_every_shard(tmp_path):
    urls = _shards(tmp_path, 7, 1)
    ws = WebShards(urls, ImageColumns(16))
    got = [_epoch0(ws, r, 2, w, 3) for r in range(2) for w in range(3)]
    assert sorted(u for g in got for u in g) == sorted(urls) and all(got)   # disjoint, covering, none idle
    other = WebShards(urls, ImageColumns(16)).configured(1, seed=5)
    first = [url for epoch, url, _ in itertools.islice(other.plan(), 14)]
    assert sorted(first[:7]) == sorted(first[7:]) == sorted(urls) and first[:7] != first[7:]   # reshuffled per epoch


def test_fewer_shards_than_slots_split_samples(tmp_path):
    urls = _shards(tmp_path, 3, 5)                                  # 15 samples, 4 slots: every slot reads all
    ws = WebShards(urls, ImageColumns(16), shuffle_buffer=0)
    seen = []
    for rank in range(2):
        for worker in range(2):
            slot = ws.configured(1, seed=1, rank=rank, world=2)
            n = 4 if rank * 2 + worker < 3 else 3                    # 15 = 4 + 4 + 4 + 3 in epoch 0
            seen += [s["__key__"] for s, _, _ in itertools.islice(slot.usable(worker, 2), n)]
    assert sorted(seen) == sorted(f"s{s}-{i}" for s in range(3) for i in range(5))


def test_dataloader_workers_interleave_the_per_worker_streams(tmp_path):
    """With W DataLoader workers batch k comes from worker k % W; each worker's batches are the pure
    function batches(worker, W) (what the resume position relies on)."""
    urls = _shards(tmp_path, 5, 3)
    ws = WebShards(urls, ImageColumns(16), shuffle_buffer=4)
    got = _take(make_loader(ws, 2, seed=3, rank=1, world_size=2, num_workers=2), 6)
    pure = ws.configured(2, seed=3, rank=1, world=2)
    per = [itertools.islice(pure.batches(w, 2), 3) for w in range(2)]
    per = [list(p) for p in per]
    want = [per[k % 2][k // 2] for k in range(6)]
    assert [b["caption"] for b in got] == [b["caption"] for b in want]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want))
    ws = WebShards(urls, ImageColumns(16), shuffle_buffer=0)       # epoch 0: rank 1 reads 2 shards, rank 0 3
    r0, r1 = (_captions(_take(make_loader(ws, 1, seed=3, rank=r, world_size=2, num_workers=2), 6)) for r in range(2))
    assert len(set(r1)) == 6 and not set(r0) & set(r1)               # disjoint shards per rank

#----------------------------------------------------------------------------
# Resampling.

def test_resampled_stream_is_endless_and_seeded(tmp_path):
    urls = _shards(tmp_path, 2, 3)                                  # 6 samples
    def keys(seed, rank=0):
        ws = WebShards(urls, ImageColumns(16), resampled=True, shuffle_buffer=3).configured(1, seed=seed, rank=rank,
                                                                                            world=2)
        return [s["__key__"] for s, _, _ in itertools.islice(ws.stream(), 40)]
    a = keys(0)
    assert len(a) == 40 and set(a) <= {f"s{s}-{i}" for s in range(2) for i in range(3)}   # endless
    assert a == keys(0) and a != keys(1) and a != keys(0, rank=1)   # seeded, per rank
    ws = tar_data(urls, resolution=16, resampled=True)
    assert isinstance(ws, WebShards) and len(_take(make_loader(ws, 4), 5)) == 5

#----------------------------------------------------------------------------
# LAION columns and filters; corrupt samples.

def _laion(tmp_path) -> str:
    meta = lambda w, h, p, **kw: json.dumps(dict(original_width=w, original_height=h, pwatermark=p, **kw))
    return _shard(tmp_path / "laion.tar", [
        {"__key__": "a", "jpg": _image("JPEG"), "txt": "a from txt", "json": meta(1024, 768, 0.1)},
        {"__key__": "b", "webp": _image("WEBP"), "json": meta(2048, 2048, 0.2, caption="b from json")},
        {"__key__": "c", "png": _image(), "caption": "c from caption", "json": meta(300, 900, 0.05)},  # small
        {"__key__": "d", "jpeg": _image("JPEG"), "json": meta(4000, 3000, 0.9, text="d watermarked")},
        {"__key__": "e", "png": _image(size=(600, 520)), "txt": "e no json"},    # no pwatermark: 1.0
        {"__key__": "f", "txt": "f has no image"},
    ])


def test_laion_columns_and_filters(tmp_path):
    path = _laion(tmp_path)
    plain = TarShards(path, resolution=16)                          # the image-less sample is not indexed
    items = {plain.items[i][1]: plain.get(i, None) for i in range(len(plain))}
    assert {k: v["caption"] for k, v in items.items()} == {
        "a": "a from txt", "b": "b from json", "c": "c from caption", "d": "d watermarked", "e": "e no json"}
    assert items["a"]["original_size"] == (768, 1024) and items["e"]["original_size"] == (520, 600)  # json, else image
    filt = TarShards(path, resolution=16, min_size=512, max_pwatermark=0.5)
    reasons = {}
    for i in range(len(filt)):
        try:
            filt.get(i, None)
        except SkipSample as e:
            reasons[filt.items[i][1]] = str(e)
    assert set(reasons) == {"c", "d", "e"} and "min_size" in reasons["c"] and "pwatermark" in reasons["d"]
    ws = tar_data(f"pipe:cat {path}", resolution=16, min_size=512, max_pwatermark=0.5, shuffle_buffer=0)
    b, = _take(make_loader(ws, 2, shuffle=False), 1)                # a, b kept; c d e f rejected before them
    assert b["caption"] == ["a from txt", "b from json"] and b["skipped"] == 0
    b2, = _take(make_loader(ws, 2, shuffle=False, start_step=1), 1) # next pass: c, d, e, f counted, then a, b
    assert b2["caption"] == ["a from txt", "b from json"] and b2["skipped"] == 4
    assert b["original_size"] == [(768, 1024), (2048, 2048)]


def test_corrupt_samples_and_failing_shards_are_skipped_and_counted(tmp_path):
    good = _shards(tmp_path / "good", 1, 4)[0]
    bad = _shard(tmp_path / "bad.tar", [
        {"__key__": "x0", "png": b"not a png", "txt": "corrupt image"},          # decoded: substituted in its batch
        {"__key__": "x1", "png": _image(), "txt": "  "},                          # empty caption: rejected
        {"__key__": "x2", "png": _image(), "txt": "fine"}])
    raw = open(good, "rb").read()
    (tmp_path / "trunc.tar").write_bytes(raw[:len(raw) // 2 + 700])         # truncated inside a member
    urls = [f"pipe:cat {bad}", f"pipe:cat {tmp_path}/trunc.tar", "pipe:exit 1", str(tmp_path / "missing.tar")]
    ws = tar_data(urls, resolution=16, shuffle_buffer=0)
    batches = _take(make_loader(ws, 2, shuffle=False), 3)
    caps = _captions(batches)
    assert "corrupt image" not in caps and "  " not in caps and "fine" in caps
    assert caps == ["fine", "fine", "caption 0-0", "caption 0-1", "fine", "fine"]   # x0 replaced by x2, its batch's
    assert [b["skipped"] for b in batches[:2]] == [2, 0]             # x1 (caption) + x0 (image)
    assert batches[2]["skipped"] >= 5                                # truncated, exit 1, missing shards; x1, x0 again
    dead = tar_data([f"pipe:cat {bad}"], resolution=16, shuffle_buffer=0)
    dead.columns.decode = lambda *a: (_ for _ in ()).throw(SkipSample("all corrupt"))
    with pytest.raises(RuntimeError, match="consecutive corrupt"):
        _take(make_loader(dead, 2), 1)
    with pytest.raises(RuntimeError, match="no samples"):
        _take(make_loader(tar_data(["pipe:exit 1"], resolution=16), 2), 1)

#----------------------------------------------------------------------------
# Resume: batch j after a resume at step s is batch s + j of the uninterrupted stream.

@pytest.mark.parametrize("workers", [0, 2])
def test_resume_position_is_exact(tmp_path, workers):
    urls = _shards(tmp_path, 4, 5)
    urls[1] = _shard(tmp_path / "shard-001.tar", [{"__key__": "z", "png": b"junk", "txt": "junk"},
                                                   *({"__key__": f"s1-{i}", "png": _image(), "txt": f"caption 1-{i}"}
                                                     for i in range(4))])
    ws = tar_data(f"pipe:cat {tmp_path}/shard-{{000..003}}.tar", resolution=16, crop="random", flip=True,
                  shuffle_buffer=6)
    full = _take(make_loader(ws, 3, seed=7, num_workers=workers), 9)    # crosses epochs (20 samples, 2 slots)
    for start in (1, 4):
        resumed = _take(make_loader(ws, 3, seed=7, start_step=start, num_workers=workers), 9 - start)
        for a, b in zip(full[start:], resumed):
            assert a["caption"] == b["caption"] and torch.equal(a["index"], b["index"]) and a["skipped"] == b["skipped"]
            assert torch.equal(a["image"], b["image"])               # random crops and flips too
    fast = tar_data(f"pipe:cat {tmp_path}/shard-{{000..003}}.tar", resolution=16, shuffle_buffer=6, exact_resume=False)
    a, b = (_take(make_loader(fast, 3, seed=s, start_step=t, num_workers=workers), 3)   # nothing re-read: a fresh
            for s, t in ((7, 4), (hash_seed(7, "resumed", 4), 0)))                     # order seeded by the step
    assert [x["caption"] for x in a] == [x["caption"] for x in b]


def test_training_resumed_on_a_stream_equals_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from lcm.objectives.base import LoRAConfig
    from lcm.objectives.lcd_lora import LCDLoRA
    from train import build_pipeline
    model = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)
    _shards(tmp_path, 3, 3)
    ws = tar_data(f"pipe:cat {tmp_path}/shard-{{000..002}}.tar", resolution=32, shuffle_buffer=4)

    def run(name, steps, resume=None):
        cfg = loop.TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, log_every=1, checkpoint_every=2)
        v = ValidationConfig(every=steps, steps=[1], teacher_steps=2, guidance=[1.0])
        out = loop.train(build_pipeline(model), ws, cfg, str(tmp_path / name),
                         LCDLoRA(lora=LoRAConfig(rank=4, alpha=4)), resume=resume, validation=v)
        return load_file(out["export"])
    a = run("full", 4)
    b = run("resumed", 4, resume=str(tmp_path / "full" / "checkpoints" / "step_0000002"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # bit for bit on CPU
