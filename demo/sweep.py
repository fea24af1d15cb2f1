"""The demo world's ablations: LCM-LoRA quality vs the teacher solver Psi, the skipping step k, the
guidance range and the LoRA rank, as a table and the LCM paper's figure form, with 95% intervals and,
for configurations trained with several seeds, the mean over seeds.

    # train (Hydra multiruns, one run dir per job; commands and wall time in docs/demo_sweep.md)
    python train.py -m experiment=demo_lcm_lora train.max_steps=200 train.checkpoint_every=50 \
        objective.teacher_solver=ddim,dpmsolver,dpmsolver++ objective.k=1,5,10,20,50 train.seed=0,1,2 \
        hydra.sweep.dir=outputs/sweep/psi_k \
        'hydra.sweep.subdir="psi_${objective.teacher_solver}_k${objective.k}_s${train.seed}"'
    # evaluate every finished run (its checkpoints at 4 and 1 LCM steps, its final LoRA at 1/2/4/8 steps),
    # writing <run>/eval.json and <run>/eval_boot.safetensors, then build the report
    python -m demo.sweep evaluate outputs/sweep/psi_k outputs/sweep/w outputs/sweep/rank
    python -m demo.sweep report outputs/sweep/psi_k outputs/sweep/w outputs/sweep/rank   # docs/demo_sweep.*

`report` retrains and re-evaluates nothing: it reads each run's config.json, eval.json and
eval_boot.safetensors. Every LoRA is sampled on its own grid (the `lcm.spec` its file carries). The
metrics are demo.bench's (prompt accuracy, Frechet distance of evaluator features against real
images) on the same prompts and per-image seeds for every run, each with its 95% bootstrap interval
(over prompts for accuracy, over the generated images for the Frechet distance; docs/statistics.md).

Training seeds: the runs of one configuration (everything but `train.seed` equal) are summarised as
the mean over seeds with its 95% t-interval, beside the generation interval of that mean; every
configuration is compared with a reference one (`--reference`, default the recipe: DDIM, k = 20,
w ~ U[2, 4], rank 16) by the paired bootstrap of the difference over prompts / images and, with
>= 2 seeds on both sides, Welch's t-interval over seeds (lcm.evaluation.stats.config_difference).

eval.json is keyed by what was evaluated (prompt set, n, generation seed, steps, guidance, solver,
the teacher's, evaluator's and LoRA's file hashes, the reference set and the bootstrap): an
evaluation asked for with anything different re-evaluates the run. The plot needs matplotlib.
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import textwrap
import time

import torch

from demo import seed_groups
from demo.seed_groups import (METRICS, STEPS, cell_text, comparison_table, differences, pick_reference,
                               seed_table, summarise)
from lcm.evaluation import stats
from lcm.training import cluster

CURVE_STEPS = (4, 1)                            # the paper's figure: 4-step sampling vs training iterations;
                                                # 1 step too (4 steps saturate on the demo world)
SOLVER_NAMES = {"ddim": "DDIM", "dpmsolver": "DPM-Solver", "dpmsolver++": "DPM-Solver++"}
RECIPE = dict(psi="ddim", k=20, w=(2.0, 4.0), rank=16)   # experiment=demo_lcm_lora: the default reference
BOOT_FILE = "eval_boot.safetensors"
# overrides that do not change what a run trains: left out of its configuration

#----------------------------------------------------------------------------
# Finding runs.


def _lora(cfg: dict) -> dict:
    """The trained LoRA's config of a run's config.json (objective.lora; runs before the objective
    group kept it at the top level as `lora`)."""
    return (cfg.get("objective") or {}).get("lora") or cfg["lora"]


def configuration(cfg: dict) -> str:
    """A run's configuration (lcm.training.cluster.configuration of config.json's `overrides`; '' for
    runs that did not record them)."""
    return cluster.configuration(cfg.get("overrides"))


def train_seed(cfg: dict):
    """The run's train.seed (None when its config does not say)."""
    return (cfg.get("train") or {}).get("seed")


