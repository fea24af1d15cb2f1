"""TCD, PCM, and the trailing DDIM / Euler presets (Hyper-SD, SDXL-Lightning) against diffusers' schedulers
and their defining properties (docs/method.md, TCD and PCM)."""
import logging

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, TCDScheduler

from solvers.ddim import ddim_from_x0_eps, sample_ddim
from solvers.schedule import Schedule, lcm_timesteps, pcm_edges, pcm_phase_starts, pcm_timesteps, spaced_timesteps
from solvers.tcd import sample_tcd, tcd_s, tcd_step
from solvers.wrappers import GuidedModel
from tests.test_pipeline import H, W, close, pipe, reference, sd15  # noqa: F401  (fixtures)
from tests.test_solvers import SD, _check, _diffusers_loop, net_fn

S = Schedule.make()

#----------------------------------------------------------------------------
# TCD: timesteps, step parity (eps and v, gamma 0 and 0.3, 1/2/4/8 steps), gamma = 0 is DDIM.

@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 0.3])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_tcd_parity_with_diffusers(n, gamma, pred):
    sch = TCDScheduler(**SD, prediction_type=pred)
    sch.set_timesteps(n)                              # original_inference_steps not passed: the k-grid branch
    ts = lcm_timesteps(n)
    assert ts == sch.timesteps.tolist()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    x = z.clone()
    g = torch.Generator().manual_seed(7)
    for t in sch.timesteps:
        x = sch.step(net_fn(x, t, False), t, x, eta=gamma, generator=g).prev_sample
    model = GuidedModel(net_fn, pred, S)
    ours = sample_tcd(model.x0_eps, z, ts, S, gamma=gamma, generator=torch.Generator().manual_seed(7))
    _check(ours, x)


def test_tcd_grids_and_explicit_original_steps_gotcha():
    expect = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259], 8: [999, 879, 759, 639, 499, 379, 259, 139]}
    for n, ts in expect.items():
        assert lcm_timesteps(n) == ts
    sch = TCDScheduler(**SD)
    sch.set_timesteps(4, original_inference_steps=50)  # diffusers' "customised" branch: not the k-grid
    assert sch.timesteps.tolist() == [999, 749, 499, 249] != lcm_timesteps(4)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_tcd_gamma_zero_is_ddim_on_its_grid(n):
    model = GuidedModel(net_fn, "epsilon", S)
    z = torch.randn(2, 4, 8, 8)
    ts = lcm_timesteps(n)
    torch.testing.assert_close(sample_tcd(model.x0_eps, z, ts, S, gamma=0.0), sample_ddim(model.eps, z, ts, S),
                               rtol=0, atol=1e-6)


def test_tcd_step_closed_form_and_marginal():
    """x_prev = alpha_p x0 + sigma_p (sqrt(r) eps + sqrt(1 - r) z), r = SNR(prev) / SNR(s') (PCM Eq. 44);
    and if x_s' is a sample of the forward marginal, so is x_prev (noise variance 1 - abar[prev])."""
    gen = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(20000, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    for prev, gamma in [(499, 0.3), (259, 0.7), (739, 1.0)]:
        s = tcd_s(prev, gamma)
        snr = lambda t: float(S.alpha(t) ** 2 / S.sigma(t) ** 2)          # noqa: E731
        r = snr(prev) / snr(s)
        ref = float(S.alpha(prev)) * x0 + float(S.sigma(prev)) * (r**0.5 * eps + (1 - r) ** 0.5 * z)
        torch.testing.assert_close(tcd_step(x0, eps, prev, S, gamma, z), ref)
        out = tcd_step(torch.zeros_like(x0), eps, prev, S, gamma, z)      # x0 = 0: pure noise part
        assert abs(out.var().item() - float(S.sigma(prev)) ** 2) < 0.03


def test_tcd_gamma_out_of_range_and_noise_count():
    model = GuidedModel(net_fn, "epsilon", S)
    with pytest.raises(ValueError, match="gamma"):
        sample_tcd(model.x0_eps, torch.randn(1, 4, 8, 8), [999], S, gamma=1.5)

    class Counting(torch.Generator):
        pass
    g = torch.Generator().manual_seed(0)
    before = g.get_state().clone()
    sample_tcd(model.x0_eps, torch.randn(1, 4, 8, 8), lcm_timesteps(4), S, gamma=0.0, generator=g)
    assert torch.equal(g.get_state(), before)                              # gamma 0: no draws
    sample_tcd(model.x0_eps, torch.randn(1, 4, 8, 8), lcm_timesteps(4), S, gamma=0.3, generator=g)
    ref = torch.Generator().manual_seed(0)
    for _ in range(3):                                                     # one draw per non-final step
        torch.randn(1, 4, 8, 8, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())

#----------------------------------------------------------------------------
# PCM: phase edges, the phase-exact grid, deterministic DDIM between edges.

def test_pcm_phase_edges():
    grid = [19 + 20 * i for i in range(50)]
    assert pcm_edges(1) == [0] and pcm_edges(2) == [0, 499] and pcm_edges(4) == [0, 239, 499, 739]
    assert pcm_edges(8) == [0, 119, 239, 359, 499, 619, 739, 859]
    for m in (1, 2, 4, 8):
        starts = pcm_phase_starts(m)
        assert starts[0] == 0 and len(starts) == m
        for i in range(50):                          # the phase of grid index i and its lower edge
            idx = max(s for s in starts if s <= i)
            edge = grid[idx - 1] if idx else 0
            assert edge == pcm_edges(m)[starts.index(idx)] and edge <= max(grid[i] - 20, 0)
    assert pcm_timesteps(4) == [999, 739, 499, 239] != spaced_timesteps(4, "trailing") == [999, 749, 499, 249]
    assert pcm_timesteps(1) == [999] and pcm_timesteps(2) == [999, 499]
    assert set(pcm_timesteps(4)) <= set(pcm_timesteps(8))          # 8 steps stop on every 4-phase edge
    with pytest.raises(ValueError, match="phases"):
        pcm_edges(0)

#----------------------------------------------------------------------------
# Trailing DDIM (Hyper-SD) and trailing Euler (SDXL-Lightning) against diffusers.

@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ddim_trailing_parity_with_diffusers(n, pred):
    sch = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                        prediction_type=pred)
    sch.set_timesteps(n)
    ts = spaced_timesteps(n, "trailing")
    assert ts == sch.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8)
    _check(sample_ddim(GuidedModel(net_fn, pred, S).eps, x, ts, S), _diffusers_loop(sch, x))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_euler_trailing_parity_with_diffusers(n, pred):
    """Euler in sigma-space on x = z / alpha is DDIM on z, except that it ends at sigma = 0. diffusers starts
    trailing grids at x = sigma_max eps (its init_noise_sigma), i.e. z_T = alpha_T sigma_max eps = sigma_T eps."""
    sch = EulerDiscreteScheduler(**SD, timestep_spacing="trailing", prediction_type=pred)
    sch.set_timesteps(n)
    ts = spaced_timesteps(n, "trailing")
    assert ts == sch.timesteps.round().long().tolist()
    z = torch.randn(2, 4, 8, 8)
    x = z * sch.init_noise_sigma                                           # = z_T / alpha_T
    for t in sch.timesteps:
        out = net_fn(sch.scale_model_input(x, t), t, False)               # the UNet sees z = alpha x
        x = sch.step(out, t, x).prev_sample
    z_T = z * S.sigma(ts[0]).float()
    _check(sample_ddim(GuidedModel(net_fn, pred, S).eps, z_T, ts, S, t_final=None), x)

