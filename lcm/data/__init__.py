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
- Streamed (an IterableDataset, lcm.data.webshards.WebShards, read through the webdataset library): pipe: commands,
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
