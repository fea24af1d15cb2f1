"""A1111 infotext (lcm/sampling/infotext.py) and sample.py's use of it on the bundled demo model: every PNG
readable by sd-parsers with no absolute path in it, from_png regenerating pixel for pixel, the fair
grid's teacher rows equal to plain runs without the LCM-LoRA, and vae.tiny."""
import contextlib
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch

from lcm.sampling import infotext, samplers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
ASSETS = os.path.join(ROOT, "assets")
P1 = "a large red circle in the center on a blue background"
P2 = "a small yellow square at the top left on a black background"
NEG = "blurry, low quality: bad"                         # a comma and a colon
LCM = f"{{path: {ASSETS}/demo_lcm_lora.safetensors, name: lcm}}"
STYLE = f"{{path: {ASSETS}/demo_style_lora.safetensors, scale: 0.8}}"
TINY = os.path.join(ASSETS, "demo_taesd_decoder.safetensors")

#----------------------------------------------------------------------------
# The format itself.

def test_format_parse_round_trip_with_quoting():
    params = {"prompt": "a cat, sitting:\non a mat", "negative_prompt": "blurry, bad\nugly",
              "Steps": 4, "Sampler": "DPM++ 2M", "CFG scale": 1.5, "Seed": 7, "Size": "64x64",
              "Model hash": "0123456789", "Model": "demo, v1: final", "VAE": None,
              "loras": [("style_a", 0.8, "abcdefabcdef"), ("lcm", 1.0, None)],
              "Note": 'say "hi"', "Padded": " x ", "Lines": "one\ntwo", "Empty": "", "Unicode": "é, ü",
              "Timesteps": [999, 499]}
    text = infotext.format_infotext(params)
    *head, last = text.split("\n")
    assert last.startswith("Steps: 4, Sampler: DPM++ 2M, CFG scale: 1.5, Seed: 7, Size: 64x64, ")
    assert head == ["a cat, sitting:", "on a mat <lora:style_a:0.8> <lora:lcm:1>", "Negative prompt: blurry, bad", "ugly"]
    assert f"Model: {json.dumps('demo, v1: final')}" in last and 'Lora hashes: "style_a: abcdefabcdef"' in last
    assert "Lines: " + json.dumps("one\ntwo") in last and "VAE" not in last      # None is left out
    back = infotext.parse_infotext(text)
    want = {k: (json.dumps(v) if isinstance(v, list) else infotext.number(v)) for k, v in params.items()
            if k not in ("prompt", "negative_prompt", "loras") and v is not None}
    assert back == {"prompt": params["prompt"], "negative_prompt": params["negative_prompt"],
                    "loras": [("style_a", 0.8, "abcdefabcdef"), ("lcm", 1.0, None)], **want}
    assert infotext.parse_infotext(infotext.format_infotext({**params, "negative_prompt": None}))["negative_prompt"] is None


def test_parses_an_a1111_webui_infotext():
    text = ("masterpiece, <lora:papercut:0.7> a fox\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M, "
            "Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, Model hash: 6ce0161689, Model: "
            "v1-5-pruned-emaonly, Lora hashes: \"papercut: 1b2c3d4e5f60\", Version: v1.10.1")
    p = infotext.parse_infotext(text)
    assert p["prompt"] == "masterpiece, a fox" and p["negative_prompt"] == "lowres"
    assert p["loras"] == [("papercut", 0.7, "1b2c3d4e5f60")] and p["Schedule type"] == "Karras"
    assert (p["Steps"], p["CFG scale"], p["Seed"], p["Size"], p["Version"]) == ("20", "7", "123", "512x768", "v1.10.1")
    assert infotext.parse_infotext("just a prompt, with: a colon") == \
        {"prompt": "just a prompt, with: a colon", "negative_prompt": None, "loras": []}


def test_hashes_are_a1111s(tmp_path):
    """Model hash: sha256 of the file, 10 hex; LoRA hash: sha256 of the tensor data after the
    safetensors header (metadata does not change it), 12 hex."""
    from safetensors.torch import save_file
    t = {"w": torch.arange(6.0).reshape(2, 3)}
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(t, a, metadata={"x": "1"})
    save_file(t, b, metadata={"x": "a longer value"})
    raw = open(a, "rb").read()
    assert infotext.short_hash(a) == hashlib.sha256(raw).hexdigest()[:10] != infotext.short_hash(b)
    n = int.from_bytes(raw[:8], "little")
    assert infotext.lora_hash(a) == hashlib.sha256(raw[8 + n:]).hexdigest()[:12] == infotext.lora_hash(b)
    pt = tmp_path / "c.pt"
    pt.write_bytes(b"not safetensors")
    assert infotext.lora_hash(str(pt)) == hashlib.sha256(b"not safetensors").hexdigest()[:12]

