"""LoRA layers (exact algebra), full-size counts and key maps on meta, and parity with diffusers+peft."""
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.keymaps import unet_module_diffusers_to_ldm, unet_module_ldm_to_diffusers, unet_state_dict_diffusers_to_ldm
from models.lora import (LoRAConv2d, LoRALinear, adapters_disabled, count_lora_params, fuse_lora, inject_lora,
                         is_lora_key, lora_layers, lora_state, remove_lora, set_lora_scales, target_names, unfuse_lora)
from models.lora_io import export_lora, load_lora, parse_key, read_lora_file, save_lora, unet_candidates
from models.unet import UNET_PRESETS, UNetModel, infer_unet_config

# The released LCM-LoRA's 14 target kinds, as diffusers/peft name them (docs/method.md Sec. 5).
DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def randomize_adapter_(model: nn.Module, name: str, seed: int = 0, std: float = 0.2) -> None:
    """Random A and B (B = 0 would make every parity test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.copy_(std * torch.randn(p.shape, generator=g))


def toy(dtype=torch.float32) -> nn.Module:
    """A Linear and a strided 3x3 conv (the downsample kind) with two adapters of unequal rank/alpha."""
    torch.manual_seed(0)
    m = nn.ModuleDict(dict(lin=nn.Linear(16, 24), conv=nn.Conv2d(8, 12, 3, stride=2, padding=1))).to(dtype)
    inject_lora(m, "a", rank=4, alpha=2, targets=("lin", "conv"))
    inject_lora(m, "b", rank=3, alpha=5, targets=("lin", "conv"))
    randomize_adapter_(m, "a", 1), randomize_adapter_(m, "b", 2)
    return m


def merged(layer, scales: dict) -> torch.Tensor:
    """W0 + sum_i s_i (alpha_i / r_i) B_i A_i written out directly (docs/method.md Sec. 6, report Eq. 3)."""
    W = layer.weight.detach().float().clone()
    for n, s in scales.items():
        A, B = layer.lora_down[n].weight.float(), layer.lora_up[n].weight.float()
        W += s * layer.lora_alpha[n] / A.shape[0] * (B.flatten(1) @ A.flatten(1)).view(W.shape)
    return W

#----------------------------------------------------------------------------
# Layers.


def test_identity_at_init_and_keys_unchanged():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(8, 4, 3, padding=1))
    base_keys, sd = list(m.state_dict()), {k: v.clone() for k, v in m.state_dict().items()}
    x, xc = torch.randn(3, 16), torch.randn(2, 8, 5, 5)
    y, yc = m[0](x), m[1](xc)
    params = inject_lora(m, "lcm", rank=4, alpha=4, targets=("0", "1"))
    assert isinstance(m[0], LoRALinear) and isinstance(m[1], LoRAConv2d) and isinstance(m[0], nn.Linear)
    assert torch.equal(m[0](x), y) and torch.equal(m[1](xc), yc)                 # B = 0
    assert [p.shape for p in params] == [(4, 16), (8, 4), (4, 8, 3, 3), (4, 4, 1, 1)]
    assert [k for k in m.state_dict() if not is_lora_key(k)] == base_keys       # base keys load unchanged
    assert m.load_state_dict(sd, strict=False).missing_keys == [k for k in m.state_dict() if is_lora_key(k)]


def test_forward_equals_merged_weight_with_two_scaled_adapters():
    m = toy()
    set_lora_scales(m, {"a": 1.0, "b": 0.8})
    x, xc = torch.randn(3, 16), torch.randn(2, 8, 9, 9)
    W, Wc = merged(m["lin"], {"a": 1.0, "b": 0.8}), merged(m["conv"], {"a": 1.0, "b": 0.8})
    torch.testing.assert_close(m["lin"](x), F.linear(x, W, m["lin"].bias), rtol=0, atol=1e-5)
    torch.testing.assert_close(m["conv"](xc), F.conv2d(xc, Wc, m["conv"].bias, stride=2, padding=1), rtol=0, atol=1e-5)
    assert (m["lin"](x) - F.linear(x, merged(m["lin"], {"a": 1.0}), m["lin"].bias)).abs().max() > 1e-2
    lin, A, B = m["lin"], m["lin"].lora_down["a"].weight, m["lin"].lora_up["a"].weight
    explicit = lin.weight @ x.T + 0.5 * B @ (A @ x.T) + 0.8 * lin.delta_weight("b") @ x.T     # alpha/r = 2/4
    g_ours = torch.autograd.grad(lin(x).pow(2).sum(), (A, B))   # training: gradients reach A and B
    g_ref = torch.autograd.grad((explicit.T + lin.bias).pow(2).sum(), (A, B))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scale_zero_and_disabled_are_exactly_the_base():
    m = toy()
    x = torch.randn(3, 16)
    base = F.linear(x, m["lin"].weight, m["lin"].bias)
    with adapters_disabled(m):
        assert torch.equal(m["lin"](x), base)
    assert not torch.equal(m["lin"](x), base)
    set_lora_scales(m, {"a": 0.0, "b": 0.0})
    assert torch.equal(m["lin"](x), base)
    with pytest.raises(ValueError, match="unknown adapters"):
        set_lora_scales(m, {"style": 1.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fuse_unfuse_bit_exact_and_rescale_while_fused(dtype):
    m = toy(dtype)
    W0 = {k: m[k].weight.detach().clone() for k in m}
    x, xc = torch.randn(3, 16, dtype=dtype), torch.randn(2, 8, 9, 9, dtype=dtype)
    set_lora_scales(m, {"a": 1.0, "b": 0.8})
    fuse_lora(m)
    for k in m:                                                   # delta summed in fp32, cast once
        W = m[k].w0.float()
        for n, sc in (("a", 1.0), ("b", 0.8)):
            W = W + sc * m[k].delta_weight(n)
        assert torch.equal(m[k].weight, W.to(dtype)) and torch.equal(m[k].w0, W0[k])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    set_lora_scales(m, {"b": 0.3})                                # re-fuses from W0
    fused = m["lin"](x).float(), m["conv"](xc).float()
    unfuse_lora(m)
    assert all(torch.equal(m[k].weight, W0[k]) for k in m)        # bit-exact
    torch.testing.assert_close(m["lin"](x).float(), fused[0], rtol=0, atol=tol * fused[0].abs().max().item())
    torch.testing.assert_close(m["conv"](xc).float(), fused[1], rtol=0, atol=tol * fused[1].abs().max().item())
    fuse_lora(m)
    Wf = m["lin"].weight.detach().clone()
    with adapters_disabled(m):                                    # the teacher pass sees W0 even when fused
        assert torch.equal(m["lin"](x), F.linear(x, W0["lin"], m["lin"].bias))
    assert torch.equal(m["lin"].weight, Wf)                       # and the same fused bits come back
    m.eval(), m.train()                                           # never merges or unmerges
    assert m["lin"].fused and m["conv"].fused


def test_remove_restores_plain_modules_and_trainables_only():
    m = toy()
    W0 = m["lin"].weight.detach().clone()
    fuse_lora(m)
    remove_lora(m, "a")
    assert set(lora_state(m, "b")) == {"lin", "conv"} and m["lin"].fused
    remove_lora(m, "b")
    assert type(m["lin"]) is nn.Linear and type(m["conv"]) is nn.Conv2d and torch.equal(m["lin"].weight, W0)
    assert not any(is_lora_key(k) for k in m.state_dict())
    m.requires_grad_(False)
    params = inject_lora(m, "lcm", rank=2, alpha=2, targets=("lin",))
    m["lin"](torch.randn(2, 16)).sum().backward()
    assert all(p.grad is not None for p in params) and m["lin"].weight.grad is None
    assert {id(p) for p in m.parameters() if p.requires_grad} == {id(p) for p in params}

def test_custom_conv_subclass_keeps_its_forward_and_class():
    from models.unet import Conv2d                                # the UNet's CPU fast-path conv
    torch.manual_seed(0)
    m = nn.Sequential(Conv2d(8, 12, 3, stride=2, padding=1))
    inject_lora(m, "a", rank=4, alpha=2, targets=("0",))
    randomize_adapter_(m, "a")
    assert isinstance(m[0], Conv2d) and isinstance(m[0], LoRAConv2d)
    assert m[0].lora_down["a"].stride == (2, 2) and m[0].lora_down["a"].kernel_size == (3, 3)   # A: base geometry
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():                                         # the fast path runs (no grad, fp32, small)
        torch.testing.assert_close(m[0](x), F.conv2d(x, merged(m[0], {"a": 1.0}), m[0].bias, stride=2, padding=1),
                                   rtol=0, atol=1e-5)
    remove_lora(m, "a")
    assert type(m[0]) is Conv2d and not hasattr(m[0], "lora_alpha")

def test_wrappers_are_static_classes_that_pickle_and_deepcopy():
    """Injection builds no class: every wrapper is a module-level class of models.lora (pickle finds
    it by name); a deep copy (the trainer's EMA target) is independent and unfuses bit-exactly."""
    import copy
    import io

    import models.lora as lora_mod
    names = set(vars(lora_mod))
    unet = tiny_with_lora(SD1_TINY)
    m = toy()
    assert set(vars(lora_mod)) == names                          # nothing registered at run time
    kinds = {type(layer) for net in (unet, m) for _, layer in lora_layers(net)}
    assert kinds == {LoRALinear, LoRAConv2d, lora_mod.LoRAUNetConv2d}
    assert all(getattr(lora_mod, k.__qualname__) is k and k.__module__ == "models.lora" for k in kinds)
    x = torch.randn(3, 16)
    fuse_lora(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded, twin = torch.load(buf, weights_only=False), copy.deepcopy(m)
    for c in (loaded, twin):
        assert list(c.state_dict()) == list(m.state_dict()) and c["lin"].fused
        assert torch.equal(c["lin"](x), m["lin"](x))
    with torch.no_grad():
        twin["lin"].lora_up["a"].weight.add_(1.0)                # the copy owns its adapters
    twin["lin"].fuse()                                           # re-fuse from the copy's own W0
    assert not torch.equal(twin["lin"].weight, m["lin"].weight)
    unfuse_lora(m), unfuse_lora(twin), unfuse_lora(loaded)
    assert torch.equal(twin["lin"].weight, m["lin"].weight) and torch.equal(loaded["conv"].weight, m["conv"].weight)


def test_an_unknown_layer_subclass_is_refused_with_the_fix():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x).relu()
    m = nn.Sequential(MyLinear(4, 4))
    with pytest.raises(TypeError, match=r"class LoRAMyLinear\(LoRALinear, MyLinear\)"):
        inject_lora(m, "a", rank=2, alpha=2, targets=("0",))
    assert type(m[0]) is MyLinear

#----------------------------------------------------------------------------
# Full-size topologies on the meta device.


@pytest.mark.parametrize("family,params,modules", [("sd15", 67_252_224, 278), ("sdxl", 196_751_360, 788),
                                                   ("ssd1b", 104_902_656, 423)])   # report Table 1: 105M
def test_full_size_counts_and_ldm_diffusers_round_trip(family, params, modules):
    with torch.device("meta"):
        unet = UNetModel(**UNET_PRESETS[family])
        inject_lora(unet, "lcm", rank=64, alpha=64)
    assert count_lora_params(unet, "lcm") == (params, modules)
    names = target_names(unet)
    assert not any(n in names for n in ("input_blocks.0.0", "out.2", "time_embed.0", "label_emb.0.0"))
    has_attn = {int(unet_module_ldm_to_diffusers(n).split(".")[1]) for n in names if ".1.transformer_blocks" in n
                and n.startswith("output_blocks")}
    for n in names:
        d = unet_module_ldm_to_diffusers(n, 2)
        assert unet_module_diffusers_to_ldm(d, 2, lambda i: i in has_attn) == n


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_released_kohya_names_map_one_to_one(family):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    cfg = dict(cross_attention_dim=768) if family == "sd15" else dict(
        block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        ref = inject_adapter_in_model(LoraConfig(r=64, target_modules=DIFFUSERS_TARGETS), UNet2DConditionModel(**cfg))
        ours = UNetModel(**UNET_PRESETS[family])
    released = ["lora_unet_" + n.removesuffix(".lora_A").replace(".", "_")   # the LCM-LoRA file's keys
                for n, _ in ref.named_modules() if n.endswith(".lora_A")]
    cand = unet_candidates(ours)
    mapped = [cand[k] for k in released]                          # KeyError = an unmapped released name
    assert len(released) == (278 if family == "sd15" else 788)
    assert sorted(mapped) == sorted(target_names(ours))           # one to one, onto our targets

#----------------------------------------------------------------------------
# Parity with diffusers + peft on tiny random UNets.


DIFFUSERS_TINY = {
    "sd15": dict(sample_size=8, layers_per_block=2, block_out_channels=(32, 64), cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sdxl": dict(sample_size=8, layers_per_block=2, block_out_channels=(64, 128), cross_attention_dim=2048,
                 attention_head_dim=(1, 2), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)}


def run(model, family, ref=False):
    """One forward on fixed small inputs (8x8 latents, 8 context tokens: parity needs no 77)."""
    from models.unet import timestep_embedding
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 10])
    ctx = torch.randn(2, 8, 768 if family == "sd15" else 2048, generator=g)
    kw = {}
    if family == "sdxl":
        pooled, ids = torch.randn(2, 1280, generator=g), torch.tensor([[512.0, 512, 0, 0, 512, 512]] * 2)
        kw = dict(added_cond_kwargs=dict(text_embeds=pooled, time_ids=ids)) if ref else \
            dict(y=torch.cat([pooled, timestep_embedding(ids.flatten(), 256).reshape(2, -1)], -1))
    with torch.no_grad():
        return model(x, t, ctx, **kw).sample if ref else model(x, t, ctx, **kw)


