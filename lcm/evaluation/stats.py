"""Uncertainty of evaluation metrics (docs/statistics.md): bootstrap intervals, paired comparisons,
diversity, and the spread over training seeds.

One draw of resample indices (`draw`) serves every metric and every cell of a grid: per-image metrics
(accuracy, CLIP score, aesthetic, diversity) resample prompts with all their images, set metrics
(FID, KID, Frechet distances) resample the generated images; the reference set is held fixed. The
same draw for two cells makes their replicate differences a paired bootstrap. Intervals are
percentile intervals; a set metric's are recentred on the estimate (its bootstrap bias removed).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

#----------------------------------------------------------------------------
# Resample indices: B draws of P prompts (with all their k images) and of N = P k images.

@dataclasses.dataclass(frozen=True)
class Resample:
    prompts: torch.Tensor                             # (B, P) prompt indices, drawn with replacement
    images: torch.Tensor                              # (B, N) image indices, drawn with replacement
    per_prompt: int                                   # k: image i belongs to prompt i // k

    def __len__(self) -> int:
        return len(self.prompts)


def draw(n_prompts: int, per_prompt: int = 1, n: int = 1000, generator: torch.Generator | None = None) -> Resample:
    """n bootstrap draws for a set of n_prompts prompts x per_prompt images (generator: seeded, injected)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    P, N = int(n_prompts), int(n_prompts) * int(per_prompt)
    return Resample(torch.randint(P, (n, P), generator=g, device="cpu"), torch.randint(N, (n, N), generator=g, device="cpu"), int(per_prompt))


def percentile_interval(reps: torch.Tensor, alpha: float = 0.05) -> list[float]:
    """[alpha/2, 1 - alpha/2] quantiles of the replicates (NaNs dropped)."""
    r = reps.double()
    r = r[~r.isnan()]
    if not len(r):
        return [math.nan, math.nan]
    q = torch.quantile(r, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=r.dtype, device=r.device))
    return [q[0].item(), q[1].item()]


def interval(est: float, reps: torch.Tensor, unit: str, alpha: float = 0.05) -> list[float]:
    """Percentile interval of the replicates; for a set metric (unit "image") shifted by the bootstrap
    bias mean(reps) - est: a resample repeats images, which inflates a Frechet distance once more."""
    if unit == "image":
        r = reps.double()
        reps = r - (r[~r.isnan()].mean() - est)
    return percentile_interval(reps, alpha)

#----------------------------------------------------------------------------
# Replicates of the metric kinds, vectorised over the draws.

def per_prompt(values: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) per-image values -> (P,) per-prompt means (images of prompt j: j k ... j k + k - 1)."""
    assert len(values) % k == 0, (len(values), k)
    return values.double().view(-1, k).mean(1)


def mean_replicates(values: torch.Tensor, r: Resample) -> torch.Tensor:
    """(B,) means of a per-image value over prompts resampled with all their images."""
    return per_prompt(values, r.per_prompt)[r.prompts].mean(1)


def frechet_replicates(feats: torch.Tensor, mu_ref: torch.Tensor, sigma_ref: torch.Tensor, images: torch.Tensor,
                       max_bytes: float = 2**28) -> torch.Tensor:
    """(B,) Frechet distances |mu - mu_r|^2 + tr(S + S_r - 2 (S S_r)^1/2) of the resampled feature sets
    images (B, N) against a fixed reference; float64, chunked to ~max_bytes. Cost per draw: N F^2 + F^3."""
    x = feats.double()
    N, F = x.shape
    w_, v_ = torch.linalg.eigh(sigma_ref.double().to(x.device))
    root = (v_ * w_.clamp(min=0).sqrt()) @ v_.T                    # S_r^1/2
    mu_ref, tr_ref = mu_ref.double().to(x.device), sigma_ref.double().trace().item()
    chunk = max(1, int(max_bytes // (8 * N * F)))
    out = []
    for idx in images.split(chunk):
        w = torch.zeros(len(idx), N, dtype=x.dtype, device=x.device).scatter_add_(
            1, idx.to(x.device), torch.ones(idx.shape, dtype=x.dtype, device=x.device))   # (c, N) counts
        mu = w @ x / N                                                                     # (c, F)
        xc = x[None] - mu[:, None]                                                         # (c, N, F)
        s = (xc * w[..., None]).transpose(1, 2) @ xc / (N - 1)                             # (c, F, F)
        m = root @ s @ root                                       # same spectrum as S S_r, symmetric
        tr_covmean = torch.linalg.eigvalsh((m + m.transpose(1, 2)) / 2).clamp(min=0).sqrt().sum(-1)
        d2 = (mu - mu_ref).square().sum(-1) + s.diagonal(dim1=1, dim2=2).sum(-1) + tr_ref - 2 * tr_covmean
        out.append(d2.clamp(min=0).cpu())
    return torch.cat(out)


def diversity_per_prompt(feats: torch.Tensor, k: int) -> torch.Tensor:
    """(P,) mean pairwise 1 - cos of the k images of each prompt's features (P k, F): 0 = identical images."""
    if k < 2:
        raise ValueError("a diversity metric needs several images per prompt: set seeds_per_prompt >= 2")
    f = torch.nn.functional.normalize(feats.double().view(-1, k, feats.shape[-1]), dim=-1)   # (P, k, F)
    cos = f @ f.transpose(1, 2)                                                              # (P, k, k)
    return (k * k - cos.sum((1, 2))) / (k * (k - 1))


