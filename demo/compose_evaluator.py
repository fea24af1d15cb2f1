"""The compositional world's evaluator: a small CNN that reads both objects and their relation.

One head per attribute of the canonical description (demo.compose.HEADS: the left / top object is
object 1, relation 'to the left of' | 'above'), which the image alone defines; `correct` maps it back
onto a caption's order. Trained on the generator's ground truth over every combination (held-out
pairs included) with the same random original sizes and crops; its penultimate features give a
Frechet distance (demo.evaluator's FID formula).
Train the bundled weights: python -m demo.compose_evaluator --train --out assets/compose_evaluator.safetensors
Check them:                python -m demo.compose_evaluator --check assets/compose_evaluator.safetensors
"""

import json

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from demo.compose import CANONICAL, HEADS, RELATIONS, Attributes, parse_caption, real_batch, sample, world_spec
from demo.evaluator import FeatureStats, cli, feature_stats, fit_heads

ACCURACY_BAR = 0.99                # per head, on fresh real images (--check fails below it)
COLUMNS = ("shape1", "colour1", "size1", "shape2", "colour2", "size2", "relation")   # caption order

#----------------------------------------------------------------------------
# The network: 4 strided convs (64 -> 4 px), one hidden layer of features, one head per attribute.

class ComposeEvaluator(nn.Module):
    def __init__(self, resolution: int = 64, channels: tuple[int, ...] = (32, 64, 64, 96),
                 features: int = 192):
        super().__init__()
        self.config = dict(resolution=resolution, channels=list(channels), features=features)
        layers, c_in = [], 3
        for c in channels:                                  # each conv halves the side
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = resolution // 2 ** len(channels)
        self.fc = nn.Linear(c_in * side * side, features)   # flatten keeps which object is where
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in HEADS.items()})

    def logits(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits (B, n_values) per head, and the penultimate features (B, F)."""
        p, res = next(self.parameters()), self.config["resolution"]
        x = images.to(p.device, p.dtype)
        if x.shape[-2:] != (res, res):
            x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True)
        h = F.silu(self.fc(self.convs(x).flatten(1)))
        return {k: head(h) for k, head in self.heads.items()}, h

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Penultimate features (B, F) of images (B, 3, H, W) in [-1, 1] (resized if needed)."""
        return torch.cat([self.logits(x)[1] for x in images.split(batch)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Predicted label index (B,) per head (indices into demo.compose.HEADS)."""
        outs = [{k: v.argmax(1).cpu() for k, v in self.logits(x)[0].items()} for x in images.split(batch)]
        return {k: torch.cat([o[k] for o in outs]) for k in HEADS}

    @torch.no_grad()
    def prompt_accuracy(self, images: torch.Tensor, prompts: list["str | Attributes"]) -> dict[str, float]:
        """Accuracy per caption-order column (COLUMNS) and 'overall' (all 7 right)."""
        attrs = [parse_caption(p) if isinstance(p, str) else p for p in prompts]
        assert len(attrs) == len(images), (len(attrs), len(images))
        ok = correct(self.predict(images), attrs).float()
        return {k: ok[:, i].mean().item() for i, k in enumerate(COLUMNS)} | {"overall": ok.all(1).float().mean().item()}

    @torch.no_grad()
    def reference_stats(self, n: int = 2048, seed: int = 1, split: str = "train", micro: bool = False,
                        batch: int = 256) -> FeatureStats:
        """Feature statistics of n real samples of world `seed` (the FD reference set)."""
        res = self.config["resolution"]
        feats = [self.features(real_batch(min(batch, n - i), seed, split, res, start=i, micro=micro)[0])
                 for i in range(0, n, batch)]
        return feature_stats(torch.cat(feats))

    def save(self, path: str) -> None:
        """Weights + config + the world they were trained on, as safetensors."""
        meta = dict(config=json.dumps(self.config), world=json.dumps(world_spec()))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        safetensors.torch.save_file(state, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "ComposeEvaluator":
        """Load saved weights; refuses a file trained on another version of the world."""
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta or "world" not in meta or "heads" not in json.loads(meta["world"]):
            raise ValueError(f"{path} is not a compose-world evaluator (no config / world in its metadata)")
        if json.loads(meta["world"]) != json.loads(json.dumps(world_spec())):   # JSON-normalised
            raise ValueError(f"{path} was trained on another version of the compose world (demo/compose.py "
                             "changed); retrain it with `python -m demo.compose_evaluator --train --out PATH`")
        cfg = json.loads(meta["config"])
        model = cls(cfg["resolution"], tuple(cfg["channels"]), cfg["features"])
        model.load_state_dict(safetensors.torch.load_file(path), strict=True)
        return model.to(device).eval()

#----------------------------------------------------------------------------
# Predictions (canonical heads) against captions (any order): per image, 7 booleans in COLUMNS order.

def _hits(x: tuple, y: tuple) -> int:
    return sum(u == v for u, v in zip(x, y))


def correct(pred: dict[str, torch.Tensor], attrs: list[Attributes]) -> torch.Tensor:
    """(B, 7) bool in COLUMNS order. The predicted objects (left/top, right/bottom) are matched to the
    caption's, swapped only if that matches strictly more attributes; 'relation' is right iff the axis
    is right and no swap was needed, so an object on the wrong side costs the relation, not its attributes."""
    rows = []
    for i, a in enumerate(attrs):
        p = {k: HEADS[k][int(v[i])] for k, v in pred.items()}
        slots = [(p[f"shape{j}"], p[f"colour{j}"], p[f"size{j}"]) for j in (1, 2)]
        named = [(o.shape, o.colour, o.size) for o in (a.first, a.second)]
        s1 = 0 if a.relation in CANONICAL else 1            # the slot the caption puts object 1 in
        keep = _hits(slots[s1], named[0]) + _hits(slots[1 - s1], named[1])
        swap = _hits(slots[1 - s1], named[0]) + _hits(slots[s1], named[1])
        j1 = s1 ^ int(swap > keep)                          # the slot matched to object 1
        axis_ok = p["relation"] == CANONICAL[RELATIONS.index(a.relation) // 2]
        rows.append([u == v for u, v in zip(slots[j1], named[0])] + [u == v for u, v in zip(slots[1 - j1], named[1])]
                    + [axis_ok and swap <= keep])
    return torch.tensor(rows, dtype=torch.bool).reshape(len(attrs), len(COLUMNS))

#----------------------------------------------------------------------------
# Training on the generator's ground truth (fresh samples every step, every combination and crop).

def train_batch(seed: int, step: int, batch: int, resolution: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training images (B, 3, R, R) and labels (B,) per head: world `seed`, split 'all', random crops."""
    pairs = [sample(seed, step * batch + i, "all", resolution) for i in range(batch)]
    labels = [s.attrs.labels() for s, _ in pairs]
    return torch.stack([img for _, img in pairs]), {k: torch.tensor([l[k] for l in labels]) for k in HEADS}


def train_evaluator(steps: int = 8000, batch: int = 64, lr: float = 2e-3, seed: int = 0, resolution: int = 64,
                    log_every: int = 200, model: ComposeEvaluator | None = None) -> tuple[ComposeEvaluator, float]:
    """The compose evaluator fitted on every combination and crop of world `seed`; returns (model, last loss)."""
    model = model if model is not None else ComposeEvaluator(resolution)
    return fit_heads(model, lambda step: train_batch(seed, step, batch, resolution), steps, lr, seed, log_every)


def check(model: ComposeEvaluator, n: int = 1024, seed: int = 12345) -> dict[str, float]:
    """Per-head accuracy on n fresh real images of world `seed` (every combination, random crops)."""
    x, y = train_batch(seed, 0, n, model.config["resolution"])
    pred = model.predict(x)
    return {k: (pred[k] == y[k]).float().mean().item() for k in HEADS}

#----------------------------------------------------------------------------

if __name__ == "__main__":
    cli(__doc__, ComposeEvaluator, train_evaluator, check, "assets/compose_evaluator.safetensors", 8000, ACCURACY_BAR)
