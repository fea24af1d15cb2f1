"""CPU speed of our UNet vs diffusers' UNet2DConditionModel at SD1.5 size, identical random weights.

    nice python benchmarks/unet.py --runs 5 --batch 1 2

Prints the median seconds per forward (fp32, torch.inference_mode) and ours / diffusers.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusers import UNet2DConditionModel  # noqa: E402

from models.keymaps import unet_state_dict_diffusers_to_ldm  # noqa: E402
from models.unet import UNetModel, infer_unet_config  # noqa: E402
from train_step import SD15  # noqa: E402  (the diffusers SD1.5 UNet config, one copy)


def median_times(fns, warmup: int, runs: int) -> list:
    """Median seconds of each callable; runs interleave so that machine load hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model and batch (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--side", type=int, default=64, help="latent side (64 = 512px images)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**SD15).eval()
    sd = unet_state_dict_diffusers_to_ldm(ref.state_dict())
    with torch.device("meta"):
        ours = UNetModel(**infer_unet_config(sd))
    ours.load_state_dict(sd, strict=True, assign=True)                  # shares the very same tensors
    ours.eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, latent {args.side}x{args.side}, fp32")
    for B in args.batch:
        g = torch.Generator().manual_seed(B)
        x = torch.randn(B, 4, args.side, args.side, generator=g)
        t = torch.full((B,), 500)
        ctx = torch.randn(B, 77, 768, generator=g)
        with torch.inference_mode():
            err = (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max().item()
            t_ours, t_ref = median_times([lambda: ours(x, t, ctx), lambda: ref(x, t, ctx).sample],
                                         args.warmup, args.runs)
        print(f"batch {B}: ours {t_ours:.3f} s  diffusers {t_ref:.3f} s  ratio {t_ours / t_ref:.3f}  "
              f"(max abs diff {err:.2e})", flush=True)


if __name__ == "__main__":
    main()
