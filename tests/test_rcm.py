"""objective=rcm (lcm/objectives/rcm.py): a student step is sCM's loss + lambda x DMD2's DM term, its two grad
passes batched into one and equal to the two separate passes; adapter routing; fake-score steps; dmd_start;
a CLI run exporting the student with the sCM spec."""
import os

import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from lcm.consistency import ConsistencySpec
from lcm.denoiser import unet_net
from lcm.objectives.rcm import RCM
from lcm.training.loop import step_generators
from models import lora as lora_lib
from tests import test_dmd2
from tests.test_dmd2 import grads
from train import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_MODEL = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)
LORA = dict(name="rcm", rank=2, alpha=2)


def setup(**kw):
    pipe = build_pipeline(SMOKE_MODEL)
    obj = RCM(lora=LORA, tangent_warmup=0, **kw)
    torch.manual_seed(0)
    obj.setup(pipe)
    test_dmd2.randomize_(obj.trainables)                       # neither adapter is the base
    return pipe, obj


def batch(pipe, step=0, B=2):
    return test_dmd2.batch(pipe, step, B)[:3]


def test_student_step_is_scm_plus_weighted_dm_term_in_one_batched_pass():
    pipe, obj = setup(dmd_weight=0.5)
    d, G, Fk = obj.dmd, obj.lora_name, obj.dmd.fake.name
    z, cond, uncond = batch(pipe)
    log = []
    layer = next(m for _, m in lora_lib.lora_layers(pipe.unet) if hasattr(m, "lora_scale"))
    h = pipe.unet.register_forward_pre_hook(
        lambda m, a: log.append((torch.is_grad_enabled(), layer._active() if layer.lora_enabled else [], a[0].shape[0])))
    with obj.step_context(0, 0):
        loss, diag = obj.loss(pipe.unet, z, cond, uncond, step_generators(0, 0, 0, 2))
    h.remove()
    loss.mean().backward()
    got = grads(d.gen_params)
    assert all(g is None for g in grads(d.fake_params))
    k = diag["k"]
    assert [c for c in log if c[0]] == [(True, [G], 4)]                      # one grad pass: [sCM; generator]
    assert log.count((False, [], 4)) == 2 and log.count((False, [Fk], 2)) == 1   # teacher CFG twice; fake once
    assert log.count((False, [G], 2)) >= k                                   # backward simulation (+ the JVP)

    # By hand: the same draws, the two grad passes apart.
    obj.student.zero_grad(set_to_none=True)
    sch, gens = obj.schedule(z.device), step_generators(0, 0, 0, 2)
    draws = d.draw_generator_inputs(z, gens)
    x_in, t_in = d.generator_input(z, cond, draws, sch)
    l_scm, _ = obj.scm_step(z, cond, uncond, gens, obj.F_net(unet_net(pipe.unet), cond, sch))
    x = obj._generate(unet_net(pipe.unet), cond, sch)(x_in, t_in)
    (l_scm + 0.5 * d.dm_term(x, cond, uncond, draws, sch)).mean().backward()
    want = grads(d.gen_params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_fake_score_steps_and_dmd_start():
    pipe, obj = setup(gen_every=3, dmd_start=1)
    d = obj.dmd
    z, cond, uncond = batch(pipe, step=1)
    with obj.step_context(1, 0):                                             # a fake-score step
        loss, diag = obj.loss(pipe.unet, z, cond, uncond, step_generators(0, 1, 0, 2))
    loss.mean().backward()
    assert not diag["generator_step"]
    assert all(g is None for g in grads(d.gen_params)) and all(g is not None for g in grads(d.fake_params))
    d._stats.clear()
    with obj.step_context(0, 0):                                             # student step 0 < dmd_start: sCM only
        obj.loss(pipe.unet, z, cond, uncond, step_generators(0, 0, 0, 2))
    assert "dm_loss" not in d._stats
    with obj.step_context(3, 0):                                             # student step 1: the DM term joins
        obj.loss(pipe.unet, z, cond, uncond, step_generators(0, 3, 0, 2))
    assert "dm_loss" in d._stats


def test_cli_run_exports_the_student_with_the_scm_spec(tmp_path):
    test_dmd2.cli_run("rcm", tmp_path)
    with safe_open(str(tmp_path / "rcm.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and not any("fake" in k for k in keys)
    assert ConsistencySpec.from_metadata(meta).objective == "scm"
