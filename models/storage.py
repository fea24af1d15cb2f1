"""Frozen weights kept in a compact storage dtype, cast to the compute dtype inside each layer.

In LoRA distillation the frozen base UNet is most of the memory (SD1.5: 3.4 GB of 4.9 GB at fp32).
`store_frozen(model, torch.float16)` keeps every frozen nn.Linear / nn.Conv2d weight and bias in
fp16 and casts them to the input's dtype when the layer runs; backward re-casts the stored weight
instead of keeping an fp32 copy alive. fp16 -> fp32 is exact, so for a checkpoint stored in fp16 (as
the released SD/SDXL files are) the fp32 computation is bit-identical to holding fp32 weights, at
half their memory and one cast per layer call. Trainable parameters (LoRA A/B) are left as they are.

The casting layers are the plain classes `StoredLinear` / `StoredConv2d` (nn.Linear / nn.Conv2d
that cast when the weight's dtype is not the input's; otherwise the torch forward). The LoRA
wrappers derive from them, so `store_frozen` only changes their dtypes; a plain frozen layer is
replaced by its Stored twin holding the same Parameters, so names, state-dict keys and
`isinstance(m, nn.Linear)` stay as they were.
"""
import threading

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

#----------------------------------------------------------------------------
# The cast. On CPU a fresh fp32 copy of a large weight per call costs mostly page faults (glibc
# hands big blocks back to the OS): 6x the copy into reused memory (SD1.5 conv/linear shapes, one
# thread: 43 vs 7 ms). So each thread keeps one scratch buffer per dtype and reuses it when no
# tensor refers to its memory any more (its storage use count says so); a result still held by
# a caller is never overwritten, the next cast then gets fresh memory instead.

_SCRATCH = threading.local()
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)   # private, used by torch's own inductor


def _in_use(buf: torch.Tensor, idle: int) -> bool:
    return _USE_COUNT is None or _USE_COUNT(buf.untyped_storage()._cdata) != idle


def cast_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w as dtype (w itself if it has that dtype). The result is the caller's to keep: on CPU its
    memory is a per-thread buffer that is recycled only once nothing refers to it."""
    if w.dtype == dtype:
        return w
    if w.device.type != "cpu" or torch.compiler.is_compiling():    # CUDA / inductor: own allocators
        return w.to(dtype)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf, idle = bufs.get(dtype, (None, 0))
    if buf is not None and _in_use(buf, idle):
        return w.to(dtype)                                     # a caller still holds it: fresh memory
    if buf is None or buf.numel() < w.numel():
        with torch.inference_mode(False):                      # a normal tensor: writable in any mode
            buf = torch.empty(w.numel(), dtype=dtype, device="cpu")
        bufs[dtype] = buf, _USE_COUNT(buf.untyped_storage()._cdata) if _USE_COUNT else 0
    return buf[:w.numel()].view(w.shape).copy_(w)

#----------------------------------------------------------------------------
# y = x W^T + b and y = conv(x, W) + b with W, b stored in another dtype; dL/dx only (W is frozen).

class _CastLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, cast_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])                       # the stored (half) weight, not a copy
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ cast_weight(weight, grad.dtype), None, None         # dL/dx = dL/dy W

    @staticmethod
    def jvp(ctx, x_dot, w_dot, b_dot):                          # forward AD (a JVP, sCM): d(x W^T) = x_dot W^T
        (weight,) = ctx.saved_tensors
        return F.linear(x_dot, weight.to(x_dot.dtype))


class _CastConv2d(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, cast_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, *conf = inputs
        ctx.save_for_backward(weight)
        ctx.save_for_forward(weight)
        ctx.conf, ctx.x_shape = tuple(conf), x.shape

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:                         # e.g. conv_in on the noisy latent
            return None, None, None, None, None, None, None
        gx = torch.nn.grad.conv2d_input(ctx.x_shape, cast_weight(weight, grad.dtype), grad, *ctx.conf)
        return gx, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, *_):                                    # d conv(x, W) = conv(x_dot, W)
        (weight,) = ctx.saved_tensors
        return F.conv2d(x_dot, weight.to(x_dot.dtype), None, *ctx.conf)

def has_tangent(*ts: torch.Tensor) -> bool:
    """True if a tensor carries a forward-AD tangent (a torch.func.jvp input or a make_dual tensor).
    Outside a dual level unpack_dual returns before any op: free, and torch.compile guards on it."""
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)

#----------------------------------------------------------------------------
# The casting layers. StoredConv2d replaces only nn.Conv2d._conv_forward (the op itself), so a
# subclass's forward (the UNet's CPU fast path, a LoRA wrapper's adapters) still runs around it,
# wherever the class sits in the MRO.

class StoredLinear(nn.Linear):
    """nn.Linear whose weight/bias may be stored in another dtype than the input's."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype or self.weight.requires_grad:   # trainable: autocast casts it, with its grad
            return F.linear(x, self.weight, self.bias)
        y = _CastLinear.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)   # 2-D: no view out of
        return y.view(*x.shape[:-1], y.shape[-1])                                  # the Function


