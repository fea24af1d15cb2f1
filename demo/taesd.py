"""The demo world's tiny decoder: a TAESD decoder (models/taesd.py) distilled from the demo VAE.

    python -m demo.taesd --threads 1                  # the bundled assets/demo_taesd_decoder.safetensors
    python -m demo.taesd --threads 1 --steps 0 --eval 256    # evaluate the bundled file only
    python sample.py vae.tiny=assets/demo_taesd_decoder.safetensors   # (the sample.py knob)

The demo VAE downsamples x4 (64x64 images, 16x16x4 latents), so the net is TAESD's decoder with 2
upsampling levels instead of 3 and 32 channels instead of 64 (215k parameters, 0.9 MB fp32); the
layout and conventions are TAESD's: it decodes UNet-space latents (scale factor 1) to [0, 1].
Objective (TAESD's distillation target, without its adversarial term): the full decoder's image,
    L = mean_w |D_tiny(z) - D(z / s)|_1 + |D_tiny(z) - D(z / s)|^2,   z = s * mean of q(z|x)
over demo images x (plain and outlined), w = 1 + 4 on the shape's pixels (small shapes' colours),
random 8x8 latent crops (32x32 pixels) first and whole latents for the last --full-steps.
Deterministic for a given --threads (seeded data, init and batches). Evaluation (--eval N): PSNR of
the tiny decoder against the full one, and the demo evaluator's prompt accuracy of both decoders, on
N held-out real images' latents and on N LCM-LoRA 4-step samples.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from demo.vae import image_pool, latent_means
from demo.world import fixed_prompt_set, real_batch, world_spec
from lcm.pipeline import Pipeline
from models.taesd import TinyDecoder, load_tiny_vae, save_tiny_decoder

OUT = "assets/demo_taesd_decoder.safetensors"
ARCH = dict(channels=32, upsamples=2, latent_channels=4)

#----------------------------------------------------------------------------


@torch.no_grad()
def distillation_data(pipe: Pipeline, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet-space latents z (n,4,16,16), the full decoder's images D(z/s) (n,3,64,64) in [-1,1],
    and the shape-pixel weights (n,1,64,64) of n demo images."""
    x = image_pool(n, seed)
    z = latent_means(pipe.vae, x) * pipe.vae_scale
    target = torch.cat([pipe.decode(zb) * 2 - 1 for zb in z.split(128)])
    weight = 1.0 + 4.0 * ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.15).float()
    return z, target, weight


def train(pipe: Pipeline, steps: int, batch: int = 32, lr: float = 2e-3, n: int = 1024, seed: int = 0,
          crop: int = 8, full_steps: int = 100, log_every: int = 100) -> TinyDecoder:
    """Distil the tiny decoder from pipe's VAE decoder (see the module docstring)."""
    z, target, weight = distillation_data(pipe, n, seed)
    f = pipe.latent_factor
    torch.manual_seed(seed)
    dec = TinyDecoder(**ARCH)
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)      # linear decay to 0
    g = torch.Generator().manual_seed(seed)
    t0, side = time.time(), z.shape[-1]
    for step in range(steps):
        c = side if step >= steps - full_steps else crop
        idx = torch.randint(0, n, (batch,), generator=g).tolist()
        off = torch.randint(0, side - c + 1, (batch, 2), generator=g).tolist()
        crops = lambda t, s: torch.stack([t[k, :, i * s:(i + c) * s, j * s:(j + c) * s]  # noqa: E731
                                          for k, (i, j) in zip(idx, off)])
        zb, xb, wb = crops(z, 1), crops(target, f), crops(weight, f)
        err = dec(zb) * 2 - 1 - xb                                   # taesd's [0,1] -> [-1,1]
        loss = (wb * (err.abs() + err.pow(2))).mean() / wb.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return dec.eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean()))


@torch.no_grad()
def evaluate(pipe: Pipeline, tiny_path: str, evaluator_path: str, n: int, seed: int = 7) -> dict:
    """Tiny vs full decoder on n held-out real images' latents and on n LCM-LoRA 4-step samples."""
    from demo.evaluator import DemoEvaluator
    ev = DemoEvaluator.load(evaluator_path)
    x, attrs = real_batch(n, seed, start=100_000)                   # not in the training pool's seed
    prompts = fixed_prompt_set(n, seed=3)
    lat = {"real": latent_means(pipe.vae, x) * pipe.vae_scale,
           "lcm4": torch.cat([pipe(prompts[i:i + 64], steps=4, seed=i, output="latent", progress=False)
                              for i in range(0, n, 64)])}
    tiny = load_tiny_vae(tiny_path)
    out = {}
    for name, z in lat.items():
        full = pipe.decode(z)
        small = ((tiny.decode(z) + 1) / 2).clamp(0, 1)
        labels = attrs if name == "real" else prompts
        t0 = time.perf_counter()
        pipe.decode(z)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        tiny.decode(z)
        t_tiny = time.perf_counter() - t0
        out[name] = dict(psnr_tiny_vs_full=psnr(small, full),
                         acc_full=ev.prompt_accuracy(full * 2 - 1, labels)["overall"],
                         acc_tiny=ev.prompt_accuracy(small * 2 - 1, labels)["overall"],
                         decode_ms_per_image_full=1e3 * t_full / n, decode_ms_per_image_tiny=1e3 * t_tiny / n)
        if name == "real":
            out[name]["psnr_full_vs_image"] = psnr(full, (x + 1) / 2)
            out[name]["psnr_tiny_vs_image"] = psnr(small, (x + 1) / 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="assets/demo_teacher.safetensors", help="the demo model whose VAE is distilled")
    ap.add_argument("--lora", default="assets/demo_lcm_lora.safetensors", help="--eval: the LCM-LoRA that samples")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--steps", type=int, default=1500, help="0: no training, evaluate --out")
    ap.add_argument("--full-steps", type=int, default=100, help="last steps on whole latents")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval", type=int, default=0, help="evaluate on this many images per set")
    ap.add_argument("--evaluator", default="assets/demo_evaluator.safetensors")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = Pipeline.from_checkpoint(a.teacher)
    if a.steps:
        t0 = time.time()
        dec = train(pipe, a.steps, a.batch, a.lr, seed=a.seed, full_steps=a.full_steps)
        meta = {"recipe": f"python -m demo.taesd --steps {a.steps} --full-steps {a.full_steps} --batch {a.batch} "
                          f"--lr {a.lr} --seed {a.seed} --threads {a.threads}",
                "teacher": a.teacher, "arch": json.dumps(ARCH), "world": json.dumps(world_spec()),
                "train_seconds": f"{time.time() - t0:.0f}"}
        save_tiny_decoder(dec, a.out, meta)
        print(a.out, flush=True)
    if a.eval:
        pipe.load_lora(a.lora, name="lcm")
        print(json.dumps(evaluate(pipe, a.out, a.evaluator, a.eval), indent=1))


if __name__ == "__main__":
    main()
