"""The compose tier's distillation presets (conf/experiment/compose_*_lora.yaml, the matrix of issue 32)
hold every method to one budget: the same teacher, data, LoRA rank and targets, batch, lr and number of
student / generator optimizer steps; each objective's own knobs are valid for its class."""
import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from tests.test_device_hygiene import ROOT

METHODS = ("lcm", "tcd", "pcm", "dmd2", "scm", "rcm")
SHARED = ("model", "data", "train.batch_size", "train.lr", "train.cache", "objective.lora.rank",
          "objective.lora.alpha", "objective.lora.targets", "objective.lora.dropout")


def preset(method: str):
    with initialize_config_dir(f"{ROOT}/conf", version_base=None):
        return compose("train", overrides=[f"experiment=compose_{method}_lora"])


def student_steps(cfg) -> int:
    """Optimizer steps of the exported adapter: DMD2 / rCM update it every gen_every-th step."""
    return cfg.train.max_steps // cfg.objective.get("gen_every", 1)


@pytest.mark.parametrize("method", METHODS)
def test_preset_fits_its_objective(method):
    cfg = preset(method)
    obj = OmegaConf.to_container(cfg.objective, resolve=False)
    params = inspect.signature(get_class(obj.pop("_target_"))).parameters
    assert set(obj) <= set(params) or any(p.kind == p.VAR_KEYWORD for p in params.values()), \
        sorted(set(obj) - set(params))
    assert cfg.objective.lora.name == ("lcm" if method == "lcm" else method)   # <name>.safetensors per method


def test_presets_share_one_budget():
    cfgs = {m: preset(m) for m in METHODS}
    ref = cfgs["lcm"]
    for m, c in cfgs.items():
        for key in SHARED:
            assert OmegaConf.select(c, key) == OmegaConf.select(ref, key), (m, key)
        assert student_steps(c) == student_steps(ref) == 400, m
        assert c.data.split == "train"                                      # held-out pairs unseen
