"""Pipeline parity with diffusers' StableDiffusionPipeline (same random weights, latents, noise)."""
import logging
import os

import pytest
import torch

from lcm.pipeline import Pipeline
from tests.oracle import tiny_clip, tiny_unet, tiny_vae, write_original

H = W = 32                                                   # tiny VAE downsamples 2x -> 16x16 latents


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    unet, vae, te = tiny_unet("sd15", layers_per_block=2), tiny_vae(), tiny_clip(768, "quick_gelu")
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors")
    write_original(path, "sd15", unet, vae, [te])
    return path, unet, vae, te


@pytest.fixture(scope="module")
def pipe(sd15):
    return Pipeline.from_checkpoint(sd15[0])


def reference(sd15, scheduler):
    from diffusers import StableDiffusionPipeline
    _, unet, vae, te = sd15
    ref = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet, scheduler=scheduler,
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def schedulers():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return {
        "ddim": DDIMScheduler(**sd, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading"),
        "dpmsolver++": DPMSolverMultistepScheduler(**sd, algorithm_type="dpmsolver++", solver_order=2,
                                                   timestep_spacing="linspace"),
        "lcm": LCMScheduler(**sd, original_inference_steps=50, set_alpha_to_one=True),
    }


def close(a, b, rel):
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), f"max abs error {err:.3g}"


@pytest.mark.parametrize("solver,steps,s", [("ddim", 8, 7.5), ("dpmsolver++", 8, 7.5), ("lcm", 1, 1.0),
                                            ("lcm", 4, 1.0)])
def test_latents_match_diffusers(sd15, pipe, solver, steps, s):
    prompts = ["a red circle", "a blue square"]
    x_T = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    ours = pipe(prompts, steps=steps, guidance_scale=s, solver=solver, height=H, width=W,
                generator=torch.Generator().manual_seed(7), latents=x_T, output="latent", progress=False)
    cond, uncond = pipe.encode_prompt(prompts), pipe.encode_prompt(["", ""])
    ref = reference(sd15, schedulers()[solver])
    theirs = ref(prompt_embeds=cond.context, negative_prompt_embeds=uncond.context, num_inference_steps=steps,
                 guidance_scale=s, height=H, width=W, latents=x_T.clone(),
                 generator=torch.Generator().manual_seed(7), output_type="latent").images
    close(ours, theirs, 1e-3)


def test_per_image_seeds_reproduce_across_batch_sizes(pipe):
    one = pipe(["a"], steps=2, height=H, width=W, seed=5, output="latent", progress=False)
    two = pipe(["a", "b"], steps=2, height=H, width=W, seed=5, output="latent", progress=False)
    # same noise bit for bit (tests/test_solvers); the UNet's batched matmuls differ in the last ulp
    torch.testing.assert_close(one[0], two[0], rtol=1e-5, atol=1e-4)
    three = pipe(["a"], steps=2, height=H, width=W, seed=6, output="latent", progress=False)
    assert (three[0] - one[0]).abs().max() > 1e-2