#----------------------------------------------------------------------------
# sample.py in-process on the demo model (Hydra compose; overrides count as the command line).

@contextlib.contextmanager
def composed(*overrides):
    """conf/sample.yaml composed with these overrides (as the command line), Hydra's config set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("sample", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def sample(out_dir, *overrides, capture=None) -> list[str]:
    """sample.run on conf/sample.yaml with these overrides; capture: a list that gets the pipeline."""
    import sample as sample_py
    build = sample_py.build_pipeline

    def spy(c):
        pipe, loras = build(c)
        if capture is not None:
            capture.append(pipe)
        return pipe, loras
    sample_py.build_pipeline = spy
    try:
        with composed(*overrides, f"out_dir={out_dir}") as cfg:
            return sample_py.run(cfg)
    finally:
        sample_py.build_pipeline = build


def pixels(path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def params(path) -> str:
    from PIL import Image
    return Image.open(path).text["parameters"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs the tests look at, each into its own folder: name -> written paths."""
    tmp = tmp_path_factory.mktemp("infotext")
    common = ["steps=2", f"prompt={P1}", f"lora=[{LCM}, {STYLE}]"]
    out = {"tmp": tmp, "pipes": []}
    out["plain"] = sample(tmp / "plain", *common, "guidance_scale=1.5", f"negative_prompt='{NEG}'")
    out["grid"] = sample(tmp / "grid", *common, "grid={solvers: [lcm, ddim], steps: [2]}", capture=out["pipes"])
    out["teacher"] = sample(tmp / "teacher", "solver=ddim", "steps=2", f"prompt={P1}", f"lora=[{STYLE}]")
    out["batch"] = sample(tmp / "batch", "steps=1", f"prompt=[{P1}, '{P2}']", f"lora=[{LCM}]")
    out["tiny"] = sample(tmp / "tiny", *common, "guidance_scale=1.5", f"negative_prompt='{NEG}'", f"vae.tiny={TINY}")
    return out


def all_pngs(runs) -> list[str]:
    return [p for k, v in runs.items() if k not in ("tmp", "pipes") for p in v]


@pytest.mark.slow
def test_sd_parsers_reads_every_png(runs):
    from sd_parsers import ParserManager
    manager = ParserManager()
    for path in all_pngs(runs):
        info = manager.parse(path)
        assert info is not None and info.generator.name == "AUTOMATIC1111", path
        ours = infotext.parse_infotext(params(path))
        sampler, = info.samplers
        assert sampler.name == samplers.get(ours["Solver"]).a1111
        assert {k: sampler.parameters[k] for k in ("steps", "cfg_scale", "seed")} == \
            {"steps": ours["Steps"], "cfg_scale": ours["CFG scale"], "seed": ours["Seed"]}
        assert info.metadata["Size"] == "64x64"
        assert sampler.model.name == "demo_teacher" and sampler.model.hash == infotext.short_hash(
            os.path.join(ASSETS, "demo_teacher.safetensors"))
        prompt = str(info.prompts[0])
        assert prompt.startswith(ours["prompt"])
        loras = [(n, float(w)) for n, w in re.findall(r"<lora:([^:>]+):([^>]+)>", prompt)]
        assert loras == [(n, w) for n, w, _ in ours["loras"]] and loras
    plain = manager.parse(runs["plain"][0])
    assert str(plain.negative_prompts[0]) == NEG and str(plain.prompts[0]) == \
        f"{P1} <lora:demo_lcm_lora:1> <lora:demo_style_lora:0.8>"
    assert plain.samplers[0].parameters["cfg_scale"] == "1.5" and plain.samplers[0].parameters["steps"] == "2"


@pytest.mark.slow
def test_no_absolute_path_in_any_chunk(runs):
    from PIL import Image
    for path in all_pngs(runs):
        chunks = Image.open(path).text
        assert list(chunks) == ["parameters"], path
        for bad in (str(runs["tmp"]), ROOT, ASSETS):
            assert bad not in chunks["parameters"], (path, chunks["parameters"])
    tiny = infotext.parse_infotext(params(runs["tiny"][0]))
    assert tiny["VAE"] == "demo_taesd_decoder.safetensors" and tiny["VAE hash"] == infotext.short_hash(TINY)


