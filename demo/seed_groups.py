"""Configurations over training seeds, shared by the demo reports (demo.sweep, demo.compare): runs
grouped into configurations, each summarised over its seeds (mean, t-interval over seeds, generation
interval), compared with a reference configuration (paired bootstrap and Welch over seeds), and the
markdown of both. The statistics are lcm.evaluation.stats'; docs/statistics.md says what they mean.
"""
from __future__ import annotations

import json
import os

from lcm.evaluation import stats

STEPS = (1, 2, 4, 8)
METRICS = (("acc", "prompt"), ("fd", "image"))  # the demo metrics and their bootstrap unit (stats.interval)

#----------------------------------------------------------------------------



def eval_setting(key: dict | None):
    """An evaluation key without the LoRA's hash: runs with equal settings were scored on the same
    prompts, seeds and bootstrap draw, so they can be compared pairwise."""
    return None if key is None else json.dumps({k: v for k, v in key.items() if k != "lora"}, sort_keys=True)


def group_configs(runs: list[dict], *, label, key, order) -> list[dict]:
    """Runs grouped by configuration (`key`) in `order`: {label, runs (by seed), seeds}. Two
    configurations that would share a label get their overrides (else their run dir) appended."""
    groups: dict = {}
    for r in sorted(runs, key=order):
        groups.setdefault(key(r), []).append(r)
    out = []
    for rs in groups.values():
        seeds = [r.get("train_seed") for r in rs]
        if len(rs) > 1 and (None in seeds or len(set(seeds)) < len(seeds)):
            # not one configuration over seeds: runs alike in what their configs record (e.g. no overrides
            # recorded) with the same seed; each stays its own configuration, named by its run dir
            out += [dict(label=f"{label(r)} ({os.path.basename(os.path.normpath(r['run']))})", runs=[r],
                         seeds=[r.get("train_seed")]) for r in rs]
        else:
            out.append(dict(label=label(rs[0]), runs=rs, seeds=seeds))
    labels = [g["label"] for g in out]
    for g in out:
        if labels.count(g["label"]) > 1:
            r = g["runs"][0]
            g["label"] += f" ({r.get('configuration') or os.path.basename(os.path.normpath(r['run']))})"
    return out


def summarise(groups: list[dict], steps=STEPS, cell=lambda r, s: r["metrics"].get(s), boot=lambda r, k, s: (
        (r.get("boot") or {}).get(f"{k}/{s}"))) -> list[dict]:
    """Per configuration, steps and metric: stats.seed_level over its seeds (mean, t-interval over
    seeds, std, the generation interval of the mean) as rows {configuration, steps, metric, seeds, ...}."""
    out = []
    for g in groups:
        for s in steps:
            cells = [(r, cell(r, s)) for r in g["runs"]]
            if any(c is None for _, c in cells):
                continue
            for k, unit in METRICS:
                lvl = stats.seed_level([c[k] for _, c in cells], [c.get(f"{k}_ci") for _, c in cells],
                                       [boot(r, k, s) for r, _ in cells], unit)
                out.append(dict(configuration=g["label"], steps=s, metric=k, seeds=g["seeds"], **lvl))
    return out


def differences(groups: list[dict], reference: str | None, steps=STEPS, cell=lambda r, s: r["metrics"].get(s),
                boot=lambda r, k, s: (r.get("boot") or {}).get(f"{k}/{s}")) -> list[dict]:
    """Every configuration against the reference one at the same steps (stats.config_difference):
    paired bootstrap over prompts / images when both were scored on the same prompts, seeds and draw
    (eval keys equal but for the LoRA), Welch over training seeds when both have >= 2 seeds."""
    if not reference:
        return []
    ref = next(g for g in groups if g["label"] == reference)
    out = []
    for g in groups:
        if g is ref:
            continue
        settings = {eval_setting(r.get("key")) for r in g["runs"] + ref["runs"]}
        paired = len(settings) == 1 and None not in settings
        for s in steps:
            a, b = [cell(r, s) for r in g["runs"]], [cell(r, s) for r in ref["runs"]]
            if None in a or None in b:
                continue
            for k, unit in METRICS:
                d = stats.config_difference([c[k] for c in a], [c[k] for c in b],
                                            [boot(r, k, s) for r in g["runs"]] if paired else None,
                                            [boot(r, k, s) for r in ref["runs"]] if paired else None, unit)
                out.append(dict(configuration=g["label"], reference=reference, steps=s, metric=k, **d))
    return out


