"""Human-preference rewards as per-image metrics (higher is better), the scores few-step papers report
beside FID and CLIP score: `hps` (HPSv2.1), `image_reward` (ImageReward), `pickscore` (PickScore).

Each is an extractor (images, prompts) -> (B, 1) and a per-image mean metric of the same name (intervals
over prompts), registered when this module is imported (lcm/evaluation/__init__.py). All read local files only;
a file not set or not there raises MissingWeights (one line: the option and where to get it), a file
of another layout a ValueError naming the keys. open_clip (HPS) is a dependency already; transformers
(ImageReward's BLIP, PickScore's CLIP) is imported only when one of those is chosen
(requirements-rewards.txt). The hpsv2 and image-reward packages are not used: hpsv2 downloads the LAION
ViT-H-14 weights when it builds its model and pins pytest==7.2.0 and protobuf<4; image-reward pins
timm==0.6.13 (open_clip needs timm>=1.0.17), fetches its tokenizer from the hub and does not import with
transformers 5. Their models are rebuilt here from the classes they use (docs/evaluation_rewards.md).
"""
from __future__ import annotations

import json
import logging
import os
import re

import torch
import torch.nn.functional as F

from lcm.evaluation.metrics import (Extractor, MissingWeights, _safe_state_dict, register_extractor, register_metric,
                                    to_uint8, weights_file)
from lcm.evaluation.stats import mean_metric

log = logging.getLogger(__name__)


def checked_load(module: torch.nn.Module, state: dict, option: str, where: str, extra_ok: bool = False) -> None:
    """Load `state` into `module` after comparing names and shapes; a mismatch is a ValueError naming them."""
    ours = module.state_dict()
    missing, extra = ours.keys() - state.keys(), state.keys() - ours.keys()
    bad = [k for k in ours.keys() & state.keys() if ours[k].shape != state[k].shape]
    if missing or bad or (extra and not extra_ok):
        raise ValueError(f"{option}: not {where}: missing {sorted(missing)[:3]} ({len(missing)} in all), "
                         f"unexpected {sorted(extra)[:3]} ({len(extra)}), wrong shape {sorted(bad)[:3]}")
    if extra:                                         # the package itself loads with strict=False
        log.info("%s: %d tensors not used (%s, ...)", option, len(extra), sorted(extra)[0])
    module.load_state_dict({k: state[k] for k in ours})


def local_dir(path, what: str, where: str, needs: list[tuple[str, ...]]) -> str:
    """`path` if it is a folder holding one file of each group in `needs`, else MissingWeights."""
    if not path:
        raise MissingWeights(f"{what} is not set: download {where} and pass its local folder")
    if not os.path.isdir(str(path)):
        raise MissingWeights(f"{what}={path}: no such folder; download {where}")
    for group in needs:
        if not any(os.path.isfile(os.path.join(str(path), f)) for f in group):
            raise MissingWeights(f"{what}={path}: has no {' or '.join(group)}; download {where}")
    return str(path)


def pil_images(images: torch.Tensor) -> list:
    """(B,3,H,W) in [0,1] -> PIL images, rounded as saved PNGs are (what the packages read)."""
    from PIL import Image
    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]

#----------------------------------------------------------------------------
# HPSv2.1 (Wu et al. 2023, Human Preference Score v2): an open_clip ViT-H-14 fine-tuned on HPD v2;
# score = 100 cos(image, prompt), the hpsv2 benchmark's (hpsv2.score() returns the cosine itself).

HPS_WHERE = "HPS_v2.1_compressed.pt of xswu/HPSv2 on the Hugging Face hub (tgxs002/HPSv2)"


