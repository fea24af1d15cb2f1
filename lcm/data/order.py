"""The training view of a source and its deterministic, resumable order: virtual keys (epoch * N +
index) -> usable samples with skips counted, batches collated, epoch permutations by (seed, epoch)."""
from __future__ import annotations

import logging
import random

import torch
from torch.utils.data import Dataset, IterableDataset

from lcm.data.sources import SkipSample, check_caption

log = logging.getLogger(__name__)


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
                item["caption"] = check_caption(item.get("caption"))
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
                key=torch.tensor([it["key"] for it in items], device="cpu"),
                index=torch.tensor([it["index"] for it in items], device="cpu"),
                skipped=sum(it["skipped"] for it in items))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (n,), a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(hash_seed(seed, epoch, "epoch"))
    return torch.randperm(n, generator=g, device="cpu")


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
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch).tolist())
        return epoch * self.n + self._perm[1][i]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.keys(step)
            step += 1
