"""The demo world's autoencoder: a tiny AutoencoderKL (64x64 -> 16x16x4) trained on demo images.

Full recipe of the bundled weights: docs/demo_results.md. In short:
    # 1. the VAE: random 32x32 crops, then whole images; then shape-weighted fine-tunes of the
    #    decoder (--decoder-steps) and of the whole VAE (--decoder-steps N --encoder)
    python -m demo.vae --threads 1 --steps 1000 --full-steps 60 --out outputs/demo/vae_long.safetensors --base-out ""
    python -m demo.vae --threads 1 --from-vae VAE --decoder-steps 700 --full-steps 250 --fg-weight 4 \
        --decay [--encoder] --out NEW_VAE --base-out ""
    # 2. the untrained teacher file: UNet init + this VAE + the caption-pretrained text tower
    python -m demo.text --threads 1 --out outputs/demo2/text.safetensors
    python -m demo.vae --threads 1 --from-vae NEW_VAE --text outputs/demo2/text.safetensors \
        --base-out outputs/demo2/base_init.safetensors
    # 3. python train.py experiment=demo_teacher (trains the UNet from that file)
    # (--replace-in MODEL writes --base-out as MODEL with its VAE replaced, for decoder-only fine-tunes)

Objective (LDM's first stage without the GAN and LPIPS terms, enough for flat shapes):
    L = |x - D(z)|_1 + |x - D(z)|_2^2 + beta * KL(q(z|x) || N(0, I)),   z ~ q(z|x), beta tiny
After training, the latent scale is set as in LDM: scale_factor = 1 / std(z) over training images,
so UNet-space latents have unit variance. `--base-out` also writes the untrained demo teacher (the
UNet at its LDM init, this VAE, and the text tower of --text, else a random-init one) as an
original-layout single file: `python train.py experiment=demo_teacher` trains its UNet from there.
The decoder fine-tuning keeps the encoder (so a teacher's latents stay valid) unless --encoder, and
weights the shape's pixels more: small shapes on large backgrounds otherwise lose their colour
(the first run's VAE, outputs/demo/vae_dec2, returned blue and cyan shapes as each other: 83%
prompt accuracy of its reconstructions; after the decayed decoder and whole-VAE fine-tunes: 99.6%,
`--from-vae VAE --eval 256`).
Use --threads 1 on a shared CPU: 2 OpenMP threads on an oversubscribed CPU ran 10x slower here.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import safetensors.torch
import torch

from demo.arch import TEACHER_ARCH, VAE_ARCH
from demo.evaluator import DemoEvaluator
from demo.text import load_text
from demo.world import real_batch, sample, world_spec
from models.checkpoint import save_model_file
from models.checkpoint import VAE_PREFIX
from models.text import TextConditioner
from models.unet import UNetModel
from models.vae import AutoencoderKL

#----------------------------------------------------------------------------


def image_pool(n: int, seed: int) -> torch.Tensor:
    """n demo images (n, 3, 64, 64) in [-1, 1], alternating plain and outlined styles."""
    return torch.stack([sample(seed, i, ("plain", "outlined")[i % 2])[1] for i in range(n)])


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator, beta: float) -> torch.Tensor:
    """L1 + L2 reconstruction of x (B,3,H,W) from z ~ q(z|x), plus beta * KL(q || N(0,I))."""
    post = vae.encode(x)
    z = post.sample(g)
    err = vae.decode(z) - x
    kl = 0.5 * (post.mean.pow(2) + post.std.pow(2) - 1.0 - post.logvar).sum(dim=(1, 2, 3))
    return err.abs().mean() + err.pow(2).mean() + beta * kl.mean()


def random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image of x (B,3,H,W), offsets on the 4-pixel latent grid."""
    if size >= x.shape[-1]:
        return x
    n = (x.shape[-1] - size) // 4 + 1
    off = torch.randint(0, n, (x.shape[0], 2), generator=g) * 4
    return torch.stack([im[:, i:i + size, j:j + size] for im, (i, j) in zip(x, off.tolist())])


