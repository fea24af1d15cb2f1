"""Training data: image folders with captions, webdataset shards (local files, URLs, pipe: commands),
the latent shards the encode step writes, and a deterministic resumable order (docs/users.md
Sec. 6-7, docs/scale.md).

Every image source yields dict(image (3,H,W) in [-1,1], caption str, original_size (h, w),
crop_top_left (top, left)); a latent source (data=latents) yields, in place of the image, what the
encode step computed from it: mean, std (C,h,w) of the VAE posterior, context (77,D), pooled (P,)
or None, and size (H, W) of the image they came from. Unusable samples (corrupt, vanished or
oversized image, empty or non-UTF-8 caption, filtered out by data.min_size / data.max_pwatermark,
a shard deleted, truncated or failing mid-run) are skipped and counted (the trainer logs
`skipped_samples`), never fatal.

Two ways to read shards, chosen by what they allow (data.streaming=auto picks; docs/scale.md):
- Indexed (map-style Datasets): local folders, tar paths, globs and brace lists (ImageFolder,
  TarShards, LatentShards). Every member is indexed once at start, so the order of samples is a
  pure function of (seed, position) (StepSampler): a run resumes at the exact sample it stopped on,
  and a global batch is the same whatever the number of processes (rank r takes the r-th slice).
- Streamed (an IterableDataset, lcm.webshards.WebShards, read through the webdataset library): pipe: commands,
  http(s)/s3/gs URLs, data.resampled=true or data.streaming=true. Such shards cannot be indexed
  without reading all of them, so each (rank, DataLoader worker) reads shards of its own: in epoch e
  the shards in randperm(seed, e), rank r every world-th, worker w every W-th of those (fewer
  shards than world * W: every worker reads all and keeps every (world*W)-th sample); resampled,
  worker slot s draws shards with replacement from a generator seeded by (seed, s), an endless
  stream. A seeded shuffle buffer mixes samples. Batch j of a worker is the samples j*B .. j*B+B-1
  of its filtered stream (a corrupt image is replaced by another sample of that batch), so the
  position after s steps is a function of s alone: resume re-reads, without decoding, the samples
  each worker had consumed and continues exactly there, given the same world size and
  train.num_workers (other counts read another, equally valid, order).
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from glob import glob
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset

from lcm.conditioning import ZERO_UNCOND_FAMILIES, unconditional, with_vector
from models.text import Conditioning
from solvers.noise import randn

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 2**26                                      # 67 Mpx (8192^2): larger images are skipped undecoded
CAPTION_KEYS = ("text", "caption", "prompt")            # metadata.jsonl / tar json caption fields
IMAGE_COLUMNS = ("jpg", "png", "jpeg", "webp")          # a shard sample's image: the first of these (LAION order)
TEXT_COLUMNS = ("txt", "caption")                       # its caption: the first of these, else the json's field
LATENT_FORMAT = "lcm-latents/1"                         # manifest.json "format" of the encode step's output


class SkipSample(Exception):
    """A sample that cannot be used (corrupt image, empty caption); the loader takes the next."""


def decode_caption(raw: bytes) -> str:
    """Caption file bytes -> text (UTF-8, a BOM allowed); another encoding is a skipped sample."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipSample(f"caption is not UTF-8 ({e.reason} at byte {e.start})") from None

#----------------------------------------------------------------------------
# Image preprocessing: resize the short side, crop a square, optionally flip (SDXL micro-cond ids).

