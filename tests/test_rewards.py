"""Preference rewards (lcm/evaluation/rewards.py) on tiny random models written in the released files'
layouts: HPSv2.1 (open_clip state dict under 'state_dict'), ImageReward (ImageReward.pt's BLIP names,
med_config.json, a BERT vocab.txt), PickScore (a transformers CLIPModel folder and a CLIPProcessor folder).
Each score is checked against a direct computation from the file's own tensors."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lcm.evaluation.rewards  # noqa: F401  (registers hps, image_reward, pickscore)
from lcm.evaluation import MetricSet, MissingWeights
from lcm.evaluation.stats import Bootstrap
from tests.oracle import hf_tokenizer, randomize_, tiny_open_clip_model

PROMPTS = ["a red cube", "a blue sphere"]


def _images(h: int, w: int) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(1))


def _scores(name: str, opts: dict, images: torch.Tensor, prompts: list) -> torch.Tensor:
    return MetricSet([name], opts).build().features(images, prompts)[name][:, 0]


def _pil(images: torch.Tensor) -> list:
    from PIL import Image
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for im in images]


def _one_line_error(name: str, opts: dict, match: str, kind=MissingWeights) -> None:
    with pytest.raises(kind, match=match) as e:
        MetricSet([name], opts).build()
    assert "\n" not in str(e.value), str(e.value)


def test_the_rewards_register_without_importing_their_packages():
    code = ("import sys, lcm.evaluation.rewards; from lcm.evaluation import METRICS\n"
            "assert {'hps', 'image_reward', 'pickscore'} <= set(METRICS)\n"
            "assert 'transformers' not in sys.modules and 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

#----------------------------------------------------------------------------
# HPSv2.1: 100 cos(image, prompt) of an open_clip CLIP, hpsv2's letterbox preprocessing.

def test_hps_is_100_cos_of_the_open_clip_model_on_letterboxed_images(tmp_path):
    import open_clip
    from torchvision.transforms import functional as TF
    clip = randomize_(tiny_open_clip_model(tmp_path / "cfg", "tiny-hps", 16))
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")     # hpsv2's layout
    opts = {"hps_weights": str(tmp_path / "HPS_v2.1_compressed.pt"), "hps_clip_model": "tiny-hps"}
    images = _images(24, 40)                                    # landscape: resized to 19x32, padded 6 + 7 rows
    got = _scores("hps", opts, images, PROMPTS)

    mean, std = open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD
    px = []
    for pil in _pil(images):                                    # hpsv2: ToTensor, ResizeMaxSize(32, fill=0), Normalize
        x = TF.resize(TF.to_tensor(pil), [19, 32], TF.InterpolationMode.BICUBIC)
        px.append(TF.normalize(TF.pad(x, [0, 6, 0, 7], fill=0), mean, std))
    with torch.no_grad():
        img, txt, _ = clip.eval()(torch.stack(px), open_clip.get_tokenizer("tiny-hps")(PROMPTS))   # normalised
    torch.testing.assert_close(got, 100 * (img * txt).sum(-1), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(got, _scores("hps", opts, images, PROMPTS[::-1]), atol=1e-3)      # reads the prompt

    ms = MetricSet(["hps"], opts).build()                       # a per-image mean with prompt-level intervals
    feats = ms.features(images, PROMPTS)
    assert ms.reduce(feats, PROMPTS)["hps"] == pytest.approx(got.double().mean().item(), abs=1e-5)
    unit, reps = ms.replicates(feats, PROMPTS, Bootstrap(20).resample(2, 1))["hps"]
    assert unit == "prompt" and reps.shape == (20,)

    _one_line_error("hps", {}, r"hps_weights is not set: download HPS_v2\.1_compressed\.pt of xswu/HPSv2")
    _one_line_error("hps", {"hps_weights": str(tmp_path / "nope.pt")}, r"nope\.pt: no such file; download HPS_v2")
    torch.save({"state_dict": {"layers.0.weight": torch.zeros(2, 2)}}, tmp_path / "bad.pt")
    _one_line_error("hps", opts | {"hps_weights": str(tmp_path / "bad.pt")},
                    r"hps_weights: not an open_clip tiny-hps state dict .*missing \['ln_final", ValueError)

#----------------------------------------------------------------------------
# ImageReward: BLIP ViT -> BERT with cross-attention -> MLP on [CLS], standardised.

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cube", "sphere"]
MED = dict(architectures=["BertModel"], hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=64, vocab_size=len(VOCAB) + 2, max_position_embeddings=40, hidden_act="gelu",
           layer_norm_eps=1e-12, pad_token_id=0, type_vocab_size=2, model_type="bert", encoder_width=768,
           add_cross_attention=True)
VIT = dict(width=128, depth=1, patch=16, grid=2, heads=2)       # BLIP ViT-L: 1024, 24, 16, 14, 16


def _image_reward_checkpoint(seed: int = 0) -> dict:
    """Random tensors under ImageReward.pt's names: blip.visual_encoder (timm ViT), blip.text_encoder
    (BLIP med.py BertModel), the unused ITC projections and position_ids buffer, mlp.layers.{0,2,4,6,7}."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)                               # noqa: E731
    W, D, I, p, n = VIT["width"], MED["hidden_size"], MED["intermediate_size"], VIT["patch"], VIT["grid"] ** 2
    sd = {}
    norm = lambda k, d: sd.update({f"{k}.weight": 1 + r(d), f"{k}.bias": r(d)})     # noqa: E731
    lin = lambda k, o, i: sd.update({f"{k}.weight": r(o, i) * 3, f"{k}.bias": r(o)})  # noqa: E731
    v = "blip.visual_encoder."
    sd |= {v + "cls_token": r(1, 1, W), v + "pos_embed": r(1, n + 1, W), v + "patch_embed.proj.weight": r(W, 3, p, p),
           v + "patch_embed.proj.bias": r(W)}
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", W), lin(b + "attn.qkv", 3 * W, W), lin(b + "attn.proj", W, W)
        norm(b + "norm2", W), lin(b + "mlp.fc1", 4 * W, W), lin(b + "mlp.fc2", W, 4 * W)
    norm(v + "norm", W)
    t = "blip.text_encoder."
    sd |= {t + "embeddings.position_ids": torch.arange(MED["max_position_embeddings"])[None],
           t + "embeddings.word_embeddings.weight": r(MED["vocab_size"], D),
           t + "embeddings.position_embeddings.weight": r(MED["max_position_embeddings"], D)}
    norm(t + "embeddings.LayerNorm", D)
    for i in range(MED["num_hidden_layers"]):
        e = f"{t}encoder.layer.{i}."
        for a, kv in (("attention", D), ("crossattention", W)):
            lin(e + a + ".self.query", D, D), lin(e + a + ".self.key", D, kv), lin(e + a + ".self.value", D, kv)
            lin(e + a + ".output.dense", D, D), norm(e + a + ".output.LayerNorm", D)
        lin(e + "intermediate.dense", I, D), lin(e + "output.dense", D, I), norm(e + "output.LayerNorm", D)
    lin("blip.vision_proj", 256, W), lin("blip.text_proj", 256, D)
    dims = [D, 1024, 128, 64, 16, 1]
    for i, j in enumerate([0, 2, 4, 6, 7]):
        lin(f"mlp.layers.{j}", dims[i + 1], dims[i])
    return sd


