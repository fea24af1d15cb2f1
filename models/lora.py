"""Hand-written LoRA: LoRALinear / LoRAConv2d, injection, runtime scales, exact fuse / unfuse.

docs/method.md Sec. 5-6. Adapter i of a layer adds  scale_i * (alpha_i / r_i) * B_i A_i  to W0.

Design: the wrappers are plain subclasses of nn.Linear / nn.Conv2d (through storage.StoredLinear /
StoredConv2d, so frozen storage needs no second class) that take over the base's own `weight` and
`bias` Parameters, so a wrapped model has the same base keys (`...proj_in.weight`) as a plain one
and `isinstance(m, nn.Linear)` still holds. A custom layer class of models/ (the UNet's fast-path
Conv2d) has its own static wrapper deriving from both, so its forward still computes the base part.
Adapters add keys `<module>.lora_down.<name>.weight` and `<module>.lora_up.<name>.weight`; load
base checkpoints before injecting, or filter with `is_lora_key`. Fusing swaps `weight.data` for
W0 + sum_i delta_i and keeps the W0 tensor itself (non-persistent buffer `w0`), so unfusing
restores it bit-for-bit (costs one weight copy per layer).

Text towers (open_clip: nn.MultiheadAttention with a fused in_proj_weight) cannot be wrapped, so
their LoRAs are `LoRAParamDelta`s: always-applied deltas on rows of a weight, inference only.
"""
import contextlib
import math
import re
from typing import Iterator

import torch
from torch import nn

from models.storage import StoredConv2d, StoredLinear, adopt_layer, stored_base, take_over
from models.unet import Conv2d as UNetConv2d

# The 14 module kinds of the released LCM-LoRA, on original LDM/SGM names (docs/method.md Sec. 5).
LCM_LORA_TARGETS = (
    r"attn[12]\.to_[qkv]", r"attn[12]\.to_out\.0",                     # attention
    r"proj_in", r"proj_out", r"ff\.net\.0\.proj", r"ff\.net\.2",        # transformer io, feed-forward
    r"in_layers\.2", r"out_layers\.3", r"emb_layers\.1", r"skip_connection",   # resnet
    r"input_blocks\.\d+\.0\.op", r"output_blocks\.\d+\.\d+\.conv",      # down / up sampling convs
)


def is_lora_key(key: str) -> bool:
    """True for state-dict keys that belong to adapters (not to the base model)."""
    return ".lora_down." in key or ".lora_up." in key or ".lora_delta_" in key

#----------------------------------------------------------------------------
# Adapter bookkeeping shared by the Linear and Conv2d wrappers.


