"""Test-only: tiny random reference models (diffusers/transformers) written as original-layout files.

The oracle builds the same random model in the reference libraries; `write_original` stores it
with the project's own diffusers->LDM key maps as a single-file checkpoint, exactly as the
released SD files are laid out, so `Pipeline.from_checkpoint` can load it.
"""
import gzip
import re

import torch
from safetensors.torch import save_file

from models.keymaps import (clip_state_dict_hf_to_open_clip, unet_state_dict_diffusers_to_ldm,
                            vae_state_dict_diffusers_to_ldm)


def hf_tokenizer(**kw):
    """transformers CLIPTokenizer built offline from open_clip's bundled BPE (same vocab and merges)."""
    import transformers
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    return transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                                      model_max_length=77, **kw)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (norms and biases included) random values: nothing hides behind init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) * (3 if p.dim() == 1 else 1))
    return module.eval()


def tiny_open_clip_model(config_dir, name: str, embed_dim: int):
    """Register and build a tiny open_clip CLIP (ViT 32x32 in patches of 16, one layer per tower) as
    open_clip.create_model(name) builds the real ones; the config is written to config_dir/<name>.json."""
    import json
    import os

    import open_clip
    cfg = dict(embed_dim=embed_dim, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, f"{name}.json"), "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(str(config_dir))
    return open_clip.create_model(name)


def tiny_unet(family: str = "sd15", layers_per_block: int = 1, seed: int = 0):
    from diffusers import UNet2DConditionModel
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
                  norm_num_groups=32)
    if family == "sd15":
        cfg = dict(block_out_channels=(32, 64), cross_attention_dim=768, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    elif family == "sd21":
        cfg = dict(block_out_channels=(64, 128), cross_attention_dim=1024, attention_head_dim=(1, 2),
                   use_linear_projection=True, upcast_attention=True,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    elif family == "sdxl":
        cfg = dict(block_out_channels=(64, 128), cross_attention_dim=2048, attention_head_dim=(1, 2),
                   use_linear_projection=True, transformer_layers_per_block=(1, 2),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                   addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return randomize_(UNet2DConditionModel(**common, **cfg), seed)


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32, sample_size=32)
    return randomize_(vae, seed)


def tiny_clip(width: int, act: str, projection: int | None = None, layers: int = 2, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=width // 64,
                         max_position_embeddings=77, hidden_act=act, projection_dim=projection or width,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return randomize_(model, seed, std=0.02)


def original_state_dict(family: str, unet, vae, text_encoders: list) -> dict:
    """diffusers/transformers modules -> one original-layout state dict (released key layout)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in
          unet_state_dict_diffusers_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()}
    sd |= {f"first_stage_model.{k}": v for k, v in vae_state_dict_diffusers_to_ldm(vae.state_dict()).items()}
    hf = [{k: v for k, v in te.state_dict().items()} for te in text_encoders]
    if family == "sd15":
        sd |= {f"cond_stage_model.transformer.{k}": v for k, v in hf[0].items()}
    elif family == "sd21":
        sd |= {f"cond_stage_model.model.{k}": v for k, v in clip_state_dict_hf_to_open_clip(hf[0]).items()}
    else:
        sd |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in hf[0].items()}
        sd |= {f"conditioner.embedders.1.model.{k}": v for k, v in clip_state_dict_hf_to_open_clip(hf[1]).items()}
    return sd


def write_original(path: str, family: str, unet, vae, text_encoders: list, metadata=None) -> None:
    """Save diffusers/transformers modules as one original-layout checkpoint (released key layout)."""
    sd = original_state_dict(family, unet, vae, text_encoders)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)


def inline_comments(path: str) -> dict[str, str]:
    """Top-level `key: value  # comment` lines of a yaml file (read here independently of lcm.cli)."""
    out = {}
    for line in open(path):
        if m := re.match(r"^(\w+):\s.*?\s#\s+(.*\S)\s*$", line):
            out[m.group(1)] = m.group(2)
    return out