def _blip_reference(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward.score from the checkpoint's own names: timm ViT (pre-norm, eps 1e-6), BERT layers
    (post-norm, eps 1e-12: self-attention, cross-attention to all image tokens, feed-forward)."""
    g = lambda k: sd[k]                                                              # noqa: E731
    ln = lambda x, k, eps: F.layer_norm(x, x.shape[-1:], g(k + ".weight"), g(k + ".bias"), eps)   # noqa: E731
    lin = lambda x, k: F.linear(x, g(k + ".weight"), g(k + ".bias"))                 # noqa: E731

    def attn(q, k, v, heads, bias=0.0):
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)              # noqa: E731
        a = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5 + bias
        return (a.softmax(-1) @ split(v)).transpose(1, 2).flatten(2)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, g(v + "patch_embed.proj.weight"), g(v + "patch_embed.proj.bias"), stride=VIT["patch"])
    x = torch.cat([g(v + "cls_token").expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + g(v + "pos_embed")
    for i in range(VIT["depth"]):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(attn(q, k, val, VIT["heads"]), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln(x, v + "norm", 1e-6)
    t, h, eps = "blip.text_encoder.", MED["num_attention_heads"], MED["layer_norm_eps"]
    x = g(t + "embeddings.word_embeddings.weight")[ids] + g(t + "embeddings.position_embeddings.weight")[:ids.shape[1]]
    x = ln(x, t + "embeddings.LayerNorm", eps)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0                        # med.py's extended mask
    for i in range(MED["num_hidden_layers"]):
        e = f"{t}encoder.layer.{i}."
        for a, bias in (("attention", pad), ("crossattention", 0.0)):
            src = x if a == "attention" else img                                    # keys, values: image tokens
            q, k, val = lin(x, e + a + ".self.query"), lin(src, e + a + ".self.key"), lin(src, e + a + ".self.value")
            o = attn(q, k, val, h, bias)
            x = ln(x + lin(o, e + a + ".output.dense"), e + a + ".output.LayerNorm", eps)
        x = ln(x + lin(F.gelu(lin(x, e + "intermediate.dense")), e + "output.dense"), e + "output.LayerNorm", eps)
    r = x[:, 0]
    for j in (0, 2, 4, 6, 7):                                                        # MLP without activations
        r = lin(r, f"mlp.layers.{j}")
    return (r[:, 0] - 0.16717362830052426) / 1.0333394966054072


def _image_reward_files(tmp_path, sd: dict) -> dict:
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    (tmp_path / "bert-base-uncased").mkdir(exist_ok=True)
    (tmp_path / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return {"image_reward_weights": str(tmp_path / "ImageReward.pt"),
            "image_reward_med_config": str(tmp_path / "med_config.json"),
            "image_reward_tokenizer": str(tmp_path / "bert-base-uncased")}


def test_image_reward_is_blips_cross_attention_cls_through_the_mlp(tmp_path):
    from torchvision import transforms as T
    sd = _image_reward_checkpoint()
    opts = _image_reward_files(tmp_path, sd)
    images = _images(40, 24)                                    # portrait: resized to 32 wide, centre-cropped
    got = _scores("image_reward", opts, images, PROMPTS)

    pre = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    ids = torch.zeros(2, 35, dtype=torch.long)                  # [CLS] words [SEP], padded to 35 with [PAD]
    ids[0, :5], ids[1, :5] = torch.tensor([2, 5, 6, 8, 3]), torch.tensor([2, 5, 7, 9, 3])
    with torch.no_grad():
        want = _blip_reference(sd, torch.stack([pre(p) for p in _pil(images)]), ids, (ids != 0).long())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, _scores("image_reward", opts, images, PROMPTS[::-1]), atol=1e-3)

    _one_line_error("image_reward", {k: v for k, v in opts.items() if k != "image_reward_weights"},
                    r"image_reward_weights is not set: download ImageReward\.pt of THUDM/ImageReward")
    _one_line_error("image_reward", opts | {"image_reward_med_config": None},
                    r"image_reward_med_config is not set: download med_config\.json of THUDM/ImageReward")
    _one_line_error("image_reward", opts | {"image_reward_tokenizer": str(tmp_path / "none")},
                    r"image_reward_tokenizer=.*none: no such folder; download .*google-bert/bert-base-uncased")
    del sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    torch.save(sd, tmp_path / "ImageReward.pt")
    _one_line_error("image_reward", opts, r"image_reward_weights: not ImageReward\.pt.*missing "
                    r"\['text_encoder\.encoder\.layer\.0\.crossattention\.self\.key\.weight'\]", ValueError)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "ImageReward.pt")
    _one_line_error("image_reward", opts, r"image_reward_weights: not ImageReward\.pt.*no blip\.visual_encoder",
                    ValueError)
    torch.save(_image_reward_checkpoint(), tmp_path / "ImageReward.pt")
    (tmp_path / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB[:-1]) + "\n")
    _one_line_error("image_reward", opts, r"image_reward_tokenizer=.*11 tokens .*embeds 12", ValueError)

#----------------------------------------------------------------------------
# PickScore: exp(logit_scale) cos(image, prompt) of a transformers CLIPModel (its README's code).

def test_pickscore_is_the_readmes_scaled_cosine_of_the_clip_model(tmp_path):
    import transformers
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), projection_dim=16)
    model = randomize_(transformers.CLIPModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)                        # exp: 100, as trained CLIPs saturate
    model.save_pretrained(tmp_path / "PickScore_v1")
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image_processor.save_pretrained(tmp_path / "processor")   # laion's layout: preprocessor_config.json,
    hf_tokenizer().save_pretrained(tmp_path / "processor")    # tokenizer.json, tokenizer_config.json, ...
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "processor")
    opts = {"pickscore_model": str(tmp_path / "PickScore_v1"), "pickscore_processor": str(tmp_path / "processor")}
    images = _images(48, 32)
    got = _scores("pickscore", opts, images, PROMPTS)

    feats = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output          # noqa: E731
    want = []
    with torch.no_grad():                                       # the README: one prompt, its images
        for pil, prompt in zip(_pil(images), PROMPTS):
            image_inputs = processor(images=[pil], padding=True, truncation=True, max_length=77, return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = feats(model.get_image_features(**image_inputs))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = feats(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            want.append((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-3, rtol=1e-5)
    assert not torch.allclose(got, _scores("pickscore", opts, images, PROMPTS[::-1]), atol=1e-2)

    _one_line_error("pickscore", {}, r"pickscore_model is not set: download the folder yuvalkirstain/PickScore_v1")
    _one_line_error("pickscore", opts | {"pickscore_processor": str(tmp_path)},
                    r"pickscore_processor=.*: has no preprocessor_config\.json or processor_config\.json; "
                    r"download .*laion/CLIP-ViT-H-14")
    bert = transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=8)
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    _one_line_error("pickscore", opts | {"pickscore_model": str(tmp_path / "bert")},
                    r"pickscore_model=.*bert: config.json has model_type 'bert', not 'clip'; it needs the folder "
                    r"yuvalkirstain/PickScore_v1", ValueError)
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "PickScore_v1" / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "visual_projection.weight"},
              tmp_path / "PickScore_v1" / "model.safetensors", metadata={"format": "pt"})   # as the hub's files
    _one_line_error("pickscore", opts, r"pickscore_model=.*: not the folder yuvalkirstain/PickScore_v1 .*missing "
                    r"\['visual_projection.weight'\]", ValueError)
