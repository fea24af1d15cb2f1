"""Schedule math and timestep selection; diffusers' schedulers are the oracles for the spacings."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from solvers.schedule import Schedule, lcm_grid, lcm_timesteps, off_grid, on_lcm_grid, spaced_timesteps

S = Schedule.make()
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
NS = (1, 2, 3, 4, 7, 25, 50, 1000)


def test_sd_abar_endpoints():
    assert S.abar.dtype == torch.float64 and S.abar.shape == (1000,)
    assert abs(S.abar[0].item() - 0.99915) < 1e-12               # abar[0] = 1 - beta_0
    assert abs(S.abar[999].item() - 0.00466) < 1e-5
    assert torch.all(S.abar[1:] < S.abar[:-1])


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_kinds_match_diffusers(kind):
    ref = DDIMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    ours = Schedule.make(kind).abar
    torch.testing.assert_close(ours, ref, rtol=2e-5, atol=1e-7)  # diffusers cumprods in float32


def test_alpha_sigma_lambda_continuous():
    t = torch.cat([torch.arange(1000.0), torch.rand(500, dtype=torch.float64) * 999])
    a, s = S.alpha(t), S.sigma(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), rtol=0, atol=1e-14)
    torch.testing.assert_close(S.lambda_(t), (a / s).log(), rtol=0, atol=1e-12)
    ti = torch.arange(1000)                                      # integer t reads the table exactly
    torch.testing.assert_close(S.alpha(ti), S.abar.sqrt(), rtol=1e-15, atol=0)
    torch.testing.assert_close(S.alpha(ti.double()), S.abar.sqrt(), rtol=1e-15, atol=0)
    lam = S.lambda_(torch.linspace(0, 999, 4001, dtype=torch.float64))
    assert torch.all(lam[1:] < lam[:-1])                         # lambda decreases with t
    assert float(S.lambda_(0)) > 3.5 and float(S.lambda_(999)) < -2.6


def test_inverse_lambda_round_trips():
    t = torch.rand(2000, dtype=torch.float64) * 999
    torch.testing.assert_close(S.inverse_lambda(S.lambda_(t)), t, rtol=0, atol=1e-9)
    lam = torch.linspace(float(S.lambda_(999)), float(S.lambda_(0)), 777, dtype=torch.float64)
    torch.testing.assert_close(S.lambda_(S.inverse_lambda(lam)), lam, rtol=0, atol=1e-12)
    assert abs(float(S.inverse_lambda(S.lambda_(420))) - 420) < 1e-9    # scalar in, scalar out


def test_integer_timestep_out_of_range_raises():
    with pytest.raises(ValueError, match="0, 999"):
        S.alpha(-1)
    with pytest.raises(ValueError):
        S.alpha(torch.tensor([3, 1000]))


def test_add_noise_broadcasts_per_sample_t():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    z = S.add_noise(x0, eps, t)
    for i in range(3):
        ref = S.abar[t[i]].sqrt().float() * x0[i] + (1 - S.abar[t[i]]).sqrt().float() * eps[i]
        torch.testing.assert_close(z[i], ref)

#----------------------------------------------------------------------------
# Spacings: equal to diffusers where diffusers' list is valid; a clear error where it is not.

def _valid(ts):
    return ts[0] < 1000 and ts[-1] >= 0 and all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", NS)
def test_ddim_spacings_match_diffusers(n, spacing, offset):
    sch = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    sch.set_timesteps(n)
    ref = sch.timesteps.tolist()
    if _valid(ref):
        assert spaced_timesteps(n, spacing, offset) == ref
    else:                                                        # e.g. leading+offset 1 at N=1000 hits t=1000
        with pytest.raises(ValueError, match="steps"):
            spaced_timesteps(n, spacing, offset)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("n", NS)
def test_dpm_spacings_match_diffusers(n, spacing, offset):
    sch = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    sch.set_timesteps(n)
    ref = sch.timesteps.tolist()
    if _valid(ref):
        assert spaced_timesteps(n, spacing, offset, convention="dpm") == ref
    else:                                                        # duplicates at N=1000 (leading, linspace)
        with pytest.raises(ValueError):
            spaced_timesteps(n, spacing, offset, convention="dpm")


def test_bad_spacing_args_raise():
    for bad in [dict(n=0), dict(n=1001), dict(n=4, spacing="karras"), dict(n=4, convention="euler")]:
        with pytest.raises(ValueError):
            spaced_timesteps(**bad)

#----------------------------------------------------------------------------
# LCM timesteps (docs/method.md Sec. 7 golden lists; diffusers LCMScheduler as the oracle).

GOLDEN = {1: [999], 2: [999, 499], 3: [999, 679, 339], 4: [999, 759, 499, 259],
          8: [999, 879, 759, 639, 499, 379, 259, 139]}


def _lcm_ref(n, strength=1.0):
    sch = LCMScheduler(**SD, original_inference_steps=50)
    sch.set_timesteps(n, strength=strength)
    return sch.timesteps.tolist()


def test_lcm_grid():
    assert lcm_grid() == list(range(19, 1000, 20)) and len(lcm_grid()) == 50


@pytest.mark.parametrize("n", sorted(GOLDEN))
def test_lcm_golden_lists(n):
    assert lcm_timesteps(n) == GOLDEN[n] == _lcm_ref(n)


def test_lcm_26_steps_cover_the_grid():
    ts = lcm_timesteps(26)
    assert ts == _lcm_ref(26) and len(ts) == 26 and len(set(ts)) == 26
    assert ts[0] == 999 and ts[-1] == 39                         # does not stop at 499 (diffusers#5815)
    assert not off_grid(ts)


@pytest.mark.parametrize("strength", [1.0, 0.8, 0.6, 0.3, 0.05])
def test_lcm_matches_diffusers_all_steps_and_strengths(strength):
    m = int(50 * strength)
    for n in range(1, m + 1):
        assert lcm_timesteps(n, strength=strength) == _lcm_ref(n, strength), (n, strength)


def test_lcm_img2img_truncation():
    assert lcm_timesteps(4, strength=0.6) == [599, 459, 299, 159]
    assert lcm_timesteps(1, strength=0.05) == [39]               # strength > 0 always runs >= 1 step
    with pytest.raises(ValueError, match="steps <= 2"):
        lcm_timesteps(4, strength=0.05)
    with pytest.raises(ValueError, match="steps <= 0"):
        lcm_timesteps(1, strength=0.01)                          # int(50 * 0.01) = 0 grid points
    for s in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            lcm_timesteps(1, strength=s)


def test_lcm_too_many_steps_names_original_inference_steps():
    with pytest.raises(ValueError, match="original_inference_steps"):
        lcm_timesteps(51)
    assert lcm_timesteps(50) == lcm_grid()[::-1]


def test_off_grid():
    assert off_grid([999, 759, 499, 259]) == []
    assert off_grid([800, 499, 250]) == [800, 250]
    assert off_grid(np.array([999, 500])) == [500]
    assert on_lcm_grid([999, 499]) and not on_lcm_grid([800]) and on_lcm_grid([999, 959], original_steps=25)
