"""The compose tier's teacher in the SDXL layout (demo/compose_arch.py, demo/compose_text.py): a tiny model of
the same architecture function, written by save_teacher, loads through the SDXL code paths (family sdxl,
pooled vector, size/crop ids through label_emb), samples, trains its towers, and trains 2 steps of
`train.py experiment=compose_teacher`."""

import json
import os

import pytest
import safetensors
import safetensors.torch
import torch
from omegaconf import open_dict

from demo.compose import in_split, parse_caption
from demo.compose_arch import N_SIZE_IDS, new_text, new_unet, save_teacher, teacher_arch
from demo.compose_evaluator import COLUMNS
from demo.compose_text import load_towers, pretrain_towers, save_towers
from lcm.conditioning import SIZE_EMB_DIM, sdxl_vector, with_vector
from lcm.pipeline import Pipeline
from models.vae import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = teacher_arch(model_channels=32, channel_mult=(1, 1), attention=(1, 0), middle=1, head_channels=16,
                    widths=(8, 16), layers=2, heads=2)
POOLED = 16


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(ch=32, ch_mult=[1, 1, 1], num_res_blocks=1, z_channels=4, embed_dim=4, scale_factor=0.6)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A tiny random SGM-layout teacher file (UNet perturbed off LDM's zero output layers)."""
    path = str(tmp_path_factory.mktemp("compose") / "tiny_teacher.safetensors")
    unet, text = new_unet(TINY, seed=0), new_text(TINY, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_teacher(path, unet, tiny_vae(), text, TINY)
    return path, text


@pytest.fixture(scope="module")
def pipe(tiny_file):
    return Pipeline.from_checkpoint(tiny_file[0])

#----------------------------------------------------------------------------
# Layout and loading.

def test_file_is_sgm_layout_and_loads_as_sdxl(tiny_file, pipe):
    with safetensors.safe_open(tiny_file[0], framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys   # HF CLIP
    assert "conditioner.embedders.1.model.text_projection" in keys                                        # open_clip
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    assert "/" not in meta["world"] and meta["prediction_type"] == "v_prediction"
    assert (pipe.family, pipe.prediction_type, pipe.default_size) == ("sdxl", "v_prediction", 64)
    assert pipe.vae_scale == pytest.approx(0.6) and pipe.latent_factor == 4
    assert pipe.unet.adm_in_channels == POOLED + N_SIZE_IDS * SIZE_EMB_DIM and hasattr(pipe.unet, "label_emb")
    prompts = ["a small red circle to the left of a large blue square", "a large green square above a small red diamond"]
    cond = pipe.encode_prompt(prompts)
    assert cond.context.shape == (2, 77, 8 + 16) and cond.pooled.shape == (2, POOLED)
    ref = tiny_file[1].encode(prompts)                      # the towers round-trip through the HF / open_clip keys
    torch.testing.assert_close(cond.context, ref.context)   # (float rounding: q/k/v are split and rejoined)
    torch.testing.assert_close(cond.pooled, ref.pooled)


def test_size_and_crop_ids_reach_label_emb(pipe):
    cond = pipe.encode_prompt(["a small red circle to the left of a large blue square"])
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    outs = [pipe.unet(z, t, cond.context, with_vector(cond, [o], [c], (64, 64)).y)
            for o, c in (((64, 64), (0, 0)), ((96, 80), (0, 0)), ((64, 64), (8, 12)))]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    seen = []
    hook = pipe.unet.label_emb.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        pipe(["a small red circle to the left of a large blue square"], steps=1, solver="ddim", guidance_scale=3.0,
             seed=0, output="latent", progress=False)
    finally:
        hook.remove()
    y = seen[0]                                             # CFG: [cond; zero uncond] in one pass
    assert y.shape == (2, POOLED + 6 * 256)
    torch.testing.assert_close(y[:1], sdxl_vector(cond.pooled, (64, 64), (0, 0), (64, 64)))
    assert (y[1:, :POOLED] == 0).all()                      # SDXL's zero unconditional pooled vector


@pytest.mark.parametrize("solver,size", [("lcm", (64, 64)), ("ddim", (96, 64))])
def test_one_step_sampling(pipe, solver, size):
    h, w = size
    img = pipe(["a large purple triangle above a small red diamond"], steps=1, solver=solver, guidance_scale=1.0,
               height=h, width=w, seed=0, output="tensor", progress=False)
    assert img.shape == (1, 3, h, w) and torch.isfinite(img).all()

#----------------------------------------------------------------------------
# Text towers.

def test_tower_pretraining_runs_and_round_trips(tmp_path):
    text, heads, acc = pretrain_towers(TINY["text"], steps=2, batch=8, n_captions=32, eval_n=16, log_every=1)
    assert set(acc) == {"train", "heldout"} and set(acc["train"]) == {"tower0", "tower1", "pooled"}
    assert set(acc["train"]["pooled"]) == set(COLUMNS) | {"all"}
    assert all(0 <= v <= 1 for part in acc.values() for head in part.values() for v in head.values())
    assert not any(p.requires_grad for p in text.parameters())
    path = str(tmp_path / "text.safetensors")
    save_towers(text, path, acc)
    back, saved = load_towers(path)
    assert back.config == text.config == new_text(TINY).config and saved == acc
    prompts = ["a small yellow square below a large cyan circle", ""]
    a, b = back.encode(prompts), text.encode(prompts)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)

#----------------------------------------------------------------------------
# The experiment.

def _compose(overrides, config="train"):
    """The composed config, with HydraConfig set (its ${hydra:...} paths resolve)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose(config, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_presets_compose():
    cfg = _compose(["experiment=compose_teacher"])
    o, t, d = cfg.objective, cfg.train, cfg.data
    assert (o._target_, o.ema_decay, o.p_uncond, o.lora) == ("lcm.objectives.diffusion.Diffusion", 0.999, 0.1, None)
    assert (d._target_, d.split, d.micro, d.resolution) == ("demo.compose.ComposeDataset", "train", True, 64)
    assert (t.cache, t.checkpoint_every, t.keep_checkpoints, t.batch_size, cfg.validation.every) == (True, 250, 2, 32, 0)
    assert cfg.model.path.endswith("outputs/compose/base_init.safetensors") and list(cfg.model.lora) == []
    sample = _compose(["model=compose"], "sample")
    assert sample.model.path.endswith("assets/compose_teacher.safetensors")
    assert all(in_split(parse_caption(p), "train") for p in sample.model.prompts)
    assert [os.path.basename(lo.path) for lo in sample.model.lora] == ["compose_lcm_lora.safetensors"]
    assert os.path.isfile(sample.model.lora[0].path)
    assert list(_compose(["experiment=compose_lcm_lora"]).lora) == []   # distillation loads no frozen LoRA


def _run(overrides):
    import train as cli
    cfg = _compose(overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cli.run(cfg)


def test_train_two_steps_then_resume(tiny_file, tmp_path):
    run = str(tmp_path / "run")
    over = ["experiment=compose_teacher", f"model.path={tiny_file[0]}", "data.length=8", "train.batch_size=2",
            "train.max_steps=2", "train.checkpoint_every=1", "train.warmup_steps=0", f"hydra.run.dir={run}"]
    result = _run(over)
    assert result["status"] == "done" and result["step"] == 2
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_0000001", "step_0000002"]
    out = Pipeline.from_checkpoint(result["export"])       # the EMA teacher, still an SDXL-layout file
    assert out.family == "sdxl" and out.prediction_type == "v_prediction" and out.unet.adm_in_channels
    result = _run([o.replace("train.max_steps=2", "train.max_steps=3") for o in over] + ["resume=true"])
    assert result["status"] == "done" and result["step"] == 3


def test_bundle_then_continue_a_leg(tiny_file, tmp_path):
    """demo.compose_text bundle: float16 tensors equal to the export's rounded, the world spec back, no
    machine path; a leg trained from the bundled file appends itself to the file's legs."""
    from demo.compose_text import bundle_teacher
    out = str(tmp_path / "compose_teacher.safetensors")
    over = ["experiment=compose_teacher", "data.length=8", "train.batch_size=2", "train.max_steps=1",
            "train.warmup_steps=0"]
    first = _run(over + [f"model.path={tiny_file[0]}", f"hydra.run.dir={tmp_path / 'leg1'}"])
    bundle_teacher(first["export"], out, 1)
    src, got = safetensors.torch.load_file(first["export"]), safetensors.torch.load_file(out)
    assert src.keys() == got.keys() and all(got[k].dtype == torch.float16 for k in got)
    assert all(torch.equal(got[k], src[k].half()) for k in src)
    with safetensors.safe_open(out, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["world"]) and str(tmp_path) not in json.dumps(meta)
    assert json.loads(meta["lcm.teacher_legs"]) == [{"steps": 1, "from": os.path.basename(tiny_file[0])}]
    second = _run(over + [f"model.path={out}", f"hydra.run.dir={tmp_path / 'leg2'}"])
    assert Pipeline.from_checkpoint(out).family == "sdxl"
    bundle_teacher(second["export"], out, 1)
    with safetensors.safe_open(out, framework="pt") as f:
        legs = json.loads(f.metadata()["lcm.teacher_legs"])
    assert legs == [{"steps": 1, "from": os.path.basename(tiny_file[0])}, {"steps": 1, "from": os.path.basename(out)}]
