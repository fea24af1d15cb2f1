"""The demo world's metrics in the evaluation registry (lcm/evaluation/metrics.py), as demo.bench
computes them: `demo_accuracy` (all 5 content attributes of the caption right, by the demo
evaluator; the CLIP-score stand-in) and `demo_fd` (Frechet distance of the evaluator's features
against `demo_n_ref` real plain images of world seed 1; the FID stand-in), each with its bootstrap
interval (lcm/evaluation/stats.py), and `demo_diversity` (mean pairwise 1 - cos of the evaluator's
features of each prompt's images; needs seeds_per_prompt >= 2; 0 = collapsed). Also the prompt set
`demo`: demo.bench's fixed_prompt_set(n, seed=0). Importing this module registers them
(evaluate.py does for model=demo or a demo_* metric; training: validation.metric_options.plugins)."""
from __future__ import annotations

import functools
import os

import torch

from demo.evaluator import DemoEvaluator, frechet_distance
from demo.world import CONTENT, VOCAB, fixed_prompt_set, parse_caption
from lcm.evaluation.metrics import register_extractor, register_metric, weights_file
from lcm.evaluation.prompts import register_prompt_source
from lcm.evaluation.stats import diversity_reducer, frechet_metric, mean_metric

DEFAULT_EVALUATOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "assets", "demo_evaluator.safetensors")


@functools.lru_cache(maxsize=4)
def _load(path: str) -> DemoEvaluator:
    return DemoEvaluator.load(path)


def evaluator(options: dict) -> DemoEvaluator:
    path = weights_file(options.get("demo_evaluator") or DEFAULT_EVALUATOR, "demo_evaluator",
                        "the bundled assets/demo_evaluator.safetensors (python -m demo.evaluator --train)")
    return _load(path)


def correct_extractor(options: dict):
    """Per image, 1.0 where each content attribute (demo.world.CONTENT) is predicted as the caption says: (B, 5)."""
    ev = evaluator(options)

    def extract(images: torch.Tensor, prompts: list) -> torch.Tensor:
        attrs = [parse_caption(p) for p in prompts]
        pred = ev.predict(images * 2 - 1)
        return torch.stack([(pred[k] == torch.tensor([VOCAB[k].index(getattr(a, k)) for a in attrs])).float()
                            for k in CONTENT], dim=1)
    return extract


def features_extractor(options: dict):
    """The evaluator's penultimate features (B, 128) of images in [0, 1]."""
    ev = evaluator(options)
    return lambda images, prompts: ev.features(images * 2 - 1)


def _fd(options: dict):
    ref = evaluator(options).reference_stats(int(options.get("demo_n_ref", 2048)), seed=1, style="plain")
    return frechet_metric("demo_fd", ref.mu, ref.sigma, lambda f: frechet_distance(f, ref))


register_prompt_source("demo", lambda n: fixed_prompt_set(n, seed=0))
register_extractor("demo_correct", correct_extractor)
register_extractor("demo_features", features_extractor)
register_metric("demo_accuracy", "demo_correct", lambda options: mean_metric("demo_acc", lambda f: f.bool().all(1)))
register_metric("demo_fd", "demo_features", _fd)
register_metric("demo_diversity", "demo_features", lambda options: diversity_reducer("demo_diversity", options=options))
