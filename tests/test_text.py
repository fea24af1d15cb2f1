"""Text encoders and tokenization: parity with transformers' CLIP and open_clip's tokenizer (oracles)."""
import warnings

import open_clip
import pytest
import torch

from models.keymaps import clip_state_dict_hf_to_open_clip, clip_state_dict_open_clip_to_hf
from models.text import (CLIP_L, EOT, OPENCLIP_BIGG, PRESETS, SOT, TextTower, build_text_conditioner,
                         infer_text_config, tokenize)

transformers = pytest.importorskip("transformers")

PROMPTS = ["", "a photo of a cat", "A  Photo, of a CAT!!  ", "it's a dog's life; (1.2) 3d-render, 8k",
           "café naïve 日本語 ümlaut", "emoji 🐱 <cat> [dog] {x}", "tokens:   x_y-z/w\\v"]
LONG = "a very long prompt about " + " ".join(f"cat number {i}," for i in range(40))  # > 77 tokens


@pytest.fixture(scope="module")
def hf_tokenizer():
    """HF CLIPTokenizer built offline from open_clip's bundled BPE file (tests/oracle.py)."""
    from tests.oracle import hf_tokenizer as build
    tok = build()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (SOT, EOT, EOT)
    return tok


def hf_clip(width=128, layers=3, act="quick_gelu", proj_dim=None):
    """A random HF CLIP text model (head dim 64), weights scaled so activations are O(1)."""
    cfg = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=width,
                                      intermediate_size=4 * width, num_hidden_layers=layers,
                                      num_attention_heads=width // 64, hidden_act=act, eos_token_id=EOT,
                                      projection_dim=proj_dim or width, initializer_factor=1.0)
    model = (transformers.CLIPTextModelWithProjection if proj_dim else transformers.CLIPTextModel)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:                                   # LayerNorms start at (1, 0)
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("embedding.weight"):
                p.normal_(std=1.0)
    return model


