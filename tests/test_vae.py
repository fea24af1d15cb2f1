"""AutoencoderKL: parity with diffusers (the oracle) through the diffusers->LDM key map."""
import pytest
import torch

from models.keymaps import vae_state_dict_diffusers_to_ldm
from models.vae import AutoencoderKL, infer_vae_config

diffusers = pytest.importorskip("diffusers")


def tiny_pair(layers_per_block: int, block_out_channels=(32, 64)):
    """A diffusers AutoencoderKL with random weights (norms too) and ours loaded from it."""
    n = len(block_out_channels)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                                  block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                  down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():     # GroupNorms start at (1, 0): perturb all of them
            if p.ndim == 1 and "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    sd = vae_state_dict_diffusers_to_ldm(ref.state_dict())
    cfg = infer_vae_config(sd)
    ch = block_out_channels[0]
    assert cfg == dict(ch=ch, ch_mult=tuple(c // ch for c in block_out_channels),
                       num_res_blocks=layers_per_block, in_channels=3, out_ch=3, z_channels=4, embed_dim=4)
    ours = AutoencoderKL(**cfg).eval()
    ours.load_state_dict(sd, strict=True)
    return ref, ours


def assert_parity(out, ref):
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err


#----------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("layers_per_block", [1, 2])
@torch.no_grad()
def test_encode_decode_match_diffusers(layers_per_block):
    ref, ours = tiny_pair(layers_per_block)
    img = torch.rand(2, 3, 32, 24) * 2 - 1                  # non-square: catches H/W transposes
    post, post_ref = ours.encode(img), ref.encode(img).latent_dist
    assert post.mean.shape == (2, 4, 16, 12)
    assert_parity(post.mean, post_ref.mean)
    assert_parity(post.logvar, post_ref.logvar)
    assert_parity(post.std, post_ref.std)
    z = torch.randn(2, 4, 8, 6)
    out = ours.decode(z)
    assert out.shape == (2, 3, 16, 12)
    assert_parity(out, ref.decode(z).sample)


@torch.no_grad()
def test_sample_is_mean_plus_std_times_generator_noise():
    _, ours = tiny_pair(1)
    post = ours.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    s1 = post.sample(generator=torch.Generator().manual_seed(7))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, post.mean + post.std * eps, rtol=0, atol=0)
    s2 = post.sample(generator=torch.Generator().manual_seed(8))
    assert not torch.equal(s1, s2)
    assert torch.equal(post.mode(), post.mean)


def test_logvar_is_clamped_as_ldm():
    from models.vae import DiagonalGaussian
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.max().item() == 20.0
    assert DiagonalGaussian(-moments).logvar.min().item() == -30.0


@torch.no_grad()
def test_dtype_follows_parameters():
    _, ours = tiny_pair(1)
    ours = ours.to(torch.float64)
    post = ours.encode(torch.rand(1, 3, 16, 16))             # fp32 input -> VAE's fp64
    assert post.mean.dtype == torch.float64
    assert post.sample(torch.Generator().manual_seed(0)).dtype == torch.float64
    assert ours.decode(torch.randn(1, 4, 4, 4)).dtype == torch.float64


def test_scale_factor_is_config():
    assert AutoencoderKL(ch=32, ch_mult=(1,)).scale_factor == 0.18215
    assert AutoencoderKL(ch=32, ch_mult=(1,), scale_factor=0.13025).scale_factor == 0.13025

#----------------------------------------------------------------------------
# Errors.


def test_shape_errors_name_the_fix():
    vae = AutoencoderKL(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    with pytest.raises(ValueError, match=r"36x32 is not a multiple of 8"):
        vae.encode(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"raw latents \(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="missing 'encoder.conv_in.weight'"):
        infer_vae_config({"decoder.conv_in.weight": torch.zeros(1)})

#----------------------------------------------------------------------------
# Tiling.


@torch.no_grad()
def test_tiled_decode_blends_to_the_untiled_result_for_a_local_decoder():
    vae = AutoencoderKL(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1)
    vae._decode = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=4)  # pointwise
    z = torch.randn(2, 4, 23, 17)
    full = vae.decode(z)
    vae.enable_tiling(tile_size=8, tile_overlap=3)
    torch.testing.assert_close(vae.decode(z), full)           # weights form a partition of unity


@torch.no_grad()
def test_one_tile_equals_untiled():
    _, ours = tiny_pair(1)
    z = torch.randn(1, 4, 8, 8)
    full = ours.decode(z)
    ours.enable_tiling(tile_size=8, tile_overlap=2)
    assert torch.equal(ours.decode(z), full)
    ours.enable_tiling(tile_size=4, tile_overlap=2)          # real tiles: same shape, finite
    out = ours.decode(z)
    assert out.shape == full.shape and torch.isfinite(out).all()

#----------------------------------------------------------------------------
# Full-size config inference, on the meta device (no memory, no weights).


@pytest.mark.parametrize("scale", [0.18215, 0.13025])
def test_full_size_sd_vae_config_is_inferred(scale):
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                                      scaling_factor=scale)
    sd = vae_state_dict_diffusers_to_ldm(ref.state_dict())
    cfg = infer_vae_config(sd)
    assert cfg == dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, in_channels=3, out_ch=3,
                       z_channels=4, embed_dim=4)
    with torch.device("meta"):
        ours = AutoencoderKL(**cfg, scale_factor=ref.config.scaling_factor)
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in sd.items()}
    assert "encoder.mid.attn_1.q.weight" in sd and sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert ours.scale_factor == scale

#----------------------------------------------------------------------------
# Opt-in: parity at the real SD size (random weights; ~1 GiB RAM, tens of seconds).


@pytest.mark.fullsize
@torch.no_grad()
def test_full_size_parity():
    ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4).eval()
    sd = vae_state_dict_diffusers_to_ldm(ref.state_dict())
    ours = AutoencoderKL(**infer_vae_config(sd)).eval()
    ours.load_state_dict(sd, strict=True)
    img = torch.rand(1, 3, 64, 48) * 2 - 1
    assert_parity(ours.encode(img).mean, ref.encode(img).latent_dist.mean)
    z = torch.randn(1, 4, 8, 6)
    assert_parity(ours.decode(z), ref.decode(z).sample)
