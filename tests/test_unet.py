"""UNet parity against diffusers' UNet2DConditionModel (random weights, tiny configs) and properties."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from models.keymaps import unet_state_dict_diffusers_to_ldm
from models.unet import UNET_PRESETS, UNetModel, infer_unet_config, timestep_embedding

SD1_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
XL_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
CONFIGS = {   # diffusers kwargs, ours' head kwargs
    "sd1_r1": (dict(SD1_BLOCKS, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768,
                    attention_head_dim=8), dict(num_heads=8)),          # diffusers' SD1 quirk: 8 = head count
    "sd1_r2": (dict(SD1_BLOCKS, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=768,
                    attention_head_dim=8), dict(num_heads=8)),
    "sd2": (dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(64, 128),
                 layers_per_block=2, cross_attention_dim=1024, attention_head_dim=[1, 2],  # head counts: 64 wide
                 use_linear_projection=True, upcast_attention=True), dict(num_head_channels=64)),
    "sdxl": (dict(XL_BLOCKS, block_out_channels=(64, 128), layers_per_block=2, cross_attention_dim=2048,
                  attention_head_dim=[1, 2], use_linear_projection=True, transformer_layers_per_block=(1, 2),
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816), dict(num_head_channels=64)),
    "ssd1b": (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=2048,
                   attention_head_dim=[2, 4, 4], use_linear_projection=True,
                   transformer_layers_per_block=[1, [2, 1], [3, 2]],
                   reverse_transformer_layers_per_block=[[2, 1, 3], [1, 1, 2], [0, 0, 0]],
                   mid_block_type="UNetMidBlock2D", addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816), dict(num_head_channels=16)),
    "nomid": (dict(SD1_BLOCKS, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                   attention_head_dim=4, mid_block_type=None), dict(num_heads=4)),
    "lcm": (dict(SD1_BLOCKS, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, time_cond_proj_dim=256), dict(num_heads=8)),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread; OpenMP hand-offs dominate them on a loaded 2-core machine (20x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_(model: torch.nn.Module, seed: int = 0):
    """Perturb every parameter (norm scales around 1, biases around 0) so nothing hides behind init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.add_(0.3 * p.std().nan_to_num(0.02) * noise)
    return model


def build_pair(name: str):
    """A random diffusers UNet and ours, converted, inferred and strictly loaded."""
    cfg, heads = CONFIGS[name]
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(sample_size=16, **cfg)).eval()
    sd = unet_state_dict_diffusers_to_ldm(ref.state_dict())              # layers_per_block from the keys
    config = infer_unet_config(sd, **heads)
    ours = UNetModel(**config, upcast_attention=cfg.get("upcast_attention", False)).eval()
    ours.load_state_dict(sd, strict=True)
    return ref, ours, config


def sdxl_cond(B: int, g: torch.Generator):
    """diffusers' added_cond_kwargs and our y = [pooled, emb(6 size/crop ids)] (B, 2816)."""
    pooled = torch.randn(B, 1280, generator=g)
    time_ids = torch.tensor([[512., 512, 0, 0, 512, 512], [768, 1024, 16, 32, 1024, 768]])[:B]
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(B, -1)], dim=-1)
    return dict(text_embeds=pooled, time_ids=time_ids), y


def inputs(config: dict, B: int = 2, side: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config["in_channels"], side, side, generator=g)
    t = torch.tensor([999, 10])[:B]
    ctx = torch.randn(B, 77, config["context_dim"], generator=g)
    return g, x, t, ctx


def assert_parity(out, ref):
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), f"max abs err {err} (ref max {ref.abs().max().item()})"

#----------------------------------------------------------------------------

def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 17.5, 999])
    for dim in (256, 320, 7):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(t, dim), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sd1_r1", "sd1_r2", "sd2", "nomid"])
def test_parity_text_unets(name):
    ref, ours, config = build_pair(name)
    _, x, t, ctx = inputs(config)
    with torch.no_grad():
        assert_parity(ours(x, t, ctx), ref(x, t, ctx).sample)


@pytest.mark.parametrize("name", ["sdxl", "ssd1b"])
def test_parity_sdxl_family(name):
    ref, ours, config = build_pair(name)
    assert config["adm_in_channels"] == 2816
    if name == "ssd1b":                  # pruned SDXL: per-block depths, single-ResBlock middle
        assert config["transformer_depth"] == [0, 0, 2, 1, 3, 2]
        assert config["transformer_depth_output"] == [2, 1, 3, 1, 1, 2, 0, 0, 0]
        assert config["transformer_depth_middle"] == 0
    else:
        assert config["transformer_depth"] == [0, 0, 2, 2] and config["transformer_depth_middle"] == 2
    g, x, t, ctx = inputs(config)
    added, y = sdxl_cond(2, g)
    with torch.no_grad():
        assert_parity(ours(x, t, ctx, y=y), ref(x, t, ctx, added_cond_kwargs=added).sample)


