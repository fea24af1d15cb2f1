"""The LCD loss against a hand-written Algorithm 1 (LCM-LoRA report), branch by branch, on tiny UNets."""
import copy

import pytest
import torch

from lcm.consistency import guidance_embedding
from lcm.denoiser import unet_net
from lcm.objectives.diffusion import diffusion_loss, model_target
from lcm.objectives.losses import distance, draw_points, lcd_loss
from lcm.objectives.teacher import same_noise_estimate, teacher_estimate
from models.lora import adapters_disabled, inject_lora
from models.text import Conditioning
from models.unet import UNetModel
from solvers.schedule import Schedule

SCHEDULE = Schedule.make()
TINY = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), transformer_depth=[1, 1],
            transformer_depth_middle=1, num_heads=2, context_dim=16, use_linear_in_transformer=True)


def randomized(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module.eval()


def net(module, use_w: bool):
    def f(x, t, cond, w):
        emb = guidance_embedding(w, module.time_cond_proj_dim) if use_w else None
        return module(x, t, cond.context, y=cond.y, timestep_cond=emb)
    return f


def inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(B, 77, 16, generator=g))
    uncond = Conditioning(torch.randn(1, 77, 16, generator=g).expand(B, -1, -1))
    return z, cond, uncond


def lora_unet():
    unet = randomized(UNetModel(**TINY), 1)
    inject_lora(unet, "lcm", rank=4, alpha=4)
    return randomized(unet, 2)                          # B != 0: the LoRA changes the output


#----------------------------------------------------------------------------
# Hand-written Algorithm 1 (fp64 arithmetic, separate cond / uncond teacher passes, Psi form).

def reference(student, target, teacher, z, cond, uncond, t_nk, t_n, w, eps, pred, loss, c=1e-3):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    col = lambda v: v.double().reshape(-1, 1, 1, 1)
    a = lambda t: col(abar[t].sqrt())
    s = lambda t: col((1 - abar[t]).sqrt())

    def x0_eps(out, x, t):
        out, x = out.double(), x.double()
        if pred == "epsilon":
            return (x - s(t) * out) / a(t), out
        return a(t) * x - s(t) * out, s(t) * x + a(t) * out           # v-prediction

    def skip_out(t):
        st = col(t) * 10.0
        return 0.25 / (st**2 + 0.25), st / (st**2 + 0.25).sqrt()

    z_nk = a(t_nk) * z.double() + s(t_nk) * eps.double()               # z_{t_{n+k}}
    cs, co = skip_out(t_nk)
    f_student = cs * z_nk + co * x0_eps(student(z_nk.float(), t_nk, cond, w), z_nk, t_nk)[0]
    with torch.no_grad():
        def psi(cnd):                                                  # DDIM increment t_{n+k} -> t_n
            x0, e = x0_eps(teacher(z_nk.float(), t_nk, cnd, w), z_nk, t_nk)
            return a(t_n) * x0 + s(t_n) * e - z_nk
        z_hat = z_nk + (1 + col(w)) * psi(cond) - col(w) * psi(uncond)
        cs, co = skip_out(t_n)
        f_target = cs * z_hat + co * x0_eps(target(z_hat.float(), t_n, cond, w), z_hat, t_n)[0]
    d = f_student - f_target
    per = d.pow(2) if loss == "l2" else (d.pow(2) + c**2).sqrt() - c
    return per.flatten(1).mean(1)