@pytest.mark.slow
def test_from_png_regenerates_the_image_pixel_for_pixel(runs):
    """The PNG's LoRA weights win over the list's (style 1.0 here, 0.8 in the PNG), its prompt,
    negative prompt, CFG and seed over the config's; an unnamed LoRA (the grid's ddim row: LCM-LoRA
    off) runs at 0, and the solver and its CFG come from the PNG."""
    tmp = runs["tmp"]
    lora = f"lora=[{LCM}, {ASSETS}/demo_style_lora.safetensors]"
    again, = sample(tmp / "again", f"from_png={runs['plain'][0]}", lora)
    assert np.array_equal(pixels(again), pixels(runs["plain"][0]))
    assert infotext.parse_infotext(params(again)) == infotext.parse_infotext(params(runs["plain"][0]))
    ddim_cell = next(p for p in runs["grid"] if os.path.basename(p).startswith("ddim-"))
    teacher, = sample(tmp / "again_ddim", f"from_png={ddim_cell}", lora)
    assert np.array_equal(pixels(teacher), pixels(ddim_cell))
    reseeded, = sample(tmp / "reseeded", f"from_png={runs['plain'][0]}", lora, "seed=5")    # explicit wins
    assert infotext.parse_infotext(params(reseeded))["Seed"] == "5"
    assert not np.array_equal(pixels(reseeded), pixels(runs["plain"][0]))


@pytest.mark.slow
def test_from_png_names_a_lora_missing_from_the_config(runs):
    from lcm.sampling.png import read_png
    with pytest.raises(ValueError, match=r"LoRA 'demo_style_lora' .*not in this config's lora list; pass lora=\["):
        sample(runs["tmp"] / "missing", f"from_png={runs['plain'][0]}")           # the demo list: LCM-LoRA only
    grid = next(p for p in runs["grid"] if "grid" in os.path.basename(p))
    with pytest.raises(ValueError, match="grid image"):
        read_png(grid)


@pytest.mark.slow
def test_fair_grid_teacher_row_is_a_plain_run_without_the_lcm_lora(runs):
    """ddim in the grid = solver=ddim with the style LoRA only, at ddim.yaml's CFG; labelled rows;
    the cells are the single PNGs; the adapter scales are back as configured afterwards."""
    from PIL import Image
    ddim_cell = next(p for p in runs["grid"] if os.path.basename(p).startswith("ddim-"))
    lcm_cell = next(p for p in runs["grid"] if os.path.basename(p).startswith("lcm-"))
    assert np.array_equal(pixels(ddim_cell), pixels(runs["teacher"][0]))
    cell = infotext.parse_infotext(params(ddim_cell))
    assert cell["CFG scale"] == "7.5" and [n for n, *_ in cell["loras"]] == ["demo_style_lora"]
    assert [n for n, *_ in infotext.parse_infotext(params(lcm_cell))["loras"]] == ["demo_lcm_lora", "demo_style_lora"]
    grid_path = next(p for p in runs["grid"] if "grid" in os.path.basename(p))
    grid = pixels(grid_path)
    margin = grid.shape[1] - 64
    assert grid.shape[0] == 128 and margin > 20 and (grid[:, :margin] < 128).any()          # labels drawn
    assert np.array_equal(grid[:64, margin:], pixels(lcm_cell)) and np.array_equal(grid[64:, margin:], pixels(ddim_cell))
    g = infotext.parse_infotext(params(grid_path))
    assert g["Grid rows"] == "lcm 2 steps NFE 2 CFG 1 | ddim 2 steps NFE 4 CFG 7.5 no LCM-LoRA"
    pipe, = runs["pipes"]
    assert pipe.adapter_scales() == {"lcm": 1.0, "demo_style_lora": 0.8}
    assert Image.open(grid_path).text["parameters"].split("\n")[-1].startswith("Steps: 2, Sampler: LCM")


