"""The demo world's evaluator: a small CNN that plays CLIP score (attribute accuracy) and FID.

One classification head per attribute, trained on the generator's ground truth; its penultimate
features give a Frechet distance against real samples (the FID formula, in float64).
Train the bundled weights: python -m demo.evaluator --train --out assets/demo_evaluator.safetensors
Check them:                python -m demo.evaluator --check assets/demo_evaluator.safetensors
"""

import argparse
import dataclasses
import json
import math
import time

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from demo.world import CONTENT, VOCAB, Attributes, parse_caption, real_batch, sample, world_spec

#----------------------------------------------------------------------------
# The network: 4 strided convs (64 -> 4 px), one hidden layer of features, one head per attribute.

class DemoEvaluator(nn.Module):
    def __init__(self, resolution: int = 64, channels: tuple[int, ...] = (32, 48, 64, 64),
                 features: int = 128):
        super().__init__()
        self.config = dict(resolution=resolution, channels=list(channels), features=features)
        layers, c_in = [], 3
        for c in channels:                                  # each conv halves the side
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = resolution // 2 ** len(channels)
        self.fc = nn.Linear(c_in * side * side, features)   # flatten keeps where the shape is
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in VOCAB.items()})

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        res = self.config["resolution"]
        if images.shape[-2:] == (res, res):
            return images
        return F.interpolate(images, size=(res, res), mode="bilinear", antialias=True)

    def logits(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits (B, n_values) per attribute, and the penultimate features (B, F)."""
        p = next(self.parameters())
        x = self._resize(images.to(p.device, p.dtype))
        h = F.silu(self.fc(self.convs(x).flatten(1)))
        return {k: head(h) for k, head in self.heads.items()}, h

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Penultimate features (B, F) of images (B, 3, H, W) in [-1, 1] (resized if needed)."""
        return torch.cat([self.logits(x)[1] for x in images.split(batch)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Predicted label index (B,) per attribute (indices into demo.world.VOCAB)."""
        outs = [{k: v.argmax(1).cpu() for k, v in self.logits(x)[0].items()}
                for x in images.split(batch)]
        return {k: torch.cat([o[k] for o in outs]) for k in VOCAB}

    @torch.no_grad()
    def prompt_accuracy(self, images: torch.Tensor, prompts: list[str | Attributes]
                        ) -> dict[str, float]:
        """Accuracy per content attribute and 'overall' (all content attributes right)."""
        attrs = [parse_caption(p) if isinstance(p, str) else p for p in prompts]
        assert len(attrs) == len(images), (len(attrs), len(images))
        pred = self.predict(images)
        ok = {k: pred[k] == torch.tensor([VOCAB[k].index(getattr(a, k)) for a in attrs])
              for k in CONTENT}
        out = {k: ok[k].float().mean().item() for k in CONTENT}
        out["overall"] = torch.stack(list(ok.values())).all(0).float().mean().item()
        return out

    @torch.no_grad()
    def style_accuracy(self, images: torch.Tensor, style: str) -> float:
        """Fraction of images (B, 3, H, W) classified as `style` ('plain' | 'outlined')."""
        return (self.predict(images)["style"] == VOCAB["style"].index(style)).float().mean().item()

    @torch.no_grad()
    def reference_stats(self, n: int = 2048, seed: int = 1, style: str = "plain",
                        batch: int = 256) -> "FeatureStats":
        """Feature statistics of n real samples of world `seed` (the FID reference set)."""
        res = self.config["resolution"]
        feats = [self.features(real_batch(min(batch, n - i), seed, style, res, start=i)[0])
                 for i in range(0, n, batch)]
        return feature_stats(torch.cat(feats))

    def save(self, path: str) -> None:
        """Weights + config + the world they were trained on, as safetensors."""
        meta = dict(config=json.dumps(self.config), world=json.dumps(world_spec()))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        safetensors.torch.save_file(state, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "DemoEvaluator":
        """Load saved weights; refuses a file trained on another version of the world."""
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} is not a demo evaluator (no config in its metadata)")
        if json.loads(meta["world"]) != json.loads(json.dumps(world_spec())):   # JSON-normalised
            raise ValueError(f"{path} was trained on another version of the demo world "
                             "(demo/world.py changed); retrain it with "
                             "`python -m demo.evaluator --train --out PATH`")
        cfg = json.loads(meta["config"])
        model = cls(cfg["resolution"], tuple(cfg["channels"]), cfg["features"])
        model.load_state_dict(safetensors.torch.load_file(path), strict=True)
        return model.to(device).eval()

#----------------------------------------------------------------------------
# Frechet distance (FID formula) between Gaussians fitted to features, in float64:
#   d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^1/2 S_2 S_1^1/2)^1/2).

@dataclasses.dataclass
class FeatureStats:
    mu: torch.Tensor         # (F,) float64
    sigma: torch.Tensor      # (F, F) float64, unbiased covariance
    n: int


def feature_stats(feats: torch.Tensor) -> FeatureStats:
    """Mean and covariance (float64) of features (N, F)."""
    f = feats.detach().double().cpu()
    assert f.ndim == 2 and len(f) > 1, f.shape
    return FeatureStats(f.mean(0), torch.cov(f.T), len(f))


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(a: "torch.Tensor | FeatureStats", b: "torch.Tensor | FeatureStats") -> float:
    """Frechet distance between two feature sets (N, F) or their FeatureStats."""
    # Biased upwards at small N (two real sets: ~60 at N=256, ~15 at N=1024): compare equal N.
    a = a if isinstance(a, FeatureStats) else feature_stats(a)
    b = b if isinstance(b, FeatureStats) else feature_stats(b)
    r = _sqrt_psd(a.sigma)
    m = r @ b.sigma @ r                                     # symmetric PSD, same spectrum as S_1 S_2
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (a.mu - b.mu).square().sum() + a.sigma.trace() + b.sigma.trace() - 2 * tr_covmean
    return max(d2.item(), 0.0)

#----------------------------------------------------------------------------
# Training on the generator's ground truth (fresh samples every step, plain and outlined).

def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild blur and noise, so generated images (softer, noisier) are judged like real ones."""
    b = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) < 0.5)
    noise = torch.randn(x.shape, generator=g) * 0.08 * torch.rand(b, 1, 1, 1, generator=g)
    return (x + mix * (blur - x) + noise).clamp(-1, 1)


def train_batch(seed: int, step: int, batch: int, resolution: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training images (B, 3, H, W) and labels (B,) per attribute: world `seed`, both styles."""
    pairs = [sample(seed, step * batch + i, "both", resolution) for i in range(batch)]
    labels = [a.labels() for a, _ in pairs]
    return (torch.stack([img for _, img in pairs]),
            {k: torch.tensor([l[k] for l in labels]) for k in VOCAB})


def train_evaluator(steps: int = 1500, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                    resolution: int = 64, log_every: int = 200,
                    model: DemoEvaluator | None = None) -> tuple[DemoEvaluator, float]:
    """The demo evaluator fitted on both styles of world `seed`; returns (model, last loss)."""
    model = model if model is not None else DemoEvaluator(resolution)
    return fit_heads(model, lambda step: train_batch(seed, step, batch, resolution), steps, lr, seed, log_every)


def fit_heads(model: nn.Module, batches, steps: int, lr: float = 2e-3, seed: int = 0,
              log_every: int = 200) -> tuple[nn.Module, float]:
    """AdamW with cosine decay on the summed per-head cross-entropy of batches(step) -> (images, labels
    per head), images augmented as generated ones look; returns (model, last loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:                      # cosine from lr to 0
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, y = batches(step)
        logits, _ = model.logits(augment(x, g))            # blur + noise: generated images are softer
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    return model.eval(), loss.item()


def check(model: DemoEvaluator, n: int = 1024, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on n fresh real images of world `seed` (both styles)."""
    x, y = train_batch(seed, 0, n, model.config["resolution"])
    pred = model.predict(x)
    return {k: (pred[k] == y[k]).float().mean().item() for k in VOCAB}

#----------------------------------------------------------------------------

def cli(doc: str, cls, train_fn, check_fn, out: str, steps: int, bar: float | None = None) -> None:
    """--train / --check of an evaluator (the demo one here, demo.compose_evaluator's): train_fn(steps,
    batch, seed=) -> (model, loss), check_fn(model) -> accuracy per head; below `bar` exits non-zero."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", action="store_true", help="train a new evaluator")
    p.add_argument("--out", default=out, help="where --train saves")
    p.add_argument("--check", metavar="PATH", help="report accuracy of saved weights on fresh samples")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the box is shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.train and not args.check:
        p.error("nothing to do: pass --train and/or --check PATH")
    if args.train:
        t0 = time.time()
        model, _ = train_fn(args.steps, args.batch, seed=args.seed)
        model.save(args.out)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"saved {args.out} ({n_params} parameters, {time.time() - t0:.0f}s)")
        acc = check_fn(model)
    if args.check:
        acc = check_fn(cls.load(args.check))
    print("accuracy on fresh samples:", {k: round(v, 4) for k, v in acc.items()})
    if bar is not None and min(acc.values()) < bar:        # the metrics trust it only above the bar
        raise SystemExit(f"below {bar} on {[k for k, v in acc.items() if v < bar]}: train longer (--steps)")


if __name__ == "__main__":
    cli(__doc__, DemoEvaluator, train_evaluator, check, "assets/demo_evaluator.safetensors", 1500)
