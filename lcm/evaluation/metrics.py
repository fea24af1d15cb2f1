"""The metric registry: a metric is a per-image feature extractor plus a reducer over a set.

    extractor: (images (B,3,H,W) in [0,1], prompts) -> features (B,F)   (kept on disk per image)
    reducer:   (features (N,F) of all images of a cell, prompts) -> {name: value}
               (a stats.BootReducer also gives bootstrap replicates: lcm/evaluation/stats.py)

Metrics sharing an extractor (FID and KID: InceptionV3 pool3) share its features. Built in:
`fid`, `kid` (torch-fidelity's InceptionV3, the TF-Inception port behind published FIDs, and its
metric math) against a folder of reference images or an .npz of (mu, sigma); `clip_score`
(open_clip, 100 * max(cos, 0), averaged: torchmetrics' CLIPScore and the LCM paper's) and
`clip_diversity` (mean pairwise 1 - cos of each prompt's CLIP image embeddings). Every
extractor loads a local weights file; a missing one raises MissingWeights, one line naming the
file and where to get it. `aesthetic` is a per-image score too. Other metrics register themselves:
the preference rewards `hps`, `image_reward`, `pickscore` (rewards.py), the demo world's classifier.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from typing import Callable

import torch

from lcm.evaluation.stats import BootReducer, Resample, diversity_reducer, frechet_metric, mean_metric

log = logging.getLogger(__name__)

Extractor = Callable[[torch.Tensor, list], torch.Tensor]
Reducer = Callable[[torch.Tensor, list], dict]


class MissingWeights(FileNotFoundError):
    """A metric's weights file is not set or not there (the message is one line: file + source)."""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    extractor: str                                   # key of EXTRACTORS
    build: Callable[[dict], Reducer]                 # options -> reducer


EXTRACTORS: dict[str, Callable[[dict], Extractor]] = {}
METRICS: dict[str, MetricSpec] = {}


def register_extractor(name: str, factory: Callable[[dict], Extractor]) -> None:
    """factory(options) -> extractor; built once per MetricSet, only when a metric needs it."""
    EXTRACTORS[name] = factory


def register_metric(name: str, extractor: str, build: Callable[[dict], Reducer]) -> None:
    """A metric `name` reducing the features of `extractor`; build(options) -> reducer."""
    METRICS[name] = MetricSpec(extractor, build)


def weights_file(path, what: str, where: str) -> str:
    """`path` if it is a file, else MissingWeights naming what is needed and where users get it."""
    if not path:
        raise MissingWeights(f"{what} is not set: download {where} and pass its local path")
    if not os.path.isfile(str(path)):
        raise MissingWeights(f"{what}={path}: no such file; download {where}")
    return str(path)

#----------------------------------------------------------------------------
# A set of metrics: builds the extractors they need, extracts, reduces.

class MetricSet:
    """The named metrics with their options (one dict for all: each factory reads its keys)."""

    def __init__(self, names: list[str], options: dict | None = None):
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; registered: {', '.join(sorted(METRICS))} (metrics of "
                             "other modules need them imported first, e.g. plugins [demo.metrics] for demo_*)")
        self.names, self.options = list(names), dict(options or {})
        self.specs = {n: METRICS[n] for n in names}
        self._extractors: dict[str, Extractor] = {}
        self._reducers: dict[str, Reducer] = {}

    @property
    def extractor_names(self) -> list[str]:
        return list(dict.fromkeys(s.extractor for s in self.specs.values()))

    def build(self) -> "MetricSet":
        """Load every extractor and reducer now (weights, references): errors surface before sampling."""
        for e in self.extractor_names:
            if e not in self._extractors:
                self._extractors[e] = EXTRACTORS[e](self.options)
        for n, s in self.specs.items():
            if n not in self._reducers:
                self._reducers[n] = s.build(self.options)
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor, prompts: list, only: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Per-image features {extractor: (B, F) float32 CPU} of images (B,3,H,W) in [0,1]."""
        self.build()
        out = {}
        for e in only or self.extractor_names:
            f = self._extractors[e](images, list(prompts))
            assert f.ndim == 2 and len(f) == len(images), (e, tuple(f.shape))
            out[e] = f.detach().float().cpu()
        return out

    def reduce(self, feats: dict[str, torch.Tensor], prompts: list) -> dict[str, float]:
        """Every metric's values from the features of a whole cell."""
        self.build()
        out = {}
        for n, s in self.specs.items():
            out |= {k: float(v) for k, v in self._reducers[n](feats[s.extractor], list(prompts)).items()}
        return out

    def replicates(self, feats: dict[str, torch.Tensor], prompts: list, r: Resample) -> dict:
        """{key: (unit, (B,) replicates)} of every metric that bootstraps (stats.BootReducer)."""
        self.build()
        out = {}
        for n, s in self.specs.items():
            red = self._reducers[n]
            if isinstance(red, BootReducer):
                out |= {k: (red.unit, v) for k, v in red.replicates(feats[s.extractor], list(prompts), r).items()}
        return out

