"""The evaluation's outputs in its run dir: results.json (the rows), results.md (a Markdown table)
and results.png (each metric vs steps, one line per method; needs matplotlib, else skipped with a
one-line warning)."""
from __future__ import annotations

import logging
import os

from lcm.evaluation.runner import atomic_write, write_json
from lcm.runs.logger import portable

log = logging.getLogger(__name__)
SETTINGS = ("method", "solver", "steps", "guidance_scale", "eta", "spacing", "lora_scales", "nfe",
            "seconds_per_image", "n_images")
LOWER_IS_BETTER = ("fid", "kid", "kid_std", "demo_fd")


def metric_keys(rows: list[dict]) -> list[str]:
    """The metric columns, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in SETTINGS))


def markdown(rows: list[dict], title: str = "Evaluation") -> str:
    """One table: method, solver, steps, s, NFE, ms/image, then every metric."""
    keys = metric_keys(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))   # noqa: E731
    lines = [f"# {title}", "", "| method | solver | steps | guidance s | NFE | ms / image | " + " | ".join(keys) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['solver']} | {r['steps']} | {fmt(r['guidance_scale'])} | {fmt(r['nfe'])} | "
                     f"{1000 * r['seconds_per_image']:.1f} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |")
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
    keys = [k for k in metric_keys(rows) if k != "kid_std"]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for name in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["steps"], r[k]) for r in rows if r["method"] == name and r.get(k) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(k + (" (lower is better)" if k in LOWER_IS_BETTER else ""))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return True


def write_report(out_dir: str, rows: list[dict], config: dict | None = None, title: str = "Evaluation",
                 with_plot: bool = True) -> list[str]:
    """results.json / results.md (/ results.png) in out_dir, each written atomically; returns the paths.
    Paths in the config and title become file names (lcm.runs.logger.portable): the files are shared."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    write_json(paths[0], dict(rows=rows, config=portable(config or {}, (out_dir,))))

    def w(p):
        with open(p, "w") as f:
            f.write(markdown(rows, portable(title, (out_dir,))))
    atomic_write(paths[1], w)
    if with_plot and plot(rows, os.path.join(out_dir, "results.png")):
        paths.append(os.path.join(out_dir, "results.png"))
    return paths
