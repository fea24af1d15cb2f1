"""Evaluation on real data: FID / KID (torch-fidelity), CLIP score (open_clip) and registered metrics
over a grid of methods x steps (runner.py), with resume, and the same metrics during training
(lcm/training/validation.py). evaluate.py is the command line; README "Evaluation"."""
from lcm.evaluation.metrics import (METRICS, MetricSet, MissingWeights, register_extractor, register_metric,
                                    load_plugins)
from lcm.evaluation.prompts import PromptSet, load_prompts, register_prompt_source
from lcm.evaluation.runner import Method, run_grid
from lcm.evaluation import rewards  # noqa: F401,E402  (registers hps, image_reward, pickscore; imports nothing heavy)

__all__ = ["METRICS", "MetricSet", "MissingWeights", "register_extractor", "register_metric", "load_plugins",
           "PromptSet", "load_prompts", "register_prompt_source", "Method", "run_grid"]