def load_image(data: bytes | str, resolution: int, crop: str, rng: random.Random, flip: bool = False,
               max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Image file or bytes -> (image (3,R,R) in [-1,1], original (h, w), crop (top, left)).

    An image over max_pixels (a decompression bomb, a 20k x 20k scan) is skipped from its header,
    before anything is decoded."""
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():                     # the max_pixels guard below is ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        if img.size[0] * img.size[1] > max_pixels:
            raise SkipSample(f"image of {img.size[0]}x{img.size[1]} pixels is over data.max_pixels={max_pixels}")
        img.load()
        img = img.convert("RGB")
    except SkipSample:
        raise
    except Exception as e:                                  # PIL raises many types on broken files
        raise SkipSample(f"unreadable image: {type(e).__name__}: {e}") from None
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    if crop == "center":
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    elif crop == "random":
        top, left = rng.randint(0, nh - resolution), rng.randint(0, nw - resolution)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0, (h, w), (top, left)


def image_header_size(data: bytes) -> tuple[int, int]:
    """(h, w) of an image from its header alone (nothing decoded)."""
    import warnings

    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = Image.open(io.BytesIO(data)).size
    except Exception as e:
        raise SkipSample(f"unreadable image: {type(e).__name__}: {e}") from None
    return h, w


def _caption(text) -> str:
    text = "" if text is None else str(text).strip()
    if not text:
        raise SkipSample("empty caption")
    return text

#----------------------------------------------------------------------------
# Shard URLs: brace lists, '::'-joined lists, pipe: commands, http(s)/s3/gs URLs, local paths and globs.

def is_local(url: str) -> bool:
    """A local path (or file: URL), as opposed to a pipe: command or a remote URL."""
    return url.startswith("file:") or urlparse(url).scheme == ""


def expand_urls(urls: str | list[str]) -> list[str]:
    """data.urls -> shard URLs, in order: each entry split on '::' and brace-expanded
    (shard-{00000..01023}.tar, {a,b}; webdataset's expand_urls), local globs expanded (sorted)."""
    out = []
    for pat in ([urls] if isinstance(urls, str) else list(urls)):
        try:
            expanded = wds.shardlists.expand_urls(str(pat))
        except AssertionError as e:                         # ${VAR} with no WDS_VAR in the environment
            raise ValueError(f"data.urls={pat}: {e}") from None
        for u in expanded:
            u = u[len("file://"):] if u.startswith("file://") else u[len("file:"):] if u.startswith("file:") else u
            out += (sorted(glob(u)) or [u]) if is_local(u) and any(c in u for c in "*?[") else [u]
    return out


def use_streaming(urls: list[str], streaming="auto", resampled: bool = False) -> bool:
    """data.streaming (auto | true | false) -> whether shards are streamed (WebShards) or indexed."""
    remote = [u for u in urls if not is_local(u)]
    if streaming == "auto":
        return bool(resampled or remote)
    if streaming is True:
        return True
    if streaming is False:
        if resampled:
            raise ValueError("data.resampled=true is a streamed dataset: set data.streaming=auto or true")
        if remote:
            raise ValueError(f"data.streaming=false indexes local shards, but {remote[0]!r} is not a local path: "
                             "set data.streaming=auto")
        return False
    raise ValueError(f"data.streaming must be auto, true or false, got {streaming!r}")

#----------------------------------------------------------------------------
# Sample columns: one webdataset sample (extension -> bytes, read lazily) -> a training item, in two
# stages: check (caption, metadata, filters; no image decoded) and decode.

class ImageColumns:
    """LAION-style image samples: image jpg;png;jpeg;webp, caption txt;caption;json (its caption/text
    field), original_width/original_height (SDXL micro-conditioning) and pwatermark from the json.

    Filters as the reference scripts: data.min_size keeps samples whose original width and height
    are >= it (from the json, else the image header); data.max_pwatermark keeps pwatermark <= it
    (a missing pwatermark counts as 1.0). null: off."""

    def __init__(self, resolution: int = 512, crop: str = "center", flip: bool = False,
                 max_pixels: int = MAX_PIXELS, min_size: int | None = None, max_pwatermark: float | None = None):
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {crop!r}")
        self.resolution, self.crop, self.flip, self.max_pixels = resolution, crop, flip, max_pixels
        self.min_size, self.max_pwatermark = min_size, max_pwatermark

    def check(self, read, exts) -> dict:
        """Caption and metadata of a sample (read(ext) -> bytes; exts: its extensions), filters
        applied, no image decoded -> dict(caption, ext, original_size or None); else SkipSample."""
        ext = next((e for e in IMAGE_COLUMNS if e in exts), None)
        if ext is None:
            raise SkipSample(f"no image ({';'.join(IMAGE_COLUMNS)})")
        meta, bad = None, None
        if "json" in exts:
            try:
                meta = json.loads(decode_caption(read("json")))
            except (ValueError, SkipSample) as e:
                bad = SkipSample(f"broken .json caption: {e}")
            meta = meta if isinstance(meta, dict) else None
        col = next((c for c in TEXT_COLUMNS if c in exts), None)
        if col is not None:
            text = decode_caption(read(col))
        elif "json" in exts:
            if bad is not None:
                raise bad
            text = next((meta[k] for k in CAPTION_KEYS if k in meta), None) if meta else None
        else:
            raise SkipSample("no .txt, .caption or .json caption")
        caption = _caption(text)
        size = _json_size(meta)
        if self.max_pwatermark is not None:
            if bad is not None:
                raise bad
            p = meta.get("pwatermark") if meta else None
            p = 1.0 if p is None else float(p)
            if p > self.max_pwatermark:
                raise SkipSample(f"pwatermark {p:.3g} is over data.max_pwatermark={self.max_pwatermark}")
        if self.min_size:
            h, w = size or image_header_size(read(ext))
            if min(h, w) < self.min_size:
                raise SkipSample(f"original size {w}x{h} is under data.min_size={self.min_size}")
        return dict(caption=caption, ext=ext, original_size=size)

    def decode(self, info: dict, read, rng: random.Random) -> dict:
        """The checked sample -> dict(image (3,R,R), caption, original_size (h, w), crop_top_left)."""
        image, size, crop = load_image(read(info["ext"]), self.resolution, self.crop, rng, self.flip,
                                       self.max_pixels)
        return dict(image=image, caption=info["caption"], original_size=info["original_size"] or size,
                    crop_top_left=crop)


def _json_size(meta: dict | None) -> tuple[int, int] | None:
    """(original_height, original_width) from LAION json metadata, if both are there."""
    try:
        h, w = int(meta["original_height"]), int(meta["original_width"])
    except (TypeError, KeyError, ValueError):
        return None
    return (h, w) if h > 0 and w > 0 else None


class LatentColumns:
    """The encode step's samples: {key}.safetensors (mean, std, context, pooled) + {key}.json
    (caption, original_size, crop_top_left, size, dtype of the computed context)."""

    def check(self, read, exts) -> dict:
        if "safetensors" not in exts or "json" not in exts:
            raise SkipSample("not a latent sample (.safetensors + .json)")
        try:
            meta = json.loads(read("json"))
            return dict(meta, caption=_caption(meta.get("caption")))
        except (ValueError, TypeError, AttributeError) as e:
            raise SkipSample(f"broken latent .json: {e}") from None

    def decode(self, info: dict, read, rng=None) -> dict:
        from safetensors.torch import load
        try:
            t = load(read("safetensors"))
            mean, std, context = t["mean"].float(), t["std"].float(), t["context"]
        except Exception as e:                              # a damaged member
            raise SkipSample(f"broken latent .safetensors: {type(e).__name__}: {e}") from None
        dtype = getattr(torch, info.get("dtype", "float32"))    # as computed (fp16 storage is cast back)
        pooled = t.get("pooled")
        return dict(mean=mean, std=std, context=context.to(dtype), caption=info["caption"],
                    pooled=None if pooled is None else pooled.to(dtype), size=tuple(info["size"]),
                    original_size=tuple(info["original_size"]), crop_top_left=tuple(info["crop_top_left"]))

#----------------------------------------------------------------------------
# Indexed sources. `get(i, rng)` returns one sample or raises SkipSample.

class ImageFolder(Dataset):
    """A folder of images; captions in metadata.jsonl ({"file_name", "text"}) or a .txt per image."""

    def __init__(self, root: str, resolution: int = 512, crop: str = "center", flip: bool = False,
                 max_pixels: int = MAX_PIXELS):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.root={root} is not a folder of images")
        self.root, self.resolution, self.crop, self.flip = root, resolution, crop, flip
        self.max_pixels = max_pixels
        meta = os.path.join(root, "metadata.jsonl")
        if os.path.isfile(meta):
            self.items = []
            with open(meta, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:                                    # a caption in another encoding: that sample is skipped
                        line, bad = raw.decode("utf-8-sig" if n == 1 else "utf-8"), None
                    except UnicodeDecodeError as e:
                        line, bad = raw.decode("utf-8", errors="surrogateescape"), e
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{meta}:{n}: not a JSON object ({e})") from None
                    if not isinstance(row, dict) or "file_name" not in row:
                        raise ValueError(f"{meta}:{n}: each line needs a 'file_name' key")
                    text = next((row[k] for k in CAPTION_KEYS if k in row), None)
                    if bad is not None:
                        text = SkipSample(f"{meta}:{n}: caption is not UTF-8 ({bad.reason} at byte {bad.start})")
                    self.items.append((os.path.join(root, row["file_name"]), text))
        else:
            files = sorted(p for p in glob(os.path.join(root, "**", "*"), recursive=True)
                           if p.lower().endswith(IMAGE_EXTS))
            self.items = [(p, None) for p in files]            # caption read lazily from the .txt
        if not self.items:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found in {root}")

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int, rng: random.Random) -> dict:
        path, text = self.items[i]
        if isinstance(text, SkipSample):
            raise text
        if text is None:
            txt = os.path.splitext(path)[0] + ".txt"
            try:
                with open(txt, "rb") as f:
                    text = decode_caption(f.read())
            except FileNotFoundError:
                raise SkipSample(f"no caption file {txt}") from None
            except OSError as e:                            # vanished or unreadable mid-run
                raise SkipSample(f"unreadable caption file {txt}: {e}") from None
        caption = _caption(text)
        image, size, crop = load_image(path, self.resolution, self.crop, rng, self.flip, self.max_pixels)
        return dict(image=image, caption=caption, original_size=size, crop_top_left=crop)


class IndexedTars(Dataset):
    """Local webdataset-format tars ({key}.{ext} members), indexed once at start and read with the
    stdlib (random access); `keep(exts)` says which member groups are samples."""

    def __init__(self, urls: str | list[str], keep):
        urls = expand_urls(urls)
        remote = [u for u in urls if not is_local(u)]
        if remote:
            raise ValueError(f"{remote[0]!r} is not a local path: remote shards and pipe: commands are streamed "
                             "(data.streaming=auto)")
        self.paths = sorted(urls)
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing or not self.paths:
            raise FileNotFoundError(f"tar shards not found: {missing[:3] or urls} (local paths, globs and brace "
                                    "lists are indexed; pipe: commands and URLs are streamed)")
        self.items: list[tuple[int, str, dict[str, tarfile.TarInfo]]] = []
        for s, p in enumerate(self.paths):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(p) as tf:
                for m in tf.getmembers():
                    if m.isfile() and "." in os.path.basename(m.name):
                        d, b = os.path.split(m.name)
                        key, ext = b.split(".", 1)
                        groups.setdefault(os.path.join(d, key), {})[ext.lower()] = m
            self.items += [(s, k, g) for k, g in sorted(groups.items()) if keep(g)]
        if not self.items:
            raise ValueError(f"no samples in {self.paths[:3]}")
        self._open: dict[int, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, shard: int, member: tarfile.TarInfo) -> bytes:
        """A member's bytes; a shard deleted, truncated or damaged since indexing is a skipped sample."""
        try:
            tf = self._open.get(shard) or self._open.setdefault(shard, tarfile.open(self.paths[shard]))
            data = tf.extractfile(member).read()
        except (OSError, EOFError, tarfile.TarError, AttributeError) as e:   # extractfile: None if no file
            if (tf := self._open.pop(shard, None)) is not None:   # re-open next time (it may come back)
                tf.close()
            raise SkipSample(f"shard {self.paths[shard]} unreadable at {member.name}: "
                             f"{type(e).__name__}: {e}") from None
        if len(data) != member.size:
            self._open.pop(shard).close()
            raise SkipSample(f"shard {self.paths[shard]} truncated at {member.name} "
                             f"({len(data)} of {member.size} bytes)")
        return data

    def _get(self, i: int, columns, rng) -> dict:
        shard, _, g = self.items[i]
        read = lambda ext: self._read(shard, g[ext])
        return columns.decode(columns.check(read, g), read, rng)

    def __getstate__(self):                                 # open handles do not cross to workers
        return {**self.__dict__, "_open": {}}


class TarShards(IndexedTars):
    """Local webdataset-format image tars (paths, globs, brace lists), LAION columns and filters
    (ImageColumns); indexed, so the deterministic sampler and exact resume work as for folders."""

    def __init__(self, urls: str | list[str], resolution: int = 512, crop: str = "center", flip: bool = False,
                 max_pixels: int = MAX_PIXELS, min_size: int | None = None, max_pwatermark: float | None = None):
        self.columns = ImageColumns(resolution, crop, flip, max_pixels, min_size, max_pwatermark)
        self.resolution, self.crop, self.flip = resolution, crop, flip
        super().__init__(urls, lambda g: any(e in g for e in IMAGE_COLUMNS))

    def get(self, i: int, rng: random.Random) -> dict:
        return self._get(i, self.columns, rng)


class LatentShards(IndexedTars):
    """The encode step's output (task=encode; lcm/encode.py), indexed: a folder with manifest.json, or
    its shard paths. Sample keys are the source's sample indices and len() is the source's length
    (a sample skipped when encoding is skipped here too), so training from the cache takes the same
    samples in the same order as training from the images."""

    def __init__(self, urls: str | list[str]):
        self.columns = LatentColumns()
        shards, self.manifest = latent_shards(urls)
        super().__init__(shards, lambda g: "safetensors" in g)
        if self.manifest and self.manifest.get("n") is not None and sorted(shards) == self.paths:
            self.where = {int(os.path.basename(k)): n for n, (_, k, _) in enumerate(self.items)}
            self.n = int(self.manifest["n"])
        else:                                               # a subset of the shards: positions
            self.where, self.n = {n: n for n in range(len(self.items))}, len(self.items)

    def __len__(self) -> int:
        return self.n

    def get(self, i: int, rng=None) -> dict:
        if i not in self.where:
            raise SkipSample(f"sample {i} was skipped by the encode step")
        return self._get(self.where[i], self.columns, rng)


def latent_shards(urls: str | list[str]) -> tuple[list[str], dict | None]:
    """The encode step's output -> (shard urls, its manifest or None): a folder reads manifest.json
    (which lists the shards); other forms are shard urls, with the manifest beside them if any."""
    if isinstance(urls, str) and is_local(urls) and os.path.isdir(urls):
        path = os.path.join(urls, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {urls} the output of task=encode (encode.out), "
                                    "and did every rank finish?")
        manifest = read_manifest(path)
        return [os.path.join(urls, s) for s in manifest["shards"]], manifest
    shards = expand_urls(urls)
    beside = os.path.join(os.path.dirname(shards[0]), "manifest.json") if shards and is_local(shards[0]) else ""
    return shards, read_manifest(beside) if os.path.isfile(beside) else None


def read_manifest(path: str) -> dict:
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != LATENT_FORMAT:
        raise ValueError(f"{path} is not an encode manifest (format {LATENT_FORMAT})")
    return manifest

#----------------------------------------------------------------------------
# data=tars / data=latents: indexed for local shards, streamed otherwise (data.streaming).

def tar_data(urls: str | list[str], resolution: int = 512, crop: str = "center", flip: bool = False,
             max_pixels: int = MAX_PIXELS, min_size: int | None = None, max_pwatermark: float | None = None,
             streaming="auto", resampled: bool = False, shuffle_buffer: int = 1000, exact_resume: bool = True):
    """data=tars: TarShards (indexed: exact resume whatever the world size) for local shards, else
    WebShards (streamed: pipe: commands, URLs, data.resampled=true)."""
    if use_streaming(expand_urls(urls), streaming, resampled):
        from lcm.webshards import WebShards
        columns = ImageColumns(resolution, crop, flip, max_pixels, min_size, max_pwatermark)
        return WebShards(urls, columns, resampled, shuffle_buffer, exact_resume)
    return TarShards(urls, resolution, crop, flip, max_pixels, min_size, max_pwatermark)


def latent_data(urls: str | list[str], streaming="auto", resampled: bool = False, shuffle_buffer: int = 1000,
                exact_resume: bool = True):
    """data=latents: the encode step's output; LatentShards (indexed) if local, else WebShards."""
    shards, _ = latent_shards(urls)
    if use_streaming(shards, streaming, resampled):
        from lcm.webshards import WebShards
        return WebShards(shards, LatentColumns(), resampled, shuffle_buffer, exact_resume)
    return LatentShards(urls)

#----------------------------------------------------------------------------
# The training view: virtual keys (epoch * N + index) -> usable samples, skips counted.

def train_item(item: dict, key: int, index: int, skipped: int) -> dict:
    """A source's item (image or latent) checked, with its key, index and skip count."""
    if "mean" in item:                                      # precomputed by the encode step
        if not (isinstance(item["mean"], torch.Tensor) and item["mean"].ndim == 3):
            raise ValueError(f"sample {index}: latent mean must be a (C, h, w) tensor")
        size = tuple(item["size"])
        out = dict(mean=item["mean"], std=item["std"], context=item["context"], pooled=item.get("pooled"), size=size)
    else:
        img = item["image"]
        if not (isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == 3):
            raise ValueError(f"sample {index}: image must be a (3, H, W) tensor in [-1, 1]")
        size = tuple(img.shape[1:])
        out = dict(image=img)
    return dict(out, caption=item["caption"], key=key, index=index, skipped=skipped,
                original_size=tuple(item.get("original_size") or size),
                crop_top_left=tuple(item.get("crop_top_left") or (0, 0)))


class TrainData(Dataset):
    """Wraps any indexed source (`get(i, rng)` or `ds[i]` -> dict with image, caption) for the trainer."""

    MAX_SKIPS = 100
    NEAR_SKIPS = 8                      # substitutes: the next indices, then seeded random ones (a dead shard is left)

    def __init__(self, source, seed: int = 0):
        if isinstance(source, IterableDataset):
            raise TypeError(f"{type(source).__name__} is streamed: use make_loader(), not TrainData")
        self.source, self.seed = source, seed
        if len(source) == 0:
            raise ValueError("the dataset is empty")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int) -> dict:
        n = len(self.source)
        for skip in range(self.MAX_SKIPS):                  # deterministic substitutes: a function of (seed, key, skip)
            i = (key + skip) % n if skip < self.NEAR_SKIPS else hash_seed(self.seed, key, skip, "substitute") % n
            rng = random.Random(f"lcm-data/{self.seed}/{key}/{skip}")
            try:
                item = self.source.get(i, rng) if hasattr(self.source, "get") else self.source[i]
                item = dict(item)
                item["caption"] = _caption(item.get("caption"))
            except SkipSample as e:
                log.warning("skipping sample %d: %s", i, e)
                continue
            return train_item(item, key, i, skip)
        raise RuntimeError(f"{self.MAX_SKIPS} consecutive unusable samples from index {key % n}: "
                           "is the dataset mostly corrupt or uncaptioned?")


def collate(items: list[dict]) -> dict:
    """List of train items -> batch dict: images stacked (B,3,H,W), or latent moments (B,C,h,w) and
    text embeddings (B,77,D) with the image size (H, W) they came from."""
    if "mean" in items[0]:
        shapes = {(tuple(it["mean"].shape), tuple(it["size"])) for it in items}
        if len(shapes) != 1:
            raise ValueError(f"latents of one batch differ in size {sorted(shapes)}: encode at one data.resolution")
        pooled = None if items[0]["pooled"] is None else torch.stack([it["pooled"] for it in items])
        out = dict(mean=torch.stack([it["mean"] for it in items]), std=torch.stack([it["std"] for it in items]),
                   context=torch.stack([it["context"] for it in items]), pooled=pooled, size=items[0]["size"])
    else:
        shapes = {tuple(it["image"].shape) for it in items}
        if len(shapes) != 1:
            raise ValueError(f"images of one batch differ in size {sorted(shapes)}: set data.resolution")
        out = dict(image=torch.stack([it["image"] for it in items]))
    return dict(out, caption=[it["caption"] for it in items],
                original_size=[it["original_size"] for it in items],
                crop_top_left=[it["crop_top_left"] for it in items],
                key=torch.tensor([it["key"] for it in items]),
                index=torch.tensor([it["index"] for it in items]),
                skipped=sum(it["skipped"] for it in items))


def image_size(batch: dict) -> int:
    """The side of the square images a batch holds or was encoded from (validation size)."""
    return int(batch["image"].shape[-1]) if "image" in batch else int(batch["size"][-1])


def first_captions(dataset, n: int) -> list[str]:
    """The first n usable captions of a dataset (validation prompts when none are given)."""
    if isinstance(dataset, IterableDataset):             # streamed (lcm.webshards.WebShards)
        return dataset.first_captions(n)
    data = TrainData(dataset)
    return [data[i]["caption"] for i in range(min(n, len(data)))]

#----------------------------------------------------------------------------
# Deterministic, resumable order: epoch e is randperm(N) seeded by (seed, e); a global batch
# of size G at step s is positions s*G .. s*G+G-1 of the concatenated epochs; rank r takes slice r.

def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (n,), a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(hash_seed(seed, epoch, "epoch"))
    return torch.randperm(n, generator=g)


def hash_seed(*parts) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across runs and processes."""
    import hashlib
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class StepSampler(torch.utils.data.Sampler):
    """Batch sampler yielding this rank's virtual keys for steps start_step, start_step + 1, ..."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step, self.shuffle = rank, world_size, start_step, shuffle
        self._perm = (None, None)

    def keys(self, step: int) -> list[int]:
        G = self.batch_size * self.world_size
        first = step * G + self.rank * self.batch_size
        return [self._key(p) for p in range(first, first + self.batch_size)]

    def _key(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if not self.shuffle:
            return epoch * self.n + i
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return epoch * self.n + int(self._perm[1][i])

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.keys(step)
            step += 1


def _identity(x):
    return x


def make_loader(dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                start_step: int = 0, num_workers: int = 0, shuffle: bool = True):
    """Infinite DataLoader of this rank's batches from `start_step` on (resume): TrainData(dataset)
    under the StepSampler, or a streamed WebShards's own batches (in worker order)."""
    if isinstance(dataset, IterableDataset):             # streamed (lcm.webshards.WebShards): its own batches
        ws = dataset.configured(batch_size, seed, rank, world_size, start_step, shuffle)
        return torch.utils.data.DataLoader(ws, batch_size=None, collate_fn=_identity, num_workers=num_workers,
                                           persistent_workers=num_workers > 0)
    data = dataset if isinstance(dataset, TrainData) else TrainData(dataset, seed)
    sampler = StepSampler(len(data), batch_size, seed, rank, world_size, start_step, shuffle)
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)

#----------------------------------------------------------------------------
# Algorithm 1's D_z: batch -> clean latents z (B,4,h,w) and the cond / uncond UNet conditioning.

class LatentEncoder:
    """VAE + text encoding of a batch, optionally cached per sample (latent moments, context); a
    batch from data=latents carries them precomputed (only the posterior noise is drawn here)."""

    def __init__(self, pipe, device, cache: bool = False, vae_chunk: int = 0, train_text: bool = False):
        self.pipe, self.device, self.use_cache, self.vae_chunk, self.train_text = pipe, device, cache, vae_chunk, train_text
        self.cache, self._empty = {}, None

    def _encode(self, images, captions):
        """images (B,3,H,W), captions -> (mean, std (B,C,h,w) fp32, context (B,77,D), pooled or None)."""
        p = self.pipe
        chunk = self.vae_chunk or images.shape[0]
        with torch.no_grad():
            posts = [p.vae.encode(images[i:i + chunk].to(self.device)) for i in range(0, images.shape[0], chunk)]
            mean = torch.cat([q.mean for q in posts]).float()
            std = torch.cat([q.std for q in posts]).float()
        with torch.set_grad_enabled(self.train_text):
            c = p.text.encode(captions)
        return mean, std, c.context, c.pooled

    def __call__(self, batch: dict, gens):
        captions = batch["caption"]
        if "mean" in batch:                                 # data=latents: precomputed by task=encode
            if self.train_text:
                raise ValueError("data=latents holds precomputed text embeddings: it cannot train the text "
                                 "encoder (train.train_text_encoder=false, or train from images)")
            mean, std, ctx = (batch[k].to(self.device) for k in ("mean", "std", "context"))
            pooled = None if batch.get("pooled") is None else batch["pooled"].to(self.device)
        elif self.use_cache:
            images, idx = batch["image"], batch["index"].tolist()
            todo = [i for i, j in enumerate(idx) if j not in self.cache]
            if todo:
                parts = self._encode(images[todo], [captions[i] for i in todo])
                for n, i in enumerate(todo):
                    self.cache[idx[i]] = tuple(None if t is None else t[n:n + 1].detach().cpu() for t in parts)
            rows = [self.cache[j] for j in idx]
            mean, std, ctx, pooled = (None if rows[0][k] is None else torch.cat([r[k] for r in rows]).to(self.device)
                                      for k in range(4))
        else:
            mean, std, ctx, pooled = self._encode(batch["image"], captions)
        noise = randn(mean.shape, gens, device=self.device)              # posterior sample, per-sample generators
        z = (mean + std * noise) * self.pipe.vae_scale                   # z = scale * E(x).sample()
        cond = Conditioning(ctx, pooled)
        with torch.set_grad_enabled(self.train_text):      # SD1/SD2: the encoded "" (cached unless trained)
            if (self._empty is None or self.train_text) and self.pipe.family not in ZERO_UNCOND_FAMILIES:
                self._empty = self.pipe.text.encode([""])
            uncond = unconditional(self.pipe.text.encode, self.pipe.family, cond, empty=self._empty)
        sizes, crops = batch.get("original_size"), batch.get("crop_top_left")  # SDXL micro-conditioning ids
        target = tuple(batch["size"]) if "size" in batch else tuple(batch["image"].shape[-2:])
        vec = lambda c: with_vector(c, sizes, crops, target)
        return z, vec(cond), vec(uncond)
