"""TrigFlow on SD's VP schedule (lcm/objectives/trigflow.py; docs/method.md Sec. 15): tau <-> t_SD round
trips, F <-> eps / v / x0 against the definition of F, CFG on F, the Gaussian exactness of the tangent, the
truncated time proposal and the loss gradient on a linear toy model. All float64 on the CPU."""
import math

import pytest
import torch

from lcm.objectives import trigflow as tf
from lcm.objectives.jvp import jvp
from solvers.schedule import Schedule
from solvers.wrappers import cfg, to_x0

S = Schedule.make()
PREDS = ("epsilon", "v_prediction", "sample")
col = lambda v: v.reshape(-1, 1, 1, 1)
randn = lambda g, *shape: torch.randn(shape, generator=g, dtype=torch.float64)


def taus(n, seed=0, sigma_d=1.0):
    lo, hi = tf.tau_range(S, sigma_d)
    return lo + (hi - lo) * torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

#----------------------------------------------------------------------------
# Time.

def test_sd_tau_range_and_dmd2_grid_values():
    lo, hi = tf.tau_range(S)                                   # docs/method.md Sec. 15, computed independently
    assert (round(lo, 5), round(hi, 5)) == (0.02916, 1.50248)
    got = tf.tau_of_t(torch.tensor([999, 749, 499, 249]), S)
    torch.testing.assert_close(got, torch.tensor([1.5025, 1.3305, 1.0158, 0.6062], dtype=torch.float64),
                               atol=5e-5, rtol=0)


@pytest.mark.parametrize("sigma_d", [1.0, 0.5])
def test_tau_t_round_trips_exact_at_integers(sigma_d):
    t = torch.arange(1000)
    tau = tf.tau_of_t(t, S, sigma_d)
    if sigma_d == 1:                                           # tau = arccos sqrt(abar[t])
        torch.testing.assert_close(tau, torch.arccos(S.abar.sqrt()), atol=1e-14, rtol=0)
    torch.testing.assert_close(tf.t_of_tau(tau, S, sigma_d), t.double(), atol=1e-9, rtol=0)
    tau = taus(2000, sigma_d=sigma_d)
    t_sd = tf.t_of_tau(tau, S, sigma_d)
    torch.testing.assert_close(tf.tau_of_t(t_sd, S, sigma_d), tau, atol=1e-12, rtol=0)
    assert (t_sd.frac() != 0).all() and (t_sd.diff()[tau.diff() > 0] > 0).all()   # continuous, monotone
    # SNR matching: alpha_t / sigma_t = cot tau / sigma_d, alpha_t = k cos tau, sigma_t = k sigma_d sin tau
    k = tf.vp_scale(tau, sigma_d)
    torch.testing.assert_close(S.alpha(t_sd), k * torch.cos(tau), atol=1e-12, rtol=0)
    torch.testing.assert_close(S.sigma(t_sd), k * sigma_d * torch.sin(tau), atol=1e-12, rtol=0)


def test_dt_dtau_is_the_derivative_of_the_continuous_t():
    tau = tf.tau_of_t(torch.tensor([0.5, 250.5, 500.5, 750.5, 998.5], dtype=torch.float64), S)
    _, d = jvp(lambda u: tf.t_of_tau(u, S), (tau,), (torch.ones_like(tau),))
    h = 1e-7
    fd = (tf.t_of_tau(tau + h, S) - tf.t_of_tau(tau - h, S)) / (2 * h)
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=0)
    torch.testing.assert_close(d, torch.tensor([84., 572., 670., 1020., 2414.], dtype=torch.float64), rtol=0.01, atol=0)

#----------------------------------------------------------------------------
# F <-> raw outputs, against the definition sigma_d F = v_tau = cos tau z - sin tau x0 on x_tau = cos x0 + sin z.

def exact_raw(x0, eps, tau, sigma_d, pred):
    """The VP network's exact outputs at x_VP = k x_tau, t_SD(tau): eps, v = alpha eps - sigma x0, or x0."""
    k = tf.vp_scale(tau, sigma_d)
    a, s = col(k * torch.cos(tau)), col(k * sigma_d * torch.sin(tau))
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[pred]


