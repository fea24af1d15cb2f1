"""Explicit key maps from foreign weight layouts to ours (original LDM/SGM names, open_clip text).

Pure functions over names and state dicts. Each map lists its renames and reshapes; callers load
strictly and assert coverage, so a key no rule understands is an error, never silently dropped.
"""
import re

import torch

#----------------------------------------------------------------------------
# UNet: diffusers module paths -> original LDM/SGM module paths (docs/users.md Sec. 4).
# down_blocks.i.resnets.j / .attentions.j -> input_blocks.(R*i+j+1).0 / .1   (R = res blocks + 1)
# down_blocks.i.downsamplers.0.conv       -> input_blocks.(R*i+R).0.op
# mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2
# up_blocks.i.resnets.j / .attentions.j   -> output_blocks.(R*i+j).0 / .1     (R = res blocks + 1)
# up_blocks.i.upsamplers.0.conv           -> output_blocks.(R*i+R-1).(2 if attention else 1).conv

_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "time_embedding.cond_proj": "time_cond_proj",          # full-LCM w-embedding (bias-free Linear)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def unet_module_diffusers_to_ldm(path: str, layers_per_block: int = 2,
                                 up_block_has_attention=lambda i: True) -> str:
    """Map one diffusers UNet2DConditionModel module path (or parameter name) to ours.

    `up_block_has_attention(i)` says whether diffusers' up_blocks.i carries attentions; it decides
    the index of the upsampler inside its output block. Raises KeyError for an unknown path.
    """
    R = layers_per_block + 1
    for src, dst in _UNET_TOP.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)(\..*)?", path)
    if m:
        kind, i, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
        block = f"input_blocks.{R * i + j + 1}" if kind == "down_blocks" else f"output_blocks.{R * i + j}"
        return f"{block}.{0 if sub == 'resnets' else 1}" + (_resnet_rest(rest) if sub == "resnets" else rest)
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..*)?", path)
    if m:
        return f"input_blocks.{R * int(m.group(1)) + R}.0.op" + (m.group(2) or "")
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..*)?", path)
    if m:
        i = int(m.group(1))
        return f"output_blocks.{R * i + R - 1}.{2 if up_block_has_attention(i) else 1}.conv" + (m.group(2) or "")
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(\..*)?", path)
    if m:
        sub, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if sub == "attentions":
            return "middle_block.1" + rest
        return f"middle_block.{2 * j}" + _resnet_rest(rest)
    raise KeyError(f"no rule maps diffusers UNet path {path!r}")


def _resnet_rest(rest: str) -> str:
    m = re.fullmatch(r"\.(\w+)(\..*)?", rest)
    if not m or m.group(1) not in _UNET_RESNET:
        raise KeyError(f"unknown resnet sub-module {rest!r}")
    return "." + _UNET_RESNET[m.group(1)] + (m.group(2) or "")


def unet_state_dict_diffusers_to_ldm(sd: dict, layers_per_block: int | None = None) -> dict:
    """Rename a diffusers UNet state dict to original LDM/SGM names (values untouched).

    layers_per_block defaults to the one the keys show (1 + the largest down_blocks.i.resnets.j).
    """
    if layers_per_block is None:
        layers_per_block = 1 + max(int(m.group(1)) for k in sd
                                   if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k)))
    has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {unet_module_diffusers_to_ldm(k, layers_per_block, lambda i: i in has_attn): v
            for k, v in sd.items()}


