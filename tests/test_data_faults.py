"""Training-data faults: a shard deleted or truncated mid-run, an image of 20k x 20k pixels (and
other oversized images), captions in a broken encoding. Each is a skipped, counted sample (the
trainer's `skipped_samples`), never fatal."""
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import pytest

from lcm.data.order import TrainData
from lcm.data.sources import ImageFolder, SkipSample, TarShards, load_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(size=(40, 24), color=(200, 0, 0)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (cheap to write; decoding it would explode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _shard(path, n: int, first: int = 0) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(first, first + n):
            for name, data in ((f"s{i:04d}.png", _png(color=(i % 256, 0, 0))), (f"s{i:04d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _all(ds: TrainData) -> list[dict]:
    return [ds[k] for k in range(len(ds))]

#----------------------------------------------------------------------------
# Shards.

def test_a_shard_deleted_mid_run_is_skipped_and_counted(tmp_path):
    _shard(tmp_path / "a.tar", 4)
    _shard(tmp_path / "b.tar", 40, first=4)                        # more than the next-index substitutes
    ds = TrainData(TarShards(str(tmp_path / "*.tar"), resolution=16), seed=1)
    assert ds[0]["caption"] == "image 0" and ds[10]["caption"] == "image 10"   # both shards opened
    os.remove(tmp_path / "b.tar")
    ds.source._open.clear()                                        # a worker that opens it afresh
    items = _all(ds)
    assert all(it["index"] < 4 for it in items)                    # every sample now comes from a.tar
    assert sum(it["skipped"] for it in items) >= 40                # ... and each substitution was counted
    assert max(it["skipped"] for it in items) < TrainData.MAX_SKIPS
    _shard(tmp_path / "b.tar", 40, first=4)                        # back again: read again
    assert ds[10]["skipped"] == 0 and ds[10]["caption"] == "image 10"


def test_a_shard_truncated_mid_run_is_skipped_and_counted(tmp_path):
    _shard(tmp_path / "a.tar", 30)
    ds = TrainData(TarShards(str(tmp_path / "a.tar"), resolution=16))
    assert ds[0]["skipped"] == 0                                   # the open handle is cached
    with open(tmp_path / "a.tar", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "a.tar") // 2)
    items = _all(ds)
    ok = {it["index"] for it in items}
    assert 0 in ok and max(ok) < 20                                # the first half reads; the rest is skipped
    assert sum(it["skipped"] for it in items) >= 10


def test_broken_tar_captions_are_skipped(tmp_path):
    with tarfile.open(tmp_path / "c.tar", "w") as tf:
        for name, data in (("a.png", _png()), ("a.txt", "caf\xe9".encode("latin-1")),
                           ("b.png", _png()), ("b.json", b"{not json"),
                           ("c.png", _png()), ("c.json", json.dumps({"caption": "fine"}).encode()),
                           ("d.png", _png()), ("d.json", b"[1, 2]")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = TarShards(str(tmp_path / "c.tar"), resolution=16)
    for i, match in ((0, "not UTF-8"), (1, "broken .json"), (3, "empty caption")):
        with pytest.raises(SkipSample, match=match):
            src.get(i, None)
    items = _all(TrainData(src))
    assert {it["caption"] for it in items} == {"fine"} and sum(it["skipped"] for it in items) >= 3

#----------------------------------------------------------------------------
# Oversized images.

@pytest.mark.parametrize("w,h,why", [(20000, 20000, "DecompressionBombError"),  # PIL refuses it at open
                                     (9000, 9000, "9000x9000 pixels is over data.max_pixels")])  # under PIL's limit
def test_a_huge_image_is_skipped_from_its_header(w, h, why):
    t0 = time.time()
    with pytest.raises(SkipSample, match=why):
        load_image(_png_header_only(w, h), 16, "center", None)
    assert time.time() - t0 < 1                                    # nothing was decoded


def test_max_pixels_is_a_setting_and_images_under_it_load(tmp_path):
    (tmp_path / "big.png").write_bytes(_png((40, 24)))
    (tmp_path / "big.txt").write_text("big")
    (tmp_path / "small.png").write_bytes(_png((8, 8)))
    (tmp_path / "small.txt").write_text("small")
    ds = TrainData(ImageFolder(str(tmp_path), resolution=8, max_pixels=100))
    items = _all(ds)
    assert {it["caption"] for it in items} == {"small"} and sum(it["skipped"] for it in items) == 1
    assert TrainData(ImageFolder(str(tmp_path), resolution=8))[0]["caption"] == "big"

#----------------------------------------------------------------------------
# Captions in a broken encoding; files vanishing from a folder.

def test_non_utf8_captions_are_skipped_and_a_bom_is_fine(tmp_path):
    for name, raw in (("latin", "caf\xe9 au lait".encode("latin-1")), ("utf16", "hello".encode("utf-16")),
                      ("bom", "\ufeffwith bom".encode("utf-8")), ("ok", "plain".encode())):
        (tmp_path / f"{name}.png").write_bytes(_png())
        (tmp_path / f"{name}.txt").write_bytes(raw)
    src = ImageFolder(str(tmp_path), resolution=16)
    items = _all(TrainData(src))
    assert {it["caption"] for it in items} == {"with bom", "plain"}
    assert sum(it["skipped"] for it in items) == 2


def test_metadata_jsonl_with_a_broken_line_skips_that_sample(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png())
    lines = [json.dumps({"file_name": "0.png", "text": "zero"}).encode(),
             b'{"file_name": "1.png", "text": "caf\xe9"}',               # latin-1 byte in a UTF-8 file
             json.dumps({"file_name": "2.png", "text": "two"}).encode()]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    src = ImageFolder(str(tmp_path), resolution=16)
    with pytest.raises(SkipSample, match=r"metadata.jsonl:2: caption is not UTF-8"):
        src.get(1, None)
    items = _all(TrainData(src))
    assert {it["caption"] for it in items} == {"zero", "two"} and sum(it["skipped"] for it in items) == 1
    (tmp_path / "metadata.jsonl").write_bytes(lines[0] + b"\n{oops\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not a JSON object"):
        ImageFolder(str(tmp_path), resolution=16)


def test_images_and_captions_vanishing_from_a_folder_are_skipped(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(_png())
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    ds = TrainData(ImageFolder(str(tmp_path), resolution=16))
    os.remove(tmp_path / "1.png")
    os.remove(tmp_path / "2.txt")
    items = _all(ds)
    assert {it["index"] for it in items} == {0, 3}
    assert [it["skipped"] for it in items] == [0, 2, 1, 0]         # key 1 tries 1 and 2, key 2 tries 2

#----------------------------------------------------------------------------
# End to end: the trainer logs the skips and is not stopped by them.

@pytest.mark.slow
def test_training_on_a_faulty_folder_logs_skipped_samples(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"{i}.png").write_bytes(_png((32, 32), (40 * i, 0, 0)))
        (data / f"{i}.txt").write_text(f"a red circle {i}")
    (data / "1.txt").write_bytes("caf\xe9".encode("latin-1"))      # broken encoding
    (data / "2.png").write_bytes(_png_header_only(20000, 20000))     # a decompression bomb
    (data / "3.png").write_bytes(_png((32, 32))[:50])                # truncated
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "experiment=smoke", "data=folder", f"data.root={data}",
                        "data.resolution=32", "train.max_steps=2", "train.batch_size=4", "train.log_every=1",
                        "validation.every=0", "logger=none", f"hydra.run.dir={run}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert sum(row["skipped_samples"] for row in rows) >= 3