@pytest.fixture(scope="module")
def pairs():
    """family -> diffusers UNet with adapters 'lcm' (r4, alpha 6, all 14 kinds) and 'style' (r2,
    alpha 1, 3 kinds), weights fp16-representable (the released files are fp16), and its outputs."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    out = {}
    for family, heads in (("sd15", dict(num_heads=8)), ("sdxl", dict(num_head_channels=64))):
        torch.manual_seed(0)
        ref = UNet2DConditionModel(**DIFFUSERS_TINY[family]).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():                     # perturb every parameter around its init, mildly:
            for n, p in ref.named_parameters():   # the oracle's std-0.05 weights make SDXL chaotic
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.2 * noise if "norm" in n and n.endswith("weight") else
                        0.2 * noise if n.endswith("bias") else p + 0.3 * p.std().nan_to_num(0.02) * noise)
        base = unet_state_dict_diffusers_to_ldm(ref.state_dict(), 2)
        ref.add_adapter(LoraConfig(r=4, lora_alpha=6, target_modules=DIFFUSERS_TARGETS, init_lora_weights=False), "lcm")
        ref.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["to_k", "ff.net.2", "conv2"],
                                   init_lora_weights=False), "style")
        randomize_adapter_(ref, "lcm", 1, 0.06), randomize_adapter_(ref, "style", 2, 0.1)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if "lora_" in n:
                    p.copy_(p.half().float())
        outs = {}
        ref.disable_adapters()
        outs["base"] = run(ref, family, ref=True)
        ref.enable_adapters()
        ref.set_adapters(["lcm"])
        outs["lcm"] = run(ref, family, ref=True)
        ref.set_adapters(["lcm", "style"], [1.0, 0.8])
        outs["both"] = run(ref, family, ref=True)
        out[family] = ref, base, heads, outs
    return out


def build_ours(base: dict, heads: dict) -> UNetModel:
    ours = UNetModel(**infer_unet_config(base, **heads)).eval()
    ours.load_state_dict(base, strict=True)
    return ours


def close(a, b, rel=1e-4):
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), f"max abs err {err}"


def file_of(ref, adapter: str, fmt: str) -> tuple[dict, dict]:
    """The adapter written the way each format's producer lays it out."""
    import json

    from peft.utils import get_peft_model_state_dict
    sd, cfg = get_peft_model_state_dict(ref, adapter_name=adapter), ref.peft_config[adapter]
    if fmt == "peft":                                             # diffusers' pipeline save layout
        meta = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
        return {f"unet.{k}": v for k, v in sd.items()}, {"lora_adapter_metadata": json.dumps(
            {f"unet.{k}": v for k, v in meta.items()})}
    if fmt == "raw_peft":                                         # PeftModel.save_pretrained + adapter_config
        return ({f"base_model.model.{k}": v for k, v in sd.items()},
                {"lora_adapter_metadata": json.dumps({"r": cfg.r, "lora_alpha": cfg.lora_alpha})})
    out = {}
    has_attn = {int(k.split(".")[1]) for k in ref.state_dict() if k.startswith("up_blocks") and ".attentions." in k}
    for k, v in sd.items():
        path, part = k.rsplit(".lora_", 1)
        if fmt == "kohya_sgm":                                    # SDXL community: original names
            path = unet_module_diffusers_to_ldm(path, 2, lambda i: i in has_attn)
        key = "lora_unet_" + path.replace(".", "_")
        out[f"{key}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v.half()   # released: fp16
        out[f"{key}.alpha"] = torch.tensor(float(cfg.lora_alpha), dtype=torch.float16)
    return out, {}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_parity_with_diffusers_each_format(pairs, family, tmp_path):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Mixin
    from peft.utils import get_peft_model_state_dict
    ref, base, heads, outs = pairs[family]
    assert (outs["lcm"] - outs["base"]).abs().max() > 0.1             # the LoRA does act
    Mixin.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref, adapter_name="lcm"),
                            unet_lora_adapter_metadata=ref.peft_config["lcm"].to_dict())   # diffusers' own file
    for fmt in ("diffusers_folder", "peft", "raw_peft", "kohya", "kohya_sgm"):
        ours = build_ours(base, heads)
        rep = load_lora(ours, tmp_path if fmt == "diffusers_folder" else file_of(ref, "lcm", fmt), "lcm")
        assert rep.matched == len(target_names(ours)) and not rep.unmatched, fmt
        close(run(ours, family), outs["lcm"])
    with adapters_disabled(ours):
        close(run(ours, family), outs["base"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_two_adapters_scales_fuse_and_export_back_to_diffusers(pairs, family, tmp_path):
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Mixin
    ref, base, heads, outs = pairs[family]
    ours = build_ours(base, heads)
    load_lora(ours, file_of(ref, "lcm", "kohya"), "lcm")
    load_lora(ours, file_of(ref, "style", "peft"), "style", scale=0.8)
    unfused = run(ours, family)
    close(unfused, outs["both"])                                  # == diffusers set_adapters([1.0, 0.8])
    fuse_lora(ours)
    close(run(ours, family), unfused, 1e-5)
    for _, m in list(lora_layers(ours))[:: 7]:
        x = torch.randn(2, m.in_features) if isinstance(m, nn.Linear) else torch.randn(1, m.in_channels, 8, 8)
        f = m(x)
        m.unfuse()
        close(m(x), f, 1e-5)
        m.fuse()
    set_lora_scales(ours, {"style": 0.0})                         # rescaling while fused re-fuses
    close(run(ours, family), outs["lcm"])
    unfuse_lora(ours)
    for fmt in ("kohya", "peft"):                                 # ours -> file -> diffusers
        path = save_lora(ours, tmp_path / f"{fmt}.safetensors", "lcm", format=fmt)
        sd, alphas, meta = Mixin.lora_state_dict(str(path), return_lora_metadata=True)
        ref.load_lora_adapter(sd, network_alphas=alphas, metadata=meta, prefix="unet", adapter_name=fmt)
        ref.set_adapters([fmt])
        close(run(ref, family, ref=True), outs["lcm"])
        ref.delete_adapters(fmt)

#----------------------------------------------------------------------------
# Formats, round trips and errors on tiny UNets of our own (no oracle needed).

SD1_TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=[1, 0], num_heads=2,
                context_dim=768)
XL_TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=[0, 2], num_head_channels=16,
               transformer_depth_middle=2, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816)
