"""Algorithm 1's D_z: a batch -> clean latents z (B,4,h,w) and the cond / uncond UNet conditioning."""
from __future__ import annotations

import torch

from lcm.conditioning import ZERO_UNCOND_FAMILIES, unconditional, with_vector
from models.text import Conditioning
from solvers.noise import randn


class LatentEncoder:
    """VAE + text encoding of a batch, optionally cached per sample (latent moments, context); a
    batch from data=latents carries them precomputed (only the posterior noise is drawn here)."""

    def __init__(self, pipe, device, cache: bool = False, vae_chunk: int = 0, train_text: bool = False):
        self.pipe, self.device, self.use_cache, self.vae_chunk, self.train_text = pipe, device, cache, vae_chunk, train_text
        self.cache, self._empty = {}, None

    def encode_images(self, images, captions):
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
                                 "encoder (objective.train_text_encoder=false, or train from images)")
            mean, std, ctx = (batch[k].to(self.device) for k in ("mean", "std", "context"))
            pooled = None if batch.get("pooled") is None else batch["pooled"].to(self.device)
        elif self.use_cache:
            images, idx = batch["image"], batch["index"].tolist()
            todo = [i for i, j in enumerate(idx) if j not in self.cache]
            if todo:
                parts = self.encode_images(images[todo], [captions[i] for i in todo])
                for n, i in enumerate(todo):
                    self.cache[idx[i]] = tuple(None if t is None else t[n:n + 1].detach().cpu() for t in parts)
            rows = [self.cache[j] for j in idx]
            mean, std, ctx, pooled = (None if rows[0][k] is None else torch.cat([r[k] for r in rows]).to(self.device)
                                      for k in range(4))
        else:
            mean, std, ctx, pooled = self.encode_images(batch["image"], captions)
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
