"""TAESD (models/taesd.py): parity with diffusers' AutoencoderTiny (the oracle) loaded from both
published layouts, the pipeline's tiny-VAE decode path, bad files, and the bundled demo decoder."""
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from models.keymaps import taesd_state_dict_ours_to_original, taesd_state_dict_to_ours
from models.taesd import (TinyDecoder, bytes_to_latents, latents_to_bytes, load_tiny_vae, save_tiny_decoder)

diffusers = pytest.importorskip("diffusers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TEACHER = os.path.join(ROOT, "assets", "demo_teacher.safetensors")
DEMO_TAESD = os.path.join(ROOT, "assets", "demo_taesd_decoder.safetensors")


def diffusers_to_original(sd: dict, part: str) -> dict:
    """The test's own map (independent of models/keymaps.py): diffusers AutoencoderTiny -> one
    original taesd file. DecoderTiny has no Clamp entry, so its indices are one lower."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(rf"{part}\.layers\.(\d+)\.(.+)", k)
        if m:
            out[f"{int(m.group(1)) + (part == 'decoder')}.{m.group(2)}"] = v
    return out


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """diffusers' AutoencoderTiny at its default config (= madebyollin/taesd), random weights, written
    in both published layouts: diffusers' safetensors, and taesd_decoder.safetensors + taesd_encoder.pth."""
    tmp = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():
        for p in ref.parameters():                    # default init is small: widen it so ReLUs mix
            p.mul_(1.5)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    paths = dict(diffusers=str(tmp / "diffusion_pytorch_model.safetensors"),
                 decoder=str(tmp / "taesd_decoder.safetensors"), encoder=str(tmp / "taesd_encoder.pth"))
    save_file(sd, paths["diffusers"])
    save_file(diffusers_to_original(sd, "decoder"), paths["decoder"])
    torch.save(diffusers_to_original(sd, "encoder"), paths["encoder"])
    return ref, paths


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()

#----------------------------------------------------------------------------
# Parity with the oracle, both layouts.


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_decode_and_encode_match_autoencoder_tiny(published, layout):
    """Ours from either layout == AutoencoderTiny: decode to [-1, 1] (incl. the 3 tanh(z/3) clamp on
    latents beyond +-3) and encode from [-1, 1], max abs error <= 1e-5 in fp32."""
    ref, paths = published
    ours = (load_tiny_vae(paths["diffusers"]) if layout == "diffusers"
            else load_tiny_vae(paths["decoder"], encoder_path=paths["encoder"]))
    assert (ours.downscale, ours.latent_channels, ours.decoder.channels) == (8, 4, 64)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 8, generator=g) * 2.5                # UNet-space latents, some past +-3
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        want_img, want_z = ref.decode(z).sample, ref.encode(x).latents
        got_img, got_z = ours.decode(z), ours.encode(x)
    assert got_img.shape == want_img.shape == (2, 3, 64, 64) and got_z.shape == want_z.shape == (2, 4, 8, 8)
    assert want_img.std() > 0.05 and want_z.std() > 0.05          # not a degenerate comparison
    assert max_err(got_img, want_img) <= 1e-5, max_err(got_img, want_img)
    assert max_err(got_z, want_z) <= 1e-5, max_err(got_z, want_z)
    with torch.no_grad():                                         # the raw net keeps taesd's [0, 1] output
        assert max_err(ours.decoder(z), (want_img + 1) / 2) <= 1e-5


def test_key_maps_and_latent_bytes_agree_with_the_oracle(published):
    """diffusers -> ours -> original equals the test's own diffusers -> original map; the 8-bit latent
    storage equals AutoencoderTiny's scale_latents/unscale_latents."""
    ref, _ = published
    sd = ref.state_dict()
    ours = taesd_state_dict_to_ours(sd)
    assert len(ours) == len(sd)
    for part in ("decoder", "encoder"):
        back, want = taesd_state_dict_ours_to_original(ours, part), diffusers_to_original(sd, part)
        assert back.keys() == want.keys() and all(back[k] is want[k] for k in want)
        assert taesd_state_dict_to_ours(want).keys() == {k for k in ours if k.startswith(part + ".")}
    z = torch.randn(2, 4, 8, 8) * 4
    want = ref.scale_latents(z).mul(255).round().byte()
    assert torch.equal(latents_to_bytes(z), want)
    assert torch.allclose(bytes_to_latents(want), ref.unscale_latents(want / 255.0))

#----------------------------------------------------------------------------
# Bad files: one ValueError naming the file.


