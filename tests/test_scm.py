"""objective=scm (lcm/objectives/scm.py): one training step against a hand-written version of FastGen's sCD
step on a tiny LoRA UNet (eps and v teachers, sigma_d 1 and 0.5, the weightings), the UNet's time tangent
(continuous t_SD, never snapped), the knobs, and two CLI steps whose export samples with solver=scm exactly as
the TrigFlow sampler written out by hand (= LCM's sampler in DDIM form at t_SD(tau_i), docs/method.md Sec. 15)."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from lcm.consistency import ConsistencySpec
from lcm.denoiser import unet_net
from lcm.objectives.jvp import jvp
from lcm.objectives.scm import SCM
from lcm.objectives.trigflow import tau_of_t
from lcm.pipeline import Pipeline
from models.lora import adapters_disabled
from models.text import Conditioning
from models.unet import UNetModel
from solvers.schedule import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = Schedule.make()
ABAR = S.abar
TINY = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), transformer_depth=[1, 1],
            transformer_depth_middle=1, num_heads=2, context_dim=16, use_linear_in_transformer=True)
col = lambda v: v.reshape(-1, 1, 1, 1)


def objective(pred="epsilon", **kw):
    """SCM set up on a randomised tiny UNet (a stand-in pipeline), its LoRA perturbed off zero."""
    g = torch.Generator().manual_seed(1)
    unet = UNetModel(**TINY)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    obj = SCM(lora=dict(name="scm", rank=4, alpha=4), **kw)
    obj.setup(SimpleNamespace(unet=unet.eval(), schedule=S, prediction_type=pred, adapter_specs={}))
    with torch.no_grad():
        for _, p in obj.trainables:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return obj


def inputs(B=2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(B, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g).expand(B, -1, -1)
    return z, Conditioning(cond), Conditioning(uncond)

#----------------------------------------------------------------------------
# FastGen's sCD step (sCM.py L150-285, TrigFlowPrecond L21-80), written out: its network sees x / sigma_d.

def reference_loss(obj, z, cond, uncond, seeds, r):
    unet, pred, sd, s, c = obj.student, obj.pipe.prediction_type, obj.sigma_d, obj.s, obj.c
    la = 0.5 * ABAR.log()                                              # log alpha at the integer knots
    tau_at = lambda i: math.atan(math.sqrt(1 - ABAR[i]) / (sd * math.sqrt(ABAR[i])))
    # tau: log(sigma_d tan tau) ~ N(P_mean, P_std^2) truncated to [tau(0), tau(999)] by the inverse CDF; then z
    u, noise = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        u.append(torch.rand(1, generator=g, dtype=torch.float64))
        noise.append(torch.randn((1,) + z.shape[1:], generator=g))
    u, noise = torch.cat(u), torch.cat(noise)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    cdf = lambda t: torch.special.ndtr(f64((math.log(sd * math.tan(t)) - obj.P_mean) / obj.P_std))
    lo, hi = cdf(tau_at(0)), cdf(tau_at(999))
    tau = torch.atan(torch.exp(obj.P_mean + obj.P_std * torch.special.ndtri(lo + (hi - lo) * u)) / sd)
    cos, sin = col(torch.cos(tau)).float(), col(torch.sin(tau)).float()
    x = cos * z + sin * sd * noise

    def t_sd(tau):                                     # log alpha at lambda = log(cot / sigma_d), linear between knots
        la_t = -0.5 * torch.log1p(torch.exp(-2 * torch.log(torch.cos(tau) / (sd * torch.sin(tau)))))
        j = ((la[None, :] > la_t[:, None]).sum(1) - 1).clamp(0, 998)
        return j + (la[j] - la_t) / (la[j] - la[j + 1])

    def net_F(context, x_in, tau):                     # TrigFlowPrecond: F = (cos x - x0_hat) / (sigma_d sin)
        xx = sd * x_in
        cs, sn = col(torch.cos(tau)), col(torch.sin(tau))
        k = 1 / (cs**2 + sd**2 * sn**2).sqrt()
        a, sg = (k * cs).float(), (k * sd * sn).float()
        out = unet(k.float() * xx, t_sd(tau), context)
        x0 = (k.float() * xx - sg * out) / a if pred == "epsilon" else a * k.float() * xx - sg * out
        return (cs.float() * xx - x0) / (sd * sn.float())

    with torch.no_grad(), adapters_disabled(unet):    # teacher: F_u + s (F_c - F_u), dx/dtau = sigma_d F~
        F_c, F_u = net_F(cond.context, x / sd, tau), net_F(uncond.context, x / sd, tau)
        dxdt = sd * (F_u + s * (F_c - F_u))
    cs = torch.cos(tau) * torch.sin(tau)
    with torch.no_grad():
        F_minus, dF = torch.func.jvp(lambda xi, ta: net_F(cond.context, xi, ta), (x / sd, tau),
                                     (col(cs).float() * dxdt / sd, cs))
    g = -cos**2 * (sd * F_minus - dxdt) - r * cos * sin * x - r * sd * dF
    g = g / col(g.flatten(1).norm(dim=1) / math.sqrt(g[0].numel()) + c)
    F = net_F(cond.context, x / sd, tau)
    w = 1 / (sd * torch.tan(tau)).float() if obj.prior_weight else torch.ones(len(seeds))
    lv = obj.logvar(torch.log(sd * torch.tan(tau)) / 4) if obj.logvar is not None else torch.zeros(len(seeds))
    return w * torch.exp(-lv) * (F - F_minus - g).pow(2).flatten(1).mean(1) + lv, tau


@pytest.mark.parametrize("pred, sigma_d, weighted", [("epsilon", 1.0, False), ("v_prediction", 0.5, True)])
def test_loss_matches_the_hand_written_reference_step(pred, sigma_d, weighted):
    obj = objective(pred, sigma_d=sigma_d, guidance_scale=3.0, tangent_warmup=1000, prior_weight=weighted,
                    adaptive_weight=weighted)
    if weighted:
        with torch.no_grad():
            obj.logvar.linear.weight.normal_(0, 0.1)
    obj.step_context(400, 0)                                           # r = 0.4: both tangent terms count
    z, cond, uncond = inputs()
    seeds = [3, 4]
    loss, diag = obj.loss(obj.student, z, cond, uncond, [torch.Generator().manual_seed(s) for s in seeds])
    ours = torch.autograd.grad(loss.sum(), [p for _, p in obj.trainables])
    ref, tau = reference_loss(obj, z, cond, uncond, seeds, r=0.4)
    want = torch.autograd.grad(ref.sum(), [p for _, p in obj.trainables])
    torch.testing.assert_close(diag["tau"], tau, atol=1e-12, rtol=0)
    torch.testing.assert_close(loss, ref, rtol=2e-4, atol=1e-6)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-6)
    assert diag["r"] == 0.4 and (diag["g_norm"] > 0).all() and obj.metrics()["tangent_r"] == 0.4


def test_the_unet_time_tangent_is_continuous_and_nonzero():
    """d F_theta / d tau at fixed x through t_SD(tau) and the sinusoidal embedding: nonzero (an integer cast or
    a snapped t_SD would zero it) and equal to a central difference in tau, away from the knots of t_SD."""
    obj = objective()
    z, cond, _ = inputs()
    F = obj.F_net(unet_net(obj.student), cond, S)
    tau = tau_of_t(torch.tensor([300.5, 700.5], dtype=torch.float64), S)
    _, dF = jvp(F, (z, tau), (torch.zeros_like(z), torch.ones_like(tau)))
    h = 1e-4                                                           # dt = h dt/dtau < 0.2: no knot crossed
    with torch.no_grad():
        fd = (F(z, tau + h) - F(z, tau - h)) / (2 * h)
        assert dF.flatten(1).norm(dim=1).min() > 1e-2 * F(z, tau).flatten(1).norm(dim=1).max()
    torch.testing.assert_close(dF, fd, rtol=0, atol=5e-3 * float(fd.abs().max()))


def test_knobs_and_spec():
    with pytest.raises(ValueError, match="objective=scm needs a LoRA"):
        SCM(lora=None)
    with pytest.raises(ValueError, match="objective.tangent_norm"):
        SCM(lora=dict(rank=4), tangent_norm="linf")
    with pytest.raises(ValueError, match="objective.jvp_method"):
        SCM(lora=dict(rank=4), jvp_method="reverse")
    obj = objective(tangent_warmup=0)
    assert obj.tangent_r() == 1.0 and obj.sampler == "scm"
    spec = ConsistencySpec.from_metadata(obj.spec.to_metadata())
    assert spec == obj.spec and spec.objective == "scm" and spec.sigma_data == 1.0

#----------------------------------------------------------------------------
# Two CLI steps: the export (kohya LoRA + spec) samples with solver=scm as the hand-written TrigFlow sampler.

def test_cli_two_steps_export_a_lora_that_samples_with_solver_scm(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run([sys.executable, "train.py", "experiment=smoke", "objective=scm", "train.max_steps=2",
                        "train.batch_size=2", "validation.every=0", f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    path = r.stdout.strip().splitlines()[-1]
    assert path == str(tmp_path / "scm.safetensors")
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["lcm.spec"])["objective"] == "scm"
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith(".lora_up.weight")]
    assert ups and any(u.abs().max() > 0 for u in ups)                 # B moved off zero in two steps

    pipe = Pipeline.from_checkpoint(str(tmp_path / "base.safetensors"))
    name = pipe.load_lora(path)                                       # models.lora_io, kohya layout
    assert pipe.spec.objective == "scm" and name in pipe.adapter_specs
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    out = pipe(["a red circle"], steps=2, solver="scm", height=32, width=32, seed=3, latents=noise,
               output="latent", progress=False)
    # By hand: x = noise at tau(999); f = cos x - sin F (F = (eps - sin x) / cos); x = cos f + sin z' at tau(499).
    model, g = pipe.denoiser(["a red circle"]), torch.Generator().manual_seed(3)
    x = noise
    for i, t in enumerate([999, 499]):
        tau = math.acos(math.sqrt(ABAR[t]))
        F = (model.output(x, torch.tensor(t)) - math.sin(tau) * x) / math.cos(tau)
        f = math.cos(tau) * x - math.sin(tau) * F
        if i == 0:
            tau_next = math.acos(math.sqrt(ABAR[499]))
            x = math.cos(tau_next) * f + math.sin(tau_next) * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(out, f, atol=2e-5, rtol=1e-5)
    with adapters_disabled(pipe.unet):                                # the LoRA is what was sampled
        base = pipe(["a red circle"], steps=2, solver="scm", height=32, width=32, seed=3, latents=noise,
                    output="latent", progress=False)
    assert (base - out).abs().max() > 1e-4