def runs_in(folders: list[str]) -> list[dict]:
    """Every finished run (config.json + lcm.safetensors) under the given sweep folders."""
    out = []
    for folder in folders:
        for cfg_path in sorted(glob.glob(os.path.join(folder, "*", "config.json"))):
            run = os.path.dirname(cfg_path)
            lora = os.path.join(run, "lcm.safetensors")
            if not os.path.exists(lora):
                print(f"skipped (no lcm.safetensors): {run}")
                continue
            with open(cfg_path) as f:
                cfg = json.load(f)
            t = cfg["train"]
            o = cfg["objective"] if "k" in cfg.get("objective", {}) else t    # older runs kept the knobs in train
            mu = o.get("ema_decay") if o is not t else t.get("lora_ema_decay")
            out.append(dict(run=run, sweep=os.path.basename(os.path.normpath(folder)), lora=lora, k=o["k"],
                            psi=o.get("teacher_solver", "ddim"), w=(o["w_min"], o["w_max"]),
                            mu=mu, rank=_lora(cfg)["rank"], alpha=_lora(cfg)["alpha"],
                            steps_trained=t["max_steps"], train_seed=train_seed(cfg),
                            configuration=configuration(cfg)))
    return out


def checkpoints(run: str) -> list[tuple[int, str]]:
    """(training step, LoRA file) of every kept checkpoint of a run."""
    found = []
    for d in glob.glob(os.path.join(run, "checkpoints", "step_*")):
        f = os.path.join(d, "lcm.safetensors")
        if os.path.exists(f):
            found.append((int(os.path.basename(d).split("_")[1]), f))
    return sorted(found)

#----------------------------------------------------------------------------
# What was evaluated (the cache key), the scores with intervals, their replicates. demo.compare uses these too.


@functools.lru_cache(maxsize=64)
def _sha(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_id(path: str) -> str:
    """A file's content hash (16 hex digits): a retrained LoRA or another teacher is another evaluation."""
    st = os.stat(path)
    return _sha(os.path.abspath(path), st.st_size, st.st_mtime)


def normal(obj):
    """obj as JSON reads it back (tuples -> lists): keys compare equal across a save and a load."""
    return json.loads(json.dumps(obj))


def key_difference(old: dict | None, new: dict) -> str:
    """What differs between a cached evaluation's key and the one asked for, in words."""
    if not old:
        return "it records no key (written before evaluations were keyed)"
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                     if old.get(k) != new.get(k))


def resample(n: int, bootstrap: int, bootstrap_seed: int) -> stats.Resample:
    """The one bootstrap draw every run and cell of an evaluation shares (so differences are paired)."""
    return stats.draw(n, 1, bootstrap, torch.Generator().manual_seed(bootstrap_seed))


@torch.no_grad()
def score_cell(ev, images: torch.Tensor, prompts: list[str], ref, r: stats.Resample) -> tuple[dict, dict]:
    """demo.bench's metrics of one cell (images in [-1, 1], one per prompt) with their 95% intervals:
    {acc, acc_ci, fd, fd_ci, n}, and their bootstrap replicates {acc: (B,), fd: (B,)} over the draw r
    (accuracy resampled over prompts, the Frechet distance over the generated images, reference fixed)."""
    from demo.evaluator import feature_stats, frechet_distance
    from demo.world import CONTENT, VOCAB, parse_caption
    attrs = [parse_caption(p) for p in prompts]
    pred = ev.predict(images)
    correct = torch.stack([pred[k] == torch.tensor([VOCAB[k].index(getattr(a, k)) for a in attrs])
                           for k in CONTENT]).all(0).double()                    # all 5 attributes right
    feats = ev.features(images)
    est = dict(acc=correct.mean().item(), fd=frechet_distance(feature_stats(feats), ref))
    reps = dict(acc=stats.mean_replicates(correct, r),
                fd=stats.frechet_replicates(feats, ref.mu, ref.sigma, r.images))
    out = {}
    for k, unit in METRICS:
        out.update({k: est[k], f"{k}_ci": stats.interval(est[k], reps[k], unit)})
    return dict(out, n=len(images)), reps


