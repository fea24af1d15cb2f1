"""End-to-end LCM-LoRA 4 steps at SD1.5 size with the tiny decoder (TAESD) vs the full VAE, ours vs
diffusers (AutoencoderTiny), on the same random weights.

    nice python benchmarks/taesd.py --threads 2 --runs 2

The pipelines of benchmarks/e2e.py (benchmarks/gpu.py's `build`: identical random SD1.5-size
weights, the same fused rank-64 LCM-LoRA, 512x512, fp32 CPU, guidance 1.0) plus one random
AutoencoderTiny at diffusers' default config (= madebyollin/taesd), written as its safetensors and
loaded by ours with `Pipeline.load_tiny_vae`. Parity first: the warm-up run of every configuration
returns its images, ours vs diffusers are compared (full VAE and tiny), and the two tiny decoders
alone on the same latents. Then --runs interleaved runs of the four configurations (prompt -> PIL
image), medians, and the decoders alone (median of --decode-runs). Ratios: tiny / full, ours / diffusers.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from gpu import PROMPT, build  # noqa: E402


def tiny_reference(path: str):
    """diffusers' AutoencoderTiny at its default config, random weights (x1.5 so ReLUs mix), saved to path."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file
    torch.manual_seed(0)
    tiny = AutoencoderTiny().eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(1.5)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, path)
    return tiny


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="timed end-to-end runs per configuration (median)")
    ap.add_argument("--decode-runs", type=int, default=5, help="timed runs of the tiny decoders alone")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref, _ = build("sd15", False, "cpu", torch.float32, tmp)
        path = os.path.join(tmp, "diffusion_pytorch_model.safetensors")
        tiny_ref = tiny_reference(path)
        ours_tiny = ours.replace()
        ours_tiny.load_tiny_vae(path)
    ref_tiny = StableDiffusionPipeline(**{**ref.components, "vae": tiny_ref}, requires_safety_checker=False)
    ref_tiny.set_progress_bar_config(disable=True)
    side = args.size // ours.latent_factor
    x_T = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))

    def run_ours(pipe, out="pil"):
        return pipe(PROMPT, steps=args.steps, guidance_scale=1.0, solver="lcm", height=args.size, width=args.size,
                    latents=x_T, generator=torch.Generator().manual_seed(2), output=out, progress=False)

    def run_ref(pipe, out="pil"):
        return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=1.0, height=args.size, width=args.size,
                    latents=x_T, generator=torch.Generator().manual_seed(2), output_type=out).images

    configs = {"ours full VAE": lambda out="pil": run_ours(ours, out),
               "diffusers full VAE": lambda out="pil": run_ref(ref, out),
               "ours TAESD": lambda out="pil": run_ours(ours_tiny, out),
               "diffusers TAESD": lambda out="pil": run_ref(ref_tiny, out)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD1.5 size, {args.size}x{args.size}, "
          f"{args.steps} LCM steps, fused LoRA r64, fp32", flush=True)
    with torch.inference_mode():
        imgs = {name: fn("tensor" if name.startswith("ours") else "pt").float() for name, fn in configs.items()}
        err_full = (imgs["ours full VAE"] - imgs["diffusers full VAE"]).abs().max().item()
        err_tiny = (imgs["ours TAESD"] - imgs["diffusers TAESD"]).abs().max().item()
        z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(4))
        want = tiny_ref.decode(z).sample
        err_dec = (ours_tiny.tiny_vae.decode(z) - want).abs().max().item()
        print(f"parity (images in [0, 1], max abs): full VAE {err_full:.1e}, TAESD {err_tiny:.1e}; TAESD decode alone "
              f"(in [-1, 1], |out| <= {want.abs().max():.2f}) {err_dec:.1e}", flush=True)
        if max(err_full, err_tiny) > 1e-3 or err_dec > 1e-4:
            sys.exit("ours and diffusers disagree: not benchmarking different computations")
        times = {name: [] for name in configs}
        for _ in range(args.runs):                             # interleaved
            for name, fn in configs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        dec = {"ours TAESD": median_time(lambda: ours_tiny.tiny_vae.decode(z), args.decode_runs),
               "diffusers TAESD": median_time(lambda: tiny_ref.decode(z), args.decode_runs)}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nend to end (prompt -> PIL), median of {args.runs}:")
    for name in configs:
        print(f"  {name:20s} {med[name]:6.2f} s")
    print(f"  tiny / full: ours {med['ours TAESD'] / med['ours full VAE']:.3f}, diffusers "
          f"{med['diffusers TAESD'] / med['diffusers full VAE']:.3f}")
    print(f"  ours / diffusers: full VAE {med['ours full VAE'] / med['diffusers full VAE']:.3f}, TAESD "
          f"{med['ours TAESD'] / med['diffusers TAESD']:.3f}")
    print(f"TAESD decode alone (64x64 latent -> 512x512), median of {args.decode_runs}: ours {dec['ours TAESD']:.3f} s, "
          f"diffusers {dec['diffusers TAESD']:.3f} s, ratio {dec['ours TAESD'] / dec['diffusers TAESD']:.3f}")
    print(f"full-VAE decode share of end to end, ours (full - TAESD run + TAESD decode): "
          f"{(med['ours full VAE'] - med['ours TAESD'] + dec['ours TAESD']) / med['ours full VAE']:.0%}")


if __name__ == "__main__":
    main()
