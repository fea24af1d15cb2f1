"""GPU table: LCM-LoRA 4-step text-to-image latency (SD1.5 512px, SDXL 1024px), bf16, torch.compile
off/on, ours vs diffusers on the same random weights; LCM-LoRA training step memory at SDXL size;
our UNet's model FLOP utilisation at batch 8.

    python benchmarks/gpu.py                          # one CUDA GPU, prints one table (aims at < 8 min;
                                                      # not yet run on a GPU: none was available)
    python benchmarks/gpu.py --tiny --device cpu      # the same code on tiny models (CI smoke test)
    python benchmarks/gpu.py --families --no-train --json mfu.json    # only the MFU rows, also as JSON

Latency = one prompt -> text encoding -> 4 LCM steps (guidance 1.0, fused rank-64 LoRA) -> VAE
decode -> PIL, median of --runs after warm-up (compile time is reported apart). Both pipelines get
identical weights (diffusers modules -> the original layout -> ours), the VAE in bf16 in both.
Their final latents are compared first (bf16: ~1e-2 relative is expected; fp32: 1e-3 asserted).
Training memory: benchmarks/train_step.py at SDXL size (latent 128 = 1024px, base bf16, LoRA fp32,
autocast), each implementation in its own process, torch.cuda.max_memory_allocated.
MFU: our SD1.5 UNet (64x64 latents, 77 tokens; --tiny: the smoke model), batch --mfu-batch, --dtype:
FLOPs counted by torch's FlopCounterMode (shapes only, on the meta device) over the median seconds of
a forward (inference) and of a forward + backward (all weights trainable), divided by the device's
dense bf16/fp16 tensor-core peak (PEAK_TFLOPS; --peak-tflops for others). --json rewrites its file
after each row, so a killed run keeps the rows done.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from train_step import SD15, SDXL  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")
BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280)


def reference_modules(family: str, tiny: bool):
    """diffusers UNet + VAE and transformers text encoder(s), random, fp32 on CPU; image side."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.oracle import randomize_, tiny_clip, tiny_unet, tiny_vae
    if tiny:
        tes = [tiny_clip(768, "quick_gelu")] + ([tiny_clip(1280, "gelu", projection=1280)] if family == "sdxl" else [])
        return tiny_unet(family), tiny_vae(), tes, 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15 if family == "sd15" else SDXL))
    vae = AutoencoderKL(**SD_VAE, force_upcast=False)
    cfg = lambda kw: CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **kw)
    tes = [CLIPTextModel(cfg(CLIP_L))] + ([CLIPTextModelWithProjection(cfg(BIGG))] if family == "sdxl" else [])
    for i, m in enumerate((unet, vae, *tes)):
        randomize_(m, seed=i, std=0.02)
    return unet, vae, tes, 512 if family == "sd15" else 1024


