"""LCD vs TCD vs PCM LoRAs distilled from the demo teacher under one budget, each sampled with its own
sampler (the objective its file's `lcm.spec` names; TCD at several gammas), at 1/2/4/8 steps, with 95%
intervals; runs of one configuration trained with several `train.seed` are summarised over seeds.

    python -m demo.compare outputs/compare/lcd outputs/compare/tcd outputs/compare/pcm \
        --out docs/demo_compare --header docs/demo_compare_header.md
    # 3 training seeds per method (run dirs lcd_s0 lcd_s1 ..., trained with train.seed=0,1,2):
    python -m demo.compare outputs/compare/{lcd,tcd,pcm}_s{0,1,2} --reference "LCD (LCM-LoRA) / lcm"

Writes <out>.md (tables), <out>.json (every number), <out>_metrics.png (accuracy and Frechet distance
vs steps with 95% error bars, one line per configuration, the teacher as a band) and <out>.png (the
first prompts: the teacher, then every configuration's first run at 1 and at 4 steps, labelled).
Metrics as demo.bench: prompt accuracy and Frechet distance of evaluator features against real images,
the same prompts and per-image seeds everywhere; each with its 95% bootstrap interval (accuracy over
prompts, FD over the generated images; docs/statistics.md), the paired difference of every
configuration to the reference one (`--reference`, default the first), and, per configuration with
several training seeds, the mean over seeds with its t-interval (lcm.evaluation.stats.seed_level,
config_difference).

Each run's numbers are cached in <run>/compare.json (+ the bootstrap replicates in
<run>/compare_boot.safetensors), keyed by what was evaluated: prompt set, --n, --seed, steps, guidance,
the teacher's, evaluator's and LoRA's file hashes, the reference set and the bootstrap. A request that
differs in any of them re-evaluates the run (--force re-evaluates regardless).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time

import torch

from demo import sweep
from demo.bench import labelled_grid
from demo.matrix import supported_steps
from demo.seed_groups import (METRICS, STEPS, cell_text, comparison_table, differences, group_configs,
                               pick_reference, seed_table, summarise)
from demo.sweep import file_id, key_difference, load_replicates, normal, resample, save_replicates, score_cell

# A run's method: its objective's class (config.json objective._target_); each sampled with its own sampler(s).
NAMES = {"LCDLoRA": "LCD (LCM-LoRA)", "TCD": "TCD", "PCM": "PCM", "DMD2": "DMD2", "SCM": "sCM", "RCM": "rCM"}
SAMPLERS = {"LCD (LCM-LoRA)": [("lcm", {}), ("tcd", {"eta": 0.3})],
            "TCD": [("tcd", {"eta": 0.3}), ("tcd", {"eta": 0.0}), ("tcd", {"eta": 0.7})],
            "PCM": [("pcm", {})], "DMD2": [("lcm", {})], "sCM": [("scm", {})], "rCM": [("scm", {})]}
BY_SPEC = {"lcm": "LCD (LCM-LoRA)", "tcd": "TCD", "pcm": "PCM", "scm": "sCM"}   # runs without a config.json


def method_of(run: str, spec_objective: str) -> str:
    """The method of a run: its config's objective class, else the spec's objective."""
    path = os.path.join(run, "config.json")
    target = (json.load(open(path)).get("objective") or {}).get("_target_", "") if os.path.exists(path) else ""
    return NAMES.get(target.rsplit(".", 1)[-1], BY_SPEC[spec_objective])
BOOT_FILE = "compare_boot.safetensors"
TEACHER = dict(solver="ddim", steps=25, guidance_scale=3.0)


def find_lora(run: str) -> str:
    """The exported LoRA of a finished run (the one .safetensors file at its top level)."""
    files = sorted(f for f in glob.glob(os.path.join(run, "*.safetensors"))
                   if os.path.basename(f) not in (BOOT_FILE, sweep.BOOT_FILE))      # the reports' replicates
    if len(files) != 1:
        raise SystemExit(f"{run}: expected one exported LoRA (*.safetensors), found {len(files)}; is the run finished?")
    return files[0]


def label(sampler: str, kw: dict) -> str:
    return sampler + (f" gamma={kw['eta']:g}" if "eta" in kw else "")


def eval_key(n: int, seed: int, teacher: str, evaluator: str, n_ref: int, bootstrap: int, bootstrap_seed: int) -> dict:
    """What an evaluation of this tool depends on, but for the LoRA (evaluate_run adds its hash)."""
    return normal(dict(prompts="demo fixed_prompt_set(seed=0)", n=n, seed=seed, guidance_scale=1.0, steps=list(STEPS),
                       teacher=file_id(teacher), evaluator=file_id(evaluator), n_ref=n_ref, ref_seed=1,
                       bootstrap=bootstrap, bootstrap_seed=bootstrap_seed))


def evaluate_run(run: str, pipe, ev, ref, prompts, seed: int, keep: int, force: bool, key: dict,
                 draw) -> tuple[dict, dict, dict]:
    """One run: ({key, spec, seconds, results: {sampler label: {steps: {acc, acc_ci, fd, fd_ci, n,
    sec_per_image}}}}, kept images {(label, steps): (keep, 3, H, W)}, replicates {label/metric/steps: (B,)}).
    Cached in <run>/compare.json and <run>/compare_boot.safetensors under `key` + the LoRA's hash: a
    cache made for anything else is re-evaluated."""
    from demo.bench import generate
    from models.lora import remove_lora
    lora = find_lora(run)
    key = normal(dict(key, lora=file_id(lora)))
    cache, boot_path = os.path.join(run, "compare.json"), os.path.join(run, BOOT_FILE)
    res = json.load(open(cache)) if os.path.exists(cache) and not force else {}
    if res and res.get("key") != key:
        print(f"{run}: re-evaluating, compare.json was made for another evaluation: {key_difference(res.get('key'), key)}",
              flush=True)
        res = {}
    reps = load_replicates(boot_path, key) if res else None
    if reps is None:                                     # no replicates of this evaluation: score every cell again
        res, reps = {}, {}
    results = res.setdefault("results", {})
    name = pipe.load_lora(lora, name="distilled")
    images = {}
    t0 = time.perf_counter()
    try:
        spec = pipe.spec
        method = method_of(run, spec.objective)
        for sampler, kw in SAMPLERS[method]:
            lab = label(sampler, kw)
            for steps in supported_steps(sampler, dataclasses.asdict(spec), STEPS):   # DMD2's 4-point grid: no 8
                done = str(steps) in results.get(lab, {})
                shown = steps in (1, 4) and keep > 0
                if done and not shown:
                    continue
                imgs, dt = generate(pipe, prompts if not done else prompts[:keep], seed, steps=steps,
                                    guidance_scale=1.0, solver=sampler, **kw)
                if shown:
                    images[(lab, steps)] = imgs[:keep]
                if not done:
                    m, rep = score_cell(ev, imgs, prompts, ref, draw)
                    results.setdefault(lab, {})[str(steps)] = dict(m, sec_per_image=dt)
                    reps.update({f"{lab}/{k}/{steps}": v for k, v in rep.items()})
        res["spec"] = dict(objective=spec.objective, num_ddim_timesteps=spec.num_ddim_timesteps, phases=spec.phases)
        res["method"] = method
    finally:
        remove_lora(pipe.unet, name)
        pipe.adapter_specs.pop(name, None)
    res["key"] = key
    res["seconds"] = res.get("seconds", 0) + time.perf_counter() - t0
    save_replicates(boot_path, reps, key)
    with open(cache + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(cache + ".tmp", cache)
    return res, images, reps


def run_info(run: str) -> dict:
    """train steps, train seed and configuration (overrides but the seed) of a run's config.json."""
    cfg = json.load(open(os.path.join(run, "config.json")))
    return dict(train_steps=cfg["train"]["max_steps"], train_seed=sweep.train_seed(cfg),
                configuration=sweep.configuration(cfg))


