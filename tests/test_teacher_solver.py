"""The teacher solver Psi of LCD (objective.teacher_solver): one guided solver step from t_{n+k} to t_n,
checked on the Gaussian-data PF-ODE, where the exact step is known (solvers/gaussian.py)."""
import pytest
import torch

from lcm.objectives.teacher import teacher_estimate
from lcm.sampling.samplers import TEACHER_SOLVERS
from models.text import Conditioning
from solvers.gaussian import GaussianData
from solvers.schedule import Schedule

S = Schedule.make()
DATA = GaussianData.random(16, S, seed=3)
B = 4


def gauss_net(data: GaussianData):
    """A teacher net(x, t, cond, w) whose eps is the exact Gaussian one, for every sample's own t."""
    def net(x, t, cond, w):
        t = t.reshape(-1, 1) if t.ndim else t
        return S.sigma(t) * (x - S.alpha(t) * data.mu) / (S.alpha(t) ** 2 * data.s0**2 + S.sigma(t) ** 2)
    return net


def conds():
    return Conditioning(torch.zeros(B, 1, 1)), Conditioning(torch.zeros(B, 1, 1))


def one_step(solver: str, x, t: int, s: int, net=None, w=3.0):
    est = teacher_estimate(net or gauss_net(DATA), S, "epsilon", solver)
    c, u = conds()
    tt, ss = torch.full((B,), t), torch.full((B,), s)
    return est(x, tt, ss, None, None, c, u, torch.full((B,), w, dtype=torch.float64))


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpmsolver", 2), ("dpmsolver++", 2)])
def test_local_error_falls_with_the_order(solver, order):
    """Guidance with cond == uncond leaves the Gaussian eps unchanged, so the exact step is the flow;
    halving the step divides the one-step error by 2^(order + 1)."""
    x = torch.randn(B, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = 600
    errs = [(one_step(solver, x, t, t - d) - DATA.flow(x, t, t - d)).abs().max().item() for d in (160, 80, 40)]
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    p = 2 ** (order + 1)
    assert errs[-1] > 1e-12, errs
    assert all(0.7 * p < r < 1.4 * p for r in ratios), (solver, errs, ratios)


def test_dpm_solver_2_is_its_midpoint_form_with_cfg_inside():
    """DPM-Solver-2 (r1 = 1/2) == z_s = (a_s/a_t) z - sigma_s (e^h - 1) eps~(z_u, u), eps~ the guided
    eps at every evaluation (midpoint included), with cond != uncond so the guidance matters."""
    other = GaussianData.random(16, S, seed=4)
    cond_net, uncond_net = gauss_net(DATA), gauss_net(other)

    def net(x, t, cond, w):                               # [cond; uncond] halves as the adapter batches them
        n = x.shape[0] // 2 if x.shape[0] == 2 * B else x.shape[0]
        if x.shape[0] == 2 * B:
            return torch.cat([cond_net(x[:n], t[:n], None, w), uncond_net(x[n:], t[n:], None, w)])
        return cond_net(x, t, cond, w)

    x = torch.randn(B, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w, t, s = 2.5, 700, 400
    got = one_step("dpmsolver", x, t, s, net, w)

    def guided_eps(z, tau):
        tau = torch.as_tensor(tau, dtype=torch.float64)
        return (1 + w) * cond_net(z, tau, None, None) - w * uncond_net(z, tau, None, None)
    a, sg, lam = S.alpha, S.sigma, S.lambda_
    h = lam(s) - lam(t)
    u = S.inverse_lambda(lam(t) + h / 2)
    z_u = a(u) / a(t) * x - sg(u) * torch.expm1(h / 2) * guided_eps(x, t)
    want = a(s) / a(t) * x - sg(s) * torch.expm1(h) * guided_eps(z_u, u)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unknown_solver_names_the_knob():
    with pytest.raises(ValueError, match="objective.teacher_solver must be one of ddim, dpmsolver, dpmsolver"):
        teacher_estimate(gauss_net(DATA), S, "epsilon", "heun")
    assert set(TEACHER_SOLVERS) == {"ddim", "dpmsolver", "dpmsolver++"}
