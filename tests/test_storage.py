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
