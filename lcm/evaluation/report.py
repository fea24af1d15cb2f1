"""The evaluation's outputs in its run dir: results.json (the rows, each metric's `<key>_ci` beside it,
and the paired `comparisons`), results.md (tables: `est [lo, hi]`, the comparisons, and the spread
over training seeds when rows carry train_seed) and results.png (each metric vs steps with its 95%
interval as error bars, one line per method; needs matplotlib, else skipped with a one-line warning).
docs/statistics.md says what the intervals are."""
from __future__ import annotations

import logging
import os

from lcm.evaluation.runner import atomic_write, write_json
from lcm.evaluation.stats import seed_summary
from lcm.runs.logger import portable

log = logging.getLogger(__name__)
SETTINGS = ("method", "solver", "steps", "guidance_scale", "eta", "spacing", "lora_scales", "nfe",
            "seconds_per_image", "n_images", "n_prompts", "train_seed")
LOWER_IS_BETTER = ("fid", "kid", "kid_std", "demo_fd", "compose_fd")


def metric_keys(rows: list[dict]) -> list[str]:
    """The metric columns, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in SETTINGS and not k.endswith("_ci")))


def fmt(v) -> str:
    return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def with_ci(v, ci) -> str:
    """est [lo, hi]."""
    return fmt(v) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def markdown(rows: list[dict], title: str = "Evaluation", comparisons: list[dict] | None = None) -> str:
    """The rows (method, solver, steps, s, NFE, ms/image, then every metric as est [lo, hi]), the paired
    comparisons to the baseline, and the mean over training seeds when rows carry train_seed."""
    keys = metric_keys(rows)
    seeded = any(r.get("train_seed") is not None for r in rows)
    seed_col = (" train seed |", "---:|") if seeded else ("", "")
    n = next((r for r in rows if r.get("n_prompts")), None)
    lines = [f"# {title}", ""]
    if n is not None and any(f"{k}_ci" in r for r in rows for k in keys):
        lines += [f"{n['n_images']} images of {n['n_prompts']} prompts per cell; [lo, hi]: 95% bootstrap interval "
                  "(per-image metrics over prompts, set metrics over images; docs/statistics.md).", ""]
    lines += ["| method |" + seed_col[0] + " solver | steps | guidance s | NFE | ms / image | " + " | ".join(keys) + " |",
              "|---|" + seed_col[1] + "---|---:|---:|---:|---:|" + "---:|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['method']} |" + (f" {fmt(r.get('train_seed'))} |" if seeded else "")
                     + f" {r['solver']} | {r['steps']} | {fmt(r['guidance_scale'])} | {fmt(r['nfe'])} | "
                     f"{1000 * r['seconds_per_image']:.1f} | " + " | ".join(with_ci(r.get(k), r.get(f"{k}_ci"))
                                                                       for k in keys) + " |")
    if comparisons:
        lines += ["", f"## Paired differences to {comparisons[0]['baseline']} at the same steps", "",
                  "Same prompts and seeds; the difference's 95% paired-bootstrap interval. **bold**: it excludes 0.", "",
                  "| metric | method | steps | difference [lo, hi] | excludes 0 |", "|---|---|---:|---:|---|"]
        for c in comparisons:
            d = with_ci(c["diff"], c["ci"])
            name = c["method"] + (f" (seed {c['train_seed']})" if c.get("train_seed") is not None else "")
            lines.append(f"| {c['metric']} | {name} | {c['steps']} | {f'**{d}**' if c['excludes_0'] else d} | "
                         f"{'yes' if c['excludes_0'] else 'no'} |")
    if seeded and (summary := seed_summary(rows)):
        lines += ["", "## Over training seeds", "",
                  "Mean over the LoRAs of different train.seed, its 95% t-interval over seeds, and the mean width of "
                  "the single-LoRA (generation) intervals.", "",
                  "| method | steps | metric | seeds | mean [t-interval] | std | within-seed width |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for s in summary:
            lines.append(f"| {s['method']} | {s['steps']} | {s['metric']} | {s['n_seeds']} | {with_ci(s['mean'], s['ci'])} | "
                         f"{fmt(s['std'])} | {fmt(s['within_seed_ci_width'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> bool:
    """results.png: one panel per metric, x = steps (log2), one line per method. False if no matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: %s not written (pip install matplotlib)", os.path.basename(path))
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in metric_keys(rows) if k != "kid_std" and not k.endswith("_collapsed")]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for name, seed in dict.fromkeys((r["method"], r.get("train_seed")) for r in rows):
            pts = sorted((r["steps"], r[k], r.get(f"{k}_ci")) for r in rows
                         if (r["method"], r.get("train_seed")) == (name, seed) and r.get(k) is not None)
            if not pts:
                continue
            x, y, ci = zip(*pts)
            err = None if None in ci else [[max(v - c[0], 0) for v, c in zip(y, ci)],
                                           [max(c[1] - v, 0) for v, c in zip(y, ci)]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                        label=name + ("" if seed is None else f" (seed {seed})"))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(k + (", 95% interval" if any(r.get(f"{k}_ci") for r in rows) else ""))
        ax.set_title(k + (" (lower is better)" if k in LOWER_IS_BETTER else ""))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return True


def write_report(out_dir: str, rows: list[dict], config: dict | None = None, title: str = "Evaluation",
                 with_plot: bool = True, comparisons: list[dict] | None = None) -> list[str]:
    """results.json / results.md (/ results.png) in out_dir, each written atomically; returns the paths.
    Paths in the config and title become file names (lcm.runs.logger.portable): the files are shared."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    extra = {"comparisons": comparisons} if comparisons is not None else {}
    write_json(paths[0], dict(rows=rows, **extra, config=portable(config or {}, (out_dir,))))

    def w(p):
        with open(p, "w") as f:
            f.write(markdown(rows, portable(title, (out_dir,)), comparisons))
    atomic_write(paths[1], w)
    if with_plot and plot(rows, os.path.join(out_dir, "results.png")):
        paths.append(os.path.join(out_dir, "results.png"))
    return paths
