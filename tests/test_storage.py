"""store_frozen: frozen weights in fp16/bf16 storage, fp32 compute. With fp16-representable weights
(an fp16 checkpoint) the forward, the LoRA gradients and the no-grad fast paths equal fp32 storage."""
import copy

import pytest
import torch
from torch import nn

from models.lora import fuse_lora, inject_lora, lora_layers
from models.storage import store_frozen
from models.unet import UNetModel

TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=[1, 1], num_heads=2,
            context_dim=64, use_linear_in_transformer=False)


def fp16_model(seed=0):
    torch.manual_seed(seed)
    unet = UNetModel(**TINY).requires_grad_(False)
    with torch.no_grad():
        for p in unet.parameters():                  # non-zero everywhere, exactly representable in fp16
            p.copy_((p + 0.05 * torch.randn_like(p)).half().float())
    params = inject_lora(unet, "lcm", rank=4, alpha=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
            p.requires_grad_(True)
    return unet


def inputs(B=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(B, 7, 64, generator=g))


def grads(unet, x, t, c):
    unet.zero_grad(set_to_none=True)
    out = unet(x, t, c)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_fp16_storage_equals_fp32_on_an_fp16_checkpoint():
    ref = fp16_model()
    ours = copy.deepcopy(ref)
    keys = list(ours.state_dict())
    saved = store_frozen(ours, torch.float16)
    frozen = sum(p.numel() for p in ref.parameters() if not p.requires_grad and p.dim() > 0)
    assert list(ours.state_dict()) == keys
    assert all(isinstance(m, nn.Linear) for n, m in ours.named_modules() if isinstance(dict(ref.named_modules())[n], nn.Linear))
    assert all(p.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)      # LoRA stays fp32
    linear_conv = sum(p.numel() for m in ours.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                      for p in m.parameters(recurse=False) if p.dtype == torch.float16)
    assert saved == 2 * linear_conv and linear_conv > 0.9 * frozen                    # 2 bytes saved each
    x, t, c = inputs()
    out_ref, g_ref = grads(ref, x, t, c)
    out, g = grads(ours, x, t, c)
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-7)
    assert g.keys() == g_ref.keys() and len(g) > 0
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-5, atol=1e-8, msg=n)
    with torch.no_grad():                                                  # inference paths (CPU GEMM conv)
        torch.testing.assert_close(ours(x, t, c), ref(x, t, c), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_then_fuse_and_autocast_run(dtype):
    unet = fp16_model()
    store_frozen(unet, dtype)
    x, t, c = inputs()
    with torch.no_grad():
        a = unet(x, t, c)
        fuse_lora(unet)                                                    # fused weights stay in storage dtype
        b = unet(x, t, c)
        assert all(m.weight.dtype == dtype for _, m in lora_layers(unet))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = unet(x, t, c)
    assert torch.isfinite(d).all()
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()                    # fused deltas rounded to storage

#----------------------------------------------------------------------------
# The cast's memory reuse is safe: a result the caller still holds is never overwritten.


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_cast_weight_never_overwrites_a_held_result(mode):
    from models.storage import cast_weight
    a, b = torch.randn(300).half(), torch.randn(40, 5).half()
    with mode():
        ptr = cast_weight(a, torch.float32).data_ptr()            # freed at once: the memory is recycled
        assert cast_weight(a, torch.float32).data_ptr() == ptr   # (the speed: no fresh pages per call)
        held = cast_weight(a, torch.float32)[:100].reshape(10, 10).detach()   # a view of a view, held
        other = cast_weight(b, torch.float32)
        assert other.data_ptr() != held.data_ptr() and torch.equal(other, b.float())
        assert torch.equal(held, a[:100].float().reshape(10, 10))           # still a's values
        del held, other
        assert cast_weight(b, torch.float32).data_ptr() == ptr               # recycled once released
    w = torch.randn(6, 5).half()
    assert cast_weight(w, torch.float16) is w


def test_cast_weight_result_kept_by_autograd_stays_valid():
    """A caller's own F.linear keeps the cast weight for backward: later casts must not touch it."""
    import torch.nn.functional as F

    from models.storage import cast_weight
    w, x = torch.randn(8, 6).half(), torch.randn(3, 6, requires_grad=True)
    y = F.linear(x, cast_weight(w, torch.float32)).square().sum()           # saves the cast for dL/dx
    for _ in range(3):
        cast_weight(torch.randn(8, 6).half(), torch.float32)
    (g,) = torch.autograd.grad(y, x)
    torch.testing.assert_close(g, (2 * x @ w.float().T) @ w.float())

#----------------------------------------------------------------------------
# Classes: static and importable (pickle, deepcopy), in either order with LoRA; compile traces them.


def stored_lora_model(dtype=torch.float16):
    unet = fp16_model()
    store_frozen(unet, dtype)
    return unet


def test_stored_classes_are_static_and_injection_order_does_not_matter():
    import models.storage as storage
    from models.lora import LoRAConv2d, LoRALinear, LoRAUNetConv2d, remove_lora
    from models.unet import Conv2d
    a = stored_lora_model()                                   # inject, then store (the trainer's order)
    torch.manual_seed(0)
    b = UNetModel(**TINY).requires_grad_(False)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if ".lora_" not in k}, strict=False)
    store_frozen(b, torch.float16)                            # store, then inject
    inject_lora(b, "lcm", rank=4, alpha=4, dtype=torch.float32)   # (default: the layer's, now fp16)
    b.load_state_dict(a.state_dict())
    assert list(a.state_dict()) == list(b.state_dict())
    layers = dict(a.named_modules())
    for name, m in b.named_modules():
        assert type(m) is type(layers[name]), name            # the same classes either way
        if isinstance(m, (nn.Linear, nn.Conv2d)) and ".lora_" not in name:
            assert isinstance(m, (storage.StoredLinear, storage.StoredConv2d)), name
            assert m.weight.dtype == torch.float16, name
    assert {type(m) for _, m in lora_layers(a)} == {LoRALinear, LoRAConv2d, LoRAUNetConv2d}   # no others
    x, t, c = inputs()
    with torch.no_grad():
        torch.testing.assert_close(b(x, t, c), a(x, t, c), rtol=0, atol=0)
    fast = a.input_blocks[0][0]                               # conv_in: frozen, not a LoRA target
    assert isinstance(fast, Conv2d) and isinstance(fast, storage.StoredConv2d)   # fast path kept
    remove_lora(a, "lcm")
    assert not list(lora_layers(a)) and isinstance(a.input_blocks[0][0], Conv2d)
    store_frozen(a, torch.float16)                            # re-store: unwrapped layers cast again
    with torch.no_grad():
        assert torch.isfinite(a(x, t, c)).all()


