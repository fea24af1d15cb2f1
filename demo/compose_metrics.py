"""The compositional world's metrics in the evaluation registry (lcm/evaluation/metrics.py):
`compose_accuracy` (both objects' shape, colour and size and the relation all right, by the compose
evaluator; demo.compose_evaluator.correct matches objects to the caption) and `compose_fd` (Frechet
distance of the evaluator's features against `compose_n_ref` real images of world seed 1, split
`compose_ref_split` (default train), centred unless `compose_ref_micro`: what sampling at original =
target size and crop (0, 0) asks for), each with its bootstrap interval (lcm/evaluation/stats.py),
and `compose_diversity` (mean pairwise 1 - cos of the evaluator's features of each prompt's images;
seeds_per_prompt >= 2; 0 = collapsed). Prompt sets: `compose` (seen pairs) and `compose_heldout` (at
least one held-out shape-colour pair). Importing this module registers them (evaluate.py:
metric_plugins=[demo.compose_metrics]; training: validation.metric_options.plugins)."""
from __future__ import annotations

import functools
import os

from demo.compose import fixed_prompt_set, parse_caption
from demo.compose_evaluator import ComposeEvaluator, correct
from demo.evaluator import frechet_distance
from lcm.evaluation.metrics import register_extractor, register_metric, weights_file
from lcm.evaluation.prompts import register_prompt_source
from lcm.evaluation.stats import diversity_reducer, frechet_metric, mean_metric

DEFAULT_EVALUATOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "assets", "compose_evaluator.safetensors")


@functools.lru_cache(maxsize=4)
def _load(path: str) -> ComposeEvaluator:
    return ComposeEvaluator.load(path)


def evaluator(options: dict) -> ComposeEvaluator:
    path = weights_file(options.get("compose_evaluator") or DEFAULT_EVALUATOR, "compose_evaluator",
                        "the bundled assets/compose_evaluator.safetensors (python -m demo.compose_evaluator --train)")
    return _load(path)


def correct_extractor(options: dict):
    """Per image, 1.0 where each caption-order column (COLUMNS: 3 attributes x 2 objects, relation) is right: (B, 7)."""
    ev = evaluator(options)
    return lambda images, prompts: correct(ev.predict(images * 2 - 1), [parse_caption(p) for p in prompts]).float()


def features_extractor(options: dict):
    """The evaluator's penultimate features (B, F) of images in [0, 1]."""
    ev = evaluator(options)
    return lambda images, prompts: ev.features(images * 2 - 1)


def _fd(options: dict):
    ref = evaluator(options).reference_stats(int(options.get("compose_n_ref", 2048)), seed=1,
                                             split=options.get("compose_ref_split", "train"),
                                             micro=bool(options.get("compose_ref_micro", False)))
    return frechet_metric("compose_fd", ref.mu, ref.sigma, lambda f: frechet_distance(f, ref))


def _accuracy(options: dict):
    return mean_metric("compose_acc", lambda f: f.bool().all(1))


register_prompt_source("compose", lambda n: fixed_prompt_set(n, seed=0, split="train"))
register_prompt_source("compose_heldout", lambda n: fixed_prompt_set(n, seed=0, split="heldout"))
register_extractor("compose_correct", correct_extractor)
register_extractor("compose_features", features_extractor)
register_metric("compose_accuracy", "compose_correct", _accuracy)
register_metric("compose_fd", "compose_features", _fd)
register_metric("compose_diversity", "compose_features",
                lambda options: diversity_reducer("compose_diversity", options=options))
