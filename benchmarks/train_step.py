"""One LCM-LoRA distillation step at SD1.5 (or SDXL) size: ours vs diffusers UNet2DConditionModel + peft.

    nice python benchmarks/train_step.py --threads 1 --steps 3 --repeat 2
    python benchmarks/train_step.py --impls dmd2,ours --threads 1 --steps 4     # DMD2 vs LCD-LoRA
    python benchmarks/train_step.py --family sdxl --device cuda --dtype bf16 --side 128   # GPU memory

The step of Algorithm 1 with one UNet in memory: student (LoRA) forward + backward at t_{n+k},
teacher = the same UNet with adapters disabled (cond + uncond, guided DDIM step), target = the
LoRA UNet under no_grad at t_n, pseudo-Huber loss, grad clip 1.0, AdamW step. Rank 64, alpha 64,
the 14 LCM-LoRA module kinds, batch 1, fp32, CPU; latents and text embeddings are given (cached).
Each implementation runs in its own subprocess so that its peak RSS (VmHWM, reset after the
model is built) is its own. Prints median step seconds, peak RSS and ours / diffusers ratios.
On CUDA the memory is torch.cuda.max_memory_allocated; --dtype bf16 keeps the frozen base in bf16
and the LoRA weights in fp32 under autocast (as the diffusers LCM-LoRA scripts do).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SD15 = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, sample_size=64)
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
CONFIGS = {"sd15": SD15, "sdxl": SDXL}
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                     "time_emb_proj"]          # the diffusers LCM-LoRA scripts' list (docs/method.md Sec. 5)
K, W_MIN, W_MAX, HUBER_C = 20, 5.0, 15.0, 1e-3


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:        # "5": reset VmHWM to the current RSS (Linux)
        f.write("5")

#----------------------------------------------------------------------------
# Ours: the trainer's step of an objective (lcm/objectives/) over models.unet + models.lora:
# "ours" = objective=lcd_lora (Algorithm 1), "dmd2" = objective=dmd2 (generator and fake-score steps
# alternate, gen_every=2, so both kinds are timed; 4 generator steps with backward simulation).

def ours_step(args):
    from types import SimpleNamespace

    from lcm.consistency import ConsistencySpec
    from lcm.objectives.base import LoRAConfig
    from lcm.objectives.dmd2 import DMD2
    from lcm.objectives.lcd_lora import LCDLoRA
    from lcm.training.loop import TrainConfig, make_optimizer, step_generators
    from models.text import Conditioning
    from models.unet import UNET_PRESETS, UNetModel
    from solvers.schedule import Schedule
    with torch.device(args.device):
        unet = UNetModel(**UNET_PRESETS[args.family]).requires_grad_(False).to(DTYPES[args.dtype])
    pipe = SimpleNamespace(unet=unet, schedule=Schedule.make(), prediction_type="epsilon", spec=ConsistencySpec(),
                           adapter_specs={})
    lora = LoRAConfig(rank=64, alpha=64)
    objective = (DMD2(lora=lora, gen_every=2, real_guidance=1.75) if args.impl == "dmd2" else
                 LCDLoRA(lora=lora, k=K, w_min=W_MIN, w_max=W_MAX, loss="huber", huber_c=HUBER_C))
    objective.setup(pipe)
    if args.frozen_storage != "none":                     # train.frozen_storage: exact for an fp16 file
        from models.storage import store_frozen
        store_frozen(unet, torch.float16 if args.frozen_storage == "fp16" else torch.bfloat16)
    unet.train().set_gradient_checkpointing(args.gc)
    opt = make_optimizer(objective, TrainConfig(lr=1e-4))  # the trainer's (fused) AdamW per declared optimizer
    scaler = torch.amp.GradScaler(args.device, enabled=False)
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(z, ctx, uctx, y, i):
        with objective.step_context(i, 0), amp:
            loss, _ = objective.loss(unet, z, Conditioning(ctx, y=y), Conditioning(uctx, y=y),
                                     step_generators(0, i, 0, z.shape[0]))
        loss.mean().backward()
        opt.unscale_clip_(scaler, i, 1.0)
        opt.step(scaler, i)
        opt.zero_grad()
        return "generator" if getattr(objective, "is_generator_step", lambda: False)() else "step"
    step.unet = unet
    return step

#----------------------------------------------------------------------------
# Reference: the diffusers LCM-LoRA script's step (train_lcm_distill_lora_sd*.py), one UNet with
# disable_adapters() for the teacher, as the diffusers SDXL datasets script does.

def diffusers_step(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    with torch.device(args.device):
        unet = UNet2DConditionModel(**CONFIGS[args.family]).requires_grad_(False).to(DTYPES[args.dtype])
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=DIFFUSERS_TARGETS, lora_dropout=0.0))
    for p in unet.parameters():                           # cast_training_params: trainables in fp32
        if p.requires_grad:
            p.data = p.data.float()
    if args.gc:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    abar = sched.alphas_cumprod
    a, s = abar.sqrt(), (1 - abar).sqrt()
    grid = torch.arange(1, 1000 // K + 1) * K - 1

    def scalings(t):
        t = t * 10.0
        return 0.25 / (t**2 + 0.25), t / (t**2 + 0.25) ** 0.5

    def col(v):
        return v.reshape(-1, 1, 1, 1)

    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    a, s = a.to(args.device), s.to(args.device)

    def step(z, ctx, uctx, y, i):
        g = torch.Generator().manual_seed(i)
        B = z.shape[0]
        start = grid[torch.randint(0, len(grid), (B,), generator=g)]
        w = (W_MIN + (W_MAX - W_MIN) * torch.rand(B, generator=g)).to(z.device)
        noise = torch.randn(z.shape, generator=g).to(z.device)
        t = (start - K).clamp(min=0)
        added = None if y is None else {"text_embeds": y[:, :1280], "time_ids": y[:, 1280:1286]}
        start, t = start.to(z.device), t.to(z.device)

        def unet_(*a, **kw):
            with amp:
                return unet(*a, added_cond_kwargs=added, **kw).sample.float()
        cs0, co0 = scalings(start)
        cs, co = scalings(t)
        x = col(a[start]) * z + col(s[start]) * noise
        eps = unet_(x, start, encoder_hidden_states=ctx)
        model_pred = col(cs0) * x + col(co0) * (x - col(s[start]) * eps) / col(a[start])
        with torch.no_grad():
            unet.disable_adapters()
            ec = unet_(x, start, encoder_hidden_states=ctx)
            eu = unet_(x, start, encoder_hidden_states=uctx)
            x0c, x0u = ((x - col(s[start]) * e) / col(a[start]) for e in (ec, eu))
            x0 = x0c + col(w) * (x0c - x0u)
            e = ec + col(w) * (ec - eu)
            x_prev = col(a[t]) * x0 + col(s[t]) * e                   # DDIMSolver.ddim_step
            unet.enable_adapters()
            et = unet_(x_prev, t, encoder_hidden_states=ctx)
            target = col(cs) * x_prev + col(co) * (x_prev - col(s[t]) * et) / col(a[t])
        loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + HUBER_C**2) - HUBER_C)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step

#----------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = (diffusers_step if args.impl == "diffusers" else ours_step)(args)
    calls = [0]
    if hasattr(step, "unet"):                             # UNet calls per step (a batched cond+uncond pass = 1)
        step.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    g = torch.Generator().manual_seed(1)
    B, D = args.batch, CONTEXT_DIM[args.family]
    z = torch.randn(B, 4, args.side, args.side, generator=g).to(args.device)
    ctx, uctx = (torch.randn(B, 77, D, generator=g).to(args.device) for _ in range(2))
    y = None
    if args.family == "sdxl":                             # pooled text (1280) + 6 size ids
        ids = torch.tensor([[8.0 * args.side] * 2 + [0.0, 0.0] + [8.0 * args.side] * 2]).expand(B, -1)
        y = torch.cat([torch.randn(B, 1280, generator=g), ids, torch.zeros(B, 2816 - 1286)], 1).to(args.device)
    cuda = args.device == "cuda"
    base = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb("VmRSS:")
    torch.cuda.reset_peak_memory_stats() if cuda else reset_peak_rss()
    times, kinds = [], {}
    for i in range(args.warmup + args.steps):
        sync(args.device)
        t0, calls[0] = time.perf_counter(), 0
        kind = step(z, ctx, uctx, y, i) or "step"
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            kinds.setdefault(kind, []).append((times[-1], calls[0]))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM:")
    print(json.dumps(dict(impl=args.impl, median_s=statistics.median(times), times=times, base_rss_mb=base,
                          peak_rss_mb=peak, threads=torch.get_num_threads(), kinds=kinds)))


def run(args) -> dict:
    """The implementations in alternating subprocesses; medians per implementation."""
    runs = {impl: [] for impl in args.impls.split(",")}
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--side", str(args.side), "--threads",
             str(args.threads), "--family", args.family, "--device", args.device, "--dtype", args.dtype,
             "--batch", str(args.batch), "--frozen-storage", args.frozen_storage] + (["--gc"] if args.gc else [])
    for _ in range(args.repeat):                          # alternate: machine load hits both alike
        for impl in runs:                                 # separate processes: separate peak memory
            out = subprocess.run([sys.executable, __file__, "--impl", impl, *flags], capture_output=True,
                                 text=True, check=False)
            if out.returncode:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {impl: dict(impl=impl, times=[t for r in rs for t in r["times"]], threads=rs[0]["threads"],
                       median_s=statistics.median([t for r in rs for t in r["times"]]),
                       peak_rss_mb=statistics.median([r["peak_rss_mb"] for r in rs]),
                       base_rss_mb=statistics.median([r["base_rss_mb"] for r in rs]),
                       kinds={k: [v for r in rs for v in r["kinds"].get(k, [])] for k in rs[0]["kinds"]})
            for impl, rs in runs.items()}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocates Adam state)")
    ap.add_argument("--side", type=int, default=32, help="latent side (32 = 256px images)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--family", choices=list(CONFIGS), default="sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="frozen base weights' dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing in both")
    ap.add_argument("--frozen-storage", choices=["none", "fp16", "bf16"], default="none",
                    help="ours only: train.frozen_storage (frozen weights stored so, computed in --dtype)")
    ap.add_argument("--repeat", type=int, default=2, help="alternate the two subprocesses this many times")
    ap.add_argument("--impls", default="ours,diffusers",
                    help="what to compare, the first against the second: ours (LCD-LoRA), diffusers, dmd2")
    ap.add_argument("--impl", choices=["ours", "diffusers", "dmd2"], help=argparse.SUPPRESS)
    return ap


def main():
    args = parser().parse_args()
    if args.impl:
        return child(args)
    res = run(args)
    first, second = args.impls.split(",")[:2]
    o, d = res[second], res[first]                        # printed: first / second
    mem = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"torch {torch.__version__}, {o['threads']} threads, {args.family} UNet, latent {args.side}x{args.side}, "
          f"batch {args.batch}, {args.device}, base {args.dtype}, LoRA r64, gradient checkpointing "
          f"{'on' if args.gc else 'off'}, ours' frozen storage {args.frozen_storage}")
    for r in (d, o):
        print(f"{r['impl']:>9}: step {r['median_s']:.2f} s (median of {len(r['times'])}), {mem} "
              f"{r['peak_rss_mb']:.0f} MB (model built: {r['base_rss_mb']:.0f} MB, step adds "
              f"{r['peak_rss_mb'] - r['base_rss_mb']:.0f} MB)")
        for kind, v in r["kinds"].items():
            if any(c for _, c in v):                      # ours: UNet calls counted
                print(f"{'':>11}{kind} steps: {statistics.median(t for t, _ in v):.2f} s, "
                      f"{statistics.mean(c for _, c in v):.1f} UNet calls (n={len(v)})")
    print(f"ratio {first}/{second}: time {d['median_s'] / o['median_s']:.3f}, {mem} "
          f"{d['peak_rss_mb'] / o['peak_rss_mb']:.3f}, step's extra memory "
          f"{(d['peak_rss_mb'] - d['base_rss_mb']) / (o['peak_rss_mb'] - o['base_rss_mb']):.3f}")


if __name__ == "__main__":
    main()
