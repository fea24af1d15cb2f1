"""Frozen weights kept in a compact storage dtype, cast to the compute dtype inside each layer.

In LoRA distillation the frozen base UNet is most of the memory (SD1.5: 3.4 GB of 4.9 GB at fp32).
`store_frozen(model, torch.float16)` keeps every frozen nn.Linear / nn.Conv2d weight and bias in
fp16 and casts them to the input's dtype when the layer runs; backward re-casts the stored weight
instead of keeping an fp32 copy alive. fp16 -> fp32 is exact, so for a checkpoint stored in fp16 (as
the released SD/SDXL files are) the fp32 computation is bit-identical to holding fp32 weights, at
half their memory and one cast per layer call. Trainable parameters (LoRA A/B) are left as they are.
The layer classes are swapped for subclasses, so names, state-dict keys, LoRA wrappers and
`isinstance(m, nn.Linear)` all stay as they were.
"""
import threading

import torch
import torch.nn.functional as F
from torch import nn

#----------------------------------------------------------------------------
# The cast. On CPU a fresh fp32 copy of a large weight per call costs mostly page faults (glibc
# hands big blocks back to the OS), ~8x the copy itself: weights are cast into one scratch buffer
# per thread, reused layer after layer (each use is consumed before the next cast).

_SCRATCH = threading.local()


def cast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w as dtype; on CPU a view of a per-thread scratch buffer, valid until the next call."""
    if w.dtype == dtype:
        return w
    if w.device.type != "cpu":
        return w.to(dtype)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < w.numel():
        buf = bufs[dtype] = torch.empty(w.numel(), dtype=dtype)
    return buf[:w.numel()].view(w.shape).copy_(w)

#----------------------------------------------------------------------------
# y = x W^T + b and y = conv(x, W) + b with W, b stored in another dtype; dL/dx only (W is frozen).

class _CastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)                           # the stored (half) weight, not a copy
        return F.linear(x, cast_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ cast_weight(weight, grad.dtype), None, None         # dL/dx = dL/dy W


class _CastConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf, ctx.x_shape = (stride, padding, dilation, groups), x.shape
        return F.conv2d(x, cast_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:                         # e.g. conv_in on the noisy latent
            return None, None, None, None, None, None, None
        gx = torch.nn.grad.conv2d_input(ctx.x_shape, cast_weight(weight, grad.dtype), grad, *ctx.conf)
        return gx, None, None, None, None, None, None

#----------------------------------------------------------------------------
# Layer mixins: they replace only the base computation (nn.Linear/nn.Conv2d.forward), so a LoRA
# wrapper's forward (base + adapters) or a custom conv's fast path still runs around it.

class StoredLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        y = _CastLinear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)   # 2-D: no view out of
        return y.view(*x.shape[:-1], y.shape[-1])                                  # the Function


class StoredConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        assert self.padding_mode == "zeros", self.padding_mode
        return _CastConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


_CLASSES: dict[type, type] = {}


def _stored_class(cls: type) -> type:
    """cls with nn.Linear/nn.Conv2d.forward replaced by the casting one (placed right above it)."""
    base = StoredLinear if issubclass(cls, nn.Linear) else StoredConv2d
    if cls in (nn.Linear, nn.Conv2d):
        return base
    if cls not in _CLASSES:
        qual = f"_Stored_{cls.__module__}_{cls.__qualname__}".replace(".", "_")
        _CLASSES[cls] = globals()[qual] = type(f"Stored{cls.__name__}", (cls, base),
                                               {"__module__": __name__, "__qualname__": qual})
    return _CLASSES[cls]                                         # registered here, so it pickles


def store_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep frozen Linear/Conv2d weights of `model` in `dtype` (in place); returns the bytes saved."""
    saved = 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or m.weight.requires_grad or m.weight.dtype == dtype:
            continue
        if ".lora_down." in name or ".lora_up." in name:         # adapters (a frozen EMA one too) stay
            continue
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            continue
        if not isinstance(m, (StoredLinear, StoredConv2d)):
            m.__class__ = _stored_class(type(m))
        for p in (m.weight, m.bias):
            if p is not None and not p.requires_grad:
                saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype).element_size())
                p.data = p.data.to(dtype)
    return saved