def train_vae(steps: int, batch: int = 16, lr: float = 1e-3, beta: float = 1e-6, pool: int = 1024,
              seed: int = 0, log_every: int = 10, crop: int = 32, full_steps: int = 20) -> AutoencoderKL:
    """Train the demo VAE; sets scale_factor = 1/std of the latent means over the pool.

    The first steps - full_steps see random crop x crop crops (the nets are convolutional; 4x
    cheaper on a CPU), the last full_steps whole 64x64 images (GroupNorm and attention statistics)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_ARCH)
    with torch.no_grad():                       # start with a narrow posterior: log sigma^2 = -10
        vae.quant_conv.bias[VAE_ARCH["embed_dim"]:] = -10.0
    data = image_pool(pool, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 2.0 * (1 - s / steps) + 0.05))
    t0 = time.time()
    for step in range(steps):
        x = data[torch.randint(0, pool, (batch,), generator=g)]
        x = random_crops(x, crop, g) if step < steps - full_steps else x
        loss = vae_loss(vae, x, g, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():
        mse = torch.cat([(vae.decode(vae.encode(data[i:i + 128]).mean) - data[i:i + 128]).pow(2).mean((1, 2, 3))
                         for i in range(0, 512, 128)]).mean()
    set_scale_factor(vae, data[:1024], f"; recon mse {mse:.5f}")
    return vae


def finetune_decoder(vae: AutoencoderKL, steps: int, batch: int = 16, lr: float = 1e-3, pool: int = 1024,
                     seed: int = 1, crop: int = 32, fg_weight: float = 8.0, log_every: int = 25,
                     full_steps: int = 0, decay: bool = False, encoder: bool = False,
                     beta: float = 1e-6) -> AutoencoderKL:
    """Train the decoder alone on the frozen encoder's latents (so a teacher trained on those latents
    stays valid), with the shape's pixels weighted (1 + fg_weight): the small shapes' colours.
    decay: lr falls linearly to 0 over the run (else constant). encoder: train the encoder too
    (z ~ q(z|x) of the crop, + beta * KL; invalidates teachers trained on the old latents) and
    re-set scale_factor = 1/std of the latent means."""
    data = image_pool(pool, seed)
    mean = latent_means(vae, data)
    bg = data[:, :, :1, :1]                                            # corner pixel = background
    weight = 1.0 + fg_weight * ((data - bg).abs().sum(1, keepdim=True) > 0.15).float()
    g = torch.Generator().manual_seed(seed)
    params = list(vae.parameters()) if encoder else list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps if decay else 1.0)
    vae.train()
    t0, f = time.time(), 4
    for step in range(steps):
        c = 16 if step >= steps - full_steps else crop // 4             # last full_steps: whole images
        idx = torch.randint(0, pool, (batch,), generator=g)
        off = torch.randint(0, 16 - c + 1, (batch, 2), generator=g).tolist()
        z = torch.stack([mean[k, :, i:i + c, j:j + c] for k, (i, j) in zip(idx.tolist(), off)])
        x = torch.stack([data[k, :, i * f:(i + c) * f, j * f:(j + c) * f] for k, (i, j) in zip(idx.tolist(), off)])
        w = torch.stack([weight[k, :, i * f:(i + c) * f, j * f:(j + c) * f] for k, (i, j) in zip(idx.tolist(), off)])
        kl = 0.0
        if encoder:                                                     # z ~ q(z|x) of the crop itself
            post = vae.encode(x)
            z = post.sample(g)
            kl = beta * 0.5 * (post.mean.pow(2) + post.std.pow(2) - 1.0 - post.logvar).sum(dim=(1, 2, 3)).mean()
        err = vae.decode(z) - x
        loss = (w * (err.abs() + err.pow(2))).mean() / w.mean() + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"decoder step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    if encoder:
        set_scale_factor(vae, data)
    return vae


@torch.no_grad()
def latent_means(vae: AutoencoderKL, x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Means of q(z|x) (N,4,h,w) for images x (N,3,H,W), encoded in chunks."""
    return torch.cat([vae.encode(x[i:i + chunk]).mean for i in range(0, len(x), chunk)])


def set_scale_factor(vae: AutoencoderKL, x: torch.Tensor, extra: str = "") -> None:
    """LDM's latent scale: scale_factor = 1 / std of the latent means of images x (unit-variance latents)."""
    std = latent_means(vae, x).std()
    vae.scale_factor = float(1.0 / std)
    print(f"latent std {std:.4f} -> scale_factor {vae.scale_factor:.5f}{extra}", flush=True)


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, evaluator_path: str, n: int = 256, seed: int = 7) -> dict:
    """The evaluator's prompt accuracy on D(mean of q(z|x)) of n real plain images: the VAE's cap."""
    x, attrs = real_batch(n, seed)
    rec = torch.cat([vae.decode(vae.encode(xb).mean) for xb in x.split(64)])
    return DemoEvaluator.load(evaluator_path).prompt_accuracy(rec, attrs)


def vae_config(vae: AutoencoderKL) -> dict:
    return dict(VAE_ARCH, scale_factor=vae.scale_factor)


