"""Stable Diffusion UNet (SD1.x, SD2.x, SDXL, SSD-1B) with the original LDM/SGM module names.

An original checkpoint loads strictly after stripping `model.diffusion_model.`; the architecture is
read from the checkpoint's keys and shapes by `infer_unet_config`, so pruned SDXL variants (SSD-1B,
Vega) need no new code. Attention is torch's scaled_dot_product_attention; a call under forward-mode
AD (torch.func.jvp, torch.autograd.forward_ad) takes a plain softmax path instead (`attention_math`).

Speed (CPU matters to users): residual adds and SiLUs run in place on fresh intermediate tensors
that no backward formula needs, so a forward hook on e.g. `attn1` or `in_layers` sees the tensor
after the residual was added; small fp32 CPU convs take a GEMM path (`Conv2d`).
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.storage import StoredConv2d, cast_weight, has_tangent

GROUPS = 32                                # GroupNorm groups everywhere in SD (LDM `normalization`)
GEMM_CONV_MAX_ROWS = 256                   # CPU: 3x3 convs with batch*H_out*W_out <= this run as one GEMM

#----------------------------------------------------------------------------
# Conv2d with a CPU fast path: at low resolution (SD's 8x8 and 16x16 levels) oneDNN re-packs the
# whole weight on every call and is weight-bandwidth bound; unfold + one batched GEMM on the
# (C_out, C_in*9) weight view is 1.2-1.9x faster there (fp32, inference). Same module, same names.

class Conv2d(StoredConv2d):
    """nn.Conv2d (3x3 or any; cast-aware for frozen fp16/bf16 storage, models/storage.py); fp32 CPU
    inference of small 3x3 outputs goes through unfold + GEMM."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.kernel_size != (3, 3) or torch.is_grad_enabled()
                or has_tangent(x)):                                                 # a JVP: the plain ops
            return super().forward(x)
        (B, _, H, W), (p, q), (s, r), Co = x.shape, self.padding, self.stride, self.out_channels
        Ho, Wo = (H + 2 * p - 3) // s + 1, (W + 2 * q - 3) // r + 1
        if B * Ho * Wo > GEMM_CONV_MAX_ROWS:
            return super().forward(x)
        cols = F.unfold(x, 3, padding=self.padding, stride=self.stride)              # (B, C_in*9, Ho*Wo)
        w = cast_weight(self.weight, x.dtype).reshape(Co, -1).expand(B, -1, -1)       # (B, C_out, C_in*9)
        out = torch.bmm(w, cols) if self.bias is None else torch.baddbmm(self.bias.to(x.dtype)[:, None], w, cols)
        return out.view(B, Co, Ho, Wo)

#----------------------------------------------------------------------------
# Sinusoidal timestep embedding (LDM `timestep_embedding`; DDPM / Transformer positional encoding):
# emb = [cos(t * f_i), sin(t * f_i)], f_i = max_period^(-i / half), i = 0..half-1.

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """(B,) timesteps (int or float) -> (B, dim) embedding, [cos, sin] order: float32, or float64 for
    float64 t (a JVP in t, sCM, is then exact to float64)."""
    half, dt = dim // 2, torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt, device=t.device) / half)
    args = t[:, None].to(dt) * freqs[None]                                    # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb

#----------------------------------------------------------------------------
# Residual block: GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-conv, skip.

