"""The samplers table (lcm/sampling/samplers.py): one record per solver, one preset per record, and
nothing else in the sampling path that names a solver."""
import ast
import inspect
import os
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from lcm.pipeline import Pipeline
from lcm.sampling import samplers
from tests.test_pipeline import pipe, sd15  # noqa: F401  (module fixtures: a tiny SD1.5 checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")


def test_every_record_has_its_preset_and_every_preset_names_a_record():
    for name, rec in samplers.SAMPLERS.items():
        assert rec.name == name
        preset = OmegaConf.load(os.path.join(ROOT, rec.preset))
        assert preset.name == name, f"{rec.preset} names {preset.name}"
        assert (preset.get("eta") is None) or rec.eta is not None, f"{rec.preset} sets an eta {name} ignores"
    for f in os.listdir(os.path.join(CONF, "solver")):
        assert OmegaConf.load(os.path.join(CONF, "solver", f)).name in samplers.SAMPLERS, f
    a1111 = [r.a1111 for r in samplers.SAMPLERS.values()]
    assert len(set(a1111)) == len(a1111)                          # from_png maps A1111 names back uniquely
    assert all(samplers.by_a1111(r.a1111) is r for r in samplers.SAMPLERS.values())


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown solver 'heun'; choose one of lcm, tcd"):
        samplers.get("heun")
    with pytest.raises(ValueError, match="teacher_solver must be one of ddim, dpmsolver, dpmsolver"):
        samplers.teacher_solver("lcm")
    with pytest.raises(ValueError, match="not a preset in conf/solver/"):
        samplers.load_preset(CONF, "heun")


def _string_constants(fn) -> set[str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body   # not the signature's defaults
    return {n.value for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_the_pipeline_names_no_solver():
    for fn in (Pipeline.__call__, Pipeline._timesteps, Pipeline._check_eta_spacing, Pipeline._check_args):
        named = _string_constants(fn) & set(samplers.SAMPLERS)
        assert not named, f"{fn.__name__} compares solver names {named}: read the record instead"


def test_a_new_record_samples_without_touching_the_pipeline(pipe, monkeypatch):
    """Adding a sampler is one record: a 'ddim_copy' record runs through Pipeline.__call__ unchanged
    and gives DDIM's images bit for bit."""
    rec = samplers.SAMPLERS["ddim"]
    copy = samplers.Sampler("ddim_copy", rec.run, rec.grid, "DDIM copy", eta=0.0)
    monkeypatch.setitem(samplers.SAMPLERS, "ddim_copy", copy)
    kw = dict(steps=3, guidance_scale=2.0, height=32, width=32, seed=1, output="latent", progress=False)
    a = pipe(["a prompt"], solver="ddim", **kw)
    b = pipe(["a prompt"], solver="ddim_copy", **kw)
    assert torch.equal(a, b)
