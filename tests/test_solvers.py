"""PF-ODE solvers: convergence order on Gaussian data (exact solution known), exactness on a point
mass, and parity with diffusers' DDIM / DPM-Solver++(2M) / LCM schedulers on a fixed toy network."""
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from lcm.consistency import ConsistencySpec
from solvers.ddim import ddim_from_x0_eps, ddim_step, sample_ddim
from solvers.dpm_solver import sample_dpm_solver, sample_dpmpp_2m
from solvers.lcm import sample_lcm
from solvers.gaussian import GaussianData
from solvers.noise import randn
from solvers.schedule import Schedule, lcm_timesteps, spaced_timesteps
from solvers.wrappers import eps_to_x0, make_eps_fn, make_x0_fn

S = Schedule.make()
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

#----------------------------------------------------------------------------
# Gaussian data x0 ~ N(mu, s0^2) (solvers/gaussian.py): the exact PF-ODE flow is known.

GAUSS = GaussianData.random(64, S)
MU, S0, gauss_eps, gauss_flow = GAUSS.mu, GAUSS.s0, GAUSS.eps, GAUSS.flow


def test_gaussian_eps_is_the_posterior_mean_form():
    """eps_hat = (x - alpha E[x0 | x_t]) / sigma with the Gaussian posterior mean: the oracle itself."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (0, 10, 500, 999):
        a, s = S.alpha(t), S.sigma(t)
        x0 = MU + a * S0**2 / (a**2 * S0**2 + s**2) * (x - a * MU)
        torch.testing.assert_close(gauss_eps(x, t), (x - a * x0) / s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gauss_flow(gauss_flow(x, 999, 300), 300, 999), x, rtol=1e-12, atol=1e-12)


def _lambda_grid(n, t0=999, t1=3):
    lam = torch.linspace(float(S.lambda_(t0)), float(S.lambda_(t1)), n + 1, dtype=torch.float64)
    ts = list(S.inverse_lambda(lam))                             # continuous float64 times
    return ts[:-1], ts[-1]


def _error(solve, n):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts, t_end = _lambda_grid(n)
    return (solve(x, ts, t_end) - gauss_flow(x, ts[0], t_end)).abs().max().item()


SOLVERS = {   # name: (solve(x, ts, t_end), step counts, expected error ratio on doubling)
    "ddim": (lambda x, ts, te: sample_ddim(gauss_eps, x, ts, S, t_final=te), (8, 16, 32), 2),
    "dpm1": (lambda x, ts, te: sample_dpm_solver(gauss_eps, x, ts, S, order=1, t_final=te), (10, 20, 40), 2),
    "dpm2": (lambda x, ts, te: sample_dpm_solver(gauss_eps, x, ts, S, order=2, t_final=te), (8, 16, 32), 4),
    "dpm3": (lambda x, ts, te: sample_dpm_solver(gauss_eps, x, ts, S, order=3, t_final=te), (16, 32, 64), 8),
    "dpmpp2s": (lambda x, ts, te: sample_dpm_solver(gauss_eps, x, ts, S, 2, "dpmsolver++", te), (8, 16, 32), 4),
    "dpmpp2m": (lambda x, ts, te: sample_dpmpp_2m(gauss_eps, x, ts, S, t_final=te, lower_order_final=False),
                (16, 32, 64), 4),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_convergence_order_on_gaussian_data(name):
    solve, ns, p = SOLVERS[name]
    errs = [_error(solve, n) for n in ns]
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert errs[0] > 1e-9, errs                                  # above float64 noise, so ratios mean something
    for r in ratios:
        assert 0.8 * p < r < 1.25 * p, (name, errs, ratios)


@pytest.mark.parametrize("n", [1, 2, 4, 25])
def test_ddim_and_dpmpp_exact_on_a_point_mass(n):
    x_star = torch.randn(2, 4, 8, 8, dtype=torch.float64)        # one-point data: x0_hat = x_star exactly
    point_eps = lambda x, t: (x - S.alpha(t) * x_star) / S.sigma(t)
    x_T = torch.randn_like(x_star)
    ts = spaced_timesteps(n, "leading", 1)
    eps0 = (x_T - S.alpha(ts[0]) * x_star) / S.sigma(ts[0])     # the trajectory's noise
    torch.testing.assert_close(sample_ddim(point_eps, x_T, ts, S), S.alpha(0) * x_star + S.sigma(0) * eps0)
    torch.testing.assert_close(sample_ddim(point_eps, x_T, ts, S, t_final=None), x_star)
    torch.testing.assert_close(sample_dpmpp_2m(point_eps, x_T, ts, S), x_star)


def test_ddim_forms_agree():
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t, tp = torch.tensor(759), torch.tensor(499)
    out = ddim_step(x, eps, t, tp, S)
    torch.testing.assert_close(out, ddim_from_x0_eps(eps_to_x0(eps, x, t, S), eps, tp, S))
    a_t, s_t, a_p, s_p = (float(f(v)) for v in (t, tp) for f in (S.alpha, S.sigma))
    h = float(S.lambda_(tp) - S.lambda_(t))                      # docs/method.md Sec. 8, noise form
    torch.testing.assert_close(out, (a_p / a_t) * x - s_p * torch.expm1(torch.tensor(h)).item() * eps)
    tp_b = torch.tensor([499, 0, 259])                           # per-sample t_prev (trainer)
    ref = torch.stack([ddim_from_x0_eps(x[i], eps[i], tp_b[i], S) for i in range(3)])
    torch.testing.assert_close(ddim_from_x0_eps(x, eps, tp_b, S), ref)

#----------------------------------------------------------------------------
# Parity with diffusers on a fixed toy network (a random 1x1 conv with t-dependent factors).

W = torch.randn(4, 4, generator=torch.Generator().manual_seed(2)) * 0.4
B = torch.randn(4, generator=torch.Generator().manual_seed(3))


def toy_net(x, t):
    tf = float(t) / 1000
    return torch.einsum("oc,bchw->bohw", W * (1 + tf), x) + B[:, None, None] * torch.cos(torch.tensor(3 * tf))


def net_fn(x, t, with_uncond):                                   # the guided contract of solvers.wrappers
    out = toy_net(x, t)
    return torch.cat([out[: len(x) // 2], 0.5 * out[len(x) // 2:]]) if with_uncond else out


def _check(ours, ref):
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err
    return err


def _diffusers_loop(sch, x, gen=None, s=1.0):
    for t in sch.timesteps:
        out = net_fn(x, t, False) if s == 1.0 else None
        if s != 1.0:
            c, u = net_fn(torch.cat([x, x]), t, True).chunk(2)
            out = u + s * (c - u)
        kw = {"generator": gen} if gen is not None else {}
        x = sch.step(out, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 25])
def test_ddim_parity_with_diffusers(n, pred):
    sch = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        timestep_spacing="leading", prediction_type=pred)
    sch.set_timesteps(n)
    x = torch.randn(2, 4, 8, 8)
    ts = spaced_timesteps(n, "leading", 1)
    assert ts == sch.timesteps.tolist()
    s = 1.0 if n != 4 else 3.0                                   # one guided case through the 2B pass
    _check(sample_ddim(make_eps_fn(net_fn, pred, S, s), x, ts, S), _diffusers_loop(sch, x, s=s))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 20])
@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 1)])
def test_dpmpp_2m_parity_with_diffusers(n, pred, spacing, offset):
    sch = DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                      final_sigmas_type="zero", prediction_type=pred,
                                      timestep_spacing=spacing, steps_offset=offset)
    sch.set_timesteps(n)
    ts = spaced_timesteps(n, spacing, offset, convention="dpm")
    assert ts == sch.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8)
    _check(sample_dpmpp_2m(make_eps_fn(net_fn, pred, S), x, ts, S), _diffusers_loop(sch, x))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_parity_with_diffusers(n, pred):
    sch = LCMScheduler(**SD, original_inference_steps=50, timestep_scaling=10.0, prediction_type=pred)
    sch.set_timesteps(n)
    ts = lcm_timesteps(n)
    assert ts == sch.timesteps.tolist()
    z = randn((2, 4, 8, 8), torch.Generator().manual_seed(5))
    ref = _diffusers_loop(sch, z, gen=torch.Generator().manual_seed(7))
    denoise = ConsistencySpec().consistency_fn(make_x0_fn(net_fn, pred, S))
    _check(sample_lcm(denoise, z, ts, S, generator=torch.Generator().manual_seed(7)), ref)

#----------------------------------------------------------------------------
# Contracts: what model_fn receives, and CFG's pass count.

def test_model_fn_receives_0dim_cpu_times():
    seen = []
    def model_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)
    sample_dpm_solver(model_fn, torch.randn(1, 4, 2, 2), [999, 499], S, order=2)
    assert all(t.ndim == 0 and t.device.type == "cpu" for t in seen) and len(seen) == 4
    assert [t.dtype for t in seen] == [torch.int64, torch.float64, torch.int64, torch.float64]
    assert 499 < float(seen[1]) < 999 and 0 < float(seen[3]) < 499


@pytest.mark.parametrize("s", [1.0, 1.5, 0.0])
def test_guidance_pass_count(s):
    calls = []
    def counting_net(x, t, with_uncond):
        calls.append((x.shape[0], with_uncond))
        return net_fn(x, t, with_uncond)
    x = torch.randn(3, 4, 2, 2)
    eps = make_eps_fn(counting_net, "epsilon", S, s)(x, torch.tensor(500))
    assert calls == ([(3, False)] if s == 1.0 else [(6, True)])
    c, u = toy_net(x, 500), 0.5 * toy_net(x, 500)
    torch.testing.assert_close(eps, u + s * (c - u))


def test_ddim_eta_draws_noise_from_the_generator():
    sch = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    ref = x
    g = torch.Generator().manual_seed(9)
    for t in sch.timesteps:
        ref = sch.step(toy_net(ref, t), t, ref, eta=1.0, generator=g).prev_sample
    eps_fn = lambda x, t: toy_net(x, t)
    ours = sample_ddim(eps_fn, x, sch.timesteps.tolist(), S, eta=1.0, generator=torch.Generator().manual_seed(9))
    _check(ours, ref)