def rows_of(run: str, res: dict, reps: dict, info: dict) -> list[dict]:
    """The table rows of one evaluated run: one per sampler, with its replicates under `boot`."""
    out = []
    for lab, metrics in res["results"].items():
        boot = {f"{k}/{s}": reps.get(f"{lab}/{k}/{s}") for k, _ in METRICS for s in STEPS}
        out.append(dict(run=run, method=res.get("method") or BY_SPEC[res["spec"]["objective"]], sampler=lab, spec=res["spec"],
                        **info, key=res["key"], metrics=metrics, boot=boot))
    return out


def group_rows(rows: list[dict]) -> list[dict]:
    """Rows grouped by configuration (method, sampler, train steps, overrides but the seed), in table order."""
    for i, r in enumerate(rows):
        r.setdefault("_i", i)
    first: dict = {}
    key = lambda r: (r["method"], r["sampler"], r["train_steps"], r["configuration"])   # noqa: E731
    for r in rows:
        first.setdefault(key(r), r["_i"])
    steps = {r["train_steps"] for r in rows}
    lab = lambda r: f"{r['method']} / {r['sampler']}" + (f" {r['train_steps']} st." if len(steps) > 1 else "")  # noqa: E731
    return group_configs(rows, label=lab, key=key,
                         order=lambda r: (first[key(r)], -1 if r["train_seed"] is None else r["train_seed"], r["_i"]))