PRUNED_TINY = dict(XL_TINY, transformer_depth=[0, 1], transformer_depth_middle=1)   # an "SSD-1B" of XL_TINY


def tiny_with_lora(cfg: dict, mixed: bool = False) -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(**cfg).eval()
    if mixed:                                                     # per-module ranks and alphas differ
        inject_lora(unet, "a", rank=4, alpha=2, targets=(r"attn[12]\.to_[qkv]", r"attn[12]\.to_out\.0"))
        inject_lora(unet, "a", rank=8, alpha=8, targets=(r"in_layers\.2", r"out_layers\.3", r"emb_layers\.1"))
        inject_lora(unet, "a", rank=2, alpha=3,
                    targets=(r"proj_in", r"proj_out", r"ff\.net\.\d\S*", r"op", r"\d\.conv"))
    else:
        inject_lora(unet, "a", rank=4, alpha=6)
    randomize_adapter_(unet, "a")
    return unet


def test_round_trips_keep_ranks_and_alphas(tmp_path):
    src = tiny_with_lora(SD1_TINY, mixed=True)
    k1, meta = export_lora(src, "a", "kohya")
    assert all(k.startswith("lora_unet_") and "input_blocks" not in k for k in k1) and k1[next(iter(k1))].ndim
    for fmt in ("kohya", "peft", "native"):
        dst = UNetModel(**SD1_TINY).eval()
        dst.load_state_dict(src.state_dict(), strict=False)
        load_lora(dst, export_lora(src, "a", fmt), "a")
        a, b = lora_state(src, "a"), lora_state(dst, "a")
        assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
                                            and a[k][2] == b[k][2] for k in a), fmt
        if fmt == "kohya":                                        # kohya -> ours -> kohya is identical
            k2, _ = export_lora(dst, "a", "kohya")
            assert k1.keys() == k2.keys() and all(torch.equal(k1[k], k2[k]) for k in k1)
    assert save_lora(src, tmp_path, "a").endswith("pytorch_lora_weights.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_lora(src, tmp_path / "pytorch_lora_weights.safetensors", "a")
    save_lora(src, tmp_path, "a", format="peft", overwrite=True)
    sd, meta = read_lora_file(tmp_path)                           # a folder works too
    assert "lora_adapter_metadata" in meta and any(k.endswith(".lora_A.weight") for k in sd)


def test_missing_alpha_means_rank_and_old_diffusers_keys():
    src = tiny_with_lora(SD1_TINY)
    peft, _ = export_lora(src, "a", "peft")
    dst = UNetModel(**SD1_TINY)
    load_lora(dst, peft, "a")                                     # no metadata: alpha = rank
    assert {a for _, _, a in lora_state(dst, "a").values()} == {4.0}
    old = {}
    for k, v in peft.items():                                     # diffusers <= 0.20 attention processors
        if m := re.fullmatch(r"(unet\..*attn[12])\.(to_[qkv]|to_out\.0)\.lora_([AB])\.weight", k):
            proc = "to_out" if m.group(2) == "to_out.0" else m.group(2)
            old[f"{m.group(1)}.processor.{proc}_lora.{'down' if m.group(3) == 'A' else 'up'}.weight"] = v
    dst = UNetModel(**SD1_TINY)
    load_lora(dst, old, "a")
    attn = [n for n in lora_state(src, "a") if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert sorted(lora_state(dst, "a")) == sorted(attn) and len(attn) == 8 * 4


def test_key_parsing_covers_every_layout():
    kohya = "lora_unet_up_blocks_2_attentions_0_proj_in"
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    for key, want in [
        (f"{kohya}.lora_up.weight", ("unet", kohya, "up")),
        (f"{sgm}.alpha", ("unet", sgm, "alpha")),
        ("unet.mid_block.attentions.0.proj_out.lora_A.weight", ("unet", "mid_block.attentions.0.proj_out", "down")),
        ("base_model.model.down_blocks.0.resnets.0.conv1.lora_B.default.weight",
         ("unet", "down_blocks.0.resnets.0.conv1", "up")),
        ("unet.a.attn2.processor.to_out_lora.down.weight", ("unet", "a.attn2.to_out.0", "down")),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
         (1, "text_model_encoder_layers_0_mlp_fc1", "down")),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
         (0, "text_model.encoder.layers.0.self_attn.q_proj", "up"))]:
        assert parse_key(key) == want, key
    with pytest.raises(ValueError, match="LyCORIS"):
        parse_key("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a")