class StoredConv2d(nn.Conv2d):
    """nn.Conv2d whose weight/bias may be stored in another dtype than the input's."""
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.dtype == x.dtype or weight.requires_grad:        # trainable: autocast casts it, with its grad
            return super()._conv_forward(x, weight, bias)
        assert self.padding_mode == "zeros", self.padding_mode
        return _CastConv2d.apply(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def adopt_layer(new: nn.Module, layer: nn.Module) -> None:
    """(Re)initialise `new` as a Module with `layer`'s plain attributes (sizes, kernel, training
    flag) and its very weight/bias Parameters: same keys, no copy. Used instead of __init__."""
    nn.Module.__init__(new)
    for k, v in vars(layer).items():
        if not k.startswith("_") or k == "_reversed_padding_repeated_twice":
            setattr(new, k, v)
    new.weight, new.bias = layer.weight, layer.bias


def take_over(cls: type, layer: nn.Module) -> nn.Module:
    """A `cls` instance holding `layer`'s attributes and Parameters (adopt_layer); no __init__."""
    new = cls.__new__(cls)
    adopt_layer(new, layer)
    return new

#----------------------------------------------------------------------------
# The Stored twin of each frozen layer class: StoredLinear / StoredConv2d for the torch classes.
#
# Every class is static: a project subclass (models.unet.Conv2d, the CPU fast path) derives from
# StoredConv2d itself, so store_frozen only changes its dtypes; another subclass is refused.

_TWINS: dict[type, type] = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d}


def _twin(cls: type) -> type:
    """The static Stored class of a plain nn.Linear / nn.Conv2d (subclasses define their own)."""
    if cls not in _TWINS:
        raise TypeError(f"store_frozen keeps nn.Linear / nn.Conv2d and Stored subclasses in half precision; "
                        f"{cls.__module__}.{cls.__qualname__} is another subclass: derive it from "
                        "models.storage.StoredLinear / StoredConv2d (as models.unet.Conv2d does)")
    return _TWINS[cls]


def stored_base(cls: type) -> type:
    """The layer class a Stored twin was made from (cls itself for any other class)."""
    return next((base for base, twin in _TWINS.items() if twin is cls), cls)


def store_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep frozen Linear/Conv2d weights of `model` in `dtype` (in place); returns the bytes saved.
    Every frozen plain layer is replaced by its Stored twin (same Parameters; it computes as the
    plain one when the dtypes match); Stored ones (the LoRA wrappers too) keep their identity."""
    saved, twins = 0, {}
    for name, m in list(model.named_modules(remove_duplicate=False)):   # a shared layer: one twin
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or m.weight.requires_grad:
            continue
        if ".lora_down." in name or ".lora_up." in name:         # adapters (a frozen EMA one too) stay
            continue
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            continue
        if not isinstance(m, (StoredLinear, StoredConv2d)):      # LoRA wrappers are Stored already
            if not name:
                raise TypeError(f"store_frozen replaces the layers inside a model; got a bare "
                                f"{type(m).__name__}: pass a container (e.g. nn.Sequential(layer))")
            twins.setdefault(id(m), take_over(_twin(type(m)), m))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, twins[id(m)])
        for p in (m.weight, m.bias):                             # the Parameters the twin holds
            if p is not None and not p.requires_grad and p.dtype != dtype:
                saved += p.numel() * (p.element_size() - torch.empty((), dtype=dtype, device="meta").element_size())
                p.data = p.data.to(dtype)
    return saved
