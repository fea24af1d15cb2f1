"""CPU cost of a JVP through the UNet (sCM's dF/dt, docs/method.md Sec. 15): a plain forward vs
lcm.objectives.jvp by forward-mode AD vs by central differences, and the cost of the forward-AD check
in the attention on ordinary forwards.

    nice python benchmarks/jvp.py --runs 5

fp32, no_grad, an active unfused rank-4 LoRA, tangents in x and t. "tiny" is conf/experiment/smoke.yaml's
UNet at 16x16 latents, "mid" a 3-level UNet (128 channels, SD2-style heads of 64) at 32x32. Median ms
per call (min in brackets); "fwd, no check" swaps models.unet.has_tangent for a constant (the code
before the check), alternating with the checked forward, so the two see the same machine load.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models.unet as unet_module  # noqa: E402
from lcm.objectives.jvp import jvp  # noqa: E402
from models.lora import inject_lora  # noqa: E402
from models.unet import CrossAttention, UNetModel  # noqa: E402

CONFIGS = {   # name: (UNet kwargs, latent side, context tokens)
    "tiny": (dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), transformer_depth=[1, 1], num_heads=2,
                  context_dim=32, use_linear_in_transformer=True), 16, 8),
    "mid": (dict(model_channels=128, num_res_blocks=1, channel_mult=(1, 2, 4), transformer_depth=[1, 1, 1],
                 num_head_channels=64, context_dim=256, use_linear_in_transformer=True), 32, 77),
}


def timed(f, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def bench(name: str, runs: int) -> dict[str, list[float]]:
    kw, side, tokens = CONFIGS[name]
    torch.manual_seed(0)
    unet = UNetModel(**kw).eval()
    with torch.no_grad():
        for up in inject_lora(unet, rank=4, alpha=4)[1::2]:
            up.normal_(0, 0.01)                                  # B != 0: the adapters compute
    x, ctx, t = torch.randn(1, 4, side, side), torch.randn(1, tokens, kw["context_dim"]), torch.tensor([377.3])
    fn, primals, tangents = (lambda x, t: unet(x, t, ctx)), (x, t), (torch.randn_like(x), torch.ones_like(t))

    def forward(check: bool):
        unet_module.has_tangent = checked if check else (lambda *ts: False)
        with torch.no_grad():
            fn(x, t)
    checked = unet_module.has_tangent
    for f in (lambda: forward(True), lambda: jvp(fn, primals, tangents), lambda: jvp(fn, primals, tangents, "fd")):
        f()                                                      # warm-up (functorch's first jvp loads decompositions)
    res = {"fwd": [], "fwd, no check": []}
    for _ in range(runs):                                        # interleaved: the same load for both
        res["fwd"] += timed(lambda: forward(True), 1)
        res["fwd, no check"] += timed(lambda: forward(False), 1)
    unet_module.has_tangent = checked
    res["jvp autograd"] = timed(lambda: jvp(fn, primals, tangents), runs)
    res["jvp fd"] = timed(lambda: jvp(fn, primals, tangents, "fd"), runs)
    q = torch.randn(1, 2, 8, 16)
    per_call_us = min(timed(lambda: [checked(q, q, q) for _ in range(1000)], 5))   # ms per 1000 = us per call
    res["check x calls"] = [per_call_us * sum(isinstance(m, CrossAttention) for m in unet.modules()) / 1e3]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed calls per row (median reported)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median (min) ms per call")
    for name in args.configs:
        res = bench(name, args.runs)
        fwd = statistics.median(res["fwd"])
        print(f"\n{name}: {CONFIGS[name][1]}x{CONFIGS[name][1]} latent")
        for row, ms in res.items():
            med = statistics.median(ms)
            print(f"  {row:<16} {med:9.3f} ({min(ms):9.3f})   x{med / fwd:5.2f} fwd")


if __name__ == "__main__":
    main()