COLLAPSED = 1e-5          # a prompt whose images are this close is collapsed: identical up to float noise
                          # (real demo images of one caption: 0.0008 at the least, 0.012 on average)


def diversity_reducer(key: str, features: Callable[[torch.Tensor], torch.Tensor] = lambda f: f,
                      options: dict | None = None):
    """A registry reducer `key` (mean pairwise 1 - cos over each prompt's images, averaged over prompts)
    and `key`_collapsed (the fraction of prompts whose images are all alike), bootstrapped over prompts."""
    def per(f, prompts):
        k = int((options or {}).get("seeds_per_prompt", 1))
        if len(prompts) == len(f) and any(len(set(prompts[i:i + k])) > 1 for i in range(0, len(prompts), k)):
            raise ValueError(f"{key}: images {k} by {k} must share their prompt (seeds_per_prompt={k})")
        return diversity_per_prompt(features(f), k)

    def reduce(f, prompts):
        d = per(f, prompts)
        return {key: d.mean().item(), f"{key}_collapsed": (d < COLLAPSED).double().mean().item()}
    return BootReducer(reduce, lambda f, prompts, r: {key: per(f, prompts)[r.prompts].mean(1)}, unit="prompt")

#----------------------------------------------------------------------------
# A reducer with replicates, as metric factories return it (lcm/evaluation/metrics.py).

@dataclasses.dataclass
class BootReducer:
    """reduce(feats, prompts) -> {key: value}; replicates(feats, prompts, Resample) -> {key: (B,) tensor};
    unit: "prompt" (per-image metric, prompts resampled) or "image" (set metric, images resampled)."""
    reduce: Callable
    replicates: Callable
    unit: str = "prompt"

    def __call__(self, feats, prompts):
        return self.reduce(feats, prompts)