def unet_module_ldm_to_diffusers(path: str, layers_per_block: int = 2) -> str:
    """Inverse of `unet_module_diffusers_to_ldm`: one LDM/SGM module path (or parameter) -> diffusers.

    The upsampler's index inside its output block (1 or 2) is in the LDM name itself, so no
    attention layout is needed. Raises KeyError for an unknown path.
    """
    R = layers_per_block + 1
    for dst, src in _UNET_TOP.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    inv_resnet = {v: k for k, v in _UNET_RESNET.items()}

    def resnet_rest(rest: str) -> str:
        m = re.fullmatch(r"\.(\w+\.\d+|skip_connection)(\..*)?", rest)
        if not m or m.group(1) not in inv_resnet:
            raise KeyError(f"unknown ResBlock sub-module {rest!r} in {path!r}")
        return "." + inv_resnet[m.group(1)] + (m.group(2) or "")

    m = re.fullmatch(r"input_blocks\.(\d+)\.0\.op(\..*)?", path)
    if m and int(m.group(1)) % R == 0:
        return f"down_blocks.{int(m.group(1)) // R - 1}.downsamplers.0.conv" + (m.group(2) or "")
    m = re.fullmatch(r"input_blocks\.(\d+)\.([01])(\..*)?", path)
    if m and int(m.group(1)) % R != 0:
        i, j = divmod(int(m.group(1)) - 1, R)
        rest = m.group(3) or ""
        if m.group(2) == "0":
            return f"down_blocks.{i}.resnets.{j}" + resnet_rest(rest)
        return f"down_blocks.{i}.attentions.{j}" + rest
    m = re.fullmatch(r"middle_block\.([012])(\..*)?", path)
    if m:
        k, rest = int(m.group(1)), m.group(2) or ""
        if k == 1:
            return "mid_block.attentions.0" + rest
        return f"mid_block.resnets.{k // 2}" + resnet_rest(rest)
    m = re.fullmatch(r"output_blocks\.(\d+)\.([012])(\..*)?", path)
    if m:
        (i, j), k, rest = divmod(int(m.group(1)), R), m.group(2), m.group(3) or ""
        if k != "0" and re.fullmatch(r"\.conv(\..*)?", rest):
            if j != R - 1:
                raise KeyError(f"{path!r}: an upsampler outside the last output block of its level")
            return f"up_blocks.{i}.upsamplers.0" + rest
        if k == "0":
            return f"up_blocks.{i}.resnets.{j}" + resnet_rest(rest)
        if k == "1":
            return f"up_blocks.{i}.attentions.{j}" + rest
    raise KeyError(f"no rule maps LDM UNet path {path!r}")


#----------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL -> original LDM AutoencoderKL names.
# Decoder up blocks are numbered in reverse: diffusers up_blocks.k -> decoder.up.(n-1-k).
# Mid-block attention: diffusers Linear q/k/v/out -> LDM 1x1 convs (weights gain two unit dims).

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def vae_key_diffusers_to_ldm(key: str, num_up_blocks: int) -> str:
    """Map one diffusers AutoencoderKL parameter name to the original LDM name."""
    key = key.replace("conv_shortcut", "nin_shortcut")
    for side in ("encoder", "decoder"):
        key = key.replace(f"{side}.conv_norm_out", f"{side}.norm_out")
        key = re.sub(rf"^{side}\.mid_block\.resnets\.(\d)",
                     lambda m: f"{side}.mid.block_{int(m.group(1)) + 1}", key)
        m = re.match(rf"^{side}\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
        if m:
            key = f"{side}.mid.attn_1.{_VAE_ATTN[m.group(1)]}.{m.group(2)}"
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_up_blocks - 1 - int(m.group(1))}.upsample.", key)
    return key


def vae_state_dict_diffusers_to_ldm(sd: dict) -> dict:
    """Rename (and reshape attention Linear -> 1x1 conv) a diffusers AutoencoderKL state dict."""
    n_up = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        nk = vae_key_diffusers_to_ldm(k, n_up)
        if ".mid.attn_1." in nk and nk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]                          # Linear (C, C) -> conv (C, C, 1, 1)
        out[nk] = v
    return out


#----------------------------------------------------------------------------
# Text: HF transformers CLIPTextModel(+WithProjection) -> open_clip TextTransformer layout.
# q, k, v projections are concatenated into nn.MultiheadAttention's in_proj (3C, C);
# HF text_projection is a Linear (P, C); open_clip's is a parameter (C, P) used as x @ proj.

_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
CLIP_IGNORED = ("text_model.embeddings.position_ids",)      # a buffer real files carry


