"""The distillation matrix's worlds (the evaluations each runs, the metric keys it reports) and its
report: <out>.md (a table per metric, the cost table, the verdicts, the command line), <out>.json and
<out>.png (accuracy, Frechet distance and diversity vs steps, one line per method, 95% error bars), from the
document demo/matrix.py assembles."""
from __future__ import annotations

import dataclasses
import json
import math
import os

from demo import matrix_claims


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluate run: a prompt set, its metrics, and the suffix its metric keys get in the report."""
    prompts: str
    metrics: tuple[str, ...]
    suffix: str = ""


WORLDS = {   # world -> (metric plugin, evaluations, accuracy keys, Frechet key) as the plugins register them
    "demo": ("demo.metrics", (Evaluation("demo", ("demo_accuracy", "demo_fd", "demo_diversity")),),
             ("demo_acc",), "demo_fd"),
    "compose": ("demo.compose_metrics", (Evaluation("compose", ("compose_accuracy", "compose_fd", "compose_diversity")),
                                         Evaluation("compose_heldout", ("compose_accuracy",), "_heldout")),
                ("compose_acc", "compose_acc_heldout"), "compose_fd"),
}
LABELS = {"demo_acc": "prompt accuracy (%)", "compose_acc": "prompt accuracy, seen pairs (%)",
          "compose_acc_heldout": "prompt accuracy, held-out pairs (%)", "demo_fd": "Frechet distance (lower is better)",
          "compose_fd": "Frechet distance (lower is better)", "demo_diversity": "diversity (mean pairwise 1 - cos)",
          "compose_diversity": "diversity (mean pairwise 1 - cos)"}

#----------------------------------------------------------------------------
# The report.


def fmt(v, k: str = "") -> str:
    """A number as the tables show it: accuracy in %, others to 4 significant digits; '' for None / NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if "_acc" in k:
        return f"{100 * v:.1f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def est_ci(v, ci, k: str) -> str:
    return fmt(v, k) + (f" [{fmt(ci[0], k)}, {fmt(ci[1], k)}]" if ci and None not in ci else "")


def shown_ci(level: dict, k: str = "") -> list | None:
    """The interval the tables and the plot show for a stats.seed_level of metric k: over several seeds the
    hull of the t-interval over seeds and the bootstrap interval of the seed mean (gen_ci), so that neither
    source of error is hidden (two seeds that tie give a zero-width t-interval); for one seed its bootstrap
    interval. Cut to the metric's range (>= 0; accuracy <= 1): a t-interval over few seeds can leave it."""
    ci, gen = level["ci"], level["gen_ci"]
    if level["n_seeds"] > 1 and gen:
        ci = [min(ci[0], gen[0]), max(ci[1], gen[1])]
    elif level["n_seeds"] == 1:
        ci = gen
    return ci and [max(ci[0], 0.0), min(ci[1], 1.0) if "_acc" in k else ci[1]]


def method_cell(level: dict | None, k: str) -> str:
    return "-" if level is None else est_ci(level["mean"], shown_ci(level, k), k)


def step_header(steps: list[int]) -> str:
    return " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps)


def step_cells(m: dict, k: str, steps: list[int]) -> str:
    """A method's row cells of metric k, one per step count."""
    return " | ".join(method_cell(m["results"].get(str(s), {}).get(k), k) for s in steps)


COST_HEADS = {"unet_passes_per_student_step": "UNet passes / student step", "seconds_per_student_step": "s / student step"}


def cost_cell(c: dict, key: str) -> str:
    return fmt(c.get(key)) or "n/a"


def summary(doc: dict) -> list[str]:
    """The summary (the README copies it; tests/test_matrix.py checks the copy): the first accuracy metric (seen
    accuracy) and the Frechet distance at every step count with their intervals, the seed count, the cost per
    student step (on the first table), and the teacher's values."""
    _, _, acc, fd = WORLDS[doc["world"]]
    keys, steps, t = [k for k in (acc[0], fd) if k in doc["metrics"]], doc["steps"], doc["teacher"]
    lines = []
    for i, k in enumerate(keys):
        cost = ("unet_passes_per_student_step", "seconds_per_student_step") if i == 0 else ()   # on the first table
        lines += [""] * (i > 0) + [
            f"| method | seeds | {LABELS.get(k, k)}: {step_header(steps)}"
            + "".join(f" | {COST_HEADS[key]}" for key in cost) + " |", "|---|---:|" + "---:|" * (len(steps) + len(cost))]
        lines += [f"| {m['name']} | {m['n_seeds']} | {step_cells(m, k, steps)}"
                  + "".join(f" | {cost_cell(m['cost'], key)}" for key in cost) + " |" for m in doc["methods"]]
    shown = [f"{'accuracy' if '_acc' in k else 'FD'} {est_ci(t[k]['estimate'], t[k]['ci'], k)}" for k in keys if k in t]
    if shown:
        lines += ["", f"Teacher (DDIM {t['steps']} steps, CFG {fmt(t['guidance_scale'])}): {'; '.join(shown)}."]
    return lines


