"""objective=dmd2 (lcm/objectives/dmd2.py, lcm/objectives/dmd.py): the DM gradient against a hand-written
one (eps and v teachers), adapter routing and no-grad passes, the N:1 update rule, backward
simulation, the GAN head, resume and a CLI run whose LoRA samples on its own grid."""
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from lcm.consistency import ConsistencySpec, f_theta
from lcm.data.build import make_loader
from lcm.data.encoder import LatentEncoder
from lcm.data.sources import ImageFolder
from lcm.objectives.base import LoRAConfig
from lcm.objectives.dmd import backward_simulation, dm_gradient, dm_loss
from lcm.objectives.dmd2 import DMD2
from lcm.training import loop
from lcm.training.loop import TrainConfig, make_optimizer, step_generators
from models import lora as lora_lib
from solvers.schedule import Schedule
from solvers.wrappers import cfg as cfg_mix, to_x0
from train import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = os.path.join(ROOT, "tests", "fixtures", "tiny_data")
SMOKE_MODEL = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)
LORA = LoRAConfig(name="dmd2", rank=2, alpha=2)


def setup(prediction_type="epsilon", randomize=True, **kw):
    """A DMD2 objective on the smoke model; LoRA G and F given random B so neither is the base."""
    pipe = build_pipeline({**SMOKE_MODEL, "prediction_type": prediction_type})
    obj = DMD2(lora=LORA, **kw)
    torch.manual_seed(0)
    obj.setup(pipe)
    if randomize:
        randomize_(obj.trainables)
    return pipe, obj


def randomize_(trainables) -> None:
    """LoRA B ~ N(0, 0.05): the adapters differ from the base."""
    with torch.no_grad():
        for n, p in trainables:
            if ".lora_up." in n:
                p.normal_(0, 0.05)


def batch(pipe, step=0, B=2):
    b = next(iter(make_loader(ImageFolder(TINY_DATA, resolution=32), B, 0, 0, 1, 0, 0)))
    z, cond, uncond = LatentEncoder(pipe, torch.device("cpu"))(b, step_generators(0, step, 0, B))
    return z, cond, uncond, step_generators(0, step, 0, B)


def calls(unet):
    """Record (grad enabled, active adapters, batch) of every UNet call."""
    log = []
    layer = next(m for _, m in lora_lib.lora_layers(unet) if hasattr(m, "lora_scale"))
    h = unet.register_forward_pre_hook(
        lambda m, a: log.append((torch.is_grad_enabled(), layer._active() if layer.lora_enabled else [], a[0].shape[0])))
    return log, h


def grads(params):
    return [None if p.grad is None else p.grad.clone() for _, p in params]

#----------------------------------------------------------------------------

