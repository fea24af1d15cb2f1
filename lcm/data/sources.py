"""Image and latent sources: decoding, captions, LAION columns, folders and indexed tar shards
(the item contract and the two read modes are in lcm/data/__init__.py's docstring)."""
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
from torch.utils.data import Dataset

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


def check_caption(text) -> str:
    text = "" if text is None else str(text).strip()
    if not text:
        raise SkipSample("empty caption")
    return text


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
        caption = check_caption(text)
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
            return dict(meta, caption=check_caption(meta.get("caption")))
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
        caption = check_caption(text)
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
    """The encode step's output (task=encode; lcm/data/encode.py), indexed: a folder with manifest.json, or
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
