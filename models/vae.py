"""AutoencoderKL of latent diffusion (Rombach et al. 2022), with the original LDM module names.

An original checkpoint loads after stripping `first_stage_model.`. The UNet-space latent is
z = scale_factor * vae.encode(x).sample(); the scale lives in this config (0.18215 SD1/SD2,
0.13025 SDXL), nowhere else.
"""
import re

import torch
import torch.nn.functional as F
from torch import nn

#----------------------------------------------------------------------------
# Building blocks (LDM `ldm/modules/diffusionmodules/model.py`): GroupNorm(32, eps 1e-6) + swish.


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)                # (B, 1, HW, C), scale C^-1/2
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))                  # LDM's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), \
        ResnetBlock(channels, channels)
    return mid

#----------------------------------------------------------------------------
# Encoder and decoder. decoder.up.{i} is indexed by resolution level (up.{n-1} runs first).


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, in_channels: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(c_in, ch * mult))
                c_in = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
        self.mid = _mid(c_in)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * z_channels, 3, padding=1)   # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple, num_res_blocks: int, out_ch: int, z_channels: int):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in)
        levels = []
        for i in reversed(range(len(ch_mult))):                    # lowest resolution first
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, ch * ch_mult[i]))
                c_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

#----------------------------------------------------------------------------
# Posterior q(z|x) = N(mean, diag(std^2)), as LDM's DiagonalGaussianDistribution.


class DiagonalGaussian:
    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)                 # (B, z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps; eps drawn on the generator's device (CPU by default), then moved."""
        device = generator.device if generator is not None else "cpu"
        eps = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

#----------------------------------------------------------------------------
# The autoencoder. Tiling (optional) decodes overlapping latent tiles and blends them linearly.


class AutoencoderKL(nn.Module):
    def __init__(self,
                 ch: int = 128,                       # channels at full resolution
                 ch_mult: tuple = (1, 2, 4, 4),       # channel multiplier per resolution level
                 num_res_blocks: int = 2,             # encoder blocks per level (decoder: +1)
                 in_channels: int = 3,
                 out_ch: int = 3,
                 z_channels: int = 4,
                 embed_dim: int = 4,                  # latent channels after quant_conv
                 scale_factor: float = 0.18215,       # raw latent -> UNet space (SDXL: 0.13025)
                 tile_size: int | None = None,        # latent tile side for decode; None = no tiling
                 tile_overlap: int = 8):              # latent overlap between tiles
        super().__init__()
        self.ch_mult, self.in_channels, self.embed_dim = tuple(ch_mult), in_channels, embed_dim
        self.scale_factor, self.tile_size, self.tile_overlap = scale_factor, tile_size, tile_overlap
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, out_ch, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def enable_tiling(self, tile_size: int = 64, tile_overlap: int = 8) -> None:
        self.tile_size, self.tile_overlap = tile_size, tile_overlap

    def encode(self, img: torch.Tensor) -> DiagonalGaussian:
        """img (B,3,H,W) in [-1,1] -> posterior over raw latents (B,embed_dim,H/f,W/f), VAE dtype."""
        f = self.downscale
        if img.ndim != 4 or img.shape[1] != self.in_channels:
            raise ValueError(f"VAE.encode expects images (B, {self.in_channels}, H, W), got {tuple(img.shape)}")
        if img.shape[2] % f or img.shape[3] % f:
            raise ValueError(f"image size {img.shape[2]}x{img.shape[3]} is not a multiple of {f} "
                             f"(the VAE downsamples by {f}); resize or crop height and width to a multiple of {f}")
        return DiagonalGaussian(self.quant_conv(self.encoder(img.to(self.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent z (B,embed_dim,h,w) (UNet-space latent / scale_factor) -> image (B,3,fh,fw), not clamped."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"VAE.decode expects raw latents (B, {self.embed_dim}, h, w), got {tuple(z.shape)}")
        z = z.to(self.dtype)
        t = self.tile_size
        if t is None or (z.shape[2] <= t and z.shape[3] <= t):
            return self._decode(z)
        return self._decode_tiled(z, t, self.tile_overlap)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.device.type == "cpu":            # oneDNN's channels-last convs: ~5% faster at 512px (fp32, 1 thread)
            z = z.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(z))

    def _decode_tiled(self, z: torch.Tensor, t: int, overlap: int) -> torch.Tensor:
        """Decode overlapping tiles and blend with linear ramps (GroupNorm stats become per tile)."""
        assert 0 <= overlap < t, f"tile_overlap {overlap} must be smaller than tile_size {t}"
        f, (B, _, h, w) = self.downscale, z.shape
        out, total = None, z.new_zeros(h * f, w * f)
        for y in _tile_starts(h, t, t - overlap):
            for x in _tile_starts(w, t, t - overlap):
                tile = self._decode(z[:, :, y:y + t, x:x + t])              # (B, 3, <=tf, <=tf)
                wy = _ramp(tile.shape[2], overlap * f, y > 0, y + t < h).to(tile)
                wx = _ramp(tile.shape[3], overlap * f, x > 0, x + t < w).to(tile)
                wgt = wy[:, None] * wx[None, :]
                if out is None:
                    out = tile.new_zeros(B, tile.shape[1], h * f, w * f)
                out[:, :, y * f:y * f + tile.shape[2], x * f:x * f + tile.shape[3]] += tile * wgt
                total[y * f:y * f + tile.shape[2], x * f:x * f + tile.shape[3]] += wgt
        return out / total


def _tile_starts(n: int, t: int, stride: int) -> list[int]:
    starts = list(range(0, max(n - t, 0) + 1, stride))
    return starts if starts[-1] + t >= n else starts + [n - t]


def _ramp(n: int, m: int, rise: bool, fall: bool) -> torch.Tensor:
    """Blend weights (n,): linear over the first/last m pixels where a neighbour overlaps, else 1."""
    w = torch.ones(n, device="cpu")
    r = torch.arange(1, m + 1, dtype=torch.float32, device="cpu") / (m + 1)               # never 0
    if rise and m:
        w[:m] = torch.minimum(w[:m], r)
    if fall and m:
        w[n - m:] = torch.minimum(w[n - m:], r.flip(0))
    return w

#----------------------------------------------------------------------------
# Architecture from an (prefix-stripped) original-layout state dict. scale_factor is not in the
# weights: the caller sets it from the family.


def infer_vae_config(sd: dict) -> dict:
    """AutoencoderKL kwargs (without scale_factor) from LDM-named keys and shapes."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"):
        if key not in sd:
            raise ValueError(f"not an LDM AutoencoderKL state dict: missing {key!r} "
                             f"(first keys: {sorted(sd)[:3]})")
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    assert levels == list(range(len(levels))) and blocks, f"encoder levels {levels}, blocks {blocks}"
    ch = sd["encoder.conv_in.weight"].shape[0]
    return dict(ch=ch,
                ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels),
                num_res_blocks=len(blocks),
                in_channels=sd["encoder.conv_in.weight"].shape[1],
                out_ch=sd["decoder.conv_out.weight"].shape[0],
                z_channels=sd["decoder.conv_in.weight"].shape[1],
                embed_dim=sd["quant_conv.weight"].shape[0] // 2)
