"""CPU cost of LoRA at SD1.5 size: base vs one unfused rank-64 adapter on all 278 targets vs fused.

    nice python benchmarks/lora.py --runs 5

Prints the FLOP counts, then median (and min) seconds per forward (fp32, torch.inference_mode,
batch 1, 64x64 latent) and the ratios to base (targets: fused <= 1.02, unfused <= 1.15). "base" is the same model with the
adapters disabled (wrappers in place, W0 restored), so the three differ only in the LoRA math.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.lora import count_lora_params, fuse_lora, inject_lora, lora_layers, unfuse_lora  # noqa: E402
from models.unet import UNET_PRESETS, UNetModel  # noqa: E402


def set_mode(unet: UNetModel, mode: str) -> None:
    """'base' (adapters off), 'unfused' (adapter branches) or 'fused' (W0 + delta baked in)."""
    if mode == "fused":
        fuse_lora(unet)
    else:
        unfuse_lora(unet)
    for _, m in lora_layers(unet):
        m.lora_enabled = mode != "base"


def flop_counts(side: int, rank: int) -> tuple[float, float]:
    """GFLOP per forward of the base and the unfused model (meta device: shapes only, no time)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNetModel(**UNET_PRESETS["sd15"]).eval()
        x, ctx, t = torch.randn(1, 4, side, side), torch.randn(1, 77, 768), torch.tensor([500])
    out = []
    for step in range(2):
        if step:
            inject_lora(unet, "lcm", rank=rank, alpha=rank)
            for _, m in lora_layers(unet):
                m.lora_up["lcm"].weight.data = torch.ones_like(m.lora_up["lcm"].weight)   # meta: any values
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            unet(x, t, ctx)
        out.append(fc.get_total_flops() / 1e9)
    return out[0], out[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed forwards per mode (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards per mode first")
    ap.add_argument("--side", type=int, default=64, help="latent side (64 = 512px images)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gf_base, gf_lora = flop_counts(args.side, args.rank)
    print(f"GFLOP per forward: base {gf_base:.1f}, unfused LoRA {gf_lora:.1f} (x{gf_lora / gf_base:.3f}), "
          "fused = base")
    torch.manual_seed(0)
    unet = UNetModel(**UNET_PRESETS["sd15"]).eval()
    inject_lora(unet, "lcm", rank=args.rank, alpha=args.rank)
    with torch.no_grad():
        for p in unet.parameters():                       # LDM zero-inits out.2, out_layers.3, proj_out
            if not p.any():
                p.normal_(0, 0.02)
        for _, m in lora_layers(unet):                    # B != 0, as after training
            m.lora_up["lcm"].weight.normal_(0, 1e-3)
    n, mods = count_lora_params(unet, "lcm")
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, args.side, args.side, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD1.5 UNet, latent {args.side}x{args.side}, "
          f"batch 1, fp32; LoRA rank {args.rank}: {n:,} params on {mods} modules")

    modes, times = ("base", "unfused", "fused"), {}
    with torch.inference_mode():
        outs = {}
        for mode in modes:
            set_mode(unet, mode)
            for _ in range(args.warmup):
                outs[mode] = unet(x, t, ctx)
        for _ in range(args.runs):                        # interleaved: machine load hits all alike
            for mode in modes:
                set_mode(unet, mode)
                t0 = time.perf_counter()
                unet(x, t, ctx)
                times.setdefault(mode, []).append(time.perf_counter() - t0)
    med = {m: statistics.median(ts) for m, ts in times.items()}
    best = {m: min(ts) for m, ts in times.items()}          # min: least disturbed by other load
    for m in modes:
        print(f"{m:>8}: median {med[m]:7.3f} s (x{med[m] / med['base']:.3f} of base), min {best[m]:7.3f} s "
              f"(x{best[m] / best['base']:.3f})  runs {[round(v, 2) for v in times[m]]}")
    err = (outs["fused"] - outs["unfused"]).abs().max() / outs["unfused"].abs().max().clamp_min(1e-12)
    print(f"fused vs unfused output: max rel err {err.item():.1e}; "
          f"LoRA changes the output by {(outs['unfused'] - outs['base']).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