def save_replicates(path: str, reps: dict, key: dict) -> None:
    """{name: (B,) tensor} to a safetensors file that records the evaluation's key."""
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.double().contiguous() for k, v in reps.items()}, tmp, metadata={"key": json.dumps(key)})
    os.replace(tmp, path)


def load_replicates(path: str, key: dict | None) -> dict | None:
    """The replicates of the evaluation `key` (None when the file is missing or was made for another)."""
    if not os.path.exists(path) or key is None:
        return None
    from safetensors import safe_open
    with safe_open(path, "pt", device="cpu") as f:
        if json.loads((f.metadata() or {}).get("key", "null")) != normal(key):
            return None
        return {k: f.get_tensor(k) for k in f.keys()}

#----------------------------------------------------------------------------
# Evaluating (writes <run>/eval.json and <run>/eval_boot.safetensors).


def evaluate(runs: list[dict], teacher: str, evaluator: str, n: int, seed: int, force: bool = False,
             n_ref: int = 2048, bootstrap: int = 1000, bootstrap_seed: int = 0, pipe=None, ev=None) -> None:
    from demo.bench import generate
    from demo.evaluator import DemoEvaluator
    from demo.world import fixed_prompt_set
    from lcm.pipeline import Pipeline
    from lcm.runs.logger import log_summary
    from models.lora import remove_lora
    ev = DemoEvaluator.load(evaluator) if ev is None else ev
    ref = ev.reference_stats(n_ref, seed=1, style="plain")
    prompts = fixed_prompt_set(n, seed=0)
    pipe = Pipeline.from_checkpoint(teacher) if pipe is None else pipe
    draw = resample(n, bootstrap, bootstrap_seed)
    base = dict(prompts="demo fixed_prompt_set(seed=0)", n=n, seed=seed, solver="lcm", guidance_scale=1.0,
                steps=list(STEPS), curve_steps=list(CURVE_STEPS), teacher=file_id(teacher),
                evaluator=file_id(evaluator), n_ref=n_ref, ref_seed=1, bootstrap=bootstrap,
                bootstrap_seed=bootstrap_seed)

    def metrics(lora: str, steps_list, reps: dict | None = None) -> dict:
        pipe.load_lora(lora, name="lcm")                 # its own spec (grid) comes with the file
        out = {"num_ddim_timesteps": pipe.spec.num_ddim_timesteps}
        try:
            for steps in steps_list:
                images, _ = generate(pipe, prompts, seed, steps=steps, guidance_scale=1.0, solver="lcm")
                out[str(steps)], rep = score_cell(ev, images, prompts, ref, draw)
                if reps is not None:
                    reps.update({f"{k}/{steps}": v for k, v in rep.items()})
        finally:
            remove_lora(pipe.unet, "lcm")
            pipe.adapter_specs.pop("lcm", None)
        return out

    for r in runs:
        path, boot_path = os.path.join(r["run"], "eval.json"), os.path.join(r["run"], BOOT_FILE)
        key = normal(dict(base, lora=file_id(r["lora"])))
        res = {}
        if os.path.exists(path) and not force:
            with open(path) as f:
                res = json.load(f)
            if res.get("key") != key:
                print(f"{r['run']}: re-evaluating, eval.json was made for another evaluation: "
                      f"{key_difference(res.get('key'), key)}", flush=True)
                res = {}
        todo = [s for s in CURVE_STEPS if f"curve{s}" not in res]
        boot = load_replicates(boot_path, key) if res else None
        if res and not todo and boot is not None:
            continue
        t0 = time.perf_counter()
        if "final" not in res or boot is None:
            boot = {}
            res["final"] = metrics(r["lora"], STEPS, boot)
            save_replicates(boot_path, boot, key)
        final = res["final"]
        for s in todo:
            curve = {str(step): metrics(f, (s,))[str(s)] for step, f in checkpoints(r["run"])}
            curve[str(r["steps_trained"])] = final[str(s)]
            res[f"curve{s}"] = curve
        res.update(key=key, n_prompts=n, seed=seed, seconds=res.get("seconds", 0) + time.perf_counter() - t0)
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
        summary = {f"eval/{k}{suffix}_{s}steps": final[str(s)][k + suffix]
                   for s in STEPS for k, _ in METRICS for suffix in ("", "_ci")}
        log_summary(r["run"], summary)                   # the run's wandb summary, if it logged to wandb
        print(f"{r['run']}: " + " ".join(f"{s} st. {100 * final[str(s)]['acc']:.1f}%/{final[str(s)]['fd']:.0f}"
                                         for s in STEPS), flush=True)

