"""The TCD and PCM losses against hand-written versions of their training steps (docs/method.md Secs.
11-12) on tiny UNets, their boundary conditions, PCM's phase edges, PCM* (one teacher pass), per-sample
draws, and two steps of each objective from the CLI with the exported spec."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lcm.objectives.losses import draw_points, draw_tcd_s, pcm_loss, pcm_phase_edge, tcd_loss
from lcm.objectives.pcm import PCM
from lcm.objectives.tcd import TCD
from lcm.objectives.teacher import teacher_estimate, unguided_teacher_estimate
from models.lora import adapters_disabled, inject_lora
from models.text import Conditioning
from models.unet import UNetModel
from solvers.schedule import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = Schedule.make()
TINY = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), transformer_depth=[1, 1],
            transformer_depth_middle=1, num_heads=2, context_dim=16, use_linear_in_transformer=True)
K, N = 20, 50
GRID = [j * K - 1 for j in range(1, N + 1)]                 # 19, 39, ..., 999
TOL = 5e-6      # fp32 losses of ~0.5 vs fp64 references: x0_hat = (z - sigma eps) / alpha amplifies fp32 rounding


def randomized(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module.eval()


_UNET = {}


def lora_nets():
    """student = target = a LoRA UNet (B != 0), teacher = the same with adapters off (as LCM-LoRA)."""
    if "u" not in _UNET:
        unet = randomized(UNetModel(**TINY), 1)
        inject_lora(unet, "x", rank=4, alpha=4)
        _UNET["u"] = randomized(unet, 2)
    unet = _UNET["u"]
    student = lambda x, t, c, w: unet(x, t, c.context)

    def teacher(x, t, c, w):
        with adapters_disabled(unet):
            return unet(x, t, c.context)
    return student, teacher


def inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(B, 77, 16, generator=g))
    uncond = Conditioning(torch.randn(1, 77, 16, generator=g).expand(B, -1, -1))
    return z, cond, uncond


def sample_draws(seed, B=1):
    """A generator's draws as the losses consume them, by hand: grid index j, u, eps, then one more uniform."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randint(1, N + 1, (B,), generator=g)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 4, 8, 8, generator=g)
    r = torch.rand(B, generator=g, dtype=torch.float64)
    return j - 1, u, eps, r                                  # i = grid index of t_{n+k}


def pick_seeds(want):
    """One seed per predicate want(i, r) -> bool (per-sample generators choose each sample's draws)."""
    out = []
    for p in want:
        out.append(next(s for s in range(10_000) if p(*[v.item() for v in sample_draws(s)[::3]])))
    return out


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]

#----------------------------------------------------------------------------
# Hand-written steps (fp64 coefficients, separate cond / uncond teacher passes, Psi increment form).

betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
ABAR = torch.cumprod(1 - betas, 0)
col = lambda v: torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1, 1)
A = lambda t: col(ABAR[t].sqrt())
SG = lambda t: col((1 - ABAR[t]).sqrt())


def x0_eps(out, x, t, pred):
    out, x = out.double(), x.double()
    if pred == "epsilon":
        return (x - SG(t) * out) / A(t), out
    return A(t) * x - SG(t) * out, SG(t) * x + A(t) * out       # v-prediction


def teacher_step(teacher, z_nk, t_nk, t_n, cond, uncond, w, pred):
    """z_hat = z + (1 + w) Psi(c) - w Psi(uncond), Psi the DDIM increment t_{n+k} -> t_n."""
    def psi(c):
        x0, e = x0_eps(teacher(z_nk.float(), t_nk, c, w), z_nk, t_nk, pred)
        return A(t_n) * x0 + SG(t_n) * e - z_nk
    return z_nk + (1 + col(w)) * psi(cond) - col(w) * psi(uncond)


def jump(net, x, t, s, cond, w, pred):
    """alpha_s x0_hat + sigma_s eps_hat from one pass at t."""
    x0, e = x0_eps(net(x.float(), t, cond, w), x, t, pred)
    return A(s) * x0 + SG(s) * e


def dist(a, b, loss, c=1e-3):
    d = a - b
    return (d.pow(2) if loss == "l2" else (d.pow(2) + c**2).sqrt() - c).flatten(1).mean(1)


