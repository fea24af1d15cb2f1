"""Opt-in (pytest -m fullsize): full-size original single files, stored in fp16 exactly as the
released ones, load through Pipeline.from_checkpoint with no key left over and match diffusers /
transformers on the same random weights; SD1.5-size pipeline parity for the LCM solver."""
import pytest
import torch

from lcm.pipeline import Pipeline
from tests.oracle import randomize_, write_original

pytestmark = pytest.mark.fullsize

UNETS = {
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8),
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 upcast_attention=True),
}


def fp16_roundtrip_(module):
    """Round the weights through fp16, as the released files store them."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def full_models(family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, **UNETS[family])
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    width, layers, act = (768, 12, "quick_gelu") if family == "sd15" else (1024, 24, "gelu")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                      num_hidden_layers=layers, num_attention_heads=width // 64,
                                      max_position_embeddings=77, hidden_act=act))
    for i, m in enumerate((unet, vae, te)):
        fp16_roundtrip_(randomize_(m, seed=i, std=0.02))
    return unet, vae, te


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_full_size_fp16_file_loads_and_matches(family, tmp_path):
    unet, vae, te = full_models(family)
    path = str(tmp_path / f"{family}.safetensors")
    write_original(path, family, unet.half(), vae.half(), [te.half()])
    unet, vae, te = unet.float(), vae.float(), te.float()
    pipe = Pipeline.from_checkpoint(path, prediction_type="epsilon")
    assert pipe.family == family
    x = torch.randn(1, 4, 32, 32)
    t = torch.tensor([500])
    ctx = pipe.encode_prompt(["a photograph of an astronaut riding a horse"]).context
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        ours = pipe.unet(x, t, ctx)
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref_mean = vae.encode(img).latent_dist.mean
        assert (pipe.vae.encode(img).mean - ref_mean).abs().max() <= 1e-4 * max(1.0, ref_mean.abs().max().item())


@pytest.fixture(scope="module")
def sd15_full(tmp_path_factory):
    unet, vae, te = full_models("sd15")
    path = str(tmp_path_factory.mktemp("full") / "sd15.safetensors")
    write_original(path, "sd15", unet, vae, [te])
    return Pipeline.from_checkpoint(path), unet, vae, te


@pytest.mark.parametrize("solver,steps,s", [("lcm", 1, 1.0), ("lcm", 4, 1.0), ("ddim", 8, 7.5),
                                            ("dpmsolver++", 8, 7.5)])
def test_sd15_size_pipeline_matches_diffusers(sd15_full, solver, steps, s):
    from diffusers import StableDiffusionPipeline
    from tests.test_pipeline import schedulers
    pipe, unet, vae, te = sd15_full
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = pipe("a cat", steps=steps, guidance_scale=s, solver=solver, latents=x_T, height=256, width=256,
                generator=torch.Generator().manual_seed(2), output="latent", progress=False)
    ref = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet,
                                  scheduler=schedulers()[solver], safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt_embeds=pipe.encode_prompt(["a cat"]).context,
                 negative_prompt_embeds=pipe.encode_prompt([""]).context, num_inference_steps=steps,
                 guidance_scale=s, height=256, width=256, latents=x_T.clone(),
                 generator=torch.Generator().manual_seed(2), output_type="latent").images
    assert (ours - theirs).abs().max() <= 1e-3 * max(1.0, theirs.abs().max().item())


def test_sdxl_base_fp16_file_loads_and_unet_matches(tmp_path):
    """SDXL-base size: the reference runs first and is freed (two fp32 SDXL UNets exceed 24 GiB)."""
    import gc

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lcm.conditioning import sdxl_vector
    from tests.oracle import tiny_vae
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    fp16_roundtrip_(randomize_(unet, seed=0, std=0.02))
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    ctx, pooled = torch.randn(1, 77, 2048), torch.randn(1, 1280)
    time_ids = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu"))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                     num_hidden_layers=32, num_attention_heads=20,
                                                     hidden_act="gelu", projection_dim=1280))
    path = str(tmp_path / "sdxl.safetensors")
    write_original(path, "sdxl", unet.half(), tiny_vae().half(), [te1.half(), te2.half()])
    del unet, te1, te2
    gc.collect()
    pipe = Pipeline.from_checkpoint(path)
    assert pipe.family == "sdxl" and pipe.vae_scale == 0.13025
    with torch.no_grad():
        ours = pipe.unet(x, t, ctx, y=sdxl_vector(pooled, (256, 256), (0, 0), (256, 256)))
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
