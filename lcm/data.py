"""Training data: image folders with captions, webdataset-format tars, in-memory datasets, and a
deterministic resumable sampler (docs/users.md Sec. 6-7).

Every source yields dict(image (3,H,W) in [-1,1], caption str, original_size (h, w),
crop_top_left (top, left)). Unusable samples (corrupt, vanished or oversized image, empty or
non-UTF-8 caption, a shard deleted or truncated mid-run) are skipped and counted (the trainer logs
`skipped_samples`), never fatal. The order of samples is a pure function of (seed, position), so a run
resumes at the exact sample it stopped on, and a global batch is the same whatever the number
of processes (rank r takes the r-th slice of it).
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from glob import glob

import torch
from torch.utils.data import Dataset

from lcm.conditioning import ZERO_UNCOND_FAMILIES, unconditional, with_vector
from models.text import Conditioning
from solvers.noise import randn

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 2**26                                      # 67 Mpx (8192^2): larger images are skipped undecoded
CAPTION_KEYS = ("text", "caption", "prompt")            # metadata.jsonl / tar json caption fields


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


def _caption(text) -> str:
    text = "" if text is None else str(text).strip()
    if not text:
        raise SkipSample("empty caption")
    return text

#----------------------------------------------------------------------------
# Sources. `get(i, rng)` returns one sample or raises SkipSample.

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


class TarShards(Dataset):
    """webdataset-format tars ({key}.jpg/png + {key}.txt or {key}.json), read with the stdlib.

    Members are indexed once at start, so the deterministic sampler and resume work as for
    folders; the `webdataset` package is not needed."""

    def __init__(self, urls: str | list[str], resolution: int = 512, crop: str = "center", flip: bool = False,
                 max_pixels: int = MAX_PIXELS):
        pats = [urls] if isinstance(urls, str) else list(urls)
        self.paths = sorted(p for pat in pats for p in (glob(pat) or [pat]))
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"tar shards not found: {missing[:3]} (local paths or globs only)")
        self.resolution, self.crop, self.flip, self.max_pixels = resolution, crop, flip, max_pixels
        self.items: list[tuple[int, dict[str, tarfile.TarInfo]]] = []
        for s, p in enumerate(self.paths):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(p) as tf:
                for m in tf.getmembers():
                    if m.isfile() and "." in os.path.basename(m.name):
                        d, b = os.path.split(m.name)
                        key, ext = b.split(".", 1)
                        groups.setdefault(os.path.join(d, key), {})[ext.lower()] = m
            self.items += [(s, g) for _, g in sorted(groups.items()) if any(e in g for e in ("jpg", "jpeg", "png", "webp"))]
        if not self.items:
            raise ValueError(f"no image samples in {self.paths[:3]}")
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

    def get(self, i: int, rng: random.Random) -> dict:
        shard, g = self.items[i]
        if "txt" in g:
            text = decode_caption(self._read(shard, g["txt"]))
        elif "json" in g:
            try:
                row = json.loads(decode_caption(self._read(shard, g["json"])))
            except ValueError as e:
                raise SkipSample(f"broken .json caption: {e}") from None
            text = next((row[k] for k in CAPTION_KEYS if k in row), None) if isinstance(row, dict) else None
        else:
            raise SkipSample("no .txt or .json caption")
        caption = _caption(text)
        ext = next(e for e in ("jpg", "jpeg", "png", "webp") if e in g)
        image, size, crop = load_image(self._read(shard, g[ext]), self.resolution, self.crop, rng, self.flip,
                                       self.max_pixels)
        return dict(image=image, caption=caption, original_size=size, crop_top_left=crop)

    def __getstate__(self):                                 # open handles do not cross to workers
        return {**self.__dict__, "_open": {}}

#----------------------------------------------------------------------------
# The training view: virtual keys (epoch * N + index) -> usable samples, skips counted.

class TrainData(Dataset):
    """Wraps any source (`get(i, rng)` or `ds[i]` -> dict with image, caption) for the trainer."""

    MAX_SKIPS = 100
    NEAR_SKIPS = 8                      # substitutes: the next indices, then seeded random ones (a dead shard is left)

    def __init__(self, source, seed: int = 0):
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
            img = item["image"]
            if not (isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == 3):
                raise ValueError(f"sample {i}: image must be a (3, H, W) tensor in [-1, 1]")
            size = tuple(img.shape[1:])
            return dict(image=img, caption=item["caption"], key=key, index=i, skipped=skip,
                        original_size=tuple(item.get("original_size", size)),
                        crop_top_left=tuple(item.get("crop_top_left", (0, 0))))
        raise RuntimeError(f"{self.MAX_SKIPS} consecutive unusable samples from index {key % n}: "
                           "is the dataset mostly corrupt or uncaptioned?")


def collate(items: list[dict]) -> dict:
    """List of TrainData items -> batch dict (images stacked (B,3,H,W))."""
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"images of one batch differ in size {sorted(shapes)}: set data.resolution")
    return dict(image=torch.stack([it["image"] for it in items]),
                caption=[it["caption"] for it in items],
                original_size=[it["original_size"] for it in items],
                crop_top_left=[it["crop_top_left"] for it in items],
                key=torch.tensor([it["key"] for it in items]),
                index=torch.tensor([it["index"] for it in items]),
                skipped=sum(it["skipped"] for it in items))

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


def make_loader(dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                start_step: int = 0, num_workers: int = 0, shuffle: bool = True):
    """Infinite DataLoader over TrainData(dataset), starting at `start_step` (resume)."""
    data = dataset if isinstance(dataset, TrainData) else TrainData(dataset, seed)
    sampler = StepSampler(len(data), batch_size, seed, rank, world_size, start_step, shuffle)
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)

#----------------------------------------------------------------------------
# Algorithm 1's D_z: batch -> clean latents z (B,4,h,w) and the cond / uncond UNet conditioning.

class LatentEncoder:
    """VAE + text encoding of a batch, optionally cached per sample (latent moments, context)."""

    def __init__(self, pipe, device, cache: bool = False, vae_chunk: int = 0, train_text: bool = False):
        self.pipe, self.device, self.use_cache, self.vae_chunk, self.train_text = pipe, device, cache, vae_chunk, train_text
        self.cache, self._empty = {}, None

    def _encode(self, images, captions):
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
        images, captions = batch["image"], batch["caption"]
        if self.use_cache:
            idx = batch["index"].tolist()
            todo = [i for i, j in enumerate(idx) if j not in self.cache]
            if todo:
                parts = self._encode(images[todo], [captions[i] for i in todo])
                for n, i in enumerate(todo):
                    self.cache[idx[i]] = tuple(None if t is None else t[n:n + 1].detach().cpu() for t in parts)
            rows = [self.cache[j] for j in idx]
            mean, std, ctx, pooled = (None if rows[0][k] is None else torch.cat([r[k] for r in rows]).to(self.device)
                                      for k in range(4))
        else:
            mean, std, ctx, pooled = self._encode(images, captions)
        noise = randn(mean.shape, gens, device=self.device)              # posterior sample, per-sample generators
        z = (mean + std * noise) * self.pipe.vae_scale                   # z = scale * E(x).sample()
        cond = Conditioning(ctx, pooled)
        with torch.set_grad_enabled(self.train_text):      # SD1/SD2: the encoded "" (cached unless trained)
            if (self._empty is None or self.train_text) and self.pipe.family not in ZERO_UNCOND_FAMILIES:
                self._empty = self.pipe.text.encode([""])
            uncond = unconditional(self.pipe.text.encode, self.pipe.family, cond, empty=self._empty)
        sizes, crops = batch.get("original_size"), batch.get("crop_top_left")  # SDXL micro-conditioning ids
        vec = lambda c: with_vector(c, sizes, crops, tuple(images.shape[-2:]))
        return z, vec(cond), vec(uncond)