def mean_metric(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> BootReducer:
    """A per-image metric `key` = the mean of value(feats) (N,), bootstrapped over prompts."""
    return BootReducer(lambda f, p: {key: value(f).double().mean().item()},
                       lambda f, p, r: {key: mean_replicates(value(f), r)}, unit="prompt")


def frechet_metric(key: str, mu_ref: torch.Tensor, sigma_ref: torch.Tensor, distance: Callable,
                   max_draws: int | None = None) -> BootReducer:
    """A set metric `key` = distance(feats) against a fixed reference (mu_ref, sigma_ref), bootstrapped
    over the generated images (the first max_draws draws only: the cost is N F^2 + F^3 each)."""
    return BootReducer(lambda f, p: {key: float(distance(f))},
                       lambda f, p, r: {key: frechet_replicates(f, mu_ref, sigma_ref, r.images[:max_draws])},
                       unit="image")

#----------------------------------------------------------------------------
# A grid's bootstrap: one draw for all cells, each cell's replicates kept for paired comparisons.

@dataclasses.dataclass
class Bootstrap:
    n: int = 1000                                     # resamples B
    seed: int = 0                                     # the generator's seed: intervals are reproducible
    alpha: float = 0.05                               # 1 - the interval's level
    cells: dict = dataclasses.field(default_factory=dict)   # cell -> {key: (estimate, unit, replicates)}
    _draw: Resample | None = None

    def resample(self, n_prompts: int, per_prompt: int) -> Resample:
        if self._draw is None or self._draw.prompts.shape[1] != n_prompts or self._draw.per_prompt != per_prompt:
            self._draw = draw(n_prompts, per_prompt, self.n, torch.Generator().manual_seed(self.seed))
        return self._draw

    def intervals(self, cell, estimates: dict, reps: dict) -> dict:
        """{key_ci: [lo, hi]} of a cell's estimates; keeps the replicates for compare()."""
        self.cells[cell] = {k: (estimates[k], unit, r) for k, (unit, r) in reps.items() if k in estimates}
        return {f"{k}_ci": interval(est, r, unit, self.alpha) for k, (est, unit, r) in self.cells[cell].items()}


def compare(rows: list[dict], boot: Bootstrap, baseline: str, cell=lambda r: (r["method"], r["steps"],
            r.get("train_seed"))) -> list[dict]:
    """Each other method's difference to `baseline` at the same step count (and training seed when the
    baseline has one): paired bootstrap (the same draws for both cells), interval and excludes_0."""
    base = {(r["steps"], r.get("train_seed")): r for r in rows if r["method"] == baseline}
    if not base:
        raise ValueError(f"baseline={baseline!r} names no evaluated method; methods: "
                         f"{', '.join(dict.fromkeys(r['method'] for r in rows))}")
    out = []
    for r in rows:
        b = base.get((r["steps"], r.get("train_seed"))) or base.get((r["steps"], None))
        if r["method"] == baseline or b is None:
            continue
        ra, rb = boot.cells.get(cell(r), {}), boot.cells.get(cell(b), {})
        for k in ra.keys() & rb.keys():
            (ea, unit, xa), (eb, _, xb) = ra[k], rb[k]
            n = min(len(xa), len(xb))
            lo, hi = interval(ea - eb, xa[:n] - xb[:n], unit, boot.alpha)
            out.append(dict(method=r["method"], baseline=baseline, steps=r["steps"], metric=k, diff=ea - eb,
                            ci=[lo, hi], excludes_0=bool(lo > 0 or hi < 0))
                       | ({"train_seed": r["train_seed"]} if r.get("train_seed") is not None else {}))
    return sorted(out, key=lambda c: (c["metric"], c["method"], c["steps"]))

#----------------------------------------------------------------------------
# Training seeds: mean and t-interval over seeds of one configuration.

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile(df: int) -> float:
    """Student's t 0.975 quantile (table to 10 degrees of freedom, Cornish-Fisher beyond: error < 1e-3)."""
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seed_summary(rows: list[dict], keys: list[str] | None = None) -> list[dict]:
    """Rows of several training seeds (field train_seed) of one configuration (method, steps) -> per
    configuration and metric: mean over seeds, its 95% t-interval (n_seeds - 1 degrees of freedom; none
    for one seed), the seeds' std, and the mean width of the within-seed (generation) intervals."""
    groups: dict = {}
    for r in rows:
        if r.get("train_seed") is not None:
            groups.setdefault((r["method"], r["steps"]), []).append(r)
    out = []
    for (method, steps), rs in groups.items():
        for k in keys or [k for k in rs[0] if f"{k}_ci" in rs[0]]:
            v = torch.tensor([float(r[k]) for r in rs if r.get(k) is not None], dtype=torch.float64, device="cpu")
            if not len(v):
                continue
            sd = v.std().item() if len(v) > 1 else math.nan
            half = t_quantile(len(v) - 1) * sd / math.sqrt(len(v)) if len(v) > 1 else math.nan
            widths = [r[f"{k}_ci"][1] - r[f"{k}_ci"][0] for r in rs if r.get(f"{k}_ci")]
            out.append(dict(method=method, steps=steps, metric=k, n_seeds=len(v), seeds=[r["train_seed"] for r in rs],
                            mean=v.mean().item(), ci=[v.mean().item() - half, v.mean().item() + half], std=sd,
                            within_seed_ci_width=sum(widths) / len(widths) if widths else math.nan))
    return out

#----------------------------------------------------------------------------
# Configurations trained with several seeds (demo.sweep report, demo.compare): a configuration's value
# over its seeds, with the generation uncertainty inside them, and a verdict against a reference.


def _mean_reps(reps: list | None) -> torch.Tensor | None:
    """The elementwise mean of several seeds' replicates (one shared draw, so replicate b of every seed
    resampled the same prompts / images), truncated to the shortest; None when any seed lacks them."""
    if not reps or any(r is None for r in reps):
        return None
    n = min(len(r) for r in reps)
    return torch.stack([torch.as_tensor(r, dtype=torch.float64, device="cpu")[:n] for r in reps]).mean(0)


def seed_level(values: list[float], cis: list | None = None, reps: list | None = None,
               unit: str = "prompt", alpha: float = 0.05) -> dict:
    """One configuration's metric over its training seeds; values: one estimate per seed, every seed
    evaluated on the same prompts and generation seeds. Returns
      n_seeds, mean, std (the seeds' sample std; None for one seed);
      ci: the 95% Student-t interval of the mean over seeds, mean +- t_{0.975, n-1} std / sqrt(n) (None for
          one seed). Why t and not a bootstrap over seeds: with 3 seeds a bootstrap has 10 distinct
          resamples and its percentile interval covers a normal mean only ~75% of the time (it ignores
          the n - 1 degrees of freedom); the t-interval is exact for normal seed-level values and robust
          for the mean of a few roughly symmetric ones. It answers "how far would other training seeds
          move this number on these prompts": the prompt set is shared by all seeds, so its sampling
          error is common to every seed and cancels from their spread;
      gen_ci: the generation uncertainty, "how far would other prompts / images move it": the interval
          (`interval`, with alpha) of the seeds' bootstrap replicates averaged seed by seed, i.e. the
          bootstrap over prompts (per-image metrics) or images (set metrics) of the seed mean (None
          without replicates; with one seed it is that seed's own interval);
      within_seed_ci_width: the mean width of the seeds' own (generation) intervals cis (None without).
    Only the 95% level is tabulated for t (alpha applies to gen_ci)."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float64, device="cpu")
    n = len(v)
    if not n:
        raise ValueError("seed_level needs at least one seed's value")
    mean = v.mean().item()
    sd = v.std().item() if n > 1 else None
    half = t_quantile(n - 1) * sd / math.sqrt(n) if n > 1 else None
    widths = [c[1] - c[0] for c in (cis or []) if c]
    r = _mean_reps(reps)
    return dict(n_seeds=n, mean=mean, std=sd, ci=[mean - half, mean + half] if half is not None else None,
                gen_ci=interval(mean, r, unit, alpha) if r is not None else None,
                within_seed_ci_width=sum(widths) / len(widths) if widths else None)


def welch_interval(a: list[float], b: list[float]) -> dict | None:
    """95% Welch t-interval of mean(a) - mean(b) for two independent sets of training seeds (unequal
    variances; Welch-Satterthwaite degrees of freedom, rounded down: conservative). None when either
    side has fewer than 2 seeds (its spread is not measured)."""
    x = torch.tensor([float(v) for v in a], dtype=torch.float64, device="cpu")
    y = torch.tensor([float(v) for v in b], dtype=torch.float64, device="cpu")
    if len(x) < 2 or len(y) < 2:
        return None
    va, vb = x.var().item() / len(x), y.var().item() / len(y)
    diff, se = x.mean().item() - y.mean().item(), math.sqrt(va + vb)
    if se == 0:
        return dict(diff=diff, ci=[diff, diff], df=float(len(x) + len(y) - 2))
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    half = t_quantile(max(1, math.floor(df))) * se
    return dict(diff=diff, ci=[diff - half, diff + half], df=df)


def _excludes_0(ci) -> bool:
    return bool(ci[0] > 0 or ci[1] < 0)


def config_difference(a: list[float], b: list[float], reps_a: list | None = None, reps_b: list | None = None,
                      unit: str = "prompt", alpha: float = 0.05) -> dict:
    """Configuration A minus reference B, both evaluated on the same prompts and generation seeds; a, b:
    one estimate per training seed (seeds are not paired: A's seed 0 and B's seed 0 are different
    trainings), reps_a, reps_b: each seed's bootstrap replicates from one shared draw. Returns
      diff: mean over A's seeds - mean over B's;
      gen_ci: paired bootstrap of the difference (each side's replicates averaged over its seeds, then
          differenced replicate by replicate: the same prompts / images resampled for both), as
          `compare` does for one LoRA each; None without replicates;
      seed_ci (+ seed_df): `welch_interval` over training seeds; None unless both have >= 2 seeds;
      excludes_0: True when every available interval excludes 0 on the same side (a verdict must
          survive both the prompt noise and the training-seed noise), False when one does not, None
          when neither interval is available;
      n_seeds: (len(a), len(b))."""
    ma = torch.tensor([float(v) for v in a], dtype=torch.float64).mean().item()
    mb = torch.tensor([float(v) for v in b], dtype=torch.float64).mean().item()
    diff = ma - mb
    ra, rb = _mean_reps(reps_a), _mean_reps(reps_b)
    gen = None
    if ra is not None and rb is not None:
        n = min(len(ra), len(rb))
        gen = interval(diff, ra[:n] - rb[:n], unit, alpha)
    w = welch_interval(a, b)
    cis = [c for c in (gen, w and w["ci"]) if c]
    signs = {c[0] > 0 for c in cis if _excludes_0(c)}
    verdict = None if not cis else bool(all(_excludes_0(c) for c in cis) and len(signs) == 1)
    return dict(diff=diff, gen_ci=gen, seed_ci=w["ci"] if w else None, seed_df=w["df"] if w else None,
                excludes_0=verdict, n_seeds=[len(a), len(b)])