#----------------------------------------------------------------------------
# Reporting (from the run dirs only).


def load_results(runs: list[dict]) -> list[dict]:
    """Runs with their eval.json attached (`metrics`: {steps: {acc, fd[, acc_ci, fd_ci]}}) and, where
    eval_boot.safetensors matches the evaluation, their bootstrap replicates (`boot`, not serialised)."""
    out = []
    for r in runs:
        path = os.path.join(r["run"], "eval.json")
        if not os.path.exists(path):
            print(f"not evaluated yet (run `python -m demo.sweep evaluate`): {r['run']}")
            continue
        with open(path) as f:
            r = dict(r, **json.load(f))
        if "curve" in r:                                 # written before the 1-step curve existed
            r["curve4"] = r.pop("curve")
        r["metrics"] = {int(s): m for s, m in r["final"].items() if s.isdigit()}
        r["boot"] = load_replicates(os.path.join(r["run"], BOOT_FILE), r.get("key"))
        out.append(r)
    return out


def config_of(r: dict) -> tuple:
    """What the runs of one configuration share (all but the training seed)."""
    return (r["sweep"], r["psi"], r["k"], tuple(r["w"]), r["mu"], r["rank"], r["alpha"], r["steps_trained"],
            r.get("configuration", ""))


def _order(r: dict) -> tuple:
    order = {"psi_k": 0, "w": 1, "rank": 2}
    return (order.get(r["sweep"], 3), r["sweep"], list(SOLVER_NAMES).index(r["psi"]) if r["psi"] in SOLVER_NAMES
            else 9, r["k"], tuple(r["w"]), r["rank"], r["steps_trained"], r.get("configuration", ""),
            -1 if r.get("train_seed") is None else r["train_seed"])


def _label(r: dict) -> str:
    return (f"{r['sweep']} {SOLVER_NAMES.get(r['psi'], r['psi'])} k={r['k']} w=[{r['w'][0]:g}, {r['w'][1]:g}] "
            f"rank={r['rank']} {r['steps_trained']} st.")


def group_configs(runs: list[dict], label=_label, key=config_of, order=_order) -> list[dict]:
    """The sweep's runs grouped by configuration (config_of), labelled and ordered as the sweep's tables."""
    return seed_groups.group_configs(runs, label=label, key=key, order=order)


def _recipe(groups: list[dict]):
    """The default reference: the recipe's configuration (DDIM, k 20, w [2, 4], rank 16) with the most seeds."""
    hits = [g for g in groups if all(tuple(g["runs"][0][k]) == v if k == "w" else g["runs"][0][k] == v
                                     for k, v in RECIPE.items())]
    return max(hits, key=lambda g: len(g["runs"]), default=None)


def _curve_points(runs: list[dict], steps: int, key: str):
    """A configuration's curve: x, y, (lo, hi) errors and what the bars are; the mean over seeds with
    its t-interval where it has >= 2 seeds with that checkpoint, else the run's bootstrap interval."""
    curves = [r.get(f"curve{steps}") or {} for r in runs]
    xs = sorted({int(x) for c in curves for x in c})
    scale = 100 if key == "acc" else 1
    out = []
    for x in xs:
        cells = [c[str(x)] for c in curves if str(x) in c]
        lvl = stats.seed_level([c[key] for c in cells], [c.get(f"{key}_ci") for c in cells])
        ci = lvl["ci"] if lvl["n_seeds"] > 1 else cells[0].get(f"{key}_ci")
        y = scale * lvl["mean"]
        err = (0.0, 0.0) if not ci else (max(y - scale * ci[0], 0), max(scale * ci[1] - y, 0))
        out.append((x, y, err))
    return out