def _cell(r: dict, s: int):
    return r["metrics"].get(str(s))


def _boot(r: dict, k: str, s: int):
    return (r.get("boot") or {}).get(f"{k}/{s}")


def markdown(rows: list[dict], header: str, summary: list[dict] | None = None, diffs: list[dict] | None = None) -> str:
    seeded = any(len(g["runs"]) > 1 for g in group_rows(rows))
    cols = ["method", "sampler", "train steps", *(["train seed"] if seeded else []),
            *[f"acc {s} st." for s in STEPS], *[f"FD {s} st." for s in STEPS]]
    out = [header, "", "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        m = r["metrics"]
        out.append(f"| {r['method']} | {r['sampler']} | {r['train_steps']} | " + (f"{r['train_seed']} | " if seeded else "")
                   + " | ".join(cell_text(m.get(str(s)), "acc") for s in STEPS) + " | "
                   + " | ".join(cell_text(m.get(str(s)), "fd") for s in STEPS) + " |")
    out += seed_table(summary or [])
    out += comparison_table(diffs or [])
    return "\n".join(out)


def plot_metrics(groups: list[dict], teacher: dict, path: str) -> bool:
    """Accuracy and Frechet distance vs sampling steps, one line per configuration (the mean over its
    training seeds with the 95% t-interval when it has several, else the run's 95% bootstrap interval),
    the teacher as a dashed line with its interval shaded. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {os.path.basename(path)} not written")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lcm.evaluation import stats
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    seeded = False
    for j, g in enumerate(groups):
        n = len(g["runs"])
        seeded |= n > 1
        shift = 1 + 0.015 * (j - (len(groups) - 1) / 2)     # lines side by side: their error bars stay apart
        for ax, (k, _) in zip(axes, METRICS):
            scale = 100 if k == "acc" else 1
            xs, ys, lo, hi = [], [], [], []
            for s in STEPS:
                cells = [_cell(r, s) for r in g["runs"]]
                if None in cells:
                    continue
                lvl = stats.seed_level([c[k] for c in cells])
                ci = lvl["ci"] if n > 1 else cells[0].get(f"{k}_ci")
                y = scale * lvl["mean"]
                xs.append(s)
                ys.append(y)
                lo.append(0 if not ci else max(y - scale * ci[0], 0))
                hi.append(0 if not ci else max(scale * ci[1] - y, 0))
            ax.errorbar([x * shift for x in xs], ys, yerr=[lo, hi], fmt="o-", capsize=3, label=g["label"] + (f" ({n} seeds)" if n > 1 else ""))
    for ax, (k, _) in zip(axes, METRICS):
        scale = 100 if k == "acc" else 1
        ax.axhline(scale * teacher[k], color="k", ls="--", lw=1, label="teacher (DDIM 25, CFG 3)")
        if teacher.get(f"{k}_ci"):
            ax.axhspan(scale * teacher[f"{k}_ci"][0], scale * teacher[f"{k}_ci"][1], color="k", alpha=0.08)
        ax.set_xscale("log", base=2)
        ax.set_xticks(STEPS, [str(s) for s in STEPS])
        ax.set_xlabel("sampling steps")
        ax.set_ylabel("prompt accuracy (%)" if k == "acc" else "Frechet distance (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Demo world: distilled LoRAs vs sampling steps")
    fig.text(0.5, 0.005, "error bars: 95% " + ("t-interval over training seeds (mean over seeds) for lines with several "
                                               "seeds, else " if seeded else "")
             + "bootstrap interval over prompts (accuracy) / generated images (FD); band: the teacher's interval",
             ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out: str, rows: list[dict], teacher: dict, header: str, key: dict, reference: str | None = None,
          n: int | None = None, seed: int | None = None) -> dict:
    """<out>.md, <out>.json and <out>_metrics.png from evaluated rows; returns what <out>.json holds."""
    groups = group_rows(rows)
    summary = summarise(groups, STEPS, _cell, _boot)
    ref = pick_reference(groups, reference)
    diffs = differences(groups, ref, STEPS, _cell, _boot)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(markdown(rows, header, summary, diffs) + "\n")
    doc = dict(teacher=teacher, n=n, seed=seed, key=key,
               rows=[{k: v for k, v in r.items() if k not in ("boot", "_i")} for r in rows],
               configurations=[dict(label=g["label"], runs=[r["run"] for r in g["runs"]], seeds=g["seeds"])
                               for g in groups], seed_summary=summary, reference=ref, differences=diffs)
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    plot_metrics(groups, teacher, out + "_metrics.png")
    return doc


def main(argv=None) -> None:
    from demo.bench import generate
    from demo.evaluator import DemoEvaluator
    from demo.world import fixed_prompt_set
    from lcm.pipeline import Pipeline
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished training run dirs (config.json + exported LoRA)")
    p.add_argument("--out", default="docs/demo_compare")
    p.add_argument("--header", default=None, help="a Markdown file put above the table")
    p.add_argument("--teacher", default=os.path.join(root, "demo_teacher.safetensors"))
    p.add_argument("--evaluator", default=os.path.join(root, "demo_evaluator.safetensors"))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="generation seed: image i is seeded seed + i")
    p.add_argument("--n-ref", type=int, default=2048, help="real images of the Frechet reference")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each interval")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--reference", default=None, help="the configuration the others are compared with: its label "
                   "(e.g. 'LCD (LCM-LoRA) / lcm') or a unique part of it; default the first; 'none': no comparisons")
    p.add_argument("--keep", type=int, default=6, help="prompts shown in the image")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="re-evaluate runs whose cache matches the request")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ev = DemoEvaluator.load(a.evaluator)
    ref = ev.reference_stats(a.n_ref, seed=1, style="plain")
    prompts = fixed_prompt_set(a.n, seed=0)
    draw = resample(a.n, a.bootstrap, a.bootstrap_seed)
    key = eval_key(a.n, a.seed, a.teacher, a.evaluator, a.n_ref, a.bootstrap, a.bootstrap_seed)
    pipe = Pipeline.from_checkpoint(a.teacher)
    teacher_imgs, _ = generate(pipe, prompts, a.seed, **TEACHER)
    t_m, _ = score_cell(ev, teacher_imgs, prompts, ref, draw)
    rows, images = [], {}
    for run in a.runs:
        res, imgs, reps = evaluate_run(run, pipe, ev, ref, prompts, a.seed, a.keep, a.force, key, draw)
        rows += rows_of(run, res, reps, run_info(run))
        images.update({(run, lab, s): v for (lab, s), v in imgs.items()})
        print(f"{run}: done", flush=True)
    groups = group_rows(rows)
    shown = [g["runs"][0] for g in groups]               # each configuration's first run (lowest seed)
    columns, col_labels = [teacher_imgs[:a.keep]], ["teacher\nDDIM 25, CFG 3"]
    for r in shown:
        for s in (1, 4):
            if (r["run"], r["sampler"], s) in images:
                columns.append(images[(r["run"], r["sampler"], s)])
                col_labels.append(f"{r['method']}\n{r['sampler']}, {s} step{'s' if s > 1 else ''}")
    header = open(a.header).read().rstrip() if a.header else "# Demo world: LCD vs TCD vs PCM"
    header += (f"\n\nTeacher reference (DDIM 25 steps, CFG 3, 50 UNet calls): {cell_text(t_m, 'acc')} / FD "
               f"{cell_text(t_m, 'fd')}. Each cell: one LoRA's estimate [95% bootstrap interval] on {a.n} prompts "
               "(accuracy: over prompts; FD: over the generated images, the real reference fixed; docs/statistics.md). "
               f"Plot: {os.path.basename(a.out)}_metrics.png. Image {os.path.basename(a.out)}.png: one row per prompt; "
               "columns: the teacher, then each configuration's first run at 1 step and at 4 steps.")
    write(a.out, rows, dict(acc=t_m["acc"], acc_ci=t_m["acc_ci"], fd=t_m["fd"], fd_ci=t_m["fd_ci"]), header, key,
          a.reference, a.n, a.seed)
    if a.keep > 0:
        labelled_grid(columns, col_labels, prompts[:a.keep], a.out + ".png")
    print(open(a.out + ".md").read())


if __name__ == "__main__":
    main()