@pytest.mark.parametrize("sigma_d", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("pred", PREDS)
def test_F_of_the_exact_raw_output_is_the_trigflow_velocity(pred, sigma_d):
    g = torch.Generator().manual_seed(1)
    x0, eps = randn(g, 6, 4, 3, 3), randn(g, 6, 4, 3, 3)
    tau = taus(6, 2, sigma_d)
    c, s = col(torch.cos(tau)), col(torch.sin(tau))
    z = sigma_d * eps                                          # z ~ N(0, sigma_d^2 I)
    x = c * x0 + s * z
    raw = exact_raw(x0, eps, tau, sigma_d, pred)
    F = tf.F_from_raw(raw, x, tau, pred, sigma_d)
    torch.testing.assert_close(sigma_d * F, c * z - s * x0, atol=1e-12, rtol=0)            # sigma_d F = v_tau
    torch.testing.assert_close(tf.consistency_fn(F, x, tau, sigma_d), x0, atol=1e-12, rtol=0)   # f = x0
    torch.testing.assert_close(tf.raw_from_F(F, x, tau, pred, sigma_d), raw, atol=1e-12, rtol=0)
    # f = the solvers' x0_hat of any raw output at (k x, t_SD): one conversion, two routes
    other = randn(g, *x.shape)
    x_vp, t = col(tf.vp_scale(tau, sigma_d)) * x, tf.t_of_tau(tau, S, sigma_d)
    torch.testing.assert_close(tf.consistency_fn(tf.F_from_raw(other, x, tau, pred, sigma_d), x, tau, sigma_d),
                               to_x0(other, x_vp, t, S, pred), atol=1e-10, rtol=0)


def test_v_unet_output_is_F_at_integer_t():
    g = torch.Generator().manual_seed(3)
    v, x = randn(g, 4, 4, 2, 2), randn(g, 4, 4, 2, 2)
    tau = tf.tau_of_t(torch.tensor([0, 249, 749, 999]), S)
    assert torch.equal(tf.F_from_raw(v, x, tau, "v_prediction"), v)


@pytest.mark.parametrize("pred", PREDS)
def test_cfg_on_F_equals_cfg_on_the_raw_output_then_converted(pred):
    g = torch.Generator().manual_seed(4)
    rc, ru, x = (randn(g, 5, 4, 2, 2) for _ in range(3))
    tau, s = taus(5, 5, 0.5), torch.tensor([1.0, 2.0, 5.0, 7.5, 0.0], dtype=torch.float64)
    F = lambda r: tf.F_from_raw(r, x, tau, pred, 0.5)
    torch.testing.assert_close(tf.teacher_velocity(F(rc), F(ru), s, 0.5), 0.5 * F(cfg(rc, ru, s)), atol=1e-12, rtol=0)

#----------------------------------------------------------------------------
# Gaussian exactness (docs/method.md Sec. 15): x0 ~ N(mu, c^2 I); the ODE's velocity and consistency map are
# closed-form, and the tangent of the exact map must vanish (any sign or sigma_d slip breaks it).

MU_C, MU_U, C0 = 0.7, -0.3, 0.6


def gaussian(x, tau, mu, sigma_d):
    """(dx/dtau, f*) of x0 ~ N(mu, C0^2): dx/dtau = (cos x - E[x0|x]) / sin, E[x0|x] = mu + C0^2 cos/s^2 (x - cos mu),
    s^2 = C0^2 cos^2 + sigma_d^2 sin^2; f* = mu + C0 (x - cos mu) / s (the affine map of the marginals)."""
    c, s = col(torch.cos(tau)), col(torch.sin(tau))
    s2 = C0**2 * c**2 + sigma_d**2 * s**2
    x0_hat = mu + C0**2 * c / s2 * (x - c * mu)
    return (c * x - x0_hat) / s, mu + C0 * (x - c * mu) / s2.sqrt()


def gaussian_net(mu, pred):
    """The exact VP denoiser of N(mu, C0^2) as a network net(x_VP, t) -> eps / v / x0 at a float t."""
    def net(x_vp, t):
        a, s = col(S.alpha(t)), col(S.sigma(t))
        x0 = mu + C0**2 * a / (C0**2 * a**2 + s**2) * (x_vp - a * mu)
        eps = (x_vp - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[pred]
    return net


@pytest.mark.parametrize("sigma_d", [1.0, 0.5])
def test_tangent_of_the_exact_consistency_map_is_zero(sigma_d):
    g = torch.Generator().manual_seed(6)
    tau = taus(8, 7, sigma_d)
    x = randn(g, 8, 4, 3, 3)
    dxdt, _ = gaussian(x, tau, MU_C, sigma_d)
    def F_star(x, tau):                                          # f* = cos x - sigma_d sin F*
        return (col(torch.cos(tau)) * x - gaussian(x, tau, MU_C, sigma_d)[1]) / (sigma_d * col(torch.sin(tau)))

    cs = torch.cos(tau) * torch.sin(tau)
    F_minus, dF = jvp(F_star, (x, tau), (col(cs) * dxdt, cs))
    gt = tf.tangent(F_minus, dF, x, tau, dxdt, r=1.0, sigma_d=sigma_d)
    assert gt.abs().max() < 1e-13 * (1 + x.abs().max())
    assert tf.tangent(F_minus, dF, x, tau, dxdt, r=0.5, sigma_d=sigma_d).abs().max() > 1e-3   # the test can fail


@pytest.mark.parametrize("sigma_d", [1.0, 0.5])
@pytest.mark.parametrize("pred", PREDS)
def test_guided_teacher_velocity_is_the_guided_pf_ode(pred, sigma_d):
    """The teacher chain (k x, float t_SD(tau), the net's output -> F, CFG) gives the PF-ODE velocity of the
    guided Gaussian model: (1 - s) v(mu_u) + s v(mu_c) in closed form."""
    g = torch.Generator().manual_seed(8)
    tau, s = taus(6, 9, sigma_d), 3.0
    x = randn(g, 6, 4, 2, 2)
    x_vp, t = col(tf.vp_scale(tau, sigma_d)) * x, tf.t_of_tau(tau, S, sigma_d)
    F = lambda mu: tf.F_from_raw(gaussian_net(mu, pred)(x_vp, t), x, tau, pred, sigma_d)
    want = (1 - s) * gaussian(x, tau, MU_U, sigma_d)[0] + s * gaussian(x, tau, MU_C, sigma_d)[0]
    torch.testing.assert_close(tf.teacher_velocity(F(MU_C), F(MU_U), s, sigma_d), want, atol=1e-10, rtol=1e-10)

#----------------------------------------------------------------------------
# Normalisation, time proposal, loss gradient.

def test_rms_and_l2_normalisation():
    g = randn(torch.Generator().manual_seed(12), 3, 4, 8, 8) * col(torch.tensor([1e-4, 1.0, 1e3], dtype=torch.float64))
    gh, n = tf.normalize(g, 0.1, "rms")
    torch.testing.assert_close(n, g.flatten(1).norm(dim=1) / 16)                   # sqrt(D) = 16
    torch.testing.assert_close(gh, g / col(n + 0.1))
    assert gh[2].pow(2).mean().sqrt() == pytest.approx(1, abs=1e-3)          # large g: unit rms
    torch.testing.assert_close(gh[0], g[0] / 0.1, rtol=1e-2, atol=0)           # small g: c dominates
    gh2, n2 = tf.normalize(g, 0.1, "l2")
    torch.testing.assert_close(n2, g.flatten(1).norm(dim=1))
    with pytest.raises(ValueError, match="'rms' or 'l2'"):
        tf.normalize(g, 0.1, "linf")


def test_time_proposal_is_the_truncated_lognormal_and_per_sample():
    lo, hi = tf.tau_range(S)
    P_mean, P_std = -1.0, 1.6
    tau = tf.sample_tau(200_000, torch.Generator().manual_seed(0), P_mean, P_std, lo, hi)
    assert tau.dtype == torch.float64 and tau.min() >= lo and tau.max() <= hi
    n = torch.log(torch.tan(tau))
    a, b = [(math.log(math.tan(v)) - P_mean) / P_std for v in (lo, hi)]
    phi = lambda u: math.exp(-u * u / 2) / math.sqrt(2 * math.pi)
    Z = 0.5 * (math.erf(b / 2**0.5) - math.erf(a / 2**0.5))
    mean = P_mean + P_std * (phi(a) - phi(b)) / Z                                   # truncated-normal mean
    assert float(n.mean()) == pytest.approx(mean, abs=0.01) and mean > P_mean      # truncation moved it
    one = [torch.Generator().manual_seed(s) for s in (5, 6)]
    pair = tf.sample_tau(2, [torch.Generator().manual_seed(s) for s in (5, 6)], P_mean, P_std, lo, hi)
    assert torch.equal(torch.cat([tf.sample_tau(1, [g], P_mean, P_std, lo, hi) for g in one]), pair)


@pytest.mark.parametrize("prior, with_logvar", [(False, False), (True, True)])
def test_loss_gradient_is_minus_2w_over_D_el_g_hat_dF(prior, with_logvar):
    """Linear toy F = theta * x: d loss / d theta = -2 w / (D e^l) g_hat . x at theta = theta- (docs/method.md Sec. 15)."""
    g = torch.Generator().manual_seed(10)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    x, dxdt = randn(g, 3, 4, 2, 2), randn(g, 3, 4, 2, 2)
    tau = taus(3, 11)
    F_fn = lambda x, tau: theta * x * col(torch.cos(tau))             # depends on tau: the JVP's time tangent counts
    logvar = torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64) if with_logvar else None
    loss, diag = tf.scm_loss(F_fn, jvp, x, tau, dxdt, r=0.7, prior_weight=prior, logvar=logvar)
    grads = [torch.autograd.grad(loss[i], theta, retain_graph=True)[0] for i in range(3)]
    with torch.no_grad():
        cs = torch.cos(tau) * torch.sin(tau)
        F_minus, dF = jvp(F_fn, (x, tau), (col(cs) * dxdt, cs))
        g_hat, _ = tf.normalize(tf.tangent(F_minus, dF, x, tau, dxdt, 0.7), 0.1, "rms")
        w = 1 / torch.tan(tau) if prior else torch.ones(3, dtype=torch.float64)
        el = torch.exp(logvar) if with_logvar else torch.ones(3, dtype=torch.float64)
        want = -2 * w / (16 * el) * (g_hat * x * col(torch.cos(tau))).flatten(1).sum(1)
    torch.testing.assert_close(torch.stack(grads), want)
    torch.testing.assert_close(diag["g_norm"], tf.normalize(tf.tangent(F_minus, dF, x, tau, dxdt, 0.7))[1])
