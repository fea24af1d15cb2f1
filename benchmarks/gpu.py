"""GPU table: LCM-LoRA 4-step text-to-image latency (SD1.5 512px, SDXL 1024px), bf16, torch.compile
off/on, ours vs diffusers on the same random weights; LCM-LoRA training step memory at SDXL size.

    python benchmarks/gpu.py                          # one CUDA GPU, prints one table (aims at < 8 min;
                                                      # not yet run on a GPU: none was available)
    python benchmarks/gpu.py --tiny --device cpu      # the same code on tiny models (CI smoke test)

Latency = one prompt -> text encoding -> 4 LCM steps (guidance 1.0, fused rank-64 LoRA) -> VAE
decode -> PIL, median of --runs after warm-up (compile time is reported apart). Both pipelines get
identical weights (diffusers modules -> the original layout -> ours), the VAE in bf16 in both.
Their final latents are compared first (bf16: ~1e-2 relative is expected; fp32: 1e-3 asserted).
Training memory: benchmarks/train_step.py at SDXL size (latent 128 = 1024px, base bf16, LoRA fp32,
autocast), each implementation in its own process, torch.cuda.max_memory_allocated.
"""
import argparse
import os
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
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    res |= {k: statistics.median(v) for k, v in times.items()}
    return res


def training_memory(args) -> str:
    """train_step.py at SDXL size on the GPU: peak allocated of ours and of diffusers+peft."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--family", "sdxl", "--device",
           args.device, "--dtype", "bf16", "--side", "8" if args.tiny else "128", "--steps", "2", "--warmup", "1",
           "--repeat", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        return f"training step failed: {out.stderr[-2000:]}"
    return out.stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-on rows")
    ap.add_argument("--no-train", action="store_true", help="skip the SDXL training-memory row")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of this script)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"torch {torch.__version__}, {dev}, {args.dtype}, {args.steps} LCM steps, fused LoRA r64", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            ours, ref, size = build(family, args.tiny, args.device, dtype, tmp)
            for compile_ in [False] + ([] if args.no_compile else [True]):     # eager first, then compiled
                r = latency(ours, ref, size, args.steps, args.runs, args.device, compile_)
                if dtype == torch.float32 and r["rel_diff"] > 1e-3:
                    sys.exit(f"{family}: the pipelines disagree (max rel diff {r['rel_diff']:.1e})")
                rows.append((family, size, compile_, r))
                print(f"{family} {size}px compile={'on' if compile_ else 'off'}: ours {r['ours'] * 1e3:.0f} ms, "
                      f"diffusers {r['ref'] * 1e3:.0f} ms, ratio {r['ours'] / r['ref']:.3f} (first call "
                      f"{r['ours_first']:.1f} s / {r['ref_first']:.1f} s; latents rel diff {r['rel_diff']:.1e})",
                      flush=True)
            del ours, ref
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print("\n| model | size | compile | ours (ms / image) | diffusers (ms / image) | ratio | first call ours / diffusers (s) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for family, size, c, r in rows:
        print(f"| {family} | {size} | {'on' if c else 'off'} | {r['ours'] * 1e3:.0f} | {r['ref'] * 1e3:.0f} | "
              f"{r['ours'] / r['ref']:.3f} | {r['ours_first']:.1f} / {r['ref_first']:.1f} |")
    if not args.no_train:
        print("\nLCM-LoRA training step, SDXL UNet, 1024px, batch 1, base bf16 + LoRA fp32 (train_step.py):")
        print(training_memory(args))


if __name__ == "__main__":
    main()
