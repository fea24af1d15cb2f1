"""Streamed webdataset shards (pipe: commands, http(s)/s3/gs URLs, resampled streams): WebShards, an
IterableDataset read through the webdataset library, in which each (rank, DataLoader worker) reads
shards of its own and yields whole batches; the order and what resume re-reads are in lcm/data/'s
module docstring and docs/scale.md. data=tars / data=latents build it (lcm.data.build.tar_data, latent_data).
"""
from __future__ import annotations

import copy
import itertools
import logging
import random
from collections import deque

import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from lcm.data.order import collate, epoch_permutation, hash_seed, train_item
from lcm.data.sources import ImageColumns, SkipSample, expand_urls

log = logging.getLogger(__name__)

def shard_samples(url: str, errors: list):
    """One shard's samples (dict ext -> bytes, __key__, __url__), read with webdataset (local file,
    pipe: command, URL); read errors are appended to `errors` and end the shard."""
    handler = lambda e: errors.append(e) or True           # noqa: E731 (keep going: next shard)
    files = tar_file_expander(url_opener([dict(url=url)], handler=handler), handler=handler)
    return group_by_keys(files, handler=handler)


class WebShards(IterableDataset):
    """webdataset shards streamed (URLs, pipe: commands, local files; optionally resampled), in
    batches; see the module docstring for the order. make_loader() sets batch size, seed, rank,
    world and the step to start at (`configured`)."""

    MAX_REJECTED = 100_000              # consecutive filtered-out samples before giving up
    MAX_LOOKAHEAD = 8                   # batches read ahead for substitutes when a whole batch is corrupt

    def __init__(self, urls: str | list[str], columns=None, resampled: bool = False, shuffle_buffer: int = 1000,
                 exact_resume: bool = True):
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"data.urls={urls!r} names no shards")
        self.columns = columns or ImageColumns()
        self.resampled, self.shuffle_buffer, self.exact_resume = bool(resampled), int(shuffle_buffer), bool(exact_resume)
        self.batch_size, self.seed, self.rank, self.world, self.start_step, self.shuffle = 1, 0, 0, 1, 0, True

    def configured(self, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1, start_step: int = 0,
                   shuffle: bool = True) -> "WebShards":
        """A copy reading for `rank` of `world` from `start_step` on, in batches of `batch_size`."""
        ws = copy.copy(self)
        ws.batch_size, ws.seed, ws.rank, ws.world = int(batch_size), int(seed), int(rank), int(world)
        ws.start_step, ws.shuffle = int(start_step), bool(shuffle)
        return ws

    def plan(self, worker: int = 0, workers: int = 1):
        """This (rank, worker)'s shards, endless: (epoch, url, split), split = (slot, slots) when every
        slot reads all shards and keeps every slots-th sample, else None; resampled: epoch None."""
        n, slots, slot = len(self.urls), self.world * workers, self.rank * workers + worker
        if self.resampled:
            rng = random.Random(hash_seed(self.seed, "resampled", slot, slots))
            while True:
                yield None, self.urls[rng.randrange(n)], None
        split = (slot, slots) if n < slots else None
        for epoch in itertools.count():
            order = epoch_permutation(n, self.seed, epoch).tolist() if self.shuffle else list(range(n))
            for s in (order if split else order[self.rank::self.world][worker::workers]):
                yield epoch, self.urls[s], split

    def raw(self, worker: int = 0, workers: int = 1):
        """Samples (dict ext -> bytes, __key__, __url__) of the plan, read with webdataset; None marks
        a shard that failed (unreadable, truncated, a pipe: command that exited non-zero)."""
        seen, empty = 0, 0                                  # samples of all slots; shards in a row with none
        for _, url, split in self.plan(worker, workers):
            errors, count = [], 0
            for sample in shard_samples(url, errors):
                count, seen = count + 1, seen + 1
                if split is None or (seen - 1) % split[1] == split[0]:
                    yield sample
            if errors:
                log.warning("shard %s: %s (%d samples read)", url, errors[0], count)
                yield None
            empty = 0 if count else empty + 1               # a pass over every shard can hold 2(n-1) in a row
            if empty >= (max(2 * len(self.urls), 100) if self.resampled else 2 * len(self.urls)):
                raise RuntimeError(f"no samples in {empty} shards in a row of data.urls (the last: {url}"
                                   f"{': ' + repr(errors[0]) if errors else ''})")

    def usable(self, worker: int = 0, workers: int = 1):
        """(sample, checked info, samples rejected since the previous one): captions and filters
        applied, no image decoded."""
        rejected, streak = 0, 0
        for sample in self.raw(worker, workers):
            if sample is None:
                rejected += 1
                continue
            try:
                info = self.columns.check(sample.get, sample)
            except SkipSample as e:
                log.debug("skipping %s in %s: %s", sample.get("__key__"), sample.get("__url__"), e)
                rejected, streak = rejected + 1, streak + 1
                if streak >= self.MAX_REJECTED:
                    raise RuntimeError(f"{streak} samples in a row were unusable (the last: {e}): are the "
                                       "filters (data.min_size, data.max_pwatermark) or the columns right?") from None
                continue
            yield sample, info, rejected
            rejected, streak = 0, 0

    def stream(self, worker: int = 0, workers: int = 1):
        """usable() through the seeded shuffle buffer (data.shuffle_buffer samples)."""
        items = self.usable(worker, workers)
        if not self.shuffle or self.shuffle_buffer <= 1:
            return items
        seed = hash_seed(self.seed, "shuffle", self.rank, self.world, worker, workers)
        return wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(items)

    def batches(self, worker: int = 0, workers: int = 1, first: int = 0):
        """Collated batches first, first + 1, ... of this (rank, worker): batch j is the items
        j*B .. j*B+B-1 of stream(); a corrupt one is replaced by the next good item of its batch
        (cyclically), or of the batches after it if none is good."""
        B, items = self.batch_size, self.stream(worker, workers)
        for _ in range(first * B):                          # resume: consumed before, read but not decoded
            next(items)
        made, pending = first, deque()

        def block():
            nonlocal made
            out = []
            for k in range(B):
                sample, info, rejected = next(items)
                pos = made * B + k
                rng = random.Random(f"lcm-data/{self.seed}/stream/{self.rank}/{self.world}/{worker}/{workers}/{pos}")
                try:
                    item = self.columns.decode(info, sample.get, rng)
                    item = train_item(item, pos, hash_seed(sample["__url__"], sample["__key__"]), 0)
                except SkipSample as e:
                    log.warning("skipping %s in %s: %s", sample["__key__"], sample["__url__"], e)
                    item = None
                out.append((item, rejected))
            made += 1
            return out

        while True:
            cur = pending.popleft() if pending else block()
            good = [k for k, (it, _) in enumerate(cur) if it is not None]
            donors, t = [cur[k][0] for k in good], 0
            while not donors:                               # a whole batch corrupt: take from the next ones
                if t >= self.MAX_LOOKAHEAD:
                    raise RuntimeError(f"{(t + 1) * B} consecutive corrupt samples in the stream of "
                                       f"{self.urls[0]} ...: is the dataset mostly corrupt?")
                if t == len(pending):
                    pending.append(block())
                donors, t = [it for it, _ in pending[t] if it is not None], t + 1
            batch = []
            for k, (it, _) in enumerate(cur):
                if it is None:
                    it = cur[min(good, key=lambda g: (g - k) % B)][0] if good else donors[k % len(donors)]
                batch.append(dict(it, skipped=0))
            batch[0]["skipped"] = sum(r for _, r in cur) + B - len(good)
            yield collate(batch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, w = (1, 0) if info is None else (info.num_workers, info.id)
        worker = (w + self.start_step) % workers            # the DataLoader takes batch s from worker s % W
        first = (self.start_step - worker + workers - 1) // workers   # this worker's batches before start_step
        if self.start_step and not self.exact_resume:       # a fresh order seeded by the step: nothing re-read
            ws = copy.copy(self)
            ws.seed = hash_seed(self.seed, "resumed", self.start_step)
            return ws.batches(worker, workers, 0)
        return self.batches(worker, workers, first)

    def first_captions(self, n: int) -> list[str]:
        """The first n usable captions in shard order (validation prompts)."""
        ws = self.configured(1, self.seed, 0, 1, 0, shuffle=False)
        ws.resampled = False
        return [info["caption"] for _, info, _ in itertools.islice(ws.usable(), n)]