class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(nn.GroupNorm(GROUPS, channels), nn.SiLU(inplace=True),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(GROUPS, out_channels), nn.SiLU(inplace=True), nn.Dropout(dropout),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.checkpoint = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        # in-place ops touch only fresh conv outputs, which no backward formula needs
        h = self.in_layers(x).add_(self.emb_layers(emb)[:, :, None, None])   # (B, C', H, W) + time
        return self.out_layers(h).add_(self.skip_connection(x))

#----------------------------------------------------------------------------
# Multi-head attention (Vaswani et al.): softmax(q k^T / sqrt(d)) v, via SDPA.
# upcast: q, k, v in float32 when the model runs in fp16/bf16 (SD2.1 overflows otherwise).
# Forward-mode AD (the JVP dF/dt of sCM, arXiv 2410.11081): SDPA's fused kernels (flash, flash for
# CPU, memory-efficient) have no forward-AD formula (pytorch#128971), so a call whose q, k or v
# carries a tangent computes the same softmax with plain ops, which all have one.

def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, softmax in >= fp32; (B, heads, N, d) x (B, heads, M, d) -> (B, heads, N, d)."""
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)                       # (B, heads, N, M)
    return s.softmax(-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(v.dtype) @ v


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        B, N, _ = x.shape
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)       # (B, heads, N, d)
        k = self.to_k(ctx).unflatten(-1, (self.heads, -1)).transpose(1, 2)     # (B, heads, M, d)
        v = self.to_v(ctx).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        attend = attention_math if has_tangent(q, k, v) else F.scaled_dot_product_attention
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            o = attend(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            o = attend(q, k, v)
        return self.to_out(o.transpose(1, 2).reshape(B, N, -1))               # (B, N, query_dim)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): h * gelu(gate), both halves of one projection."""
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return h * F.gelu(gate)
        return F.gelu(gate).mul_(h)                                           # inference: one buffer less


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text context, GEGLU MLP."""
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, upcast)        # self-attention
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast) # cross-attention
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # residuals added in place into the fresh branch outputs (Linear outputs; no backward needs them)
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)

#----------------------------------------------------------------------------
# Spatial transformer: GroupNorm, proj_in (1x1 conv in SD1, Linear in SD2/SDXL), `depth` transformer
# blocks over the H*W tokens, proj_out, residual.

class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 use_linear: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        self.checkpoint = False

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)                      # (B, HW, C) tokens
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.unflatten(1, (H, W)).permute(0, 3, 1, 2)                       # (B, C, H, W) view
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h

#----------------------------------------------------------------------------
# Resampling: stride-2 3x3 conv down, nearest x2 then 3x3 conv up.

class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks get the time embedding, transformers get the context."""
    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

#----------------------------------------------------------------------------
# The UNet (Rombach et al. 2022, LDM `openaimodel.UNetModel`; SGM for SDXL). Module names and
# block order equal the released checkpoints: input_blocks, middle_block, output_blocks, out.

class UNetModel(nn.Module):
    def __init__(self,
        in_channels: int = 4,                         # latent channels in (9 for inpainting UNets)
        out_channels: int = 4,                        # eps / v channels out
        model_channels: int = 320,                    # base width; level l has model_channels * channel_mult[l]
        num_res_blocks: int = 2,                      # ResBlocks per input level (output levels have one more)
        channel_mult: tuple = (1, 2, 4, 4),           # width multiplier per level; 2**(levels-1) = downsampling
        transformer_depth: list | None = None,        # transformer blocks per input ResBlock (len levels*num_res_blocks), 0 = no attention
        transformer_depth_middle: int | None = 1,     # >0: res-attn-res; 0: one ResBlock (SSD-1B, Vega); None: no middle block
        transformer_depth_output: list | None = None, # per output block, in output_blocks order (len levels*(num_res_blocks+1)); None = per level from the input
        num_heads: int = -1,                          # fixed head count (SD1: 8) ...
        num_head_channels: int = -1,                  # ... or fixed head width (SD2/SDXL: 64); set exactly one
        context_dim: int | None = 768,                # text context width: 768 SD1, 1024 SD2, 2048 SDXL
        use_linear_in_transformer: bool = False,      # proj_in/out: False 1x1 conv (SD1), True Linear (SD2/SDXL)
        adm_in_channels: int | None = None,           # SDXL vector y width (2816); None = no label_emb
        upcast_attention: bool = False,               # attention in fp32 under fp16/bf16 (SD2.1)
        time_cond_proj_dim: int | None = None,        # full-LCM w-embedding width (bias-free time_cond_proj); None = none
        dropout: float = 0.0,                         # ResBlock dropout
        use_checkpoint: bool = False,                 # gradient checkpointing per ResBlock / transformer
    ):
        super().__init__()
        L, R = len(channel_mult), num_res_blocks
        transformer_depth = list(transformer_depth if transformer_depth is not None else [1] * (L * R))
        assert len(transformer_depth) == L * R, f"transformer_depth needs {L * R} entries, got {len(transformer_depth)}"
        if transformer_depth_output is None:                                  # each level reuses its input depth
            transformer_depth_output = [transformer_depth[l * R + R - 1] for l in reversed(range(L)) for _ in range(R + 1)]
        transformer_depth_output = list(transformer_depth_output)
        assert len(transformer_depth_output) == L * (R + 1), \
            f"transformer_depth_output needs {L * (R + 1)} entries, got {len(transformer_depth_output)}"
        assert (num_heads == -1) != (num_head_channels == -1), "set exactly one of num_heads, num_head_channels"
        uses_attention = any(transformer_depth) or any(transformer_depth_output) or bool(transformer_depth_middle)
        assert context_dim is not None or not uses_attention, "attention needs context_dim"
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.channel_mult, self.num_res_blocks = tuple(channel_mult), num_res_blocks
        self.adm_in_channels, self.time_cond_proj_dim = adm_in_channels, time_cond_proj_dim
        ted = model_channels * 4                                              # time embedding width

        def attn(ch, depth):
            heads = num_heads if num_heads != -1 else ch // num_head_channels
            assert ch % heads == 0, f"{ch} channels do not split into {heads} heads"
            return SpatialTransformer(ch, heads, ch // heads, depth, context_dim, use_linear_in_transformer,
                                      upcast_attention)

        if time_cond_proj_dim is not None:
            self.time_cond_proj = nn.Linear(time_cond_proj_dim, model_channels, bias=False)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch, depths = [model_channels], model_channels, iter(transformer_depth)
        for level, mult in enumerate(channel_mult):
            for _ in range(R):
                layers = [ResBlock(ch, ted, model_channels * mult, dropout)]
                ch = model_channels * mult
                if (d := next(depths)) > 0:
                    layers.append(attn(ch, d))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != L - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)

        self.middle_block = None
        if transformer_depth_middle is not None:
            mid = [ResBlock(ch, ted, ch, dropout)]
            if transformer_depth_middle > 0:
                mid += [attn(ch, transformer_depth_middle), ResBlock(ch, ted, ch, dropout)]
            self.middle_block = TimestepEmbedSequential(*mid)

        self.output_blocks = nn.ModuleList()
        depths = iter(transformer_depth_output)
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(R + 1):
                layers = [ResBlock(ch + chans.pop(), ted, model_channels * mult, dropout)]
                ch = model_channels * mult
                if (d := next(depths)) > 0:
                    layers.append(attn(ch, d))
                if level and i == R:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch), nn.SiLU(inplace=True), Conv2d(ch, out_channels, 3, padding=1))
        self.initialize_weights()
        self.set_gradient_checkpointing(use_checkpoint)

    def initialize_weights(self):
        """LDM init: PyTorch defaults, plus zero output layers so every residual branch starts at 0."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.out_layers[3].weight); nn.init.zeros_(m.out_layers[3].bias)  # zero_module(conv2)
            elif isinstance(m, SpatialTransformer):
                nn.init.zeros_(m.proj_out.weight); nn.init.zeros_(m.proj_out.bias)            # zero_module(proj_out)
        nn.init.zeros_(self.out[2].weight); nn.init.zeros_(self.out[2].bias)                  # zero_module(out conv)

    def set_gradient_checkpointing(self, on: bool = True):
        """Recompute each ResBlock / spatial transformer in backward instead of storing activations."""
        for m in self.modules():
            if isinstance(m, (ResBlock, SpatialTransformer)):
                m.checkpoint = bool(on)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                down_residuals: list | None = None, mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in, h, w), timesteps (B,) or scalar, context (B, T, context_dim), y (B, adm) SDXL,
        timestep_cond (B, time_cond_proj_dim) full LCM; down_residuals (one per input block) and
        mid_residual are ControlNet-style additions. Returns (B, out, h, w)."""
        B, _, h, w = x.shape
        m = 2 ** (len(self.channel_mult) - 1)
        if h % m or w % m:
            raise ValueError(f"latent size {h}x{w} is not a multiple of {m}: this UNet downsamples "
                             f"{len(self.channel_mult) - 1} times, so latent sides must be multiples of {m} "
                             f"(image sides multiples of {8 * m} with the x8 SD VAE)")
        if (y is None) != (self.adm_in_channels is None):
            raise ValueError(f"y is {'required' if y is None else 'not accepted'}: adm_in_channels={self.adm_in_channels}")
        if (timestep_cond is None) != (self.time_cond_proj_dim is None):
            raise ValueError(f"timestep_cond is {'required' if timestep_cond is None else 'not accepted'}: "
                             f"time_cond_proj_dim={self.time_cond_proj_dim}")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(B)
        t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)  # (B, model_channels)
        if timestep_cond is not None:
            t_emb = t_emb + self.time_cond_proj(timestep_cond)               # LCM w-embedding enters here
        emb = self.time_embed(t_emb)                                          # (B, 4 * model_channels)
        if y is not None:
            emb = emb + self.label_emb(y)

        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        if down_residuals is not None:
            assert len(down_residuals) == len(hs), f"need {len(hs)} down residuals, got {len(down_residuals)}"
            hs = [a + r for a, r in zip(hs, down_residuals)]
        if self.middle_block is not None:
            h = self.middle_block(h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

#----------------------------------------------------------------------------
# Presets of the released models (the number of heads cannot be read from weights).

_SD1_DEPTH, _SD1_DEPTH_OUT = [1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
UNET_PRESETS = {
    "sd15": dict(model_channels=320, num_res_blocks=2, channel_mult=(1, 2, 4, 4), transformer_depth=_SD1_DEPTH,
                 transformer_depth_middle=1, transformer_depth_output=_SD1_DEPTH_OUT, num_heads=8,
                 context_dim=768, use_linear_in_transformer=False),
    "sd21": dict(model_channels=320, num_res_blocks=2, channel_mult=(1, 2, 4, 4), transformer_depth=_SD1_DEPTH,
                 transformer_depth_middle=1, transformer_depth_output=_SD1_DEPTH_OUT, num_head_channels=64,
                 context_dim=1024, use_linear_in_transformer=True, upcast_attention=True),
    "sdxl": dict(model_channels=320, num_res_blocks=2, channel_mult=(1, 2, 4), transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[10, 10, 10, 2, 2, 2, 0, 0, 0],
                 num_head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816),
    "ssd1b": dict(model_channels=320, num_res_blocks=2, channel_mult=(1, 2, 4), transformer_depth=[0, 0, 2, 2, 4, 4],
                  transformer_depth_middle=0, transformer_depth_output=[4, 4, 10, 2, 1, 1, 0, 0, 0],
                  num_head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816),
}

#----------------------------------------------------------------------------
# Architecture from a prefix-stripped state dict (keys and shapes only).

def _count(keys, prefix: str) -> int:
    """Number of distinct integer children `prefix.K.` among `keys`."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for k in keys if (m := pat.match(k))})


def infer_unet_config(sd: dict, num_heads: int = -1, num_head_channels: int = -1) -> dict:
    """UNetModel kwargs read from an LDM-named UNet state dict (prefix stripped).

    Heads are not visible in weights: give num_heads or num_head_channels; if neither is given, the
    SD rule applies (conv proj_in as in SD1: 8 heads; Linear proj_in as in SD2/SDXL: 64-channel heads).
    """
    keys = list(sd)
    for k in ("input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"):
        assert k in sd, f"not an LDM-named UNet state dict: missing {k!r} (strip 'model.diffusion_model.' first?)"
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    out_channels = sd["out.2.weight"].shape[0]
    assert sd["time_embed.0.weight"].shape == (4 * model_channels, model_channels), \
        f"time_embed.0.weight {tuple(sd['time_embed.0.weight'].shape)} does not match model_channels={model_channels}"

    # Input blocks: ResBlocks (their width gives the level's multiplier) separated by Downsamples.
    n_in = _count(keys, "input_blocks")
    levels, depth = [[]], []
    for n in range(1, n_in):
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
            continue
        assert f"input_blocks.{n}.0.in_layers.2.weight" in sd, f"input_blocks.{n} is neither a ResBlock nor a Downsample"
        levels[-1].append(sd[f"input_blocks.{n}.0.in_layers.2.weight"].shape[0])
        depth.append(_count(keys, f"input_blocks.{n}.1.transformer_blocks"))
    R = len(levels[0])
    assert R > 0 and all(len(l) == R for l in levels), f"unequal ResBlocks per level: {[len(l) for l in levels]}"
    assert all(c % model_channels == 0 and len(set(l)) == 1 for l in levels for c in l), \
        f"ResBlock widths {levels} are not constant multiples of model_channels={model_channels} per level"
    channel_mult = tuple(l[0] // model_channels for l in levels)
    L = len(channel_mult)
    n_out = _count(keys, "output_blocks")
    assert n_out == L * (R + 1), f"{n_out} output blocks, expected {L * (R + 1)} for {L} levels x {R + 1}"
    depth_out = [_count(keys, f"output_blocks.{n}.1.transformer_blocks") for n in range(n_out)]

    if _count(keys, "middle_block.1.transformer_blocks") > 0:
        depth_mid = _count(keys, "middle_block.1.transformer_blocks")
        assert "middle_block.2.in_layers.2.weight" in sd, "middle_block has attention but no closing ResBlock"
    elif "middle_block.0.in_layers.2.weight" in sd:
        assert _count(keys, "middle_block") == 1, "middle_block without attention must be a single ResBlock"
        depth_mid = 0
    else:
        assert _count(keys, "middle_block") == 0, "unrecognised middle_block layout"
        depth_mid = None

    proj_in = [k for k in keys if k.endswith(".proj_in.weight")]
    to_k = [k for k in keys if k.endswith(".attn2.to_k.weight")]
    context_dim = sd[to_k[0]].shape[1] if to_k else None
    assert all(sd[k].shape[1] == context_dim for k in to_k), "cross-attention context widths differ between blocks"
    use_linear = bool(proj_in) and sd[proj_in[0]].ndim == 2
    if num_heads == -1 and num_head_channels == -1:
        num_heads, num_head_channels = (-1, 64) if use_linear else (8, -1)
    return dict(
        in_channels=int(in_channels), out_channels=int(out_channels), model_channels=int(model_channels),
        num_res_blocks=R, channel_mult=channel_mult, transformer_depth=depth,
        transformer_depth_middle=depth_mid, transformer_depth_output=depth_out,
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=None if context_dim is None else int(context_dim), use_linear_in_transformer=use_linear,
        adm_in_channels=int(sd["label_emb.0.0.weight"].shape[1]) if "label_emb.0.0.weight" in sd else None,
        time_cond_proj_dim=int(sd["time_cond_proj.weight"].shape[1]) if "time_cond_proj.weight" in sd else None,
    )
