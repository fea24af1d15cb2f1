"""End-to-end LCM-LoRA text-to-image at SD1.5 size: ours vs diffusers StableDiffusionPipeline.

    nice python benchmarks/e2e.py --threads 1 --runs 3

One prompt -> tokenize -> CLIP-L text encoding -> 4 LCM steps of the UNet with a fused rank-64
LCM-LoRA (guidance 1.0: one UNet call per step) -> VAE decode -> PIL image, 512x512, fp32 CPU.
Both pipelines hold the very same random weights: they are written once as an original-layout
single file and a kohya LoRA file, which ours loads with Pipeline.from_checkpoint / load_lora and
diffusers gets as modules + load_lora_weights; both then fuse the LoRA, as a user would for
inference. Before timing, the final latents of the two are compared (same x_T, same generator).
Prints medians of interleaved runs and the ratio ours / diffusers.
"""
import argparse
import gzip
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from unet import SD15, median_times  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def hf_tokenizer(**kw):
    """transformers CLIPTokenizer built offline from open_clip's bundled BPE (same vocab/merges)."""
    import transformers
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    return transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                                         model_max_length=77, **kw)


def reference_models():
    """Random SD1.5-size UNet, VAE and CLIP-L text encoder (diffusers / transformers modules)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from tests.oracle import randomize_
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      hidden_act="quick_gelu"))
    for i, m in enumerate((unet, vae, te)):
        randomize_(m, seed=i, std=0.02)
    return unet.eval(), vae.eval(), te.eval()


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
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from lcm.pipeline import Pipeline
    from models.lora import inject_lora, lora_layers
    from tests.oracle import write_original

    unet, vae, te = reference_models()
    with tempfile.TemporaryDirectory() as tmp:
        model_path, lora_path = os.path.join(tmp, "sd15.safetensors"), os.path.join(tmp, "lcm.safetensors")
        write_original(model_path, "sd15", unet, vae, [te])
        ours = Pipeline.from_checkpoint(model_path)
        inject_lora(ours.unet, "lcm", rank=64, alpha=64)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():                                 # B != 0, as after training
            for _, m in lora_layers(ours.unet):
                m.lora_up["lcm"].weight.normal_(0, 1e-3, generator=g)
        ours.save_lora(lora_path, "lcm", format="kohya")
        ours.fuse_lora()
        ref = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=hf_tokenizer(), unet=unet,
                                      scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012,
                                                             beta_schedule="scaled_linear",
                                                             original_inference_steps=50, set_alpha_to_one=True, steps_offset=1),
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        ref.load_lora_weights(lora_path, adapter_name="lcm")
        ref.fuse_lora()

    side = args.size // 8
    x_T = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=args.steps, guidance_scale=1.0, height=args.size, width=args.size)

    def run_ours(output="pil"):
        return ours(PROMPT, steps=args.steps, guidance_scale=1.0, solver="lcm", height=args.size,
                    width=args.size, latents=x_T, generator=torch.Generator().manual_seed(2), output=output,
                    progress=False)

    def run_ref(output="pil"):
        return ref(PROMPT, latents=x_T.clone(), generator=torch.Generator().manual_seed(2), output_type=output,
                   **kw).images

    with torch.inference_mode():
        a, b = run_ours("latent"), run_ref("latent")
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SD1.5 size, {args.size}x{args.size}, "
          f"{args.steps} LCM steps, fused LoRA r64, fp32; final latents max rel diff {err:.1e}", flush=True)
    if err > 1e-3:
        sys.exit("the two pipelines disagree: not benchmarking different computations")
    with torch.inference_mode():
        t_ours, t_ref = median_times([run_ours, run_ref], args.warmup, args.runs)
    print(f"ours {t_ours:.2f} s  diffusers {t_ref:.2f} s  ratio {t_ours / t_ref:.3f}  "
          f"(median of {args.runs}, per image incl. text encoding and VAE decode)", flush=True)


if __name__ == "__main__":
    main()