class _LoRAMixin:
    def _lora_setup(self) -> None:
        self.lora_down = nn.ModuleDict()          # A_i: (r, in) or conv (r, in, kh, kw)
        self.lora_up = nn.ModuleDict()            # B_i: (out, r) or conv (out, r, 1, 1)
        self.lora_dropout = nn.ModuleDict()
        self.lora_alpha: dict[str, float] = {}
        self.lora_scale: dict[str, float] = {}   # runtime lambda_i (task arithmetic, docs/method.md Sec. 6)
        self.lora_enabled = True
        self.fused = False
        self.register_buffer("w0", None, persistent=False)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    dtype: torch.dtype | None = None, scale: float = 1.0) -> list[nn.Parameter]:
        """Add adapter `name`: A kaiming-uniform (as peft), B = 0 so the layer is unchanged."""
        if name in self.lora_down:
            raise ValueError(f"adapter {name!r} already exists on this layer; remove_lora it first")
        assert rank > 0 and "." not in name, (rank, name)
        kw = dict(device=self.weight.device, dtype=dtype or self.weight.dtype)
        down, up = self._make_pair(rank, kw)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(up.weight)                 # B = 0: the LoRA model equals the base at step 0
        self.lora_down[name], self.lora_up[name] = down, up
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_alpha[name], self.lora_scale[name] = float(alpha), float(scale)
        if self.fused:
            self.fuse()
        return [down.weight, up.weight]

    def remove_adapter(self, name: str) -> None:
        for d in (self.lora_down, self.lora_up, self.lora_dropout):
            del d[name]
        del self.lora_alpha[name], self.lora_scale[name]
        if self.fused:
            self.fuse()

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha/r) * B A in fp32, shaped like the base weight (without the runtime scale)."""
        A, B = self.lora_down[name].weight.float(), self.lora_up[name].weight.float()
        r = A.shape[0]
        dW = B.flatten(1) @ A.flatten(1)          # (out, r) @ (r, in*kh*kw)
        return dW.view(self.weight.shape) * (self.lora_alpha[name] / r)

    def _active(self) -> list[str]:
        return [n for n in self.lora_down if self.lora_scale[n] != 0.0]

    def fuse(self) -> None:
        """W = W0 + sum_i scale_i * dW_i, summed in fp32, cast once; W0 is kept for unfuse.
        For inference: while fused, no gradient reaches the adapters."""
        w0 = self.w0 if self.fused else self.weight.data
        W = w0.float()
        for n in self._active():
            W = W + self.lora_scale[n] * self.delta_weight(n)
        self.w0, self.fused = w0, True
        self.weight.data = W.to(w0.dtype) if self._active() else w0

    def unfuse(self) -> None:
        if self.fused:
            self.weight.data, self.w0, self.fused = self.w0, None, False

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.fused or not self.lora_enabled:
            return out                            # fused: the adapters are already in the weight
        for n in self._active():
            down = self.lora_down[n]
            s = self.lora_scale[n] * self.lora_alpha[n] / down.weight.shape[0]   # lambda * alpha / r
            h = self.lora_up[n](down(self.lora_dropout[n](x.to(down.weight.dtype))))
            out = out.add_(h.to(out.dtype), alpha=s)   # in place on our own fresh output: one pass
        return out

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={self.lora_down[n].weight.shape[0]}, alpha={self.lora_alpha[n]:g}, "
                        f"scale={self.lora_scale[n]:g})" for n in self.lora_down)
        return super().extra_repr() + f", lora=[{ads}]" + (", fused" if self.fused else "")

#----------------------------------------------------------------------------
# The wrappers: one static class per layer class of the models. Each shares the base's Parameters
# (same state-dict keys, no copy) and computes the base part with the base class's own forward.


class LoRALinear(_LoRAMixin, StoredLinear):
    """nn.Linear + named adapters: y = W0 x + b + sum_i s_i (alpha_i/r_i) B_i A_i x."""

    def __init__(self, base: nn.Linear):
        adopt_layer(self, base)
        self._lora_setup()

    def _make_pair(self, r: int, kw: dict) -> tuple[nn.Module, nn.Module]:
        return (nn.Linear(self.in_features, r, bias=False, **kw),
                nn.Linear(r, self.out_features, bias=False, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_lora(x, super().forward(x))             # the base class's own forward


class LoRAConv2d(_LoRAMixin, StoredConv2d):
    """nn.Conv2d + adapters: A is a conv with the base kernel/stride/padding/dilation, B is 1x1."""

    def __init__(self, base: nn.Conv2d):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(f"LoRA supports plain convs only (groups={base.groups}, "
                             f"padding_mode={base.padding_mode!r})")
        adopt_layer(self, base)
        self._lora_setup()

    def _make_pair(self, r: int, kw: dict) -> tuple[nn.Module, nn.Module]:
        down = nn.Conv2d(self.in_channels, r, self.kernel_size, self.stride, self.padding, self.dilation,
                         bias=False, **kw)                # plain: fast paths for wide outputs lose at r = 64
        return down, nn.Conv2d(r, self.out_channels, 1, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_lora(x, super().forward(x))             # next in the MRO: a custom conv's forward


class LoRAUNetConv2d(LoRAConv2d, UNetConv2d):
    """LoRAConv2d on the UNet's Conv2d: the base part keeps its CPU fast path. The storage cast
    sits in _conv_forward, below every forward, whatever the MRO order of the two bases."""


# Layer class -> its wrapper. Another nn.Linear / nn.Conv2d subclass needs its own two-line class
# (as LoRAUNetConv2d) here: wrapping it as a plain LoRALinear would silently drop its forward.
_WRAPPERS: dict[type, type] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d, UNetConv2d: LoRAUNetConv2d}
_BASES: dict[type, type] = {w: base for base, w in _WRAPPERS.items()}


def _wrapper_class(cls: type) -> type:
    """The wrapper of a layer class (a frozen-storage twin wraps as the class it was made from)."""
    base = stored_base(cls)
    if base not in _WRAPPERS:
        raise TypeError(f"LoRA wraps {', '.join(c.__module__ + '.' + c.__qualname__ for c in _WRAPPERS)}; "
                        f"{cls.__module__}.{cls.__qualname__} is another subclass: add "
                        f"`class LoRA{cls.__name__}(LoRA{'Linear' if issubclass(cls, nn.Linear) else 'Conv2d'}, "
                        f"{cls.__name__})` to models/lora.py's _WRAPPERS")
    return _WRAPPERS[base]

#----------------------------------------------------------------------------
# Weight-row deltas for modules that cannot be wrapped (open_clip text towers). Always applied:
# W = W0 + sum_i s_i (alpha_i/r_i) B_i A_i placed on rows [start, start + out) of the parameter.


class LoRAParamDelta(nn.Module):
    """Adapters on one parameter of `owner` (e.g. in_proj_weight q/k/v slices); inference only."""

    def __init__(self, owner: nn.Module, param: str):
        super().__init__()
        self.__dict__["_owner"], self.param = owner, param   # plain ref: no module cycle
        self.down, self.up = nn.ParameterDict(), nn.ParameterDict()
        self.rows: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_scale: dict[str, float] = {}
        self.lora_enabled = True
        self.register_buffer("w0", getattr(owner, param).data, persistent=False)   # moves with .to()

    def add(self, name: str, tag: str, start: int, down: torch.Tensor, up: torch.Tensor,
            alpha: float, scale: float = 1.0) -> None:
        key = f"{name}:{tag}"                     # one adapter may touch several row slices (q, k, v)
        assert key not in self.down, f"adapter {name!r} already set on {self.param} {tag}"
        self.down[key], self.up[key] = nn.Parameter(down, False), nn.Parameter(up, False)
        self.rows[key], self.lora_alpha[name], self.lora_scale[name] = start, float(alpha), float(scale)
        self.refresh()

    def names(self) -> set[str]:
        return {k.split(":")[0] for k in self.down}

    def remove(self, name: str) -> None:
        for key in [k for k in self.down if k.split(":")[0] == name]:
            del self.down[key], self.up[key], self.rows[key]
        self.lora_alpha.pop(name), self.lora_scale.pop(name)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        keys = [k for k in self.down if self.lora_enabled and self.lora_scale[k.split(":")[0]] != 0]
        W = self.w0.to(torch.float32, copy=True) if keys else None   # never touch W0 itself
        for k in keys:
            n, A, B = k.split(":")[0], self.down[k].float(), self.up[k].float()
            s = self.lora_scale[n] * self.lora_alpha[n] / A.shape[0]
            W[self.rows[k]:self.rows[k] + B.shape[0]] += s * (B @ A)
        getattr(self._owner, self.param).data = W.to(self.w0.dtype) if keys else self.w0

#----------------------------------------------------------------------------
# Model-level API.


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA wrapper and parameter-delta host in `model`."""
    for n, m in model.named_modules():
        if isinstance(m, (_LoRAMixin, LoRAParamDelta)):
            yield n, m


