"""The consistency function, prediction-type conversions, guidance and the w-embedding."""
import pytest
import torch
from diffusers import LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)

from lcm.consistency import ConsistencySpec, boundary_scalings, f_theta, guidance_embedding
from solvers.ddim import ddim_from_x0_eps
from solvers.lcm import sample_lcm
from solvers.noise import randn
from solvers.schedule import Schedule, lcm_timesteps
from solvers.wrappers import cfg, lcm_w, to_eps, to_x0

S = Schedule.make()

#----------------------------------------------------------------------------
# Boundary scalings (docs/method.md Sec. 2.2 table).

def test_boundary_at_zero():
    c_skip, c_out = boundary_scalings(0)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(f_theta(z, torch.randn_like(z), 0), z)   # f(z, 0) = z exactly


def test_paper_table():
    t = torch.tensor([0, 1, 19, 139, 259, 999])
    c_skip, c_out = boundary_scalings(t)
    torch.testing.assert_close(c_skip, torch.tensor([1.0, 2.49e-3, 6.93e-6, 1.29e-7, 3.7e-8, 2.5e-9],
                                                    dtype=torch.float64), rtol=1e-2, atol=0)  # table: 2 digits
    torch.testing.assert_close(c_out[:3], torch.tensor([0.0, 0.99875, 0.9999965], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert torch.all(c_out[3:] > 1 - 1e-6)
    sch = LCMScheduler()
    for ti in t.tolist():                                        # the scheduler's own formula
        ref = sch.get_scalings_for_boundary_condition_discrete(ti)
        ours = boundary_scalings(ti)
        assert abs(ours[0].item() - ref[0]) < 1e-15 and abs(ours[1].item() - ref[1]) < 1e-15


def test_scalings_follow_the_spec():
    c_skip, c_out = boundary_scalings(torch.tensor(19), sigma_data=1.0, timestep_scaling=1.0)
    assert abs(c_skip.item() - 1 / 362) < 1e-15 and abs(c_out.item() - 19 / 362**0.5) < 1e-15
    z, x0, spec = torch.randn(2, 4), torch.randn(2, 4), ConsistencySpec(sigma_data=1.0, timestep_scaling=1.0)
    torch.testing.assert_close(f_theta(z, x0, 19, spec), f_theta(z, x0, 19, 1.0, 1.0))

#----------------------------------------------------------------------------
# Prediction types (docs/method.md Sec. 2.1) and guidance (Sec. 3.1).

def _noised(b=4):
    x0, eps = torch.randn(b, 4, 8, 8, dtype=torch.float64), torch.randn(b, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 19, 500, 999])[:b]                      # per-sample t broadcasts
    a, s = S.alpha(t)[:, None, None, None], S.sigma(t)[:, None, None, None]
    return x0, eps, t, a * x0 + s * eps, a * eps - s * x0       # ..., z_t, v


def test_prediction_type_round_trips():
    x0, eps, t, z, v = _noised()
    for pred, out in [("epsilon", eps), ("v_prediction", v), ("sample", x0)]:
        torch.testing.assert_close(to_x0(out, z, t, S, pred), x0)
        torch.testing.assert_close(to_eps(out, z, t, S, pred), eps)
    with pytest.raises(ValueError, match="v_prediction"):
        to_x0(v, z, t, S, "v")


def test_guided_teacher_step_is_the_lcd_combination():
    # (1+w) Psi(c) - w Psi(u) == one DDIM step from the guided (x0_w, eps_w), for v teachers too (LCM#65)
    _, _, t, z, _ = _noised()
    t_n = (t - 20).clamp(min=0)
    out_c, out_u, w = torch.randn_like(z), torch.randn_like(z), 7.0
    for pred in ("epsilon", "v_prediction", "sample"):
        psi = lambda o: ddim_from_x0_eps(to_x0(o, z, t, S, pred), to_eps(o, z, t, S, pred), t_n, S) - z
        x0_w = cfg(to_x0(out_c, z, t, S, pred), to_x0(out_u, z, t, S, pred), w + 1)
        eps_w = cfg(to_eps(out_c, z, t, S, pred), to_eps(out_u, z, t, S, pred), w + 1)
        torch.testing.assert_close(ddim_from_x0_eps(x0_w, eps_w, t_n, S), z + (1 + w) * psi(out_c) - w * psi(out_u))


def test_lcm_w_and_cfg_conventions():
    assert lcm_w(1.0) == 0.0 and lcm_w(8.5) == 7.5
    c, u = torch.randn(3), torch.randn(3)
    for s in (0.0, 1.0, 1.5, 8.5):
        torch.testing.assert_close(cfg(c, u, s), c + lcm_w(s) * (c - u))
    torch.testing.assert_close(cfg(c, u, 1.0), c)

#----------------------------------------------------------------------------
# w-embedding (diffusers' get_guidance_scale_embedding is the oracle).

@pytest.mark.parametrize("dim", [256, 255, 512])
def test_guidance_embedding_parity(dim):
    w = torch.tensor([0.0, 0.5, 3.0, 7.5, 14.9])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = guidance_embedding(w, dim)
    assert ours.shape == (5, dim)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert torch.equal(ours[0, : dim // 2], torch.zeros(dim // 2))    # [sin, cos] order: sin(0) first

#----------------------------------------------------------------------------
# Spec metadata.

def test_spec_metadata_round_trip_and_mismatch():
    spec = ConsistencySpec(num_ddim_timesteps=25, timestep_scaling=1.0)
    meta = {**spec.to_metadata(), "other": "x"}
    assert all(isinstance(v, str) for v in meta.values())
    assert ConsistencySpec.from_metadata(meta) == spec
    assert ConsistencySpec.from_metadata({"other": "x"}) is None
    with pytest.raises(ValueError, match="unknown"):
        ConsistencySpec.from_metadata({"lcm.spec": '{"k": 20}'})
    ConsistencySpec().check_matches(ConsistencySpec())
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        ConsistencySpec().check_matches(spec)

#----------------------------------------------------------------------------
# The LCM sampler: output = f_theta at the last timestep, and per-image reproducibility.

def _x0_fn(z, t):                                                # elementwise: no batch-size-dependent kernels
    return torch.tanh(z) * (1 + float(t) / 1000)


def test_sampler_returns_f_theta_at_the_last_step():
    spec = ConsistencySpec()
    seen = []
    denoise = spec.consistency_fn(lambda z, t: seen.append((z, t)) or _x0_fn(z, t))
    z = torch.randn(2, 4, 8, 8)
    g = torch.Generator().manual_seed(3)
    out = sample_lcm(denoise, z, lcm_timesteps(4), S, generator=g)
    z_last, t_last = seen[-1]
    assert int(t_last) == 259 and len(seen) == 4
    assert torch.equal(out, f_theta(z_last, _x0_fn(z_last, t_last), t_last))
    ref = torch.Generator().manual_seed(3)
    for _ in range(3):                                           # exactly N - 1 re-noise draws
        torch.randn(z.shape, generator=ref)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=ref))
    one = sample_lcm(denoise, z, [999], S)                       # one step: x0 = f_theta(z_T, 999)
    assert torch.equal(one, f_theta(z, _x0_fn(z, torch.tensor(999)), 999))


def test_per_image_generators_reproduce_across_batch_sizes():
    denoise = ConsistencySpec().consistency_fn(_x0_fn)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    seeds, shape = [10, 11, 12, 13], (4, 4, 8, 8)
    g4 = gens(seeds)
    batch = sample_lcm(denoise, randn(shape, g4), lcm_timesteps(4), S, generator=g4)
    for i, s in enumerate(seeds):
        g1 = gens([s])
        single = sample_lcm(denoise, randn((1,) + shape[1:], g1), lcm_timesteps(4), S, generator=g1)
        assert torch.equal(batch[i: i + 1], single)
    with pytest.raises(ValueError, match="generators"):
        randn(shape, gens([1, 2]))