def markdown(doc: dict) -> str:
    keys, steps, t = doc["metrics"], doc["steps"], doc["teacher"]
    lines = [doc.get("header") or "# The distillation matrix", "",
             f"World `{doc['world']}`, {doc['n_prompts']} prompt{'s' * (doc['n_prompts'] > 1)} x "
             f"{doc['seeds_per_prompt']} images per cell "
             f"(prompt sets: {', '.join(e['prompts'] for e in doc['evaluations'])}). Each cell: the mean over the "
             "method's training seeds [95% interval: on each side the wider of the t-interval over seeds and the "
             "bootstrap interval of the seed mean, cut to the metric's range; the json has both]; with one seed, "
             "that LoRA's estimate [95% bootstrap interval] (accuracy and diversity over prompts, FD over images; "
             "docs/statistics.md). Accuracy in %; "
             f"-: a step count the method's sampler does not support. Teacher: DDIM {t.get('steps')} steps, CFG "
             f"{fmt(t.get('guidance_scale'))}.", "", "## Summary", "", *summary(doc), ""]
    for k in keys:
        lines += [f"## {LABELS.get(k, k)} (`{k}`)", "",
                  f"| method | sampler | seeds | {step_header(steps)} |",
                  "|---|---|---:|" + "---:|" * len(steps)]
        for m in doc["methods"]:
            sampler = m["sampler"]["solver"] + (f" (eta {m['sampler']['eta']:g})" if m["sampler"]["eta"] is not None else "")
            lines.append(f"| {m['name']} | {sampler} | {m['n_seeds']} | {step_cells(m, k, steps)} |")
        if k in t:
            lines += ["", f"Teacher (DDIM {t['steps']} steps, CFG {fmt(t['guidance_scale'])}): "
                          f"{est_ci(t[k]['estimate'], t[k]['ci'], k)}."]
        lines.append("")
    lines += ["## Cost of training", "",
              "UNet passes: forward passes per training step, a CFG pair counted 2, "
              "backward passes not counted (demo/matrix.py unet_passes names the source of each count); a student "
              "step = one student / generator update with the gen_every - 1 fake-score updates between (DMD2, rCM). "
              "Seconds: train.batch_size / the median samples_per_s of metrics.jsonl. Peak memory: the largest "
              "peak_mem_mb logged. Seconds and memory: the fastest / smallest of the method's runs (runs share "
              "the machine with others; the UNet passes are the load-free count). Training min: s / step x train "
              "steps / 60, one run (its total: the sum over the runs below the table).", "",
              "| method | seeds | train steps | student steps | batch | UNet passes / step | gen_every | "
              "UNet passes / student step | s / step | s / student step | peak MB | training min |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in doc["methods"]:
        c = m["cost"]
        lines.append(f"| {m['name']} | {m['n_seeds']} | {fmt(c['train_steps'])} | {fmt(c['student_steps'])} | "
                     f"{fmt(c['batch_size'])} | {cost_cell(c, 'unet_passes_per_step')} | {fmt(c['gen_every'])} | "
                     + " | ".join(cost_cell(c, key) for key in ("unet_passes_per_student_step", "seconds_per_step",
                                                                 "seconds_per_student_step", "peak_mem_mb",
                                                                 "train_minutes")) + " |")
    total = [r["cost"].get("train_minutes") for r in doc["runs"]]
    if total and None not in total:
        lines += ["", f"Training time of the {len(total)} runs: {sum(total):.0f} min at their median speeds."]
    if doc["baseline"]:
        lines += ["", f"## Verdicts against {doc['baseline']}", "",
                  "Method minus baseline at the same steps: the paired bootstrap interval of the difference (the same "
                  "prompts and images resampled for both; seeds averaged) and the Welch t-interval over training seeds "
                  "(>= 2 seeds each; '-' otherwise, and then the verdict ignores the training-seed noise). **yes**: every "
                  "available interval excludes 0 (on one side); better / worse by the metric's direction (diversity: "
                  "higher / lower).", "",
                  "| metric | method | steps | difference | paired bootstrap | over seeds | seeds | excludes 0 |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for v in doc["verdicts"]:
            k = v["metric"]
            ci = lambda c: f"[{fmt(c[0], k)}, {fmt(c[1], k)}]" if c else "-"   # noqa: E731
            side = "higher" if v["diff"] > 0 else "lower"
            word = "-" if v["excludes_0"] is None else ("**yes**, " + (side if v["better"] is None else
                                                                     "better" if v["better"] else "worse")
                                                        if v["excludes_0"] else "no")
            lines.append(f"| {k} | {v['method']} | {v['steps']} | {fmt(v['diff'], k)} | {ci(v['gen_ci'])} | "
                         f"{ci(v['seed_ci'])} | {v['n_seeds'][0]} vs {v['n_seeds'][1]} | {word} |")
    if doc.get("claims"):
        lines += [""] + matrix_claims.markdown(doc["claims"], fmt)
    lines += ["", "## Runs", "", "| run | method | train seed | LoRA | sampler | steps |", "|---|---|---:|---|---|---|"]
    for r in doc["runs"]:
        lines.append(f"| {r['run']} | {r['name']} | {fmt(r['train_seed'])} | {r['lora']} | {r['sampler']['solver']} | "
                     f"{', '.join(r['results'])} |")
    lines += ["", "Made with:", "", "```bash", doc["command"], "```", ""]
    return "\n".join(lines)


def plot(doc: dict, path: str) -> bool:
    """Accuracy (each accuracy key), Frechet distance and diversity vs steps, one line per method (mean over seeds with
    shown_ci's interval), the teacher as a dashed line with its interval as a
    band. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path} not written")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, _, acc, fd = WORLDS[doc["world"]]
    keys = [k for k in (*acc, fd) if k in doc["metrics"]] + [k for k in doc["metrics"] if k.endswith("_diversity")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4.8), squeeze=False)
    n = len(doc["methods"])
    for ax, k in zip(axes[0], keys):
        scale = 100 if "_acc" in k else 1
        for j, m in enumerate(doc["methods"]):
            pts = [(int(s), lv[k]) for s, lv in m["results"].items() if k in lv]
            if not pts:
                continue
            xs, ys, lo, hi = [], [], [], []
            for s, lv in sorted(pts):
                ci = shown_ci(lv, k)
                y = scale * lv["mean"]
                xs.append(s * (1 + 0.02 * (j - (n - 1) / 2)))      # side by side: error bars stay apart
                ys.append(y)
                lo.append(max(y - scale * ci[0], 0) if ci else 0)
                hi.append(max(scale * ci[1] - y, 0) if ci else 0)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=f"{m['name']} ({m['n_seeds']} seed"
                        f"{'s' * (m['n_seeds'] > 1)})")
        t = doc["teacher"].get(k)
        if t and t["estimate"] is not None:
            ax.axhline(scale * t["estimate"], color="k", ls="--", lw=1, label=f"teacher (DDIM {doc['teacher']['steps']})")
            if t["ci"]:
                ax.axhspan(scale * t["ci"][0], scale * t["ci"][1], color="k", alpha=0.08)
        ax.set_xscale("log", base=2)
        ax.set_xticks(doc["steps"], [str(s) for s in doc["steps"]])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(LABELS.get(k, k))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()   # under the panels: long names hide no point
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, bbox_to_anchor=(0.5, 0.04))
    fig.suptitle(f"Distilled LoRAs vs sampling steps ({doc['world']} world, {doc['n_prompts']} prompts)")
    fig.text(0.5, 0.005, "error bars: 95%, the wider of the t-interval over training seeds and the bootstrap "
             "interval of the seed mean (one seed: its bootstrap interval); band: the teacher's interval",
             ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out: str, doc: dict) -> list[str]:
    """<out>.json, <out>.md and <out>.png; returns the paths written."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown(doc))
    return [out + ".json", out + ".md"] + ([out + ".png"] if plot(doc, out + ".png") else [])