def test_dm_gradient_is_per_sample_normalised_and_its_surrogate_has_it_as_gradient():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    grad = dm_gradient(x, real, fake)
    for i in range(3):
        xi, ri, fi = x[i].double(), real[i].double(), fake[i].double()       # float64 throughout
        torch.testing.assert_close(grad[i], (fi - ri) / (xi - ri).abs().mean())
    x = x.double().requires_grad_(True)
    dm_loss(x, grad).mean().backward()                           # the loop's mean over the batch
    torch.testing.assert_close(x.grad, grad / x.numel())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_generator_gradient_equals_hand_written_and_routes_adapters(prediction_type):
    pipe, obj = setup(prediction_type, steps=1, real_guidance=2.5)
    z, cond, uncond, gens = batch(pipe)
    log, h = calls(pipe.unet)
    with obj.step_context(0, 0):
        loss = obj.loss(pipe.unet, z, cond, uncond, gens)[0].mean()
    h.remove()
    loss.backward()
    got = grads(obj.gen_params)
    assert all(g is None for g in grads(obj.fake_params))       # F gets nothing on a generator step
    G, Fk = obj.lora_name, obj.fake.name
    assert log == [(True, [G], 2), (False, [], 4), (False, [Fk], 2)]   # G with grad; teacher c+u, fake: no grad

    # By hand: the same draws (x_T, t, eps per sample), the same adapters switched by hand.
    obj.student.zero_grad(set_to_none=True)
    sch, pt, B = pipe.schedule, pipe.prediction_type, 2
    gens = step_generators(0, 0, 0, B)
    x_T = torch.cat([torch.randn((1, *z.shape[1:]), generator=g) for g in gens])
    t = torch.cat([torch.randint(20, 981, (1,), generator=g) for g in gens])
    eps = torch.cat([torch.randn((1, *z.shape[1:]), generator=g) for g in gens])
    unet = pipe.unet
    lora_lib.set_lora_scales(unet, {G: 1.0, Fk: 0.0})
    t999 = torch.full((B,), 999)
    x = f_theta(x_T, to_x0(unet(x_T, t999, cond.context), x_T, t999, sch, pt), t999, obj.spec)
    x_t = sch.add_noise(x.detach(), eps, t)
    with torch.no_grad():
        with lora_lib.adapters_disabled(unet):
            c, u = unet(x_t, t, cond.context), unet(x_t, t, uncond.context)
        real = to_x0(cfg_mix(c, u, 2.5).double(), x_t.double(), t, sch, pt)
        lora_lib.set_lora_scales(unet, {G: 0.0, Fk: 1.0})
        fake = to_x0(unet(x_t, t, cond.context).double(), x_t.double(), t, sch, pt)
        lora_lib.set_lora_scales(unet, {G: 1.0, Fk: 0.0})
    w = (x.detach().double() - real).abs().flatten(1).mean(1)[:, None, None, None]
    ((x.double() * ((fake - real) / w)).sum() / x.numel()).backward()
    want = grads(obj.gen_params)
    assert sum(g.abs().sum() for g in want) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_fresh_fake_score_and_no_guidance_give_exactly_zero_gradient():
    """F = 0 (fake = teacher) and s = 1: mu_fake == mu_real bit for bit, whatever G is."""
    pipe, obj = setup(randomize=False, steps=1, real_guidance=1.0)
    randomize_(obj.gen_params)
    z, cond, uncond, gens = batch(pipe)
    with obj.step_context(0, 0):
        obj.loss(pipe.unet, z, cond, uncond, gens)[0].mean().backward()
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads(obj.gen_params))


def test_fake_score_step_sees_detached_samples_and_trains_only_f():
    pipe, obj = setup(steps=4, gen_every=3)
    z, cond, uncond, gens = batch(pipe, step=1)
    log, h = calls(pipe.unet)
    with obj.step_context(1, 0):
        loss, diag = obj.loss(pipe.unet, z, cond, uncond, gens)
    h.remove()
    loss.mean().backward()
    assert not diag["generator_step"]
    G, Fk = obj.lora_name, obj.fake.name
    assert log == [(False, [G], 2)] * (diag["k"] + 1) + [(True, [Fk], 2)]   # backsim + G: no grad; F with grad
    assert all(g is None for g in grads(obj.gen_params))
    assert all(g is not None for g in grads(obj.fake_params))


def test_update_rule_generator_every_nth_fake_score_between(tmp_path):
    pipe, obj = setup(gen_every=3)
    opt = make_optimizer(obj, TrainConfig(lr=1e-3))
    names = [[opt.specs[i].name for i in opt.due(s)] for s in range(7)]
    assert names == [["generator"], ["fake_score"], ["fake_score"]] * 2 + [["generator"]]
    assert {id(p) for p in opt.specs[0].params} == {id(p) for _, p in obj.gen_params}
    with pytest.raises(ValueError, match="gen_every"):
        DMD2(lora=LORA, gen_every=1)
    with pytest.raises(ValueError, match="ema_decay"):
        DMD2(lora=LORA, ema_decay=0.9)