def test_wrong_family_errors_name_both_families_and_strict_false_counts(caplog):
    xl, sd1, pruned = (tiny_with_lora(c) for c in (XL_TINY, SD1_TINY, PRUNED_TINY))
    with pytest.raises(ValueError, match=r"trained for SDXL \(context 2048.*the model is SD1.x \(context 768"):
        load_lora(UNetModel(**SD1_TINY), export_lora(xl, "a"), "x")
    with pytest.raises(ValueError, match="SSD-1B needs its own"):                 # SDXL LoRA on a pruned SDXL
        load_lora(UNetModel(**PRUNED_TINY), export_lora(xl, "a"), "x")
    with pytest.raises(ValueError, match=r"trained for SSD-1B .*SSD-1B needs its own"):   # and the reverse
        load_lora(UNetModel(**XL_TINY), export_lora(pruned, "a"), "x")
    target = UNetModel(**PRUNED_TINY)
    n_file, n_fit = len(lora_state(xl, "a")), len(target_names(target))
    with caplog.at_level(logging.WARNING):
        rep = load_lora(target, export_lora(xl, "a"), "x", strict=False)
    assert rep.matched == n_fit and len(rep.unmatched) == n_file - n_fit > 0 and not rep.mismatched
    assert f"{n_fit} modules matched, {n_file - n_fit} unmatched" in caplog.text
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(target, export_lora(xl, "a"), "x", strict=False)