#----------------------------------------------------------------------------
# Through the Pipeline: the tiny SD1.5 checkpoint against diffusers' StableDiffusionPipeline.

@pytest.mark.parametrize("solver,kw,scheduler", [
    ("tcd", dict(eta=0.3), lambda: TCDScheduler(**SD)),
    ("tcd", dict(eta=0.0), lambda: TCDScheduler(**SD)),
    ("ddim", dict(spacing="trailing"),
     lambda: DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")),
    ("euler", dict(spacing="trailing"), lambda: EulerDiscreteScheduler(**SD, timestep_spacing="trailing")),
])
def test_pipeline_few_step_presets_match_diffusers(sd15, pipe, solver, kw, scheduler):  # noqa: F811
    prompts = ["a red circle", "a blue square"]
    x_T = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    ours = pipe(prompts, steps=4, solver=solver, height=H, width=W, latents=x_T, output="latent",
                generator=torch.Generator().manual_seed(7), progress=False, **kw)
    sch = scheduler()
    ref = reference(sd15, sch)
    cond = pipe.encode_prompt(prompts)
    theirs = ref(prompt_embeds=cond.context, num_inference_steps=4, guidance_scale=1.0, height=H, width=W,
                 latents=x_T.clone(), eta=kw.get("eta", 0.0),
                 generator=torch.Generator().manual_seed(7), output_type="latent").images
    close(ours, theirs, 1e-3)


def test_pipeline_pcm_and_tcd_defaults(pipe):  # noqa: F811
    kw = dict(height=H, width=W, output="latent", progress=False, seed=1)
    torch.testing.assert_close(pipe("a", steps=4, solver="pcm", **kw),
                               pipe("a", solver="ddim", timesteps=[999, 739, 499, 239], **kw), rtol=0, atol=0)
    torch.testing.assert_close(pipe("a", steps=4, solver="tcd", **kw),          # eta=None: gamma 0.3
                               pipe("a", steps=4, solver="tcd", eta=0.3, **kw), rtol=0, atol=0)
    assert (pipe("a", steps=4, solver="tcd", eta=0.0, **kw) - pipe("a", steps=4, solver="tcd", **kw)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="eta=0.5 applies to solver=ddim"):
        pipe("a", steps=4, solver="lcm", eta=0.5, **kw)
    with pytest.raises(ValueError, match="grid from the weights' spec"):
        pipe("a", steps=4, solver="tcd", spacing="trailing", **kw)
    with pytest.raises(ValueError, match="spaces its timesteps"):
        pipe("a", steps=4, solver="ddim", spacing="uniform", **kw)


def test_spec_objective_warns_on_the_wrong_sampler(pipe, caplog):  # noqa: F811
    from lcm.consistency import ConsistencySpec
    from models import lora as lora_lib
    view = pipe.replace()
    lora_lib.inject_lora(view.unet, "tcdlora", 2, 2, lora_lib.LCM_LORA_TARGETS)
    try:
        view.adapter_specs["tcdlora"] = ConsistencySpec(objective="tcd")
        with caplog.at_level(logging.WARNING, logger="lcm.pipeline"):
            view("a", steps=2, solver="lcm", height=H, width=W, output="latent", progress=False)
        assert "distilled with TCD; sample it with solver=tcd" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lcm.pipeline"):
            view("a", steps=2, solver="tcd", height=H, width=W, output="latent", progress=False)
        assert "distilled with" not in caplog.text
    finally:
        lora_lib.remove_lora(view.unet, "tcdlora")