def test_backward_simulation_calls_the_generator_k_times():
    sch, grid = Schedule.make(), [999, 749, 499, 249]
    g = torch.Generator().manual_seed(0)
    noise, ren = torch.randn(2, 4, 3, 3, generator=g), [torch.randn(2, 4, 3, 3, generator=g) for _ in range(3)]
    for k in range(4):
        seen = []
        gen = lambda x, t: (seen.append(int(t[0])), 0.5 * x)[1]       # noqa: E731
        x, t = backward_simulation(gen, noise, ren, grid, k, sch)
        assert t == grid[k] and seen == grid[:k]
        if k == 0:
            assert x is noise                                          # pure noise at 999
        else:
            x_prev, _ = backward_simulation(gen, noise, ren, grid, k - 1, sch)
            torch.testing.assert_close(x, sch.add_noise(0.5 * x_prev, ren[k - 1], grid[k]))


def test_gan_terms_one_batched_pass_and_frozen_for_the_generator():
    pipe, obj = setup(gan=True, gen_every=2)
    z, cond, uncond, gens = batch(pipe, step=1)
    log, h = calls(pipe.unet)
    with obj.step_context(1, 0):
        obj.loss(pipe.unet, z, cond, uncond, gens)[0].mean().backward()
    h.remove()
    assert log[-1] == (True, [obj.fake.name], 6)                   # [F loss; D fake; D real]: one pass
    head = [g for (n, _), g in zip(obj.fake_params, grads(obj.fake_params)) if n.startswith("gan_head.")]
    assert head and all(g is not None and g.abs().sum() > 0 for g in head)
    obj.student.zero_grad(set_to_none=True)
    for _, p in obj.fake_params:
        p.grad = None
    z, cond, uncond, gens = batch(pipe, step=0)
    with obj.step_context(0, 0):
        obj.loss(pipe.unet, z, cond, uncond, gens)[0].mean().backward()
    assert all(g is None for g in grads(obj.fake_params))          # D(G(z)) trains G only
    assert all(g is not None for g in grads(obj.gen_params))
    assert obj.head(torch.randn(3, obj.head.out.in_features, 2, 2)).shape == (3, 1)


def test_resume_is_bit_identical_for_both_adapters_optimizers_and_head(tmp_path):
    data = ImageFolder(TINY_DATA, resolution=32)
    run = lambda steps, d, resume=None: loop.train(                       # noqa: E731
        build_pipeline(SMOKE_MODEL), data, TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, log_every=1,
                                                        checkpoint_every=2),
        str(tmp_path / d), DMD2(lora=LORA, gen_every=2, gan=True), resume=resume)
    a = run(4, "a")
    run(2, "b")
    b = run(4, "b", resume=True)
    ta, tb = (_tensors(r["run_dir"]) for r in (a, b))
    assert ta.keys() == tb.keys() and any("gan_head" in k for k in ta) and any("_fake" in k for k in ta)
    # (the global RNG differs by the DataLoader's base-seed draw at each start: no sample depends on it)
    assert [k for k in ta if not torch.equal(ta[k], tb[k]) and ".rng." not in k] == []
    assert any(".optimizer.generator." in k for k in ta) and any(".optimizer.fake_score." in k for k in ta)


def _tensors(run_dir):
    with safe_open(os.path.join(run_dir, "checkpoints", "step_0000004", "state.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def cli_run(objective: str, run_dir) -> None:
    """`python train.py experiment=smoke objective=<objective>` for 2 steps (one generator step)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "train.py", "experiment=smoke", f"objective={objective}", "train.max_steps=2",
                        "objective.gen_every=2", "validation=off", f"hydra.run.dir={run_dir}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_run_exports_g_only_and_it_samples_on_its_grid(tmp_path):
    cli_run("dmd2", tmp_path)
    path = str(tmp_path / "dmd2.safetensors")
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys) and not any("fake" in k for k in keys)
    assert ConsistencySpec.from_metadata(meta).num_ddim_timesteps == 4
    pipe = build_pipeline(SMOKE_MODEL)
    pipe.load_lora(path, name="dmd2")
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(int(a[1][0])))
    pipe(["a red circle"], steps=4, seed=0, solver="lcm", guidance_scale=1.0, output="latent", progress=False)
    h.remove()
    assert seen == [999, 749, 499, 249]