@pytest.mark.slow
def test_batch_pngs_and_their_contact_sheet(runs):
    """Two prompts: one PNG each (own seed, Batch size/pos) and a labelled one-row sheet."""
    a, b, sheet = runs["batch"]
    pa, pb = infotext.parse_infotext(params(a)), infotext.parse_infotext(params(b))
    assert (pa["prompt"], pa["Seed"], pb["prompt"], pb["Seed"]) == (P1, "0", P2, "1")
    assert (pb["Batch size"], pb["Batch pos"]) == ("2", "1")
    s = infotext.parse_infotext(params(sheet))
    assert s["Grid columns"] == f"seed 0 {P1} | seed 1 {P2}" and "Batch size" not in s
    assert np.array_equal(pixels(sheet)[:, -128:-64], pixels(a)) and np.array_equal(pixels(sheet)[:, -64:], pixels(b))


@pytest.mark.slow
def test_vae_tiny_decodes_differently(runs):
    tiny, full = pixels(runs["tiny"][0]), pixels(runs["plain"][0])
    assert tiny.shape == full.shape == (64, 64, 3) and tiny.std() > 10
    diff = np.abs(tiny.astype(int) - full.astype(int))
    assert diff.mean() > 1 and diff.mean() < 60          # another decoder of the same latent: close, not equal


def test_from_png_rule_command_line_keys_win():
    """apply_png: the PNG's solver settings come along unless given (or another solver is chosen);
    a given key keeps its value."""
    from lcm.sampling.from_png import apply_png
    info = infotext.parse_infotext(infotext.format_infotext(
        {"prompt": "p", "Steps": 2, "Sampler": "TCD", "CFG scale": 1.5, "Seed": 9, "Size": "64x128",
         "Solver": "tcd", "Eta": 0.5, "Spacing": None, "Timesteps": [999, 499]}))
    with composed("seed=3") as cfg:
        got = apply_png(cfg, info, {"seed"})
        assert (got.solver.name, got.steps, got.timesteps, got.guidance_scale, got.solver.eta) == \
            ("tcd", 2, [999, 499], 1.5, 0.5)
        assert (got.seed, got.prompt, got.width, got.height, got.negative_prompt) == (3, "p", 64, 128, None)
        assert [e["scale"] for e in got.lora] == [0.0]            # the demo LCM-LoRA: not named in the PNG
    with composed("solver=ddim") as cfg:
        got = apply_png(cfg, info, {"solver"})                     # another solver: its preset
        assert (got.solver.name, got.steps, got.timesteps, got.guidance_scale, got.solver.eta) == \
            ("ddim", 50, None, 7.5, None)
    with composed("solver=tcd", "steps=6") as cfg:
        got = apply_png(cfg, info, {"solver", "steps"})            # the same solver: the PNG's, but steps
        assert (got.steps, got.timesteps, got.solver.eta) == (6, None, 0.5)


@pytest.mark.slow
def test_nfe_label_counts_unet_evaluations(runs):
    """The grid's NFE = UNet evaluations per image, counted on the UNet, for every solver, CFG on/off."""
    from lcm.sampling.grid import Row, nfe
    pipe = runs["pipes"][0]
    seen = [0]
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen.__setitem__(0, seen[0] + a[0].shape[0]))
    try:
        for solver, s in [(x, 2.0) for x in ("lcm", "tcd", "pcm", "ddim", "euler", "dpmsolver", "dpmsolver++")] + \
                [("lcm", 1.0), ("dpmsolver", 1.0)]:
            seen[0] = 0
            pipe([P1], steps=2, guidance_scale=s, solver=solver, seed=0, progress=False, output="latent")
            assert seen[0] == nfe(pipe, Row(solver, 2, s, None, None, {}, False)), (solver, s)
    finally:
        hook.remove()


def test_training_validation_grid_carries_infotext(tmp_path):
    """The trainer's validation grids are PNGs the project writes too: sd-parsers reads them, no paths."""
    from PIL import Image
    from sd_parsers import ParserManager

    from tests.test_trainer import LORA, data, small, tiny_pipe, train
    setup = small(max_steps=2, validation=dict(every=2, steps=[1], guidance=[1.0]))
    train(tiny_pipe(), data(), setup, str(tmp_path), LORA, config={"model": {"path": str(tmp_path / "tiny.safetensors")}})
    png, = (tmp_path / "validation").glob("step_*.png")
    text = Image.open(png).text["parameters"]
    assert str(tmp_path) not in text and "Training step: 2" in text and "Grid rows:" in text
    info = ParserManager().parse(Image.open(png))
    sm = info.samplers[0]
    assert sm.name == "LCM" and int(sm.parameters["steps"]) == 1 and sm.model.name == "tiny"
    assert info.full_prompt.strip()