def hps_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """hpsv2's eval transform: the longest side resized to `size` (bicubic, on the [0,1] tensor), zeros
    padded around it to a square, OpenAI CLIP mean/std. (B,3,H,W) -> (B,3,size,size)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms.functional import InterpolationMode, normalize, pad, resize
    x = to_uint8(images).float() / 255                # as hpsv2 reads a saved PNG (ToTensor)
    h, w = x.shape[-2:]
    if max(h, w) != size:                             # hpsv2's ResizeMaxSize (torchvision >= 0.17 antialiases)
        h, w = round(h * size / max(h, w)), round(w * size / max(h, w))
        x = resize(x, [h, w], InterpolationMode.BICUBIC, antialias=True)
    ph, pw = size - h, size - w                       # (hpsv2 pads only after a resize; unpadded, it fails)
    x = pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return normalize(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def hps_extractor(options: dict) -> Extractor:
    """Per-image HPSv2.1 (B, 1): 100 cos(image, prompt) of the HPS ViT-H-14 (hps_weights)."""
    import open_clip
    path = weights_file(options.get("hps_weights"), "hps_weights", HPS_WHERE)
    name, device = options.get("hps_clip_model") or "ViT-H-14", options.get("device", "cpu")
    state = {k.removeprefix("module."): v for k, v in _safe_state_dict(path).items()}
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"hps_clip_model={name}: not an open_clip model config (HPSv2.1 is ViT-H-14)")
    model = open_clip.CLIP(**cfg)                     # the architecture only: every tensor comes from the file
    checked_load(model, state, "hps_weights", f"an open_clip {name} state dict ({HPS_WHERE})")
    model = model.to(device).eval()
    tokenizer, size = open_clip.get_tokenizer(name), model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    def extract(images: torch.Tensor, prompts: list) -> torch.Tensor:
        assert len(prompts) == len(images), "hps needs one caption per image"
        img = model.encode_image(hps_pixels(images, size).to(device), normalize=True).float()
        txt = model.encode_text(tokenizer(list(prompts)).to(device), normalize=True).float()
        return (100 * (img * txt).sum(-1, keepdim=True)).cpu()
    return extract

#----------------------------------------------------------------------------
# ImageReward (Xu et al. 2023): BLIP's ViT encodes the image; BLIP's BERT reads the prompt with
# cross-attention to it; an MLP on the [CLS] state, standardised by the package's mean and std.
# Built from transformers' BLIP port (BlipVisionModel, BlipTextModel) with ImageReward.pt's tensors.

IMAGE_REWARD_WHERE = "ImageReward.pt of THUDM/ImageReward on the Hugging Face hub"
MED_CONFIG_WHERE = "med_config.json of THUDM/ImageReward on the Hugging Face hub"
BERT_WHERE = ("the tokenizer files (vocab.txt, tokenizer_config.json) of google-bert/bert-base-uncased on the "
              "Hugging Face hub")
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072   # ImageReward.py's constants
IMAGE_REWARD_MAX_TOKENS = 35                          # the package's max_length (padded to it)
BLIP_HEAD_DIM = 64                                    # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)

_BLIP_VIT = [                                         # BLIP vit.py (timm names) -> transformers BlipVisionModel
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(\w+)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm(\d)\.(\w+)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(\w+)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(\w+)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc\d)\.(\w+)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(\w+)", r"post_layernorm.\1"),
]
_IMAGE_REWARD_UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\..*|.*\.position_ids")   # ITC heads, a buffer


def image_reward_state(sd: dict) -> dict:
    """ImageReward.pt's keys -> ImageRewardNet's: blip.visual_encoder.* renamed, blip.text_encoder.*
    as is (transformers' BLIP text model is med.py's BertModel), mlp.layers.i -> mlp.i."""
    out = {}
    for k, v in sd.items():
        if _IMAGE_REWARD_UNUSED.fullmatch(k):
            continue
        if k.startswith("blip.visual_encoder."):
            rest = k.removeprefix("blip.visual_encoder.")
            for pat, rep in _BLIP_VIT:
                if re.fullmatch(pat, rest):
                    k = "visual_encoder." + re.sub(pat, rep, rest)
                    break
        out[k.replace("blip.text_encoder.", "text_encoder.", 1).replace("mlp.layers.", "mlp.", 1)] = v
    return out


class ImageRewardNet(torch.nn.Module):
    """ImageReward's model: (pixels (B,3,S,S), ids (B,L), mask (B,L)) -> standardised reward (B, 1)."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        dims, drop = [text_config.hidden_size, 1024, 128, 64, 16, 1], [0.2, 0.2, 0.1, None, None]
        layers = []                                   # Linear 768-1024-128-64-16-1, no activations
        for i, p in enumerate(drop):
            layers += [torch.nn.Linear(dims[i], dims[i + 1])] + ([torch.nn.Dropout(p)] if p else [])
        self.mlp = torch.nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        img = self.visual_encoder(pixel_values=pixels).last_hidden_state               # (B, 1 + P, Dv)
        ones = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        txt = self.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=img,
                                encoder_attention_mask=ones, is_decoder=False).last_hidden_state   # (B, L, D)
        return (self.mlp(txt[:, 0].float()) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def image_reward_configs(sd: dict, med: dict):
    """(BlipVisionConfig, BlipTextConfig): the ViT read off ImageReward.pt's shapes (ViT-L/16 at 224
    there), the text model from med_config.json (BERT-base with cross-attention to the ViT)."""
    from transformers import BlipTextConfig, BlipVisionConfig
    cls = sd.get("blip.visual_encoder.cls_token")
    patch = sd.get("blip.visual_encoder.patch_embed.proj.weight")
    if cls is None or patch is None or "blip.visual_encoder.pos_embed" not in sd:
        raise ValueError(f"image_reward_weights: not {IMAGE_REWARD_WHERE}: no blip.visual_encoder.* tensors "
                         f"(keys {sorted(sd)[:3]})")
    width, p = cls.shape[-1], patch.shape[-1]
    grid = round((sd["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    depth = len({k.split(".")[3] for k in sd if k.startswith("blip.visual_encoder.blocks.")})
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"]
                              .shape[0], num_hidden_layers=depth, num_attention_heads=max(1, width // BLIP_HEAD_DIM),
                              image_size=grid * p, patch_size=p, layer_norm_eps=1e-6)   # timm ViT's eps
    if not med.get("add_cross_attention", False):
        raise ValueError(f"image_reward_med_config: not {MED_CONFIG_WHERE}: add_cross_attention is not true")
    text = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
                          intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
                          num_attention_heads=med["num_attention_heads"],
                          max_position_embeddings=med["max_position_embeddings"],
                          hidden_act=med.get("hidden_act", "gelu"),
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), pad_token_id=med.get("pad_token_id", 0),
                          bos_token_id=None, eos_token_id=None, sep_token_id=None,
                          is_decoder=True)                # builds the cross-attention; forward runs bidirectional
    return vision, text


def image_reward_extractor(options: dict) -> Extractor:
    """Per-image ImageReward (B, 1) of (image, prompt), from ImageReward.pt, med_config.json and the
    bert-base-uncased tokenizer (image_reward_weights, image_reward_med_config, image_reward_tokenizer)."""
    from torchvision import transforms as T
    from transformers import BertTokenizer
    path = weights_file(options.get("image_reward_weights"), "image_reward_weights", IMAGE_REWARD_WHERE)
    med_path = weights_file(options.get("image_reward_med_config"), "image_reward_med_config", MED_CONFIG_WHERE)
    tok_dir = local_dir(options.get("image_reward_tokenizer"), "image_reward_tokenizer", BERT_WHERE, [("vocab.txt",)])
    device = options.get("device", "cpu")
    sd = _safe_state_dict(path)
    with open(med_path) as f:
        vision, text = image_reward_configs(sd, json.load(f))
    model = ImageRewardNet(vision, text)
    checked_load(model, image_reward_state(sd), "image_reward_weights", IMAGE_REWARD_WHERE, extra_ok=True)
    model = model.to(device).eval()
    tokenizer = BertTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)     # BLIP's init_tokenizer: bos, enc tokens
    if len(tokenizer) != text.vocab_size:
        raise ValueError(f"image_reward_tokenizer={tok_dir}: {len(tokenizer)} tokens with BLIP's two, the checkpoint "
                         f"embeds {text.vocab_size}; it needs {BERT_WHERE}")
    s = vision.image_size                             # the package's _transform(224): PIL bicubic, centre crop
    preprocess = T.Compose([T.Resize(s, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s), T.ToTensor(),
                            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])

    def extract(images: torch.Tensor, prompts: list) -> torch.Tensor:
        assert len(prompts) == len(images), "image_reward needs one caption per image"
        t = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IMAGE_REWARD_MAX_TOKENS,
                      return_tensors="pt")
        pixels = torch.stack([preprocess(im) for im in pil_images(images)]).to(device)
        return model(pixels, t["input_ids"].to(device), t["attention_mask"].to(device)).float().cpu()
    return extract