def build(family: str, tiny: bool, device: str, dtype: torch.dtype, tmp: str):
    """(ours, reference, image side): the same random weights and LoRA, both fused, on device."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from lcm.pipeline import Pipeline
    from models import checkpoint as ckpt
    from models.lora import inject_lora, lora_layers
    from tests.oracle import hf_tokenizer, original_state_dict
    unet, vae, tes, size = reference_modules(family, tiny)
    sd = {k: v.clone() for k, v in original_state_dict(family, unet, vae, tes).items()}
    c = ckpt.build_components(sd, {})
    del sd
    ours = Pipeline(c.unet, c.vae, c.text, c.family, "epsilon", config=c.config, dtype=dtype)
    for m in (ours.unet, ours.vae, ours.text):
        m.to(device, dtype)
    ours.device = torch.device(device)
    inject_lora(ours.unet, "lcm", rank=64, alpha=64, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                                     # B != 0, as after training
        for _, m in lora_layers(ours.unet):
            w = m.lora_up["lcm"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 1e-3)
    lora_path = os.path.join(tmp, f"{family}-lcm.safetensors")
    ours.save_lora(lora_path, "lcm", format="kohya", overwrite=True)
    ours.fuse_lora()
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         original_inference_steps=50, set_alpha_to_one=True, steps_offset=1)
    parts = dict(vae=vae, unet=unet, scheduler=sched)
    if family == "sd15":
        ref = StableDiffusionPipeline(text_encoder=tes[0], tokenizer=hf_tokenizer(), safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False, **parts)
    else:                                                     # OpenCLIP bigG pads with "!" (id 0)
        ref = StableDiffusionXLPipeline(text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=hf_tokenizer(),
                                        tokenizer_2=hf_tokenizer(pad_token="!"), **parts)
    ref.to(device, dtype)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora_path, adapter_name="lcm")
    ref.fuse_lora()
    return ours, ref, size


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latency(ours, ref, size: int, steps: int, runs: int, device: str, compile_: bool, warmup: int = 1) -> dict:
    """Median seconds per image of each pipeline (and first-call seconds: compile time)."""
    side = size // ours.latent_factor
    x_T = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
    run_ours = lambda out="pil": ours(PROMPT, steps=steps, guidance_scale=1.0, solver="lcm", height=size,
                                      width=size, latents=x_T, generator=torch.Generator().manual_seed(2),
                                      output=out, progress=False)
    run_ref = lambda out="pil": ref(PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=size,
                                    width=size, latents=x_T.to(device, ours.dtype),
                                    generator=torch.Generator().manual_seed(2), output_type=out).images
    if compile_:
        ours.compile()
        ref.unet.compile(dynamic=False)
        ref.vae.decoder.compile(dynamic=False)
    res = {}
    with torch.inference_mode():
        for name, fn in (("ours", run_ours), ("ref", run_ref)):
            sync(device)
            t0 = time.perf_counter()
            fn()                                              # warm-up (compiles when compile_)
            sync(device)
            res[f"{name}_first"] = time.perf_counter() - t0
            for _ in range(warmup - 1):
                fn()
        a, b = run_ours("latent").float(), torch.as_tensor(run_ref("latent")).float().to(device)
        res["rel_diff"] = ((a - b).abs().max() / b.abs().max()).item()
        times = {"ours": [], "ref": []}
        for _ in range(runs):                                 # interleaved
            for name, fn in (("ours", run_ours), ("ref", run_ref)):
                sync(device)
                if device.startswith("cuda"):                 # peak above the resident weights of both
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
                if device.startswith("cuda"):
                    res[f"{name}_call_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    res |= {k: statistics.median(v) for k, v in times.items()}
    return res

#----------------------------------------------------------------------------
# UNet model FLOP utilisation: counted FLOPs / median seconds / the device's dense peak.

PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("B200", 2250.0),
               ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0)]   # dense bf16, vendor sheets


def unet_mfu(args, dtype: torch.dtype) -> list[dict]:
    """Our UNet at batch args.mfu_batch: forward and forward + backward seconds, TFLOP/s, MFU, peak MB."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.unet import UNET_PRESETS, UNetModel
    if args.tiny:
        from omegaconf import OmegaConf
        kw, side = dict(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model.unet), 8
    else:
        kw, side = UNET_PRESETS["sd15"], 64
    B, cuda = args.mfu_batch, args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else args.device
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS if cuda and k in name), None)
    if dtype == torch.float32 and not args.peak_tflops:
        peak = None                                           # the table is for half-precision tensor cores

    def call(unet, device, backward):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, 4, side, side, generator=g).to(device, dtype)
        ctx = torch.randn(B, 77, kw["context_dim"], generator=g).to(device, dtype)
        out = unet(x, torch.full((B,), 500, device=device), ctx)
        if backward:
            out.float().square().mean().backward()

    rows = []
    with torch.device("meta"):
        meta = UNetModel(**kw).to(dtype)
    with torch.device(args.device):
        unet = UNetModel(**kw).to(dtype)
    for backward in (False, True):
        with FlopCounterMode(display=False) as fc, torch.set_grad_enabled(backward):
            call(meta, "meta", backward)
        times = []
        with torch.set_grad_enabled(backward):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for i in range(2 + args.runs):                    # 2 warm-up calls
                unet.zero_grad(set_to_none=True)
                sync(args.device)
                t0 = time.perf_counter()
                call(unet, args.device, backward)
                sync(args.device)
                times.append(time.perf_counter() - t0)
        s = statistics.median(times[2:])
        tflops = fc.get_total_flops() / s / 1e12
        rows.append(dict(mode="forward+backward" if backward else "forward", batch=B, latent=side, seconds=s,
                         gflop=fc.get_total_flops() / 1e9, tflops=tflops, peak_tflops=peak,
                         mfu=tflops / peak if peak else None,
                         peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None))
    return rows