def clip_state_dict_hf_to_open_clip(sd: dict) -> dict:
    """Convert an HF CLIP text state dict (keys from `text_model.` / `text_projection.`) to open_clip.

    Keys without `text_model.` (transformers >= 5 CLIPTextModel, very old SD1 files) are accepted.
    """
    out, qkv = {}, {}
    for k, v in sd.items():
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k
        if k in CLIP_IGNORED:
            continue
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()      # (P, C) -> (C, P)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = v
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            if m.group(2) not in _CLIP_LAYER:
                raise KeyError(f"no rule maps HF CLIP key {k!r}")
            out[f"transformer.resblocks.{m.group(1)}.{_CLIP_LAYER[m.group(2)]}.{m.group(3)}"] = v
        else:
            raise KeyError(f"no rule maps HF CLIP key {k!r}")
    for (i, kind), parts in qkv.items():
        assert set(parts) == {"q", "k", "v"}, f"layer {i}: incomplete q/k/v {sorted(parts)}"
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def clip_state_dict_open_clip_to_hf(sd: dict) -> dict:
    """Inverse of `clip_state_dict_hf_to_open_clip` (for writing HF-layout SD1/SDXL text weights)."""
    inv = {v: k for k, v in _CLIP_LAYER.items()}
    out = {}
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            for name, part in zip("qkv", v.chunk(3)):
                out[f"text_model.encoder.layers.{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k):
            out[f"text_model.encoder.layers.{m.group(1)}.{inv[m.group(2)]}.{m.group(3)}"] = v
        else:
            raise KeyError(f"no rule maps open_clip key {k!r}")
    return out


#----------------------------------------------------------------------------
# TAESD (models/taesd.py): the original taesd files and diffusers' AutoencoderTiny -> ours.
# Ours are the original taesd.py nn.Sequentials under "decoder." / "encoder.". An original file
# holds one net with bare indices: a decoder's first conv is "1.weight" (index 0 is the parameter-
# free Clamp), an encoder's is "0.weight". diffusers' DecoderTiny clamps in forward and has no
# Clamp entry, so its indices are one lower; EncoderTiny's are the same:
#   decoder.layers.N.<rest> -> decoder.(N+1).<rest>        encoder.layers.N.<rest> -> encoder.N.<rest>

_TAESD_REST = re.compile(r"(weight|bias|conv\.[024]\.(weight|bias)|skip\.weight)")


def taesd_state_dict_to_ours(sd: dict) -> dict:
    """Rename a TAESD state dict (original decoder or encoder file, or diffusers AutoencoderTiny) to
    ours (values untouched). Raises KeyError naming the first key no rule maps."""
    if not sd:
        raise KeyError("no tensors")
    diffusers = any(k.startswith(("decoder.layers.", "encoder.layers.")) for k in sd)
    if not diffusers:
        if "0.weight" in sd:
            part = "encoder"
        elif "1.weight" in sd:
            part = "decoder"
        else:
            raise KeyError(f"expected the original taesd layout ('1.weight', '3.conv.0.weight', ...; an encoder: "
                           f"'0.weight') or diffusers' AutoencoderTiny ('decoder.layers.0.weight'), got keys "
                           f"{sorted(sd)[:3]}")
    out = {}
    for k in sd:
        m = re.fullmatch(r"(decoder|encoder)\.layers\.(\d+)\.(.+)" if diffusers else r"(\d+)\.(.+)", k)
        if m is None or not _TAESD_REST.fullmatch(m.group(m.lastindex)):
            raise KeyError(f"no rule maps TAESD key {k!r} ({'diffusers' if diffusers else 'original ' + part} layout)")
        if diffusers:
            p, i, rest = m.group(1), int(m.group(2)), m.group(3)
            new = f"{p}.{i + 1 if p == 'decoder' else i}.{rest}"
        else:
            new = f"{part}.{m.group(1)}.{m.group(2)}"
        assert new not in out, f"two TAESD keys map to {new!r}"
        out[new] = sd[k]
    return out


def taesd_state_dict_ours_to_original(sd: dict, part: str) -> dict:
    """One net of ours ("decoder." or "encoder." keys) as an original taesd file's state dict."""
    assert part in ("decoder", "encoder"), part
    return {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