def test_stored_lora_model_pickles_and_deepcopies():
    import io
    a = stored_lora_model()
    fuse_lora(a)                                              # fused: W0 travels as the w0 buffer
    buf = io.BytesIO()
    torch.save(a, buf)                                        # classes pickled by module-level name
    buf.seek(0)
    b, d = torch.load(buf, weights_only=False), copy.deepcopy(a)
    x, t, c = inputs()
    with torch.no_grad():
        ref = a(x, t, c)
        for m in (b, d):
            assert [type(v) for v in m.modules()] == [type(v) for v in a.modules()]
            torch.testing.assert_close(m(x, t, c), ref, rtol=0, atol=0)
    for m in (a, b, d):
        from models.lora import unfuse_lora
        unfuse_lora(m)
    assert all(torch.equal(b.state_dict()[k], v) and torch.equal(d.state_dict()[k], v)
               for k, v in a.state_dict().items())                        # W0 bit for bit in each copy


def test_compile_traces_stored_lora_layers():
    """torch.compile (dynamo + aot autograd, no C++ backend) of a stored LoRA layer stack: the same
    forward and LoRA gradients as eager, with the cast taking inductor's path inside the graph."""
    torch.manual_seed(0)
    from models.unet import Conv2d
    m = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8)).requires_grad_(False)
    conv = nn.Sequential(Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1)).requires_grad_(False)
    params = inject_lora(m, "a", rank=2, alpha=2, targets=("0",)) + inject_lora(conv, "a", rank=2, alpha=2,
                                                                                targets=("1",))
    for p in params:
        p.data.normal_(0, 0.1).requires_grad_(True)
    store_frozen(m, torch.float16), store_frozen(conv, torch.float16)
    x, xc = torch.randn(4, 8), torch.randn(2, 3, 5, 5)

    def run(f, g):
        out = f(x).square().sum() + g(xc).square().sum()
        return out.detach(), torch.autograd.grad(out, params)
    ref = run(m, conv)
    got = run(torch.compile(m, backend="aot_eager"), torch.compile(conv, backend="aot_eager"))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