def test_bad_files_raise_one_line_naming_the_file(published, tmp_path):
    ref, paths = published
    sd = diffusers_to_original(ref.state_dict(), "decoder")

    def write(name, d):
        p = str(tmp_path / name)
        save_file({k: v.contiguous() for k, v in d.items()}, p)
        return p

    cases = {
        "missing.safetensors": ({k: v for k, v in sd.items() if k != "8.conv.2.weight"}, r"missing.*8\.conv\.2\.weight"),
        "extra.safetensors": (sd | {"3.norm.weight": torch.ones(64)}, r"no rule maps TAESD key '3\.norm\.weight'"),
        "shape.safetensors": (sd | {"19.weight": torch.zeros(4, 64, 3, 3)}, r"wrong shape.*19\.weight"),
        "vae.safetensors": ({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, r"not a TAESD file"),
        "diffusers_bad.safetensors": ({"decoder.layers.0.weight": torch.zeros(64, 4, 3, 3),
                                       "decoder.mid.weight": torch.zeros(1)}, r"no rule maps TAESD key"),
    }
    for name, (d, pattern) in cases.items():
        p = write(name, d)
        with pytest.raises(ValueError, match=pattern) as e:
            load_tiny_vae(p)
        assert p in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="same TAESD net"):
        load_tiny_vae(paths["decoder"], encoder_path=paths["decoder"])
    with pytest.raises(FileNotFoundError):
        load_tiny_vae(str(tmp_path / "absent.safetensors"))
    enc = load_tiny_vae(paths["encoder"])
    with pytest.raises(ValueError, match="encoder only"):
        enc.decode(torch.zeros(1, 4, 8, 8))

#----------------------------------------------------------------------------
# The pipeline's decode path, on the demo teacher (64x64 images, 16x16x4 latents: x4).


def test_pipeline_decodes_unet_space_latents_with_the_tiny_vae(published, tmp_path):
    """With tiny_vae set, decode(z) = (TAESD.decode(z) + 1) / 2 on the UNet-space z itself (no
    division by vae_scale), clamped, NaN-checked; sampling goes through it; a TAESD of another
    downscale or an encoder-only file is refused; tiny_vae = None restores the VAE."""
    from lcm.pipeline import Pipeline
    _, paths = published
    pipe = Pipeline.from_checkpoint(DEMO_TEACHER)
    assert pipe.tiny_vae is None
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    full = pipe.decode(z)
    torch.manual_seed(0)
    dec = TinyDecoder(channels=16, upsamples=2)
    path = str(tmp_path / "tiny_decoder.safetensors")
    save_tiny_decoder(dec, path)
    assert pipe.load_tiny_vae(path) is pipe and pipe.tiny_vae.downscale == pipe.latent_factor == 4
    with torch.no_grad():
        want = ((dec(z) * 2 - 1 + 1) / 2).clamp(0, 1)
    got = pipe.decode(z)
    assert got.shape == full.shape == (2, 3, 64, 64) and max_err(got, want) <= 1e-6
    lat = pipe(["a small red circle at the top left on a blue background"], steps=1, seed=0, output="latent", progress=False)
    img = pipe(["a small red circle at the top left on a blue background"], steps=1, seed=0, output="tensor", progress=False)
    assert max_err(img, pipe.decode(lat)) == 0
    with torch.no_grad():
        dec[1].weight.fill_(float("nan"))
    save_tiny_decoder(dec, path)
    pipe.load_tiny_vae(path)
    with pytest.raises(FloatingPointError):
        pipe.decode(z)
    with pytest.raises(ValueError, match=r"x8, but this demo model's are 4-channel x4"):
        pipe.load_tiny_vae(paths["decoder"])
    with pytest.raises(ValueError, match="encoder only"):
        pipe.load_tiny_vae(paths["encoder"])
    pipe.tiny_vae = None
    assert max_err(pipe.decode(z), full) == 0


@pytest.mark.skipif(not os.path.exists(DEMO_TAESD), reason="demo TAESD not built (python -m demo.taesd)")
def test_bundled_demo_tiny_decoder_tracks_the_demo_vae():
    """assets/demo_taesd_decoder.safetensors (python -m demo.taesd) decodes the demo teacher's latents
    of real images close to its full VAE decoder: PSNR > 25 dB on held-out images."""
    from demo.world import real_batch
    from lcm.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(DEMO_TEACHER)
    x, _ = real_batch(16, seed=999)
    with torch.no_grad():
        z = pipe.vae.encode(x).mean * pipe.vae_scale
    full = pipe.decode(z)
    pipe.load_tiny_vae(DEMO_TAESD)
    mse = (pipe.decode(z) - full).pow(2).mean().item()
    assert 10 * torch.log10(torch.tensor(1.0 / mse)).item() > 25, mse


@pytest.mark.slow
def test_train_validation_grids_decode_with_vae_tiny(tmp_path):
    """train.py vae.tiny=PATH: the same 1-step run's validation grid differs only by the decoder."""
    import subprocess
    import sys

    from PIL import Image
    grids = []
    for tiny in (None, os.path.join(ROOT, "assets", "demo_taesd_decoder.safetensors")):
        run = tmp_path / ("tiny" if tiny else "full")
        args = [sys.executable, "train.py", "experiment=demo_lcm_lora", "train.max_steps=1", "train.batch_size=2",
                "data.length=4", "validation.every=1", "validation.steps=[1]", "validation.guidance=[1.0]",
                "validation.teacher_steps=2", "logger=none", f"hydra.run.dir={run}"] + ([f"vae.tiny={tiny}"] if tiny else [])
        res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
        path, = (run / "validation").glob("step_*.png")
        grids.append(torch.tensor(list(Image.open(path).convert("L").getdata()), dtype=torch.float32))
    full, tiny = grids
    assert full.shape == tiny.shape and 0 < (full - tiny).abs().mean() < 40   # same content, another decoder