#----------------------------------------------------------------------------
# PickScore (Kirstain et al. 2023, Pick-a-Pic): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences;
# score = exp(logit_scale) cos(image, prompt), as its README computes with transformers' CLIPModel.

PICKSCORE_WHERE = "the folder yuvalkirstain/PickScore_v1 on the Hugging Face hub (config.json, model.safetensors)"
PICKSCORE_PROCESSOR_WHERE = ("the processor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K on the Hugging Face hub "
                             "(preprocessor_config.json, tokenizer.json, vocab.json, merges.txt, *_config.json)")


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output   # transformers 4: a tensor; 5: an output


def pickscore_extractor(options: dict) -> Extractor:
    """Per-image PickScore (B, 1) from local folders pickscore_model (CLIPModel) and pickscore_processor."""
    from transformers import CLIPModel, CLIPProcessor
    model_dir = local_dir(options.get("pickscore_model"), "pickscore_model", PICKSCORE_WHERE,
                          [("config.json",), ("model.safetensors", "pytorch_model.bin")])
    proc_dir = local_dir(options.get("pickscore_processor"), "pickscore_processor", PICKSCORE_PROCESSOR_WHERE,
                         [("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")])
    device = options.get("device", "cpu")
    with open(os.path.join(model_dir, "config.json")) as f:
        kind = json.load(f).get("model_type")
    if kind != "clip":                                # transformers would build a random CLIP and warn
        raise ValueError(f"pickscore_model={model_dir}: config.json has model_type {kind!r}, not 'clip'; "
                         f"it needs {PICKSCORE_WHERE}")
    try:
        model, info = CLIPModel.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"pickscore_model={model_dir}: not {PICKSCORE_WHERE}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing, bad = info["missing_keys"], [m[0] for m in info.get("mismatched_keys", [])]
    if missing or bad:
        raise ValueError(f"pickscore_model={model_dir}: not {PICKSCORE_WHERE}: missing {sorted(missing)[:3]} "
                         f"({len(missing)} in all), wrong shape {sorted(bad)[:3]}")
    model = model.to(device).eval()
    processor = CLIPProcessor.from_pretrained(proc_dir, local_files_only=True)

    def extract(images: torch.Tensor, prompts: list) -> torch.Tensor:
        assert len(prompts) == len(images), "pickscore needs one caption per image"
        px = processor(images=pil_images(images), return_tensors="pt")["pixel_values"].to(device)
        t = processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = F.normalize(_features(model.get_image_features(pixel_values=px)).float(), dim=-1)
        txt = model.get_text_features(input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device))
        txt = F.normalize(_features(txt).float(), dim=-1)
        return (model.logit_scale.exp().float() * (img * txt).sum(-1, keepdim=True)).cpu()
    return extract

#----------------------------------------------------------------------------
# Per-image means, bootstrapped over prompts (docs/statistics.md), as clip_score and aesthetic.

register_extractor("hps", hps_extractor)
register_metric("hps", "hps", lambda options: mean_metric("hps", lambda f: f[:, 0]))
register_extractor("image_reward", image_reward_extractor)
register_metric("image_reward", "image_reward", lambda options: mean_metric("image_reward", lambda f: f[:, 0]))
register_extractor("pickscore", pickscore_extractor)
register_metric("pickscore", "pickscore", lambda options: mean_metric("pickscore", lambda f: f[:, 0]))