def plot(runs: list[dict], path: str) -> None:
    """The paper's figure form: metric vs training step, one line per k, one panel per Psi (rows:
    1-step accuracy, 1-step and 4-step Frechet distance); error bars: the 95% t-interval over training
    seeds where a configuration has several, else the run's 95% bootstrap interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [r for r in runs if r["sweep"] == "psi_k"] or runs
    groups = group_configs(grid)
    solvers = [s for s in SOLVER_NAMES if any(r["psi"] == s for r in grid)]
    rows = [(1, "acc", "prompt accuracy, 1 step (%)"), (1, "fd", "Frechet distance, 1 step"),
            (4, "fd", "Frechet distance, 4 steps")]
    rows = [row for row in rows if all(f"curve{row[0]}" in r for r in grid)]
    fig, axes = plt.subplots(len(rows), len(solvers), figsize=(4 * len(solvers), 3 * len(rows) + 0.4),
                             sharey="row", squeeze=False)
    seeded = False
    for col, psi in enumerate(solvers):
        lines = sorted((g for g in groups if g["runs"][0]["psi"] == psi), key=lambda g: g["runs"][0]["k"])
        for j, g in enumerate(lines):
            n = len(g["runs"])
            shift = 1 + 0.012 * (j - (len(lines) - 1) / 2)   # lines side by side: their error bars stay apart
            seeded |= n > 1
            lab = f"k = {g['runs'][0]['k']}" + (f" ({n} seeds)" if n > 1 else "")
            if len(groups) > len({(g2["runs"][0]["psi"], g2["runs"][0]["k"]) for g2 in groups}):
                lab += f", rank {g['runs'][0]['rank']}, w [{g['runs'][0]['w'][0]:g}, {g['runs'][0]['w'][1]:g}]"
            for i, (steps, key, _) in enumerate(rows):
                pts = _curve_points(g["runs"], steps, key)
                if not pts:
                    continue
                xs, ys, errs = zip(*pts)
                axes[i, col].errorbar([x * shift for x in xs], ys, yerr=[[e[0] for e in errs], [e[1] for e in errs]], fmt="o-",
                                      capsize=3, label=lab)
        axes[0, col].set_title(f"teacher solver: {SOLVER_NAMES[psi]}")
        axes[-1, col].set_xlabel("training step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    for i, (_, _, label) in enumerate(rows):
        axes[i, 0].set_ylabel(label)
    axes[0, 0].legend(fontsize=8)
    width = int(fig.get_figwidth() * 14)                  # characters per line at these font sizes
    fig.suptitle(textwrap.fill("Demo world: LCM-LoRA (EMA target, guidance 1.0) vs training step, per skipping "
                               "step k and Psi", width), fontsize=10)
    note = textwrap.fill("error bars: 95% " + ("t-interval over training seeds (mean over seeds) where a line has "
                                               "several seeds, else " if seeded else "")
                         + "bootstrap interval over prompts (accuracy) / generated images (Frechet distance)", width + 10)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.012 * (note.count("\n") + 2) * 3 / max(len(rows), 1), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(runs: list[dict], header: str, summary: list[dict] | None = None, diffs: list[dict] | None = None) -> str:
    seeded = any(len(g["runs"]) > 1 for g in group_configs(runs))
    cols = ("sweep", "Psi", "k", "w range", "rank", "train steps") + (("train seed",) if seeded else ())
    with_ci = any(m.get("acc_ci") for r in runs for m in r["metrics"].values())
    lines = [header, ""]
    if with_ci:
        r0 = next(r for r in runs if any(m.get("acc_ci") for m in r["metrics"].values()))
        lines += [f"Each cell: one LoRA's estimate [95% bootstrap interval] on {r0.get('n_prompts', '?')} prompts "
                  "(accuracy: over prompts; FD: over the generated images, the real reference fixed; "
                  "docs/statistics.md).", ""]
    lines += ["| " + " | ".join(cols) + " | " + " | ".join(f"acc {s} st." for s in STEPS) + " | "
              + " | ".join(f"FD {s} st." for s in STEPS) + " |", "|" + "---|" * 2 + "---:|" * (len(cols) - 2 + 2 * len(STEPS))]
    for r in sorted(runs, key=_order):
        m = r["metrics"]
        lines.append(f"| {r['sweep']} | {SOLVER_NAMES.get(r['psi'], r['psi'])} | {r['k']} | [{r['w'][0]:g}, {r['w'][1]:g}] | "
                     f"{r['rank']} | {r['steps_trained']} | " + (f"{r.get('train_seed')} | " if seeded else "")
                     + " | ".join(cell_text(m.get(s), "acc") for s in STEPS) + " | "
                     + " | ".join(cell_text(m.get(s), "fd") for s in STEPS) + " |")
    lines += seed_table(summary or [])
    lines += comparison_table(diffs or [])
    return "\n".join(lines)


def report(sweeps: list[str], out: str, header_file: str | None = None, reference: str | None = None) -> list[dict]:
    runs = load_results(runs_in(sweeps))
    if not runs:
        raise SystemExit(f"no evaluated runs under {sweeps}")
    groups = group_configs(runs)
    summary = summarise(groups)
    ref = pick_reference(groups, reference, _recipe)
    diffs = differences(groups, ref)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(runs=[{k: v for k, v in r.items() if k != "boot"} for r in runs],
                       configurations=[dict(label=g["label"], runs=[r["run"] for r in g["runs"]], seeds=g["seeds"])
                                       for g in groups],
                       seed_summary=summary, reference=ref, differences=diffs), f, indent=1)
    header = "# Demo world: LCM-LoRA ablations"
    if header_file and os.path.exists(header_file):
        with open(header_file) as f:
            header = f.read().rstrip()
    with open(out + ".md", "w") as f:
        f.write(markdown(runs, header, summary, diffs) + f"\n\n![Psi x k sweep]({os.path.basename(out)}.png)\n")
    plot(runs, out + ".png")
    print(out + ".md", out + ".png")
    return runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("evaluate", "report"))
    ap.add_argument("sweeps", nargs="+", help="Hydra sweep folders (their job dirs hold config.json + lcm.safetensors)")
    ap.add_argument("--teacher", default="assets/demo_teacher.safetensors")
    ap.add_argument("--evaluator", default="assets/demo_evaluator.safetensors")
    ap.add_argument("--n", type=int, default=64, help="prompts per evaluation")
    ap.add_argument("--seed", type=int, default=0, help="generation seed: image i is seeded seed + i")
    ap.add_argument("--n-ref", type=int, default=2048, help="real images of the Frechet reference")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each interval")
    ap.add_argument("--bootstrap-seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="re-evaluate runs whose eval.json matches the request")
    ap.add_argument("--out", default="docs/demo_sweep", help="report: writes <out>.json, <out>.md, <out>.png")
    ap.add_argument("--header", default=None, help="report: a Markdown file put above the table")
    ap.add_argument("--reference", default=None,
                    help="report: the configuration the others are compared with (its label or a unique part of it, "
                         "e.g. 'psi_k DDIM k=20'; default: the recipe DDIM k=20 w=[2, 4] rank=16; 'none': no comparisons)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.command == "evaluate":
        runs = runs_in(a.sweeps)
        if not runs:
            raise SystemExit(f"no finished runs under {a.sweeps}")
        evaluate(runs, a.teacher, a.evaluator, a.n, a.seed, a.force, a.n_ref, a.bootstrap, a.bootstrap_seed)
    else:
        report(a.sweeps, a.out, a.header, a.reference)


if __name__ == "__main__":
    main()