def wrap_module(model: nn.Module, name: str) -> _LoRAMixin:
    """Replace the Linear/Conv2d at `name` by its LoRA wrapper (idempotent); returns the wrapper."""
    m = model.get_submodule(name)
    if isinstance(m, _LoRAMixin):
        return m
    if not isinstance(m, (nn.Linear, nn.Conv2d)) or type(m) is nn.modules.linear.NonDynamicallyQuantizableLinear:
        raise TypeError(f"{name} is a {type(m).__name__}; LoRA wraps nn.Linear and nn.Conv2d only")
    parent, _, child = name.rpartition(".")
    wrapped = _wrapper_class(type(m))(m)
    setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    return wrapped


def target_names(model: nn.Module, targets=LCM_LORA_TARGETS) -> list[str]:
    """Names of the Linear/Conv2d modules whose full name ends with one of the `targets` regexes."""
    pat = re.compile(r"(^|\.)(" + "|".join(targets) + r")$")
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and pat.search(n)
            and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]


def inject_lora(model: nn.Module, name: str = "lcm", rank: int = 64, alpha: float = 64,
                targets=LCM_LORA_TARGETS, dropout: float = 0.0,
                dtype: torch.dtype | None = None) -> list[nn.Parameter]:
    """Add a fresh adapter to every target module; returns its trainable parameters (A_i, B_i)."""
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"no module of {type(model).__name__} matches the LoRA targets {targets}")
    params = []
    for n in names:
        params += wrap_module(model, n).add_adapter(name, rank, alpha, dropout, dtype)
    return params