def tcd_reference(student, target, teacher, z, cond, uncond, seeds, pred, loss, w_min=5.0, w_max=15.0):
    rows = [sample_draws(s) for s in seeds]
    i, u, eps, r = (torch.cat(v) for v in zip(*rows))
    t_nk = torch.tensor([GRID[a] for a in i])
    t_n = (t_nk - K).clamp(min=0)
    jj = [int(np.floor(rr * (a + 1))) for a, rr in zip(i.tolist(), r.tolist())]     # j ~ U{0..i}
    s = torch.tensor([max(GRID[b] - K, 0) for b in jj])
    w = (w_min + (w_max - w_min) * u).float()
    z_nk = A(t_nk) * z.double() + SG(t_nk) * eps.double()
    f_student = jump(student, z_nk, t_nk, s, cond, w, pred)
    with torch.no_grad():
        z_hat = teacher_step(teacher, z_nk, t_nk, t_n, cond, uncond, w, pred)
        f_target = jump(target, z_hat, t_n, s, cond, w, pred)
        f_target = torch.where(col(s == t_n).bool(), z_hat, f_target)
    return dist(f_student, f_target, loss), s


def pcm_reference(student, target, teacher, z, cond, uncond, seeds, pred, loss, starts):
    rows = [sample_draws(s) for s in seeds]
    i, u, eps, _ = (torch.cat(v) for v in zip(*rows))
    t_nk = torch.tensor([GRID[a] for a in i])
    t_n = (t_nk - K).clamp(min=0)
    idx = [max(st for st in starts if st <= a) for a in i.tolist()]                 # the phase's first index
    edge = torch.tensor([GRID[b - 1] if b else 0 for b in idx])
    w = (5.0 + 10.0 * u).float()
    z_nk = A(t_nk) * z.double() + SG(t_nk) * eps.double()
    f_student = jump(student, z_nk, t_nk, edge, cond, w, pred)
    with torch.no_grad():
        z_hat = teacher_step(teacher, z_nk, t_nk, t_n, cond, uncond, w, pred)
        f_target = jump(target, z_hat, t_n, edge, cond, w, pred)
        start = torch.tensor([a == b for a, b in zip(i.tolist(), idx)])
        f_target = torch.where(col(start).bool(), z_hat, f_target)
    return dist(f_student, f_target, loss), edge

#----------------------------------------------------------------------------
# TCD

@pytest.mark.parametrize("pred,loss", [("epsilon", "huber"), ("v_prediction", "l2")])
def test_tcd_loss_matches_hand_written_step(pred, loss):
    student, teacher = lora_nets()
    seeds = pick_seeds([lambda i, r: i > 5 and np.floor(r * (i + 1)) == i,          # s = t_n (boundary)
                        lambda i, r: i > 5 and np.floor(r * (i + 1)) < i // 2,      # s well below t_n
                        lambda i, r: i == 0])                                       # t_n = 0 = s
    z, cond, uncond = inputs(3)
    ours, diag = tcd_loss(student, student, teacher_estimate(teacher, S, pred), z, cond, uncond, S, gens(seeds),
                          k=K, loss=loss, prediction_type=pred)
    ref, s = tcd_reference(student, student, teacher, z, cond, uncond, seeds, pred, loss)
    assert torch.equal(diag["s"], s) and (diag["s"] <= diag["t_n"]).all()
    assert diag["s"][0] == diag["t_n"][0] and diag["s"][1] < diag["t_n"][1] and diag["t_n"][2] == 0
    assert ours.requires_grad and (ours.detach().double() - ref).abs().max() <= TOL, (ours, ref)


def test_tcd_target_is_z_hat_where_s_is_t_n():
    student, teacher = lora_nets()
    seeds = pick_seeds([lambda i, r: i > 5 and np.floor(r * (i + 1)) == i, lambda i, r: i > 5 and r < 0.5])
    z, cond, uncond = inputs(2)
    est = teacher_estimate(teacher, S, "epsilon")
    junk = lambda x, t, c, w: torch.full_like(x, 1e3)          # whatever the target net says
    zero = lambda x, t, c, w: torch.zeros_like(x)
    with torch.no_grad():
        a, diag = tcd_loss(student, junk, est, z, cond, uncond, S, gens(seeds), loss="l2")
        b, _ = tcd_loss(student, zero, est, z, cond, uncond, S, gens(seeds), loss="l2")
    assert diag["s"][0] == diag["t_n"][0] and diag["s"][1] < diag["t_n"][1]
    assert a[0] == b[0] and a[1] > b[1] + 1.0                   # boundary: the target net is not used