#----------------------------------------------------------------------------
# Images -> uint8 and reference images from a folder.

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> uint8, rounded as a saved PNG would be."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def folder_images(folder: str, limit: int | None = None):
    """Yield (1,3,H,W) uint8 tensors of the images in `folder` (sorted, recursive)."""
    import numpy as np
    from PIL import Image
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in reference folder {folder}")
    for p in paths[:limit]:
        with Image.open(p) as im:
            yield torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None]


def reference_features(extract: Extractor, folder: str, cache_dir: str | None, tag: str) -> torch.Tensor:
    """Features (N, F) of the reference folder's images, cached as safetensors in cache_dir."""
    from safetensors.torch import load_file, save_file
    key = hashlib.sha1(f"{os.path.abspath(folder)}|{tag}".encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"reference-{tag}-{key}.safetensors") if cache_dir else None
    if path and os.path.exists(path):
        return load_file(path)["features"]
    from tqdm.auto import tqdm
    feats = [extract(img.float() / 255, []) for img in tqdm(folder_images(folder), desc=f"reference {tag}", leave=False)]
    out = torch.cat(feats).float().cpu()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        save_file({"features": out.contiguous()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return out

#----------------------------------------------------------------------------
# FID and KID: torch-fidelity's InceptionV3 (pool3, 2048) and metric math.

INCEPTION_URL = ("pt_inception-2015-12-05-6726825d.pth from https://github.com/toshas/torch-fidelity/releases/"
                 "download/v0.2.0/weights-inception-2015-12-05-6726825d.pth")


def _safe_state_dict(path: str) -> dict:
    """A state dict from .safetensors or a tensors-only pickle (torch.load weights_only: no code runs)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                            # noqa: BLE001 (pickle errors have many types)
        raise ValueError(f"{path}: not a tensors-only weights file ({type(e).__name__}); nothing was executed") from None
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def inception_extractor(options: dict) -> Extractor:
    """torch-fidelity's FeatureExtractorInceptionV3 from inception_weights; pool3 features (B, 2048)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = weights_file(options.get("inception_weights"), "inception_weights", INCEPTION_URL)
    buf = io.BytesIO()                                # re-serialised tensors: torch-fidelity's own
    torch.save(_safe_state_dict(path), buf)           # torch.load(weights_only=False) sees only them
    buf.seek(0)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    device = options.get("device", "cpu")
    net = net.to(device)
    batch = int(options.get("metric_batch", 32))

    def extract(images: torch.Tensor, prompts: list) -> torch.Tensor:
        x = to_uint8(images)
        return torch.cat([net(b.to(device))[0].cpu() for b in x.split(batch)])
    return extract


def _reference(options: dict, extractor: str, need_features: bool):
    """The reference for FID/KID: {'features'} of a folder, or {'mu','sigma'} of an .npz."""
    ref = options.get("reference")
    if not ref:
        raise ValueError("fid/kid need reference=: a folder of real images, or an .npz with mu and sigma "
                         "(e.g. the COCO-2017 val 30k statistics)")
    if os.path.isdir(str(ref)):
        feats = reference_features(EXTRACTORS[extractor](options), str(ref), options.get("cache_dir"), extractor)
        return {"features": feats}
    if not os.path.isfile(str(ref)):
        raise FileNotFoundError(f"reference={ref}: no such folder or file")
    if need_features:
        raise ValueError(f"reference={ref} holds statistics; KID needs reference images: point reference= at a folder")
    import numpy as np
    with np.load(str(ref)) as z:
        if not {"mu", "sigma"} <= set(z.files):
            raise ValueError(f"reference={ref}: an .npz needs arrays mu and sigma, it has {sorted(z.files)}")
        return {"mu": z["mu"].astype("float64"), "sigma": z["sigma"].astype("float64")}


def fid_from_features(feats: torch.Tensor, ref: dict) -> float:
    """FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^1/2), torch-fidelity's implementation (float64)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    f64 = lambda s: {k: v.astype("float64") for k, v in s.items()}          # noqa: E731
    st = f64(fid_features_to_statistics(feats.double()))
    rs = f64(fid_features_to_statistics(ref["features"].double())) if "features" in ref else ref
    return fid_statistics_to_metric(st, rs, verbose=False)["frechet_inception_distance"]


def kid_from_features(feats: torch.Tensor, ref_feats: torch.Tensor, subsets: int = 100,
                      subset_size: int = 1000, seed: int = 2020) -> dict:
    """KID (unbiased MMD^2, cubic polynomial kernel) mean and std over subsets, torch-fidelity's."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    size = min(int(subset_size), len(feats), len(ref_feats))
    m = kid_features_to_metric(feats.double(), ref_feats.double(), kid_subsets=int(subsets), kid_subset_size=size,
                               verbose=False, rng_seed=seed, kid_kernel="poly", kid_kernel_poly_degree=3,
                               kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    return {"kid": m["kernel_inception_distance_mean"], "kid_std": m["kernel_inception_distance_std"]}


def _fid(options: dict, extractor: str = "inception") -> Reducer:
    ref = _reference(options, extractor, need_features=False)
    if "features" in ref:
        from torch_fidelity.metric_fid import fid_features_to_statistics
        ref = {k: v.astype("float64") for k, v in fid_features_to_statistics(ref["features"].double()).items()}
    mu, sigma = (torch.as_tensor(ref[k], dtype=torch.float64, device="cpu") for k in ("mu", "sigma"))
    # 2048-dim: each resample costs N 2048^2 + 2048^3 flops (docs/statistics.md), so fewer of them
    return frechet_metric("fid", mu, sigma, lambda f: fid_from_features(f, ref),
                          max_draws=int(options.get("fid_bootstrap", 100)))


def kid_linear_terms(feats: torch.Tensor, ref_feats: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N,) h_i - r_i: mean cubic-kernel similarity of generated image i to the other generated images
    minus to the reference images. MMD^2 moves by 2 mean(h - r) when the generated set is reweighted
    (its first-order, Hoeffding projection): KID's bootstrap replicates, O(N (N + M) F) once."""
    x, y = feats.double(), ref_feats.double()
    k = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3                                   # noqa: E731
    h = torch.cat([k(c, x).sum(1) for c in x.split(chunk)])
    h = (h - (x.square().sum(1) / x.shape[1] + 1) ** 3) / (len(x) - 1)                   # j != i
    r = torch.cat([k(c, y).mean(1) for c in x.split(chunk)])
    return h - r


def _kid(options: dict, extractor: str = "inception") -> Reducer:
    ref = _reference(options, extractor, need_features=True)["features"]
    return BootReducer(lambda feats, prompts: kid_from_features(feats, ref, options.get("kid_subsets", 100),
                                                                options.get("kid_subset_size", 1000)),
                       lambda feats, prompts, r: {"kid": 2 * kid_linear_terms(feats, ref)[r.images].mean(1)},
                       unit="image")

#----------------------------------------------------------------------------
# CLIP score: 100 * max(cos(image, caption), 0) per image with open_clip, averaged.

def clip_where(model: str) -> str:
    if model == "ViT-g-14":
        return ("open_clip_pytorch_model.bin of laion/CLIP-ViT-g-14-laion2B-s34B-b88K on the Hugging Face hub "
                "(open_clip ViT-g-14, laion2b_s34b_b88k)")
    return f"the open_clip weights of {model} (its open_clip_pytorch_model.bin or .safetensors)"


def open_clip_model(name: str, path: str, device):
    """(model in eval mode, image -> pixel tensor function) of an open_clip model with local weights."""
    import open_clip
    from PIL import Image
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=path, device=device)
    model.eval()
    pixels = lambda images: torch.stack([preprocess(Image.fromarray(a))                   # noqa: E731
                                         for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]).to(device)
    return model, pixels


def clip_extractor(options: dict) -> Extractor:
    """open_clip model `clip_model` with local weights `clip_pretrained`; per image the score and the
    normalised image embedding (B, 1 + D): clip_score reads column 0, clip_diversity the rest."""
    import open_clip
    name = options.get("clip_model", "ViT-g-14")
    path = weights_file(options.get("clip_pretrained"), "clip_pretrained", clip_where(name))
    device = options.get("device", "cpu")
    model, pixels = open_clip_model(name, path, device)
    tokenizer = open_clip.get_tokenizer(name)

    def extract(images: torch.Tensor, prompts: list) -> torch.Tensor:
        assert len(prompts) == len(images), "clip_score needs one caption per image"
        img = model.encode_image(pixels(images)).float()
        txt = model.encode_text(tokenizer(list(prompts)).to(device)).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        score = 100 * cos.clamp(min=0)                               # torchmetrics CLIPScore, per image
        return torch.cat([score[:, None], torch.nn.functional.normalize(img, dim=-1)], 1).cpu()
    return extract


#----------------------------------------------------------------------------
# Aesthetic score: the LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-
# predictor), a linear stack (no activations) on the L2-normalised CLIP ViT-L/14 image embedding.

AESTHETIC_WHERE = ("sac+logos+ava1-l14-linearMSE.pth of christophschuhmann/improved-aesthetic-predictor "
                   "on GitHub")
AESTHETIC_CLIP_WHERE = ("open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_224.openai on the Hugging "
                        "Face hub (OpenAI's CLIP ViT-L/14 in open_clip's layout)")


def aesthetic_head(state: dict) -> torch.nn.Sequential:
    """The predictor's MLP: Linear 768-1024-128-64-16-1 (dropouts between, identity in eval)."""
    dims, drop = [768, 1024, 128, 64, 16, 1], [0.2, 0.2, 0.1, None, None]
    mods = []
    for i, p in enumerate(drop):
        mods.append(torch.nn.Linear(dims[i], dims[i + 1]))
        if p is not None:
            mods.append(torch.nn.Dropout(p))
    head = torch.nn.Sequential(*mods)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    expected = set(head.state_dict())
    if set(state) != expected:
        raise ValueError(f"aesthetic_weights: expected the keys layers.{{{', '.join(sorted(expected))}}} of "
                         f"{AESTHETIC_WHERE}, got {sorted(state)[:6]}")
    head.load_state_dict(state)
    return head.eval()


def aesthetic_extractor(options: dict) -> Extractor:
    """Per-image aesthetic score (B, 1), about 1-10: head(e / |e|), e = CLIP ViT-L/14 image embedding."""
    head_path = weights_file(options.get("aesthetic_weights"), "aesthetic_weights", AESTHETIC_WHERE)
    clip_path = weights_file(options.get("aesthetic_clip_pretrained"), "aesthetic_clip_pretrained",
                             AESTHETIC_CLIP_WHERE)
    device = options.get("device", "cpu")
    model, pixels = open_clip_model(options.get("aesthetic_clip_model", "ViT-L-14"), clip_path, device)
    head = aesthetic_head(_safe_state_dict(head_path)).to(device)

    def extract(images: torch.Tensor, prompts: list) -> torch.Tensor:
        e = model.encode_image(pixels(images)).float()
        return head(torch.nn.functional.normalize(e, dim=-1)).cpu()
    return extract


def _clip_embedding(f: torch.Tensor) -> torch.Tensor:
    if f.shape[1] < 2:
        raise ValueError("clip_diversity needs the CLIP image embeddings, which features saved before it lack: "
                         "evaluate into a new run dir")
    return f[:, 1:]


register_extractor("inception", inception_extractor)
register_extractor("clip", clip_extractor)
register_metric("fid", "inception", _fid)
register_metric("kid", "inception", _kid)
register_metric("clip_score", "clip", lambda options: mean_metric("clip_score", lambda f: f[:, 0]))
register_metric("clip_diversity", "clip", lambda options: diversity_reducer("clip_diversity", _clip_embedding, options))
register_extractor("aesthetic", aesthetic_extractor)
register_metric("aesthetic", "aesthetic", lambda options: mean_metric("aesthetic", lambda f: f[:, 0]))


def load_plugins(modules) -> None:
    """Import modules that register more metrics / prompt sets (e.g. demo.metrics), named by config."""
    import importlib
    for name in modules or []:
        try:
            importlib.import_module(str(name))
        except ImportError as e:
            raise ValueError(f"metric plugin {name!r} could not be imported: {e}") from None