def test_parity_full_lcm_cond_proj():
    ref, ours, config = build_pair("lcm")
    assert config["time_cond_proj_dim"] == 256
    g, x, t, ctx = inputs(config)
    w_emb = timestep_embedding(torch.tensor([3.0, 7.5]), 256)           # any (B, 256) works here
    with torch.no_grad():
        assert_parity(ours(x, t, ctx, timestep_cond=w_emb), ref(x, t, ctx, timestep_cond=w_emb).sample)
        with pytest.raises(ValueError, match="timestep_cond"):
            ours(x, t, ctx)


def test_parity_controlnet_residuals_and_float_timesteps():
    ref, ours, config = build_pair("sd1_r2")
    g, x, _, ctx = inputs(config)
    t = torch.tensor([500.25, 3.5])                                       # fractional t (as in DPM-Solver)
    with torch.no_grad():
        emb, h, feats = ours.time_embed(timestep_embedding(t, ours.model_channels)), x, []
        for blk in ours.input_blocks:                                     # skip shapes, to size the residuals
            h = blk(h, emb, ctx)
            feats.append(torch.randn(h.shape, generator=g))
        mid = torch.randn(h.shape, generator=g)
        out = ours(x, t, ctx, down_residuals=feats, mid_residual=mid)
        exp = ref(x, t, ctx, down_block_additional_residuals=tuple(feats), mid_block_additional_residual=mid).sample
        assert_parity(out, exp)
        assert (out - ours(x, t, ctx)).abs().max() > 1e-2                 # the residuals do act


def test_presets_round_trip_through_infer_on_meta():
    for name, kw in UNET_PRESETS.items():
        with torch.device("meta"):
            sd = UNetModel(**kw).state_dict()
        got = infer_unet_config(sd, num_heads=kw.get("num_heads", -1), num_head_channels=kw.get("num_head_channels", -1))
        for k, v in kw.items():
            if k != "upcast_attention":
                assert got[k] == (tuple(v) if isinstance(v, tuple) else v), (name, k, got[k], v)
        assert infer_unet_config(sd) == got                               # default heads follow the SD rule
    with torch.device("meta"):
        n = sum(p.numel() for p in UNetModel(**UNET_PRESETS["sd15"]).parameters())
    assert n == 859_520_964                                               # the released SD1.5 UNet


def test_strict_load_rejects_wrong_shape_and_missing_key():
    _, ours, config = build_pair("sd1_r1")
    sd = ours.state_dict()
    bad = dict(sd, **{"input_blocks.1.1.proj_in.weight": torch.zeros(32, 32)})  # Linear shape in a conv slot
    with pytest.raises(RuntimeError, match="size mismatch"):
        UNetModel(**config).load_state_dict(bad, strict=True)
    missing = {k: v for k, v in sd.items() if k != "out.2.bias"}
    with pytest.raises(RuntimeError, match="out.2.bias"):
        UNetModel(**config).load_state_dict(missing, strict=True)
    with pytest.raises(AssertionError, match="model.diffusion_model"):
        infer_unet_config({"model.diffusion_model." + k: v for k, v in sd.items()})


def test_size_not_divisible_raises_clear_error():
    _, ours, config = build_pair("ssd1b")                                 # 3 levels: multiples of 4
    x = torch.randn(1, 4, 18, 16)
    with pytest.raises(ValueError, match=r"18x16.*multiples of 4.*multiples of 32"):
        ours(x, torch.tensor([1]), torch.randn(1, 77, 2048), y=torch.randn(1, 2816))


def test_gradient_checkpointing_same_output_and_grads():
    _, ours, config = build_pair("sd1_r2")
    ours.train()
    _, x, t, ctx = inputs(config)
    outs, grads = [], []
    for on in (False, True):
        ours.set_gradient_checkpointing(on)
        ours.zero_grad()
        out = ours(x, t, ctx)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_low_precision_upcast_attention(monkeypatch, dtype=torch.bfloat16):
    _, ours, config = build_pair("sd2")                                    # upcast_attention=True
    _, x, t, ctx = inputs(config)
    with torch.no_grad():
        ref = ours(x, t, ctx)
        seen = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
        low = ours.to(dtype)(x.to(dtype), t, ctx.to(dtype))
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert seen and set(seen) == {torch.float32}                          # attention ran in fp32
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_cpu_gemm_conv_path_matches_conv2d():
    from models.unet import Conv2d
    for stride, bias, side in [(1, True, 8), (2, True, 16), (1, False, 4)]:
        conv = Conv2d(64, 32, 3, stride=stride, padding=1, bias=bias)
        x = torch.randn(2, 64, side, side)
        with torch.no_grad():                                             # the fast path runs without grad
            torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride, 1),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.fullsize
def test_sd15_fullsize_parity():
    cfg = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
               attention_head_dim=8, sample_size=64)
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(**cfg)).eval()
    sd = unet_state_dict_diffusers_to_ldm(ref.state_dict())
    config = infer_unet_config(sd)
    assert config == {**config, **UNET_PRESETS["sd15"]}
    with torch.device("meta"):
        ours = UNetModel(**config)
    ours.load_state_dict(sd, strict=True, assign=True)                 # shares diffusers' tensors: 3.4 GB, not 7
    ours.eval()
    _, x, t, ctx = inputs(config, B=1, side=64)
    with torch.no_grad():
        assert_parity(ours(x, t[:1], ctx), ref(x, t[:1], ctx).sample)