def test_tcd_draws_lcd_points_and_s_on_the_grid():
    z, _, _ = inputs(64)
    g = torch.Generator().manual_seed(3)
    t_nk, t_n, _, _ = draw_points(z, S, K, g)
    s = draw_tcd_s(t_nk, K, g)
    assert ((s + 1) % K == 0).logical_or(s == 0).all() and (s <= t_n).all()
    assert (s == t_n).any() and (s < t_n).any()

#----------------------------------------------------------------------------
# PCM

@pytest.mark.parametrize("M", [1, 2, 4, 8, 50])
def test_pcm_edges_for_every_grid_point(M):
    starts = [int(v) for v in np.floor(np.linspace(0, N, M, endpoint=False))]       # the reference's rule
    if M == 4:
        assert starts == [0, 12, 25, 37]
    t_nk = torch.tensor(GRID)
    edge = pcm_phase_edge(t_nk, K, M)
    t_n = (t_nk - K).clamp(min=0)
    for i in range(N):
        idx = max(s for s in starts if s <= i)
        assert edge[i] == (GRID[idx - 1] if idx else 0)
        assert (edge[i] == t_n[i]) == (i == idx)                                     # start <=> t_n is the edge
    assert (edge <= t_n).all()
    if M == 1:
        assert (edge == 0).all()
    if M == 4:
        assert sorted(set(edge.tolist())) == [0, 239, 499, 739]


@pytest.mark.parametrize("pred,loss,M", [("epsilon", "huber", 4), ("v_prediction", "l2", 4), ("epsilon", "huber", 1)])
def test_pcm_loss_matches_hand_written_step(pred, loss, M):
    student, teacher = lora_nets()
    starts = {1: [0], 4: [0, 12, 25, 37]}[M]
    seeds = pick_seeds([lambda i, r: i in (12, 25, 37), lambda i, r: i not in (0, 12, 25, 37) and i > 3,
                        lambda i, r: i == 0])
    z, cond, uncond = inputs(3)
    ours, diag = pcm_loss(student, student, teacher_estimate(teacher, S, pred), z, cond, uncond, S, gens(seeds),
                          phases=M, k=K, loss=loss, prediction_type=pred)
    ref, edge = pcm_reference(student, student, teacher, z, cond, uncond, seeds, pred, loss, starts)
    assert torch.equal(diag["s"], edge)
    if M == 1:
        assert (edge == 0).all()                                # one jump to t = 0: f = alpha_0 x0 + sigma_0 eps
    else:
        assert diag["s"][0] == diag["t_n"][0] > 0 and diag["s"][1] < diag["t_n"][1]
    assert ours.requires_grad and (ours.detach().double() - ref).abs().max() <= TOL, (ours, ref)


def test_pcm_target_is_z_hat_at_a_phase_start():
    student, teacher = lora_nets()
    seeds = pick_seeds([lambda i, r: i == 25, lambda i, r: i == 30])
    z, cond, uncond = inputs(2)
    est = teacher_estimate(teacher, S, "epsilon")
    junk = lambda x, t, c, w: torch.full_like(x, 1e3)
    zero = lambda x, t, c, w: torch.zeros_like(x)
    with torch.no_grad():
        a, diag = pcm_loss(student, junk, est, z, cond, uncond, S, gens(seeds), phases=4, loss="l2")
        b, _ = pcm_loss(student, zero, est, z, cond, uncond, S, gens(seeds), phases=4, loss="l2")
    assert diag["s"].tolist() == [499, 499] and diag["t_n"].tolist() == [499, 599]
    assert a[0] == b[0] and a[1] > b[1] + 1.0