def save_vae(vae: AutoencoderKL, path: str) -> None:
    """The VAE alone (original first-stage key names) with its config and world in the metadata."""
    meta = {"lcm.vae_config": json.dumps(vae_config(vae)), "world": json.dumps(world_spec())}
    safetensors.torch.save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, path, metadata=meta)


def load_vae(path: str) -> AutoencoderKL:
    """Inverse of save_vae."""
    with safetensors.safe_open(path, framework="pt") as f:
        cfg = json.loads((f.metadata() or {})["lcm.vae_config"])
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict(safetensors.torch.load_file(path), strict=True)
    return vae.eval()


def save_base(vae: AutoencoderKL, path: str, seed: int = 0, text_path: str | None = None) -> None:
    """The untrained demo teacher: UNet at LDM init (seeded), this VAE, and the text tower of
    text_path (demo.text, pretrained on captions), else a random-init one (seeded)."""
    torch.manual_seed(seed)
    unet, text = UNetModel(**TEACHER_ARCH["unet"]), TextConditioner(**TEACHER_ARCH["text"])
    if text_path:
        text = load_text(text_path)
        assert text.config == TextConditioner(**TEACHER_ARCH["text"]).config, (text.config, TEACHER_ARCH["text"])
    config = dict(family="demo", text_family=TEACHER_ARCH["text_family"], unet=TEACHER_ARCH["unet"],
                  vae=vae_config(vae), default_size=TEACHER_ARCH["default_size"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_model_file(path, unet, vae, text, config, {"prediction_type": TEACHER_ARCH["prediction_type"]})


def replace_vae(model_path: str, vae: AutoencoderKL, out: str) -> None:
    """Copy an original-layout model file with its VAE weights (and VAE config) replaced by vae's."""
    with safetensors.safe_open(model_path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    sd = {k: v for k, v in safetensors.torch.load_file(model_path).items() if not k.startswith(VAE_PREFIX)}
    sd |= {VAE_PREFIX + k: v.contiguous() for k, v in vae.state_dict().items()}
    config = json.loads(meta["lcm.config"])
    config["vae"] = {**config["vae"], **vae_config(vae)}
    meta["lcm.config"] = json.dumps(config)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    safetensors.torch.save_file(sd, out, metadata=meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="assets/demo_vae.safetensors")
    ap.add_argument("--base-out", default="outputs/demo/base_init.safetensors",
                    help="also write the untrained teacher (UNet init + this VAE + text tower) here")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--crop", type=int, default=32, help="train on random crops of this side first")
    ap.add_argument("--full-steps", type=int, default=20, help="last steps on whole images")
    ap.add_argument("--decoder-seed", type=int, default=1)
    ap.add_argument("--encoder", action="store_true", help="decoder fine-tuning: train the encoder too")
    ap.add_argument("--decay", action="store_true", help="decoder fine-tuning: lr decays linearly to 0")
    ap.add_argument("--fg-weight", type=float, default=8.0, help="decoder fine-tuning: extra weight on shape pixels")
    ap.add_argument("--replace-in", default=None,
                    help="write --base-out as this model file with its VAE replaced (e.g. the trained teacher)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default=None, help="--base-out's text tower: this demo.text file (else random)")
    ap.add_argument("--from-vae", default=None, help="start from this VAE file instead of training one")
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="with --from-vae: fine-tune the decoder (with --encoder: the whole VAE) this many steps, write --out")
    ap.add_argument("--eval", type=int, default=0,
                    help="print the evaluator's prompt accuracy on this many reconstructed real images")
    ap.add_argument("--evaluator", default="assets/demo_evaluator.safetensors")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.from_vae:
        vae = load_vae(a.from_vae)
        if a.decoder_steps:
            vae = finetune_decoder(vae, a.decoder_steps, lr=a.lr, seed=a.decoder_seed, fg_weight=a.fg_weight,
                                   full_steps=a.full_steps, decay=a.decay,
                                   encoder=a.encoder)
            save_vae(vae, a.out)
            print(a.out)
    else:
        vae = train_vae(a.steps, a.batch, a.lr, crop=a.crop, full_steps=a.full_steps)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        save_vae(vae, a.out)
        print(a.out)
    if a.eval:
        print("reconstruction prompt accuracy:", json.dumps(reconstruction_accuracy(vae, a.evaluator, a.eval)))
    if a.base_out and a.replace_in:
        replace_vae(a.replace_in, vae, a.base_out)
        print(a.base_out)
    elif a.base_out:
        save_base(vae, a.base_out, text_path=a.text)
        print(a.base_out)


if __name__ == "__main__":
    main()