def pick_reference(groups: list[dict], reference: str | None, default=None) -> str | None:
    """The reference configuration's label: `reference` as a label or a part of exactly one ('' or
    'none': no comparisons), else `default(groups)`, else the first configuration."""
    if reference is not None and reference.lower() in ("", "none"):
        return None
    labels = [g["label"] for g in groups]
    if reference is None:
        g = default(groups) if default else None
        return (g or groups[0])["label"]
    hits = [lab for lab in labels if lab == reference] or [lab for lab in labels if reference in lab]
    if len(hits) != 1:
        raise SystemExit(f"--reference {reference!r} matches {len(hits)} configurations; they are:\n  "
                         + "\n  ".join(labels))
    return hits[0]


def pct(v, scale: float = 100) -> str:
    return f"{scale * v:.1f}"


def cell_text(m: dict | None, k: str) -> str:
    """acc as 92.2% [85.9, 98.4]; fd as 164.0 [158.1, 170.2]; without an interval as before."""
    if m is None or m.get(k) is None:
        return ""
    scale, unit = (100, "%") if k == "acc" else (1, "")
    ci = m.get(f"{k}_ci")
    return pct(m[k], scale) + unit + (f" [{pct(ci[0], scale)}, {pct(ci[1], scale)}]" if ci else "")


def interval_text(ci, k: str) -> str:
    scale = 100 if k == "acc" else 1
    return "" if not ci else f"[{pct(ci[0], scale)}, {pct(ci[1], scale)}]"


def seed_table(summary: list[dict], first_cols=("configuration",)) -> list[str]:
    """'Over training seeds': one row per configuration with >= 2 seeds and steps."""
    rows = [s for s in summary if s["n_seeds"] > 1]
    if not rows:
        return []
    lines = ["", "## Over training seeds", "",
             "Per configuration trained with several `train.seed`: the mean over seeds with its 95% t-interval "
             "(n_seeds - 1 degrees of freedom: how far other training seeds would move it on these prompts), the "
             "seeds' std, and the generation interval of that mean (95% bootstrap over prompts for accuracy, over "
             "images for FD, the seeds' replicates averaged: how far other prompts / images would move it). "
             "docs/statistics.md.", "",
             "| " + " | ".join(first_cols) + " | steps | seeds | accuracy (%): mean [t-interval over seeds] | std | "
             "generation interval | FD: mean [t-interval over seeds] | std | generation interval |",
             "|" + "---|" * len(first_cols) + "---:|---|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for s in rows:
        by.setdefault((s["configuration"], s["steps"]), {})[s["metric"]] = s
    for (conf, steps), m in by.items():
        cells = []
        for k in ("acc", "fd"):
            s = m.get(k)
            scale = 100 if k == "acc" else 1
            cells += ["", "", ""] if s is None else [
                f"{pct(s['mean'], scale)} {interval_text(s['ci'], k)}",
                "" if s["std"] is None else pct(s["std"], scale), interval_text(s["gen_ci"], k)]
        seeds = next(iter(m.values()))["seeds"]
        lines.append(f"| {conf} | {steps} | {', '.join(str(x) for x in seeds)} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(diffs: list[dict]) -> list[str]:
    """'Paired differences to <reference>': difference, its intervals and the verdict."""
    if not diffs:
        return []
    lines = ["", f"## Differences to {diffs[0]['reference']}", "",
             "Configuration minus the reference at the same sampling steps (accuracy in points; FD: lower is "
             "better). Over prompts / images: 95% paired bootstrap of the difference (same prompts, generation "
             "seeds and resamples for both; the seeds' replicates averaged). Over training seeds: 95% Welch "
             "t-interval, when both have >= 2 seeds. **Resolved** (bold): every available interval excludes 0; "
             "with one seed a side the training-seed noise is not measured. With many comparisons ~5% of null "
             "differences resolve by chance.", "",
             "| configuration | steps | metric | seeds | difference | over prompts / images | over training seeds "
             "| resolved |", "|---|---:|---|---|---:|---:|---:|---|"]
    for d in diffs:
        k = d["metric"]
        diff = pct(d["diff"], 100 if k == "acc" else 1)
        verdict = {True: "**yes**", False: "no", None: "n/a (no intervals: re-evaluate)"}[d["excludes_0"]]
        lines.append(f"| {d['configuration']} | {d['steps']} | {'accuracy' if k == 'acc' else 'FD'} | "
                     f"{d['n_seeds'][0]} vs {d['n_seeds'][1]} | {f'**{diff}**' if d['excludes_0'] else diff} | "
                     f"{interval_text(d['gen_ci'], k)} | {interval_text(d['seed_ci'], k)} | {verdict} |")
    return lines
