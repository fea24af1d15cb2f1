"""What the trainer calls: data=tars / data=latents (indexed for local shards, streamed otherwise),
the infinite loader of a rank's batches, and the validation captions and size."""
from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from lcm.data.order import StepSampler, TrainData, collate
from lcm.data.sources import (MAX_PIXELS, ImageColumns, LatentColumns, LatentShards, TarShards, expand_urls,
                              latent_shards, use_streaming)
from lcm.data.webshards import WebShards


def tar_data(urls: str | list[str], resolution: int = 512, crop: str = "center", flip: bool = False,
             max_pixels: int = MAX_PIXELS, min_size: int | None = None, max_pwatermark: float | None = None,
             streaming="auto", resampled: bool = False, shuffle_buffer: int = 1000, exact_resume: bool = True):
    """data=tars: TarShards (indexed: exact resume whatever the world size) for local shards, else
    WebShards (streamed: pipe: commands, URLs, data.resampled=true)."""
    if use_streaming(expand_urls(urls), streaming, resampled):
        columns = ImageColumns(resolution, crop, flip, max_pixels, min_size, max_pwatermark)
        return WebShards(urls, columns, resampled, shuffle_buffer, exact_resume)
    return TarShards(urls, resolution, crop, flip, max_pixels, min_size, max_pwatermark)


def latent_data(urls: str | list[str], streaming="auto", resampled: bool = False, shuffle_buffer: int = 1000,
                exact_resume: bool = True):
    """data=latents: the encode step's output; LatentShards (indexed) if local, else WebShards."""
    shards, _ = latent_shards(urls)
    if use_streaming(shards, streaming, resampled):
        return WebShards(shards, LatentColumns(), resampled, shuffle_buffer, exact_resume)
    return LatentShards(urls)


def image_size(batch: dict) -> int:
    """The side of the square images a batch holds or was encoded from (validation size)."""
    return int(batch["image"].shape[-1]) if "image" in batch else int(batch["size"][-1])


def first_captions(dataset, n: int) -> list[str]:
    """The first n usable captions of a dataset (validation prompts when none are given)."""
    if isinstance(dataset, IterableDataset):             # streamed (lcm.data.webshards.WebShards)
        return dataset.first_captions(n)
    data = TrainData(dataset)
    return [data[i]["caption"] for i in range(min(n, len(data)))]


def _identity(x):
    return x


def make_loader(dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                start_step: int = 0, num_workers: int = 0, shuffle: bool = True):
    """Infinite DataLoader of this rank's batches from `start_step` on (resume): TrainData(dataset)
    under the StepSampler, or a streamed WebShards's own batches (in worker order)."""
    if isinstance(dataset, IterableDataset):             # streamed (lcm.data.webshards.WebShards): its own batches
        ws = dataset.configured(batch_size, seed, rank, world_size, start_step, shuffle)
        return torch.utils.data.DataLoader(ws, batch_size=None, collate_fn=_identity, num_workers=num_workers,
                                           persistent_workers=num_workers > 0)
    data = dataset if isinstance(dataset, TrainData) else TrainData(dataset, seed)
    sampler = StepSampler(len(data), batch_size, seed, rank, world_size, start_step, shuffle)
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)