def add_lora_weights(model: nn.Module, name: str, state: dict, scale: float = 1.0,
                     dtype: torch.dtype | None = None) -> None:
    """Install adapter `name` from {module_name: (down, up, alpha)} (our LDM names); the adapter
    takes `dtype`, else the layer's dtype (as diffusers does)."""
    for mod, (down, up, alpha) in state.items():
        layer = wrap_module(model, mod)
        A, B = layer.add_adapter(name, down.shape[0], alpha, dtype=dtype, scale=scale)
        with torch.no_grad():                     # reshape: a 1x1-conv LoRA on a Linear and back
            A.copy_(down.reshape(A.shape))
            B.copy_(up.reshape(B.shape))
        if layer.fused:
            layer.fuse()


def lora_names(model: nn.Module) -> list[str]:
    """Adapter names present anywhere in `model`, in insertion order."""
    seen: dict[str, None] = {}
    for _, m in lora_layers(model):
        seen.update(dict.fromkeys(m.lora_alpha))
    return list(seen)


def set_lora_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Runtime scales lambda_i (docs/method.md Sec. 6; LCM-LoRA report Eq. 3); fused layers are re-fused from W0."""
    unknown = set(scales) - set(lora_names(model))
    if unknown:
        raise ValueError(f"unknown adapters {sorted(unknown)}; loaded: {lora_names(model)}")
    for _, m in lora_layers(model):
        changed = False
        for n, s in scales.items():
            if n in m.lora_scale and m.lora_scale[n] != float(s):
                m.lora_scale[n], changed = float(s), True
        if changed and isinstance(m, LoRAParamDelta):
            m.refresh()
        elif changed and m.fused:
            m.fuse()


def fuse_lora(model: nn.Module) -> None:
    """Bake the current scales into the weights (W0 kept, so unfuse is bit-exact)."""
    for _, m in lora_layers(model):
        if isinstance(m, _LoRAMixin):
            m.fuse()


def unfuse_lora(model: nn.Module) -> None:
    """Restore W0 bit-for-bit; adapters stay loaded and active (as branches)."""
    for _, m in lora_layers(model):
        if isinstance(m, _LoRAMixin):
            m.unfuse()


def remove_lora(model: nn.Module, name: str) -> None:
    """Delete adapter `name`; layers left without adapters become plain Linear/Conv2d again."""
    if name not in lora_names(model):
        raise ValueError(f"no adapter {name!r}; loaded: {lora_names(model)}")
    for n, m in list(lora_layers(model)):
        if name not in m.lora_alpha:
            continue
        m.remove(name) if isinstance(m, LoRAParamDelta) else m.remove_adapter(name)
        if isinstance(m, LoRAParamDelta) and not m.down:
            parent, _, child = n.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
        elif isinstance(m, _LoRAMixin) and not m.lora_down:
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _unwrap(m))


def _unwrap(m: _LoRAMixin) -> nn.Module:
    """The original-class Linear/Conv2d holding the wrapper's (unfused) weight and bias Parameters.
    After store_frozen it keeps the storage dtype: call store_frozen again to compute in another."""
    m.unfuse()
    base = take_over(_BASES[type(m)], m)
    for k in ("lora_alpha", "lora_scale", "lora_enabled", "fused"):
        delattr(base, k)
    return base


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the exact base model inside the block (the trainer's teacher pass)."""
    layers = [m for _, m in lora_layers(model)]
    old = [(m.lora_enabled, getattr(m, "fused", False)) for m in layers]
    try:
        for m in layers:
            m.lora_enabled = False
            m.refresh() if isinstance(m, LoRAParamDelta) else m.unfuse()   # W0 itself, bit-exact
        yield model
    finally:
        for m, (enabled, fused) in zip(layers, old):
            m.lora_enabled = enabled
            if isinstance(m, LoRAParamDelta):
                m.refresh()
            elif fused:
                m.fuse()                                  # deterministic: the same fused bits again


def lora_state(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module_name: (down, up, alpha)} of adapter `name` on wrapped layers (as trained, unscaled)."""
    out = {n: (m.lora_down[name].weight.detach(), m.lora_up[name].weight.detach(), m.lora_alpha[name])
           for n, m in lora_layers(model) if isinstance(m, _LoRAMixin) and name in m.lora_down}
    if not out:
        raise ValueError(f"no adapter {name!r}; loaded: {lora_names(model)}")
    return out


def count_lora_params(model: nn.Module, name: str) -> tuple[int, int]:
    """(parameters, modules) of adapter `name` on wrapped layers."""
    st = lora_state(model, name)
    return sum(d.numel() + u.numel() for d, u, _ in st.values()), len(st)