def training_memory(args) -> str:
    """train_step.py at SDXL size on the GPU: peak allocated of ours and of diffusers+peft."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--family", "sdxl", "--device",
           args.device, "--dtype", "bf16", "--side", "8" if args.tiny else "128", "--steps", "2", "--warmup", "1",
           "--repeat", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"training step failed: {out.stderr[-2000:]}")
    return out.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--families", nargs="*", default=["sd15", "sdxl"], help="latency rows (none: no rows)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-on rows")
    ap.add_argument("--no-train", action="store_true", help="skip the SDXL training-memory row")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of this script)")
    ap.add_argument("--mfu-batch", type=int, default=8, help="UNet MFU rows at this batch (0: none)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: PEAK_TFLOPS)")
    ap.add_argument("--json", help="also write the results here (rewritten after each row)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"torch {torch.__version__}, {dev}, {args.dtype}, {args.steps} LCM steps, fused LoRA r64", flush=True)
    rows, report = [], dict(torch=torch.__version__, device=dev, dtype=args.dtype, latency=[], mfu=[])

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    dump()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            ours, ref, size = build(family, args.tiny, args.device, dtype, tmp)
            for compile_ in [False] + ([] if args.no_compile else [True]):     # eager first, then compiled
                r = latency(ours, ref, size, args.steps, args.runs, args.device, compile_)
                if dtype == torch.float32 and r["rel_diff"] > 1e-3:
                    sys.exit(f"{family}: the pipelines disagree (max rel diff {r['rel_diff']:.1e})")
                rows.append((family, size, compile_, r))
                report["latency"].append(dict(family=family, size=size, compile=compile_,
                                              ratio=r["ours"] / r["ref"], **r))
                dump()
                print(f"{family} {size}px compile={'on' if compile_ else 'off'}: ours {r['ours'] * 1e3:.0f} ms, "
                      f"diffusers {r['ref'] * 1e3:.0f} ms, ratio {r['ours'] / r['ref']:.3f} (first call "
                      f"{r['ours_first']:.1f} s / {r['ref_first']:.1f} s; latents rel diff {r['rel_diff']:.1e})",
                      flush=True)
            del ours, ref
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if rows:
        print("\n| model | size | compile | ours (ms / image) | diffusers (ms / image) | ratio | first call ours / diffusers (s) |")
        print("|---|---:|---|---:|---:|---:|---:|")
    for family, size, c, r in rows:
        print(f"| {family} | {size} | {'on' if c else 'off'} | {r['ours'] * 1e3:.0f} | {r['ref'] * 1e3:.0f} | "
              f"{r['ours'] / r['ref']:.3f} | {r['ours_first']:.1f} / {r['ref_first']:.1f} |")
    if args.mfu_batch:
        print(f"\nUNet MFU, batch {args.mfu_batch}, {args.dtype}:")
        for r in unet_mfu(args, dtype):
            report["mfu"].append(r)
            dump()
            mfu = f"{r['mfu']:.1%} of {r['peak_tflops']:.0f}" if r["mfu"] is not None else "no peak known"
            print(f"{r['mode']}: {r['seconds'] * 1e3:.1f} ms, {r['gflop']:.0f} GFLOP, {r['tflops']:.2f} TFLOP/s "
                  f"(MFU {mfu})" + (f", peak allocated {r['peak_mb']:.0f} MB" if r["peak_mb"] else ""), flush=True)
    if not args.no_train:
        print("\nLCM-LoRA training step, SDXL UNet, 1024px, batch 1, base bf16 + LoRA fp32 (train_step.py):")
        text = training_memory(args)
        print(text)
        report["training"] = dict(text=text, peak_mb={impl: float(mb) for impl, mb in re.findall(
            r"^\s*(\w+): step .*?(?:peak allocated|peak RSS) (\d+) MB", text, re.M)})
        dump()


if __name__ == "__main__":
    main()
