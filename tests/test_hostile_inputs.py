"""Hostile sampling inputs: sizes that cannot fit, control characters, a 100k-character prompt, an
empty prompt list, NaN/Inf latents or init images, a decompression-bomb init image. Each is a
one-line ValueError before any work, or a documented behaviour (a warning)."""
import logging
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch

import lcm.sampling.guards as pl
from lcm.pipeline import Pipeline
from models.text import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "demo_teacher.safetensors")
KW = dict(steps=1, output="latent", progress=False, seed=0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_checkpoint(TEACHER)              # the bundled demo: 64x64 default, fast


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024

#----------------------------------------------------------------------------
# Sizes.

def test_a_size_that_cannot_fit_is_refused_before_allocating_with_the_size_needed(pipe):
    rss, t0 = _rss_mb(), time.time()
    with pytest.raises(ValueError) as e:
        pipe("a", height=2**17, width=2**17, **{**KW, "output": "pil"})
    msg = _one_line(e)
    assert "131072x131072" in msg and "needs at least" in msg and "GiB" in msg and "is free" in msg
    assert "VAE decode" in msg and "enable_tiling" in msg
    assert time.time() - t0 < 2 and _rss_mb() - rss < 50             # nothing was allocated


def test_the_memory_check_uses_free_memory_and_counts_what_is_kept(pipe, monkeypatch):
    parts = pl.sampling_memory(pipe, 2, 64, 64, "pil", 1.0)
    need = sum(parts.values())
    monkeypatch.setattr(pl, "available_memory", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"64x64 x 2 image\(s\) needs at least"):
        pipe(["a", "b"], **{**KW, "output": "pil"})
    monkeypatch.setattr(pl, "available_memory", lambda device: need)
    assert len(pipe(["a", "b"], **{**KW, "output": "pil"})) == 2
    latent_only = pl.sampling_memory(pipe, 2, 64, 64, "latent", 1.0)   # no decode: no image terms
    assert set(latent_only) == {"latents", "UNet skips"} and sum(latent_only.values()) < need
    assert pl.sampling_memory(pipe, 1, 64, 64, "latent", 7.5)["UNet skips"] == \
        2 * pl.sampling_memory(pipe, 1, 64, 64, "latent", 1.0)["UNet skips"]   # CFG runs the batch twice
    pipe.vae.enable_tiling(tile_size=4, tile_overlap=1)
    try:
        assert pl.sampling_memory(pipe, 2, 64, 64, "pil", 1.0)["VAE decode"] < parts["VAE decode"]
    finally:
        pipe.vae.tile_size = None


def test_the_estimate_is_a_lower_bound_of_the_real_peak(tmp_path):
    code = f"""
import torch
torch.set_num_threads(1)
from lcm.pipeline import Pipeline
from lcm.sampling.guards import sampling_memory as _sampling_memory
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) * 1024
p = Pipeline.from_checkpoint({TEACHER!r})
p('a', steps=1, height=64, width=64, progress=False)
base = hwm()
p('a', steps=1, height=512, width=512, progress=False, output='tensor')
print(hwm() - base, sum(_sampling_memory(p, 1, 512, 512, 'tensor', 1.0).values()))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    peak, estimate = map(int, r.stdout.split()[-2:])
    assert estimate <= peak, f"estimate {estimate / 2**20:.0f} MiB > measured peak {peak / 2**20:.0f} MiB"


def test_non_integer_sizes_are_named(pipe):
    with pytest.raises(ValueError, match="must be integers"):
        pipe("a", height=64.0, width=64, **KW)

#----------------------------------------------------------------------------
# Prompts.

def test_control_characters_warn_and_behave_as_documented(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        out = pipe("red\x00circle\x1b[31m", **KW)
    assert "control or format characters" in caplog.text and "'\\x00'" in caplog.text
    assert torch.isfinite(out).all()
    # documented (lcm/pipeline.py _warn_control_characters): C0 controls / ANSI escapes are dropped,
    # joining the text around them; tab/newline are whitespace; C1 and zero-width characters stay
    assert torch.equal(tokenize(["red\x00circle\x1b[31m"], 0), tokenize(["redcircle"], 0))
    assert torch.equal(tokenize(["red\tcircle\n"], 0), tokenize(["red circle"], 0))
    assert not torch.equal(tokenize(["red\u200bcircle"], 0), tokenize(["redcircle"], 0))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe("red\tcircle\n", **KW)                          # plain whitespace: no warning
    assert "control" not in caplog.text


def test_a_100k_character_prompt_is_truncated_with_a_warning(pipe):
    long = "a large red circle in the center " * 3100              # ~102k characters
    assert len(long) > 100_000
    t0 = time.time()
    with pytest.warns(UserWarning, match="exceed the 77-token"):
        out = pipe(long, **KW)
    assert time.time() - t0 < 30 and torch.isfinite(out).all()
    head = tokenize([long], 0, warn=False)[0]
    assert head[-1] == 49407 and torch.equal(head[:76], tokenize([long[:400]], 0, warn=False)[0][:76])
    with pytest.warns(UserWarning):
        same = pipe(long[:400], **KW)                             # only the first 75 tokens count
    assert torch.equal(out, same)


@pytest.mark.parametrize("prompt", [[], [None], ["a", 3], ()])
def test_empty_or_non_string_prompt_lists_are_refused(pipe, prompt):
    with pytest.raises(ValueError) as e:
        pipe(prompt, **KW)
    assert "non-empty list of strings" in _one_line(e)


def test_the_empty_prompt_is_a_prompt(pipe):
    assert pipe("", **KW).shape == (1, 4, 16, 16)

#----------------------------------------------------------------------------
# Latents and init images.

def test_latents_with_nan_inf_or_the_wrong_shape_are_named():
    shape = (2, 4, 8, 8)
    pl.check_latents(torch.randn(shape), shape)
    for bad, match in [(torch.full(shape, float("nan")), "512 NaN/Inf"), (torch.randn(1, 4, 16, 16), "shape"),
                       (torch.zeros(shape, dtype=torch.long), "floating-point"), ([0.0], "floating-point")]:
        with pytest.raises(ValueError, match=match) as e:
            pl.check_latents(bad, shape)
        _one_line(e)
    inf = torch.randn(shape)
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="1 NaN/Inf values of 512"):
        pl.check_latents(inf, shape)


def test_pipeline_refuses_nan_latents(pipe):
    with pytest.raises(ValueError, match="NaN/Inf"):
        pipe("a", latents=torch.full((1, 4, 16, 16), float("nan")), **KW)


def _img(*shape, fill=None):
    return torch.rand(*shape) if fill is None else torch.full(shape, fill)


@pytest.mark.parametrize("image,match", [
    (_img(1, 3, 64, 64, fill=float("nan")), "12288 NaN/Inf"),
    (_img(3, 64, 64, fill=float("inf")), "NaN/Inf"),
    (_img(3, 64, 64) * 255, r"must be in \[0, 1\]"),
    (torch.zeros(3, 64, 64, dtype=torch.uint8), "divide by 255"),
    (_img(1, 3, 32, 32), "32x32 .* output is 64x64"),
    (_img(2, 3, 64, 64), r"\(1 or 1, 3, H, W\)"),
    (_img(4, 64, 64), r"\(3, H, W\)"),
    ("image.png", "PIL image or a tensor"),
])
def test_bad_init_images_are_one_line_errors(pipe, image, match):
    with pytest.raises(ValueError, match=match) as e:
        pipe("a", init_image=image, strength=0.5, **{**KW, "steps": 2})
    _one_line(e)


def test_good_init_images_still_work(pipe):
    from PIL import Image
    for image in (_img(3, 64, 64), _img(1, 3, 64, 64), Image.new("RGB", (64, 64), (200, 10, 10))):
        assert pipe("a", init_image=image, strength=0.5, **{**KW, "steps": 2}).shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="NaN/Inf"):         # the converter refuses them too
        pl.as_image_tensor(_img(3, 8, 8, fill=float("nan")))


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (PIL opens it lazily; decoding would explode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                + chunk(b"IEND", b""))


def test_a_decompression_bomb_image_is_refused_without_decoding(pipe, tmp_path):
    import warnings

    from PIL import Image
    path = tmp_path / "bomb.png"
    _png_header_only(path, 12000, 12000)                      # 144 Mpx: PIL only warns, opens lazily
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    rss = _rss_mb()
    with pytest.raises(ValueError, match="12000x12000") as e:
        pipe("a", init_image=img, strength=0.5, **{**KW, "steps": 2})
    _one_line(e)
    assert _rss_mb() - rss < 50                                # 400 MiB of pixels were never decoded
    _png_header_only(path, 20000, 20000)                      # 400 Mpx: PIL refuses at open
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


@pytest.mark.slow
def test_sample_py_decompression_bomb_is_one_line(tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, 20000, 20000)
    r = subprocess.run([sys.executable, "sample.py", f"init_image={path}", "steps=2", f"out_dir={tmp_path}/out"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "bomb.png" in r.stderr, r.stderr[-2000:]
