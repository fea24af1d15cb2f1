"""TAESD, the tiny autoencoder for Stable Diffusion (madebyollin/taesd; diffusers' AutoencoderTiny).

A drop-in decoder (and encoder) for SD latents at a fraction of the VAE's cost: conv-ReLU residual
blocks and nearest x2 upsampling, no norms, no attention. Its conventions differ from
AutoencoderKL (models/vae.py) in two ways, and this module keeps the project's image convention:
- latents: TAESD's "scale factor" is 1: it decodes the UNet-space latent z = vae_scale * z_raw
  itself (taesd_* for SD1/SD2 latents scaled by 0.18215, taesdxl_* for SDXL's by 0.13025), so
  nothing is divided by vae_scale before it; its encoder returns UNet-space latents.
- images: the published nets see and return images in [0, 1]; `encode`/`decode` here take and
  return [-1, 1], as models/vae.py and diffusers' AutoencoderTiny do: decode(z) = 2 D(z) - 1,
  encode(x) = E((x + 1) / 2).
The decoder first soft-clamps its input, z <- 3 tanh(z / 3). Module names are those of the original
taesd.py nn.Sequentials, so a `taesd_decoder.safetensors` / `.pth` loads under "decoder." as it is;
diffusers' layout ("decoder.layers.N...") goes through models/keymaps.py.
"""
import re

import torch
from torch import nn

from models import checkpoint as ckpt
from models.keymaps import taesd_state_dict_to_ours

LATENT_MAGNITUDE, LATENT_SHIFT = 3.0, 0.5      # TAESD's 8-bit latent storage: z/(2*3) + 0.5 in [0, 1]

#----------------------------------------------------------------------------
# Building blocks (taesd.py): 3x3 convs, a residual block of three of them, the input soft clamp.


def conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """z -> 3 tanh(z / 3): the decoder's soft clamp of its input latent."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z / 3) * 3


class Block(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + x); `skip` is the identity (equal widths in TAESD)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(inplace=True), conv(channels, channels),
                                  nn.ReLU(inplace=True), conv(channels, channels))
        self.skip, self.fuse = nn.Identity(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x) + x)        # in place on the fresh sum only, never on x

#----------------------------------------------------------------------------
# The two nets, as the original nn.Sequentials (their indices are the file's key names).


class _Net(nn.Sequential):
    def __getitem__(self, idx):                      # a slice is a plain Sequential (no config to rebuild)
        return nn.Sequential(*list(self)[idx]) if isinstance(idx, slice) else super().__getitem__(idx)


class TinyDecoder(_Net):
    """Latent (B,latent_channels,h,w) -> image (B,3,h*2^n,w*2^n) in ~[0, 1] (taesd.py's convention).

    Published: channels 64, upsamples 3 (x8). Layout for n = 3: 0 Clamp, 1 conv, 2 ReLU, then per
    level 3 Blocks, Upsample x2 (nearest), bias-free conv (3-7, 8-12, 13-17), then 18 Block, 19 conv."""

    def __init__(self, channels: int = 64, upsamples: int = 3, latent_channels: int = 4):
        layers = [Clamp(), conv(latent_channels, channels), nn.ReLU(inplace=True)]
        for _ in range(upsamples):
            layers += [Block(channels), Block(channels), Block(channels), nn.Upsample(scale_factor=2),
                       conv(channels, channels, bias=False)]
        super().__init__(*layers, Block(channels), conv(channels, 3))
        self.channels, self.upsamples, self.latent_channels = channels, upsamples, latent_channels


class TinyEncoder(_Net):
    """Image (B,3,H,W) in [0, 1] -> latent (B,latent_channels,H/2^n,W/2^n) (taesd.py's convention).

    Published: channels 64, downsamples 3. Layout for n = 3: 0 conv, 1 Block, then per level a
    bias-free stride-2 conv and 3 Blocks (2-5, 6-9, 10-13), then 14 conv."""

    def __init__(self, channels: int = 64, downsamples: int = 3, latent_channels: int = 4):
        layers = [conv(3, channels), Block(channels)]
        for _ in range(downsamples):
            layers += [conv(channels, channels, stride=2, bias=False), Block(channels), Block(channels),
                       Block(channels)]
        super().__init__(*layers, conv(channels, latent_channels))
        self.channels, self.downsamples, self.latent_channels = channels, downsamples, latent_channels

#----------------------------------------------------------------------------
# The autoencoder: either net may be absent (a decoder-only file is the common case).


class TinyAutoencoder(nn.Module):
    """TAESD in the project's conventions: images in [-1, 1], latents in UNet space."""

    def __init__(self, decoder: TinyDecoder | None = None, encoder: TinyEncoder | None = None):
        super().__init__()
        assert decoder is not None or encoder is not None, "a TinyAutoencoder needs a decoder or an encoder"
        if decoder is not None and encoder is not None:
            assert decoder.latent_channels == encoder.latent_channels, \
                f"decoder takes {decoder.latent_channels} latent channels, encoder gives {encoder.latent_channels}"
            assert decoder.upsamples == encoder.downsamples, \
                f"decoder upsamples x{2 ** decoder.upsamples}, encoder downsamples x{2 ** encoder.downsamples}"
        self.decoder, self.encoder = decoder, encoder

    @property
    def net(self) -> nn.Sequential:
        return self.decoder if self.decoder is not None else self.encoder

    @property
    def latent_channels(self) -> int:
        return self.net.latent_channels

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8 for the published TAESD / TAESDXL)."""
        return 2 ** (self.decoder.upsamples if self.decoder is not None else self.encoder.downsamples)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """UNet-space latent z (B,C,h,w) -> image (B,3,fh,fw) in ~[-1, 1], not clamped: 2 D(z) - 1."""
        if self.decoder is None:
            raise ValueError("this TAESD holds an encoder only: load a taesd_decoder file to decode")
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"TAESD.decode expects latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        z = z.to(self.dtype)
        if z.device.type == "cpu":                   # oneDNN's channels-last convs (as models/vae.py)
            z = z.contiguous(memory_format=torch.channels_last)
        return (self.decoder(z) * 2 - 1).contiguous()

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image (B,3,H,W) in [-1, 1] -> UNet-space latent (B,C,H/f,W/f): E((img + 1) / 2)."""
        if self.encoder is None:
            raise ValueError("this TAESD holds a decoder only: load a taesd_encoder file to encode")
        f = self.downscale
        if img.ndim != 4 or img.shape[1] != 3 or img.shape[2] % f or img.shape[3] % f:
            raise ValueError(f"TAESD.encode expects images (B, 3, H, W) with H, W multiples of {f}, "
                             f"got {tuple(img.shape)}")
        return self.encoder(((img + 1) / 2).to(self.dtype))


def latents_to_bytes(z: torch.Tensor) -> torch.Tensor:
    """TAESD's lossy 8-bit latent storage: round(255 * clamp(z / 6 + 0.5, 0, 1)) as uint8."""
    return (z / (2 * LATENT_MAGNITUDE) + LATENT_SHIFT).clamp(0, 1).mul(255).round().to(torch.uint8)


def bytes_to_latents(b: torch.Tensor) -> torch.Tensor:
    """Inverse of latents_to_bytes (up to its rounding and clamping): (b / 255 - 0.5) * 6."""
    return (b.float() / 255 - LATENT_SHIFT) * (2 * LATENT_MAGNITUDE)

#----------------------------------------------------------------------------
# Architecture from our (mapped) state dict: widths from shapes, levels from the bias-free convs.


def infer_taesd_config(sd: dict) -> dict:
    """{"decoder": kwargs or None, "encoder": kwargs or None} from keys "decoder.N..."/"encoder.N..."."""
    out = {}
    for part, first, levels in (("decoder", 1, "upsamples"), ("encoder", 0, "downsamples")):
        keys = [k for k in sd if k.startswith(part + ".")]
        if not keys:
            out[part] = None
            continue
        w = sd.get(f"{part}.{first}.weight")
        if w is None or w.ndim != 4:
            raise ValueError(f"TAESD {part}: no 4-D {part}.{first}.weight (its first conv)")
        top = {int(m.group(1)) for k in keys if (m := re.fullmatch(rf"{part}\.(\d+)\.weight", k))}
        n = sum(1 for i in top if f"{part}.{i}.bias" not in sd)        # the level convs carry no bias
        last = sd[f"{part}.{max(top)}.weight"]
        out[part] = {"channels": w.shape[0], levels: n,
                     "latent_channels": w.shape[1] if part == "decoder" else last.shape[0]}
    return out


def load_tiny_vae(path: str, encoder_path: str | None = None) -> TinyAutoencoder:
    """A TinyAutoencoder (fp32, eval) from a TAESD file: the original layout (`taesd_decoder.*`,
    `taesdxl_decoder.*`, `taesd_encoder.*`; .safetensors or .pth read weights-only) or diffusers'
    AutoencoderTiny `diffusion_pytorch_model.safetensors` (both nets). encoder_path: a second
    original-layout file (e.g. the encoder next to a decoder). Bad files: one ValueError naming them."""
    sd = {}
    for p in [path] + ([encoder_path] if encoder_path else []):
        part, _ = ckpt.load_file(p)
        try:
            mapped = taesd_state_dict_to_ours(part)
        except KeyError as e:
            raise ckpt.named_error(p, f"not a TAESD file: {e.args[0]}") from None
        clash = sorted(mapped.keys() & sd.keys())
        if clash:
            raise ckpt.named_error(p, f"holds the same TAESD net as {path} (e.g. {clash[0]!r})")
        sd |= mapped
    try:
        cfg = infer_taesd_config(sd)
        with torch.device("meta"):
            tiny = TinyAutoencoder(decoder=TinyDecoder(**cfg["decoder"]) if cfg["decoder"] else None,
                                   encoder=TinyEncoder(**cfg["encoder"]) if cfg["encoder"] else None)
        ckpt.load_strict(tiny, sd, "TAESD", "TAESD")
    except (ValueError, AssertionError) as e:
        raise ckpt.named_error(path if encoder_path is None else f"{path} + {encoder_path}", e) from None
    ckpt.check_finite(sd, path)
    return tiny.float().eval()


def save_tiny_decoder(decoder: TinyDecoder, path: str, metadata: dict | None = None) -> None:
    """Write a decoder in the original taesd layout ("1.weight", "3.conv.0.weight", ...), .safetensors."""
    import safetensors.torch
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in decoder.state_dict().items()}, path,
                                metadata=metadata)