@pytest.mark.parametrize("loss", ["l2", "huber"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("mode", ["lora", "lcd"])
def test_loss_matches_hand_written_algorithm_1(mode, pred, loss):
    z, cond, uncond = inputs()
    if mode == "lora":                    # student = LoRA UNet; target = same under no_grad; teacher = adapters off
        unet = lora_unet()
        student = target = net(unet, False)

        def teacher(*a):
            with adapters_disabled(unet):
                return net(unet, False)(*a)
    else:                                 # full student with w-embedding, a different (EMA) target, base teacher
        base = randomized(UNetModel(**TINY), 1)
        s_unet = UNetModel(**TINY, time_cond_proj_dim=256)
        s_unet.load_state_dict(base.state_dict(), strict=False)
        s_unet = randomized(s_unet, 3, std=0.01)
        t_unet = randomized(copy.deepcopy(s_unet), 4, std=0.01)
        student, target, teacher = net(s_unet, True), net(t_unet, True), net(base, False)
    kw = dict(k=20, w_min=5.0, w_max=15.0, loss=loss, huber_c=1e-3, prediction_type=pred)
    ours, diag = lcd_loss(student, target, teacher_estimate(teacher, SCHEDULE, pred), z, cond, uncond,
                          SCHEDULE, torch.Generator().manual_seed(5), **kw)
    t_nk, t_n, u, eps = draw_points(z, SCHEDULE, 20, torch.Generator().manual_seed(5))
    w = (5.0 + 10.0 * u).float()
    assert torch.equal(diag["t_nk"], t_nk) and torch.equal(diag["t_n"], t_n)
    assert ((t_nk + 1) % 20 == 0).all() and torch.equal(t_n, (t_nk - 20).clamp(min=0))
    ref = reference(student, target, teacher, z, cond, uncond, t_nk, t_n, w, eps, pred, loss)
    assert ours.shape == (3,) and ours.requires_grad
    assert (ours.detach().double() - ref).abs().max() <= 1e-6, (ours, ref)


def test_target_is_z_hat_exactly_at_t0():
    z, cond, uncond = inputs()
    seen = {}

    def estimate(*a):
        seen["z_hat"] = same_noise_estimate(SCHEDULE)(*a)
        return seen["z_hat"]
    student = net(lora_unet(), False)
    junk = lambda x, t, c, w: torch.full_like(x, 1e3)          # whatever the target net says
    with torch.no_grad():
        per, diag = lcd_loss(student, junk, estimate, z, cond, uncond, SCHEDULE, torch.Generator().manual_seed(0),
                             k=1000, loss="l2")                 # grid {999}: t_n = 999 - 1000 -> 0
    assert (diag["t_n"] == 0).all()
    with torch.no_grad():                                       # student part recomputed the same way
        per2, _ = lcd_loss(student, lambda x, *a: x * 0, estimate, z, cond, uncond, SCHEDULE,
                           torch.Generator().manual_seed(0), k=1000, loss="l2")
    assert torch.equal(per.detach(), per2)


def test_teacher_pass_is_the_base_model():
    base = randomized(UNetModel(**TINY), 1)
    unet = copy.deepcopy(base)
    inject_lora(unet, "lcm", rank=4, alpha=4)
    unet = randomized(unet, 2)
    with torch.no_grad():                                       # restore W0: only the adapters differ
        for (n, p) in unet.named_parameters():
            if ".lora_" not in n:
                p.copy_(base.get_parameter(n))
    z, cond, _ = inputs()
    t = torch.tensor([999, 499, 19])
    with torch.no_grad():
        with adapters_disabled(unet):
            off = unet(z, t, cond.context)
        on, ref = unet(z, t, cond.context), base(z, t, cond.context)
    assert torch.equal(off, ref)
    assert (on - off).abs().max() > 1e-3


def test_unet_net_feeds_w_to_a_wrapped_student():
    """A DDP-wrapped full-LCM student (the UNet in .module) still gets its w-embedding, in unet_net."""
    base = randomized(UNetModel(**TINY, time_cond_proj_dim=256), 3)

    class Wrapped(torch.nn.Module):                             # DDP's layout: no time_cond_proj_dim of its own
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **kw):
            return self.module(*a, **kw)
    z, cond, _ = inputs()
    t, w = torch.tensor([999, 499, 19]), torch.tensor([2.0, 5.0, 9.0])
    with torch.no_grad():
        ref = net(base, True)(z, t, cond, w)
        assert torch.equal(unet_net(base)(z, t, cond, w), ref)
        assert torch.equal(unet_net(Wrapped(base))(z, t, cond, w), ref)           # before: "timestep_cond is required"
        assert (unet_net(Wrapped(base))(z, t, cond, w + 3.0) - ref).abs().max() > 1e-4   # w reaches the UNet


def test_lcf_estimate_shares_the_noise_of_z_nk():
    z, cond, uncond = inputs()
    t_nk, t_n, _, eps = draw_points(z, SCHEDULE, 20, torch.Generator().manual_seed(1))
    z_nk = SCHEDULE.add_noise(z, eps, t_nk)
    z_hat = same_noise_estimate(SCHEDULE)(z_nk, t_nk, t_n, z, eps, cond, uncond, None)
    col = lambda v: v.float().reshape(-1, 1, 1, 1)
    e1 = (z_hat - col(SCHEDULE.alpha(t_n)) * z) / col(SCHEDULE.sigma(t_n))
    e2 = (z_nk - col(SCHEDULE.alpha(t_nk)) * z) / col(SCHEDULE.sigma(t_nk))
    torch.testing.assert_close(e1, e2, atol=1e-4, rtol=0)


def test_per_sample_generators_make_losses_batch_independent():
    unet = lora_unet()
    z, cond, uncond = inputs(B=4)
    est = teacher_estimate(net(unet, False), SCHEDULE, "epsilon")
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]
    with torch.no_grad():
        full, _ = lcd_loss(net(unet, False), net(unet, False), est, z, cond, uncond, SCHEDULE, gens(range(4)))
        halves = [lcd_loss(net(unet, False), net(unet, False), est, z[i:i + 2], Conditioning(cond.context[i:i + 2]),
                           Conditioning(uncond.context[i:i + 2]), SCHEDULE, gens(range(i, i + 2)))[0] for i in (0, 2)]
    torch.testing.assert_close(full, torch.cat(halves), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_zero_for_the_true_prediction(pred):
    z, cond, uncond = inputs()

    def oracle(x, t, c, w):                                     # knows z: returns the exact eps / v
        a, s = (f(t).reshape(-1, 1, 1, 1).float() for f in (SCHEDULE.alpha, SCHEDULE.sigma))
        eps = (x - a * z) / s
        return eps if pred == "epsilon" else a * eps - s * z
    per, diag = diffusion_loss(oracle, z, cond, uncond, SCHEDULE, torch.Generator().manual_seed(0),
                               prediction_type=pred, p_uncond=0.5)
    assert per.max() < 1e-8
    x0 = torch.randn(2, 4, 8, 8)                                # model_target inverts the conversions
    eps = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    zt = SCHEDULE.add_noise(x0, eps, t)
    v = model_target(x0, eps, zt, t, SCHEDULE, "v_prediction")
    a, s = (f(t).reshape(-1, 1, 1, 1).float() for f in (SCHEDULE.alpha, SCHEDULE.sigma))
    torch.testing.assert_close(v, a * eps - s * x0, atol=1e-5, rtol=0)


def test_caption_dropout_swaps_in_the_unconditional_branch():
    z, cond, uncond = inputs()
    seen = []
    rec = lambda x, t, c, w: seen.append(c.context) or torch.zeros_like(x)
    diffusion_loss(rec, z, cond, uncond, SCHEDULE, torch.Generator(), p_uncond=1.0)
    diffusion_loss(rec, z, cond, uncond, SCHEDULE, torch.Generator(), p_uncond=0.0)
    assert torch.equal(seen[0], uncond.context) and torch.equal(seen[1], cond.context)


def test_distance_and_fixed_w():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(distance(a, b, "l2"), ((a - b) ** 2).mean((1, 2, 3)))
    h = distance(a, b, "huber", 1e-3)
    torch.testing.assert_close(h, ((a - b) ** 2 + 1e-6).sqrt().sub(1e-3).mean((1, 2, 3)))
    with pytest.raises(ValueError, match="loss must be"):
        distance(a, b, "l1")
    z, cond, uncond = inputs()
    f = lambda x, t, c, w: torch.zeros_like(x)
    _, diag = lcd_loss(f, f, same_noise_estimate(SCHEDULE), z, cond, uncond, SCHEDULE, torch.Generator(),
                       w_fixed=6.5)
    assert (diag["w"] == 6.5).all()
    with pytest.raises(ValueError, match="must divide"):
        lcd_loss(f, f, same_noise_estimate(SCHEDULE), z, cond, uncond, SCHEDULE, torch.Generator(), k=30)