def hf_sd(model) -> dict:
    """The model's weights in real-file HF layout (`text_model.` prefix; transformers 5 drops it)."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in model.state_dict().items()}


def final_norm(model):
    return getattr(model, "text_model", model).final_layer_norm


def ours_from_hf(model, **kw) -> TextTower:
    sd = clip_state_dict_hf_to_open_clip(hf_sd(model))
    tower = TextTower(**{**infer_text_config(sd), **kw}).eval()
    tower.load_state_dict(sd, strict=True)
    return tower


def assert_parity(out, ref):
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err

#----------------------------------------------------------------------------
# Tokenizer.


def test_token_ids_of_empty_and_simple_prompts():
    cat = [SOT, 320, 1125, 539, 320, 2368, EOT]                  # "a photo of a cat"
    for pad in (EOT, 0):
        ids = tokenize(["", "a photo of a cat"], pad_token_id=pad)
        assert ids.shape == (2, 77) and ids.dtype == torch.long
        assert ids[0].tolist() == [SOT, EOT] + [pad] * 75
        assert ids[1].tolist() == cat + [pad] * 70


def test_matches_hf_clip_tokenizer_sd1_convention(hf_tokenizer):
    # transformers 5's CLIPTokenizer skips ftfy (HTML entities, curly quotes stay): not compared here;
    # SD1's slow tokenizer with ftfy and open_clip both apply it (test_matches_open_clip_tokenize).
    for p in PROMPTS:
        ref = hf_tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids
        assert tokenize([p], pad_token_id=EOT)[0].tolist() == ref, p
    with pytest.warns(UserWarning, match="dropped"):
        ours = tokenize([LONG], pad_token_id=EOT)[0].tolist()
    assert ours == hf_tokenizer(LONG, padding="max_length", max_length=77, truncation=True).input_ids


def test_matches_open_clip_tokenize():
    for p in PROMPTS + ["&amp; becomes &", "x’s “curly” quotes"]:
        assert torch.equal(tokenize([p], pad_token_id=0), open_clip.tokenize([p])), p
    with pytest.warns(UserWarning, match="1 prompt"):
        ours = tokenize([LONG, "short"], pad_token_id=0)
    assert torch.equal(ours, open_clip.tokenize([LONG, "short"]))
    assert ours[0, -1].item() == EOT                             # EOT kept at the last position


def test_truncation_warns_once_with_the_count():
    n = len(open_clip.tokenizer.SimpleTokenizer().encode(LONG)) + 2 - 77
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenize([LONG, LONG, "x"], pad_token_id=EOT)
    assert len(caught) == 1 and f"{{0: {n}, 1: {n}}}" in str(caught[0].message)

#----------------------------------------------------------------------------
# Key map.


def test_keymap_round_trip_is_identity():
    sd = hf_sd(hf_clip(proj_dim=64))
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    back = clip_state_dict_open_clip_to_hf(clip_state_dict_hf_to_open_clip(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_keymap_accepts_keys_without_text_model_prefix():
    model = hf_clip(width=64, layers=1)                 # transformers 5 drops `text_model.` here
    bare = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    a, b = clip_state_dict_hf_to_open_clip(bare), clip_state_dict_hf_to_open_clip(hf_sd(model))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#----------------------------------------------------------------------------
# Tower parity per family mode (tokens from each reference's own tokenizer).


@torch.no_grad()
def test_sd1_mode_equals_last_hidden_state(hf_tokenizer):
    ref = hf_clip(act="quick_gelu")
    ours = ours_from_hf(ref, act="quick_gelu", layer="last", final_norm=True)
    ids = torch.tensor(hf_tokenizer(PROMPTS, padding="max_length", max_length=77).input_ids)
    hidden, pooled = ours(ids)
    assert pooled is None and hidden.shape == (len(PROMPTS), 77, 128)
    assert_parity(hidden, ref(ids).last_hidden_state)


@torch.no_grad()
def test_quick_gelu_vs_gelu_is_caught(hf_tokenizer):
    ref = hf_clip(act="quick_gelu")
    wrong = ours_from_hf(ref, act="gelu", layer="last", final_norm=True)   # loads without error
    ids = torch.tensor(hf_tokenizer(PROMPTS, padding="max_length", max_length=77).input_ids)
    target = ref(ids).last_hidden_state
    err = (wrong(ids)[0] - target).abs().max().item()
    assert err > 10 * 1e-4 * max(1.0, target.abs().max().item()), err   # 10x the parity tolerance


@torch.no_grad()
def test_sd2_mode_equals_final_norm_of_penultimate():
    ref = hf_clip(act="gelu")
    ours = ours_from_hf(ref, act="gelu", pad_token_id=0, layer="penultimate", final_norm=True)
    ids = open_clip.tokenize(PROMPTS)
    out = ref(ids, output_hidden_states=True)
    assert_parity(ours(ids)[0], final_norm(ref)(out.hidden_states[-2]))


@torch.no_grad()
def test_sdxl_conditioner_equals_cat_of_penultimates_and_bigg_text_embeds(hf_tokenizer):
    ref_l = hf_clip(width=128, layers=3, act="quick_gelu")                # CLIP-L stand-in
    ref_g = hf_clip(width=192, layers=2, act="gelu", proj_dim=96)        # bigG stand-in
    sd = {"conditioner.embedders.0.transformer." + k: v for k, v in hf_sd(ref_l).items()}
    sd |= {"conditioner.embedders.1.model." + k: v
           for k, v in clip_state_dict_hf_to_open_clip(hf_sd(ref_g)).items()}
    sd["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)    # real files carry it
    cond = build_text_conditioner("sdxl", sd)
    prompts = PROMPTS + [LONG]
    with pytest.warns(UserWarning, match="dropped"):
        c = cond.encode(prompts)
    ids_l = torch.tensor(hf_tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids)
    ids_g = open_clip.tokenize(prompts)
    out_l, out_g = ref_l(ids_l, output_hidden_states=True), ref_g(ids_g, output_hidden_states=True)
    assert c.context.shape == (len(prompts), 77, 128 + 192) and c.pooled.shape == (len(prompts), 96)
    assert_parity(c.context, torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1))
    assert_parity(c.pooled, out_g.text_embeds)
    from lcm.conditioning import unconditional                # SDXL's uncond branch: zeros, no text pass
    z = unconditional(None, "sdxl", cond.encode(PROMPTS[:3]))
    assert z.context.shape == (3, 77, 320) and z.pooled.shape == (3, 96)
    assert not z.context.any() and not z.pooled.any()

#----------------------------------------------------------------------------
# Building from full checkpoints (SD1: HF layout; SD2: open_clip layout).


@torch.no_grad()
def test_build_sd15_and_sd21_from_checkpoint_layouts(hf_tokenizer):
    ref1 = hf_clip(width=768, layers=2, act="quick_gelu")                  # SD1 width
    sd1 = {"cond_stage_model.transformer." + k: v for k, v in hf_sd(ref1).items()}
    sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    c1 = build_text_conditioner("sd15", sd1).encode(PROMPTS)
    ids = torch.tensor(hf_tokenizer(PROMPTS, padding="max_length", max_length=77).input_ids)
    assert c1.pooled is None
    assert_parity(c1.context, ref1(ids).last_hidden_state)

    ref2 = hf_clip(width=128, layers=3, act="gelu", proj_dim=128)
    sd2 = {"cond_stage_model.model." + k: v for k, v in clip_state_dict_hf_to_open_clip(hf_sd(ref2)).items()}
    sd2["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    cond2 = build_text_conditioner("sd21", sd2, dtype=torch.float64)
    assert cond2.towers[0].text_projection.dtype == torch.float64
    c2 = cond2.float().encode(PROMPTS)
    out = ref2(open_clip.tokenize(PROMPTS), output_hidden_states=True)
    assert c2.pooled is None
    assert_parity(c2.context, final_norm(ref2)(out.hidden_states[-2]))


def test_build_errors_name_family_and_keys():
    sd = {"cond_stage_model.model." + k: v for k, v in
          clip_state_dict_hf_to_open_clip(hf_sd(hf_clip(width=64, layers=1, act="gelu"))).items()}
    del sd["cond_stage_model.model.transformer.resblocks.0.ln_2.weight"]
    with pytest.raises(ValueError, match=r"sd21 text encoder 0 .*missing .*ln_2.weight \(64,\)"):
        build_text_conditioner("sd21", sd)
    with pytest.raises(ValueError, match="no text encoder weights under 'conditioner.embedders.0"):
        build_text_conditioner("sdxl", sd)
    with pytest.raises(ValueError, match="no text encoder layout for family 'demo2'"):
        build_text_conditioner("demo2", sd)

#----------------------------------------------------------------------------
# Full-size presets agree with the real architectures' shapes (meta device: no memory).


@pytest.mark.parametrize("preset,hf_kw", [
    (CLIP_L, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    (OPENCLIP_BIGG, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, projection_dim=1280)),
])
def test_presets_match_full_size_shapes(preset, hf_kw):
    cfg = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **hf_kw)
    with torch.device("meta"):
        ref = (transformers.CLIPTextModelWithProjection if preset["proj_dim"] else transformers.CLIPTextModel)(cfg)
        sd = clip_state_dict_hf_to_open_clip(hf_sd(ref))
        inferred = infer_text_config(sd)
        tower = TextTower(**{**preset, **inferred})
    assert {k: v for k, v in inferred.items() if k in preset} == {k: preset[k] for k in inferred if k in preset}
    assert {k: v.shape for k, v in tower.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    assert PRESETS["sdxl"]["towers"][1]["proj_dim"] == 1280 and PRESETS["sd15"]["towers"][0]["pad_token_id"] == EOT

#----------------------------------------------------------------------------
# Opt-in: parity at the real sizes (random weights; CLIP-L ~1 GiB, bigG ~6 GiB RAM).


@pytest.mark.fullsize
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@torch.no_grad()
def test_full_size_tower_parity(family):
    if family == "sd15":
        ref = hf_clip(width=768, layers=12, act="quick_gelu")
        ours = ours_from_hf(ref, **PRESETS["sd15"]["towers"][0])
        ids = tokenize(PROMPTS[:3], pad_token_id=EOT)
        assert_parity(ours(ids)[0], ref(ids).last_hidden_state)
    else:
        ref = hf_clip(width=1280, layers=32, act="gelu", proj_dim=1280)
        ours = ours_from_hf(ref, **PRESETS["sdxl"]["towers"][1])
        ids = open_clip.tokenize(PROMPTS[:3])
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
        assert_parity(hidden, out.hidden_states[-2])
        assert_parity(pooled, out.text_embeds)
