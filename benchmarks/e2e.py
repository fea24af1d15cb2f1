"""End-to-end LCM-LoRA text-to-image at SD1.5 size: ours vs diffusers StableDiffusionPipeline.

    nice python benchmarks/e2e.py --threads 1 --runs 3

One prompt -> tokenize -> CLIP-L text encoding -> 4 LCM steps of the UNet with a fused rank-64
LCM-LoRA (guidance 1.0: one UNet call per step) -> VAE decode -> PIL image, 512x512, fp32 CPU.
The CPU case of benchmarks/gpu.py (same builders): both pipelines hold the very same random
weights (diffusers modules -> the original layout -> ours) and the same LoRA (ours writes it as a
kohya file, diffusers loads it with load_lora_weights); both fuse it, as a user would for inference.
Before timing, the final latents of the two are compared (same x_T, same generator). Prints medians
of interleaved runs and the ratio ours / diffusers.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from gpu import build, latency  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per pipeline (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref, _ = build("sd15", False, "cpu", torch.float32, tmp)
    r = latency(ours, ref, args.size, args.steps, args.runs, "cpu", compile_=False, warmup=max(1, args.warmup))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD1.5 size, {args.size}x{args.size}, "
          f"{args.steps} LCM steps, fused LoRA r64, fp32; final latents max rel diff {r['rel_diff']:.1e}", flush=True)
    if r["rel_diff"] > 1e-3:
        sys.exit("the two pipelines disagree: not benchmarking different computations")
    print(f"ours {r['ours']:.2f} s  diffusers {r['ref']:.2f} s  ratio {r['ours'] / r['ref']:.3f}  "
          f"(median of {args.runs}, per image incl. text encoding and VAE decode)", flush=True)


if __name__ == "__main__":
    main()