def test_outputs_and_img2img(pipe):
    img = pipe("a", steps=2, height=H, width=W, seed=0, output="tensor", progress=False)
    assert img.shape == (1, 3, H, W) and 0 <= img.min() and img.max() <= 1
    pil = pipe("a", steps=1, height=H, width=W, seed=0, progress=False)
    assert pil[0].size == (W, H)
    out = pipe("a", steps=4, height=H, width=W, seed=0, init_image=img, strength=0.5, output="latent",
               progress=False)
    assert out.shape == (1, 4, H // 2, W // 2) and torch.isfinite(out).all()


def test_timesteps_argument_wins(pipe):
    a = pipe("a", timesteps=[999, 499], height=H, width=W, seed=1, output="latent", progress=False)
    b = pipe("a", steps=2, height=H, width=W, seed=1, output="latent", progress=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=30), "multiples of"), (dict(steps=0), "steps must be"), (dict(solver="heun"), "unknown solver"),
    (dict(guidance_scale=-1), "guidance_scale"), (dict(strength=0.0), "strength"), (dict(output="np"), "output"),
])
def test_bad_arguments_name_the_problem(pipe, kwargs, match):
    args = dict(height=H, width=W, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        pipe("a", **args)


def test_negative_prompt_ignored_at_guidance_one(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        pipe("a", negative_prompt="b", steps=1, height=H, width=W, seed=0, output="latent", progress=False)
    assert "negative_prompt is ignored" in caplog.text


def test_non_finite_decode_names_the_fix(pipe, monkeypatch):
    monkeypatch.setattr(pipe.vae, "decode", lambda z: torch.full((z.shape[0], 3, H, W), float("nan")))
    with pytest.raises(FloatingPointError, match="keep the VAE in fp32"):
        pipe("a", steps=1, height=H, width=W, seed=0, output="tensor", progress=False)


def test_text_only_lora_is_listed_and_rescaled(sd15, tmp_path):
    """A LoRA with text-encoder keys only: named by lora_names, scaled by set_lora_scales."""
    from safetensors.torch import save_file
    pipe = Pipeline.from_checkpoint(sd15[0])
    g = torch.Generator().manual_seed(0)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = str(tmp_path / "te.safetensors")
    save_file({f"{key}.lora_down.weight": torch.randn(4, 768, generator=g) * 0.1,
               f"{key}.lora_up.weight": torch.randn(768, 4, generator=g) * 0.1, f"{key}.alpha": torch.tensor(4.0)}, path)
    base = pipe.encode_prompt(["a cat"]).context
    assert pipe.load_lora(path, name="te") == "te"
    assert pipe.lora_names() == ["te"]
    assert (pipe.encode_prompt(["a cat"]).context - base).abs().max() > 1e-4
    pipe.set_lora_scales({"te": 0.0})
    torch.testing.assert_close(pipe.encode_prompt(["a cat"]).context, base, rtol=0, atol=1e-6)


def test_from_architecture_round_trips_through_a_saved_file(tmp_path):
    """A model built from module kwargs (the trainer's no-path case) saves and reloads as the same model."""
    import os

    from omegaconf import OmegaConf

    from models.checkpoint import save_model_file
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = OmegaConf.to_container(OmegaConf.load(os.path.join(root, "conf/experiment/smoke.yaml")).model)
    arch = {k: model[k] for k in ("family", "text_family", "unet", "vae", "text", "default_size") if k in model}
    pipe = Pipeline.from_architecture(**arch, randomize=True, prediction_type="v_prediction")
    assert pipe.config["text_family"] == model["text_family"] and pipe.prediction_type == "v_prediction"
    path = str(tmp_path / "m.safetensors")
    save_model_file(path, pipe.unet, pipe.vae, pipe.text, pipe.config, {"prediction_type": "v_prediction"})
    back = Pipeline.from_checkpoint(path)
    kw = dict(steps=2, solver="ddim", height=32, width=32, seed=0, output="latent", progress=False)
    assert back.prediction_type == "v_prediction"
    torch.testing.assert_close(back(["a red circle"], **kw), pipe(["a red circle"], **kw), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="LoRA entries need a path"):
        pipe.load_loras([{"name": "x", "scale": 0.8}])

#----------------------------------------------------------------------------
# The consistency spec travels with a LoRA file (lcm.spec metadata).

def test_lora_spec_is_read_and_sampling_uses_its_grid(tmp_path):
    """The demo LCM-LoRA re-saved with a k = 50 spec samples 4 steps at 999/749/499/249; the released
    layout without a spec keeps N = 50; disagreeing active specs and junk spec metadata are errors."""
    from safetensors.torch import load_file, save_file

    from lcm.consistency import ConsistencySpec
    assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
    sd = load_file(os.path.join(assets, "demo_lcm_lora.safetensors"))
    k50, plain, junk = (str(tmp_path / f) for f in ("k50.safetensors", "plain.safetensors", "junk.safetensors"))
    save_file(sd, k50, ConsistencySpec(num_ddim_timesteps=20).to_metadata())
    save_file(sd, plain, {})
    save_file(sd, junk, {"lcm.spec": "{zz"})
    pipe = Pipeline.from_checkpoint(os.path.join(assets, "demo_teacher.safetensors"))
    seen = []
    real = pipe.unet.forward
    pipe.unet.forward = lambda x, t, *a, **k: (seen.append(int(t[0])), real(x, t, *a, **k))[1]
    kw = dict(steps=4, output="latent", progress=False, seed=0)
    pipe.load_lora(plain, name="lcm")
    assert pipe.spec.num_ddim_timesteps == 50
    pipe(["a red circle"], **kw)
    assert seen == [999, 759, 499, 259]                     # the default 50-point grid
    pipe.set_lora_scales({"lcm": 0.0})
    pipe.load_lora(k50, name="lcm50")
    assert pipe.spec.num_ddim_timesteps == 20 and pipe.base_spec.num_ddim_timesteps == 50
    seen.clear()
    pipe(["a red circle"], **kw)
    assert seen == [999, 749, 499, 249]                     # its own 20-point grid (k = 50)
    seen.clear()
    pipe(["a red circle"], timesteps=[999, 499], output="latent", progress=False, seed=0)
    assert seen == [999, 499]                               # explicit timesteps still win
    pipe.set_lora_scales({"lcm": 1.0})                      # a spec-less "lcm" adapter does not count
    assert pipe.spec.num_ddim_timesteps == 20
    other = str(tmp_path / "k10.safetensors")
    save_file(sd, other, ConsistencySpec(num_ddim_timesteps=100).to_metadata())
    pipe.load_lora(other, name="lcm100")
    with pytest.raises(ValueError, match="lcm50.*lcm100"):
        pipe.spec
    names = pipe.lora_names()
    with pytest.raises(ValueError, match="junk.safetensors.*lcm.spec"):
        pipe.load_lora(junk, name="junk")
    assert pipe.lora_names() == names                       # nothing of the bad file stays loaded
    out = str(tmp_path / "resaved.safetensors")             # save_lora writes the adapter's own spec
    pipe.save_lora(out, "lcm50")
    fresh = Pipeline.from_checkpoint(os.path.join(assets, "demo_teacher.safetensors"))
    fresh.load_lora(out)
    assert fresh.spec.num_ddim_timesteps == 20
