"""Latent pre-caching (task=encode): the VAE moments and text embeddings of a dataset, written as
webdataset shards for data=latents (docs/scale.md).

    python train.py task=encode model.path=/w/sd15.safetensors data=tars data.urls=... encode.out=/cache/lat
    torchrun --nproc_per_node=8 train.py task=encode ...    # rank r writes units r, r + world, ...

The units of work do not depend on the number of processes: an indexed source (folder, local tars)
is cut into units of encode.shard_size samples (unit k: source indices k*S .. k*S+S-1, member keys
f"{i:010d}"); a streamed source (URLs, pipe: commands) gives one unit per input shard. Unit k is
latents-{k:06d}.tar (members {key}.safetensors: mean, std, context, pooled; {key}.json: caption,
original_size, crop_top_left, size, dtype) with latents-{k:06d}.json (its counts) beside it, each
written to a temporary name and renamed, so a killed job run again keeps the finished units. When
all units exist, rank 0 writes manifest.json (source length n, model, shards): its presence marks
the cache complete.

Each image is encoded by LatentEncoder.encode_images, the function train.cache=true calls, under the same
autocast (train.mixed_precision) and from the same fixed crop (data.crop=center, data.flip=false
are required), so the cache holds what train.cache=true would compute.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time

import torch

from lcm.data.encoder import LatentEncoder
from lcm.data.order import train_item
from lcm.data.sources import LATENT_FORMAT, LatentColumns, LatentShards, SkipSample, check_caption
from lcm.data.webshards import WebShards, shard_samples

log = logging.getLogger(__name__)
DTYPES = (None, "float32", "float16", "bfloat16")
PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#----------------------------------------------------------------------------
# Units of work and their samples.

def unit_count(source, shard_size: int) -> int:
    """Number of units: input shards of a streamed source, else ceil(len / shard_size)."""
    if isinstance(source, WebShards):
        return len(source.urls)
    return -(-len(source) // shard_size)


def unit_samples(source, unit: int, shard_size: int, stats: dict):
    """(key, index or None, item) of the usable samples of one unit; unusable ones are counted."""
    if isinstance(source, WebShards):
        url, errors = source.urls[unit], []
        for p, sample in enumerate(shard_samples(url, errors)):
            try:
                info = source.columns.check(sample.get, sample)
                item = source.columns.decode(info, sample.get, random.Random(f"lcm-data/encode/{unit}/{p}"))
            except SkipSample as e:
                log.warning("skipping %s in %s: %s", sample.get("__key__"), url, e)
                stats["skipped"] += 1
                continue
            yield f"{p:07d}", None, dict(item, source=f"{url}#{sample['__key__']}")
        if errors:
            log.warning("shard %s: %s", url, errors[0])
            stats["skipped"] += 1
        return
    for i in range(unit * shard_size, min((unit + 1) * shard_size, len(source))):
        try:
            item = source.get(i, random.Random(f"lcm-data/encode/{i}")) if hasattr(source, "get") else source[i]
            item = dict(item, caption=check_caption(item.get("caption")))
        except SkipSample as e:
            log.warning("skipping sample %d: %s", i, e)
            stats["skipped"] += 1
            continue
        yield f"{i:010d}", i, item


def check_source(source) -> None:
    """The cache stores one view per sample: fixed crops, no flips, images (not latents)."""
    if isinstance(source, LatentShards) or isinstance(getattr(source, "columns", None), LatentColumns):
        raise ValueError("task=encode reads images: data=latents is already encoded")
    view = source.columns if isinstance(source, WebShards) else source
    if getattr(view, "crop", "center") != "center" or getattr(view, "flip", False):
        raise ValueError("task=encode stores one crop per sample: set data.crop=center data.flip=false "
                         "(the cache then equals what train.cache=true computes)")

#----------------------------------------------------------------------------
# Writing.

def _tmp(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")


def _atomic(path: str, write) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def unit_name(unit: int) -> str:
    return f"latents-{unit:06d}.tar"


def encode(pipe, source, out: str, *, rank: int = 0, world: int = 1, device="cpu", shard_size: int = 1000,
           batch_size: int = 16, vae_chunk: int = 0, mixed_precision: str = "no", dtype: str | None = None,
           overwrite: bool = False) -> dict:
    """Encode this rank's units (k = rank, rank + world, ...) of `source` into `out`; returns this
    rank's counts {units, samples, skipped, kept, seconds}. Units already written are kept unless
    overwrite."""
    import webdataset as wds
    from safetensors.torch import save
    check_source(source)
    if dtype not in DTYPES:
        raise ValueError(f"encode.dtype must be null, float32, float16 or bfloat16, got {dtype!r}")
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {', '.join(PRECISIONS)}, got {mixed_precision!r}")
    amp, device = PRECISIONS[mixed_precision], torch.device(device)
    os.makedirs(out, exist_ok=True)
    pipe.to(device)
    enc = LatentEncoder(pipe, device, vae_chunk=vae_chunk)
    t0, stats = time.perf_counter(), dict(units=0, samples=0, skipped=0, kept=0)
    for unit in range(rank, unit_count(source, shard_size), world):
        path = os.path.join(out, unit_name(unit))
        if os.path.exists(path) and not overwrite:
            stats["kept"] += 1
            continue
        counts = dict(samples=0, skipped=0)
        tmp = _tmp(path)
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)

            def flush(batch):
                images = torch.stack([it["image"] for _, _, _, it in batch])
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    mean, std, ctx, pooled = enc.encode_images(images, [it["caption"] for _, _, _, it in batch])
                for n, (key, index, src, it) in enumerate(batch):
                    t = dict(mean=mean[n], std=std[n], context=ctx[n])
                    t |= {} if pooled is None else dict(pooled=pooled[n])
                    t = {k: v.detach().to("cpu", getattr(torch, dtype) if dtype else v.dtype).contiguous()
                         for k, v in t.items()}
                    meta = dict(caption=it["caption"], index=index, size=list(it["image"].shape[-2:]),
                                original_size=list(it["original_size"]), crop_top_left=list(it["crop_top_left"]),
                                dtype=str(ctx.dtype).removeprefix("torch."), source=src)
                    writer.write({"__key__": key, "safetensors": save(t), "json": json.dumps(meta).encode()})
                counts["samples"] += len(batch)

            batch = []
            for key, index, item in unit_samples(source, unit, shard_size, counts):
                batch.append((key, index, item.pop("source", None), train_item(item, 0, index or 0, 0)))
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
            writer.close()
        _atomic(path[:-4] + ".json", lambda f: f.write(json.dumps(counts).encode()))
        os.replace(tmp, path)                              # the unit is done when its tar has its name
        stats["units"] += 1
        stats["samples"] += counts["samples"]
        stats["skipped"] += counts["skipped"]
        log.info("rank %d: %s (%d samples, %d skipped)", rank, unit_name(unit), counts["samples"], counts["skipped"])
    stats["seconds"] = time.perf_counter() - t0
    return stats


def write_manifest(out: str, source, pipe, shard_size: int = 1000, dtype: str | None = None,
                   model: str | None = None) -> dict:
    """manifest.json of a finished encode (every unit written; call on one rank after all are done)."""
    n_units = unit_count(source, shard_size)
    missing = [unit_name(k) for k in range(n_units) if not os.path.exists(os.path.join(out, unit_name(k)))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {n_units} units missing in {out} (e.g. {missing[0]}): "
                                "run task=encode again to finish them")
    counts = [json.load(open(os.path.join(out, unit_name(k)[:-4] + ".json"))) for k in range(n_units)]
    indexed = not isinstance(source, WebShards)
    resolution = source.columns.resolution if not indexed else getattr(source, "resolution", None)
    manifest = dict(format=LATENT_FORMAT, n=len(source) if indexed else None,
                    shard_size=shard_size if indexed else None,
                    samples=sum(c["samples"] for c in counts), skipped=sum(c["skipped"] for c in counts),
                    shards=[unit_name(k) for k in range(n_units)], family=pipe.family, model=model,
                    fingerprint=fingerprint(pipe),
                    vae_scale=pipe.vae_scale, latent_factor=pipe.latent_factor, resolution=resolution,
                    dtype=dtype, source=list(source.urls) if not indexed else
                    getattr(source, "root", None) or list(getattr(source, "paths", [])))
    _atomic(os.path.join(out, "manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def finish(out: str, source, pipe, shard_size: int = 1000, dtype: str | None = None,
           model: str | None = None) -> dict | None:
    """The manifest once every unit exists (so the last rank to finish writes it), else None."""
    n = unit_count(source, shard_size)
    if not all(os.path.exists(os.path.join(out, unit_name(k))) for k in range(n)):
        return None
    return write_manifest(out, source, pipe, shard_size, dtype, model)


def fingerprint(pipe) -> str:
    """A short hash of the VAE and text-encoder weights (their first and last tensors, 4096 values
    each): tells whether a cache was encoded by this model."""
    import hashlib
    h = hashlib.sha256()
    for m in (pipe.vae, pipe.text):
        params = list(m.parameters())
        for p in (params[0], params[-1]):
            h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_latents(data, pipe) -> None:
    """data=latents against the model being trained: family, VAE scale, latent factor and weights
    fingerprint must match what the encode step used."""
    manifest = getattr(data, "manifest", None)
    if not manifest:
        return
    for key, have in (("family", pipe.family), ("vae_scale", pipe.vae_scale), ("latent_factor", pipe.latent_factor),
                      ("fingerprint", fingerprint(pipe))):
        if manifest.get(key) is not None and manifest[key] != have:
            raise ValueError(f"data=latents was encoded with {key}={manifest[key]!r} but this model has {have!r}: "
                             "encode the dataset with the model (and model.dtype) you train (task=encode)")