def test_pcm_without_cfg_solver_is_one_teacher_pass():
    """--not_apply_cfg_solver: uncond := cond, so one teacher pass of B (not one of 2B) and the same z_hat."""
    student, teacher = lora_nets()
    rows = []

    def counted(x, t, c, w):
        rows.append(x.shape[0])
        return teacher(x, t, c, w)
    z, cond, uncond = inputs(3)
    with torch.no_grad():
        pcm_loss(student, student, unguided_teacher_estimate(counted, S, "epsilon"), z, cond, uncond, S,
                 torch.Generator().manual_seed(0), w_fixed=0.0)
        assert rows == [3]
        rows.clear()
        pcm_loss(student, student, teacher_estimate(counted, S, "epsilon"), z, cond, uncond, S,
                 torch.Generator().manual_seed(0))
        assert rows == [6]                                      # CFG: cond and uncond in one batched pass
        t = torch.tensor([999, 519, 39])
        for solver in ("ddim", "dpmsolver++"):
            one = unguided_teacher_estimate(teacher, S, "epsilon", solver)(z, t, t - 20, z, None, cond, uncond, None)
            two = teacher_estimate(teacher, S, "epsilon", solver)(z, t, t - 20, z, None, cond, cond,
                                                                  torch.full((3,), 7.0))
            torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
    obj = PCM(lora=dict(rank=4, alpha=4), cfg_solver=False)
    assert obj.kw["w_fixed"] == 0.0 and obj.p_uncond == 0.1 and PCM(lora=dict(rank=4)).p_uncond == 0.0


def test_pcm_caption_dropout_reaches_every_network():
    student, teacher = lora_nets()
    seen = []

    def rec(net):
        def f(x, t, c, w):
            seen.append(c.context)
            return net(x, t, c, w)
        return f
    z, cond, uncond = inputs(2)
    with torch.no_grad():
        _, diag = pcm_loss(rec(student), rec(student), unguided_teacher_estimate(rec(teacher), S, "epsilon"), z, cond,
                           uncond, S, torch.Generator().manual_seed(0), p_uncond=1.0, w_fixed=0.0)
    assert diag["dropped"].all() and len(seen) == 3
    assert all(torch.equal(c, uncond.context) for c in seen)

#----------------------------------------------------------------------------
# Both: per-sample draws, objective errors, the CLI.

@pytest.mark.parametrize("which", ["tcd", "pcm"])
def test_per_sample_generators_make_losses_batch_independent(which):
    student, teacher = lora_nets()
    fn = tcd_loss if which == "tcd" else pcm_loss
    est = teacher_estimate(teacher, S, "epsilon")
    z, cond, uncond = inputs(4)
    g = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]
    sub = lambda c, i: Conditioning(c.context[i:i + 2])
    kw = dict(p_uncond=0.5) if which == "pcm" else {}
    with torch.no_grad():
        full, _ = fn(student, student, est, z, cond, uncond, S, g(range(4)), **kw)
        halves = [fn(student, student, est, z[i:i + 2], sub(cond, i), sub(uncond, i), S, g(range(i, i + 2)), **kw)[0]
                  for i in (0, 2)]
    torch.testing.assert_close(full, torch.cat(halves), atol=1e-6, rtol=1e-5)


def test_objectives_need_a_lora_and_sane_knobs():
    for cls, name in ((TCD, "tcd"), (PCM, "pcm")):
        with pytest.raises(ValueError, match=f"objective={name} needs a LoRA"):
            cls(lora=None)
    with pytest.raises(ValueError, match="objective.phases"):
        PCM(lora=dict(rank=4), phases=0)
    assert (TCD.sampler, PCM.sampler) == ("tcd", "pcm")


def _train(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run([sys.executable, "train.py", "experiment=smoke", "train.max_steps=2", "train.batch_size=2",
                        "validation.every=0", f"hydra.run.dir={tmp_path}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    path = r.stdout.strip().splitlines()[-1]
    with safe_open(path, "pt") as f:
        return path, json.loads(f.metadata()["lcm.spec"]), list(f.keys())


def test_cli_two_steps_export_the_spec(tmp_path):
    path, spec, keys = _train(tmp_path / "tcd", "objective=tcd", "objective.ema_decay=0.9")
    assert path.endswith("tcd.safetensors") and spec["objective"] == "tcd" and spec["phases"] is None
    assert spec["num_ddim_timesteps"] == 50 and any(k.endswith(".lora_down.weight") for k in keys)
    path, spec, _ = _train(tmp_path / "pcm", "objective=pcm", "objective.phases=2", "objective.cfg_solver=false",
                           "objective.k=50")
    assert path.endswith("pcm.safetensors") and (spec["objective"], spec["phases"], spec["num_ddim_timesteps"]) == (
        "pcm", 2, 20)
