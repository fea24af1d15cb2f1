"""Input guards of Pipeline.__call__: images, latents, prompts and the memory a call needs."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def as_image_tensor(image) -> torch.Tensor:
    """PIL image / (3,H,W) or (B,3,H,W) tensor in [0,1] -> (B,3,H,W) in [-1,1]; NaN/Inf refused."""
    if isinstance(image, torch.Tensor):
        t = image if image.dim() == 4 else image[None]
        if not torch.isfinite(t).all():
            raise ValueError(f"init_image holds {int((~torch.isfinite(t)).sum())} NaN/Inf values")
    else:
        import numpy as np
        t = torch.from_numpy(np.asarray(image.convert("RGB"), dtype="float32") / 255.0).permute(2, 0, 1)[None]
    return t.float() * 2 - 1


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: driver free + the allocator's cached slack;
    CPU: MemAvailable, within a cgroup memory limit); None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    known = []
    try:
        with open("/proc/meminfo") as f:
            known += [int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                lim = a.read().strip()
                if lim != "max" and int(lim) < 2**60:
                    known.append(max(0, int(lim) - int(b.read())))
            break
        except (OSError, ValueError):
            continue
    return min(known) if known else None


def sampling_memory(pipe, B: int, height: int, width: int, output: str, s: float) -> dict[str, int]:
    """A lower bound of the bytes one call holds at its peak, by part: the latents, the UNet's
    full-width skips at latent resolution, the decoded images and the VAE decoder's full-resolution
    activations (input and output of one conv; per tile when the VAE decodes in tiles)."""
    f, unet, vae = pipe.latent_factor, pipe.unet, pipe.vae
    h, w = height // f, width // f
    esize = torch.empty((), dtype=pipe.dtype, device="meta").element_size()
    n_unet = B * (2 if float(s) != 1.0 and not pipe.is_full_lcm else 1)        # CFG: cond and uncond
    parts = {"latents": B * unet.in_channels * h * w * 4,
             "UNet skips": n_unet * unet.model_channels * (unet.num_res_blocks + 1) * h * w * esize}
    if output != "latent":
        t = vae.tile_size
        th, tw = (h, w) if t is None else (min(h, t), min(w, t))
        vsize = next(vae.parameters()).element_size()
        parts["images"] = B * 3 * height * width * 4
        parts["VAE decode"] = 2 * B * vae.decoder.conv_out.in_channels * th * f * tw * f * vsize
    return parts


def check_memory(pipe, B: int, height: int, width: int, output: str, s: float) -> None:
    """Refuse, before anything is allocated, a size whose sampling cannot fit in free memory."""
    parts = sampling_memory(pipe, B, height, width, output, s)
    need, avail = sum(parts.values()), available_memory(pipe.device)
    if avail is not None and need > avail:
        gib = lambda n: f"{n / 2**30:.3g} GiB"                                   # noqa: E731
        raise ValueError(f"{height}x{width} x {B} image(s) needs at least {gib(need)} on {pipe.device} ("
                         + ", ".join(f"{k} {gib(v)}" for k, v in parts.items()) + f"), but {gib(avail)} "
                         "is free: use a smaller size or fewer images"
                         + ("" if output == "latent" or pipe.vae.tile_size else ", or pipe.vae.enable_tiling()"))


def warn_control_characters(prompts: list[str]) -> None:
    """Warn about control/format characters (documented behaviour, models/text.py tokenize): CLIP's
    text cleaning (ftfy) drops C0 controls, DEL, BOM and ANSI escapes, joining the text on either
    side ('red\\x00circle' reads 'redcircle'); C1 controls, zero-width and bidi characters stay, as
    byte tokens; tab, newline, CR and form feed are whitespace."""
    import unicodedata
    found = sorted({c for p in prompts for c in p if unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n\r\f"})
    if found:
        idx = [i for i, p in enumerate(prompts) if any(c in p for c in found)]
        log.warning("prompt(s) %s hold control or format characters (%s): the tokenizer drops C0 controls "
                    "(joining the text around them) and keeps the others as byte tokens", idx[:5],
                    ", ".join(repr(c) for c in found[:5]))


def check_init_image(image, B: int, height: int, width: int) -> None:
    """An init image is a PIL image or a (3,H,W)/(1|B,3,H,W) float tensor in [0, 1], finite, of the
    output size (checked before it is decoded or encoded, so a huge one costs nothing)."""
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.ndim not in (3, 4) or shape[-3] != 3 or (image.ndim == 4 and shape[0] not in (1, B)):
            raise ValueError(f"init_image tensor must be (3, H, W) or (1 or {B}, 3, H, W), got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"init_image tensor must be floating point in [0, 1], got {image.dtype} "
                             "(a uint8 image? divide by 255)")
        size = (shape[-1], shape[-2])
    elif hasattr(image, "size") and hasattr(image, "convert"):             # PIL: size known without decoding
        size = tuple(image.size)
    else:
        raise ValueError(f"init_image must be a PIL image or a tensor, got {type(image).__name__}")
    if size != (width, height):
        raise ValueError(f"init_image is {size[0]}x{size[1]} (width x height) but the output is {width}x{height}: "
                         "resize the image or pass matching width/height")
    if isinstance(image, torch.Tensor):
        finite = torch.isfinite(image)
        if not finite.all():
            raise ValueError(f"init_image holds {int((~finite).sum())} NaN/Inf values")
        lo, hi = image.min().item(), image.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"init_image tensor must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")


def check_latents(latents, shape: tuple) -> None:
    """User-given initial latents: a finite floating tensor of the sampling shape (B, C, h, w)."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise ValueError(f"latents must be a floating-point tensor of shape {tuple(shape)}, got "
                         f"{type(latents).__name__}{'' if not isinstance(latents, torch.Tensor) else ' ' + str(latents.dtype)}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call samples {tuple(shape)} "
                         "(batch, latent channels, latent height, latent width)")
    finite = torch.isfinite(latents)
    if not finite.all():
        raise ValueError(f"latents hold {int((~finite).sum())} NaN/Inf values of {latents.numel()}; pass "
                         "finite noise (e.g. torch.randn)")