def test_reading_refuses_missing_and_unsafe_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_lora_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        read_lora_file(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"w": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refused"):
        read_lora_file(tmp_path / "evil.ckpt")

#----------------------------------------------------------------------------
# Text-encoder LoRAs on open_clip towers (fused q/k/v in_proj_weight) vs HF CLIP + peft.


def test_text_encoder_lora_matches_hf_peft():
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.keymaps import clip_state_dict_hf_to_open_clip
    from models.text import TextTower
    torch.manual_seed(0)
    hf = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, hidden_act="quick_gelu")).eval()
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in hf.state_dict().items()}
    towers = [TextTower(width=64, layers=2, heads=2).eval() for _ in range(2)]
    for t in towers:
        t.load_state_dict(clip_state_dict_hf_to_open_clip(sd), strict=False)
    tok = torch.randint(0, 49000, (2, 12))
    with torch.no_grad():
        base = towers[0](tok)[0]
    hf = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]), hf, adapter_name="te")
    randomize_adapter_(hf, "te", std=0.1)
    with torch.no_grad():
        expect = hf(tok).last_hidden_state
    kohya = {}
    for k, v in get_peft_model_state_dict(hf, adapter_name="te").items():
        mod, part = k.rsplit(".lora_", 1)
        key = "lora_te2_text_model_" + mod.removeprefix("text_model.").replace(".", "_")
        kohya[f"{key}.lora_{'down' if part[0] == 'A' else 'up'}.weight"], kohya[f"{key}.alpha"] = v, torch.tensor(6.0)
    rep = load_lora(UNetModel(**SD1_TINY), kohya, "te", text_encoders=towers)
    assert rep.matched == 12 and not rep.unmatched
    with torch.no_grad():
        assert torch.equal(towers[0](tok)[0], base)               # lora_te2_ goes to the second tower only
        close(towers[1](tok)[0], expect)
        with adapters_disabled(towers[1]):
            assert torch.equal(towers[1](tok)[0], base)
        set_lora_scales(towers[1], {"te": 0.5})
        assert not torch.equal(towers[1](tok)[0], base)
        remove_lora(towers[1], "te")
        assert torch.equal(towers[1](tok)[0], base) and not any(is_lora_key(k) for k in towers[1].state_dict())
