"""The demo world's ablations: LCM-LoRA quality vs the teacher solver Psi, the skipping step k, the
guidance range and the LoRA rank, as a table and the LCM paper's figure form.

    # train (Hydra multiruns, one run dir per job; commands and wall time in docs/demo_sweep.md)
    python train.py -m experiment=demo_lcm_lora train.max_steps=200 train.checkpoint_every=50 \
        objective.teacher_solver=ddim,dpmsolver,dpmsolver++ objective.k=1,5,10,20,50 \
        hydra.sweep.dir=outputs/sweep/psi_k 'hydra.sweep.subdir="psi_${objective.teacher_solver}_k${objective.k}"'
    # evaluate every finished run (its checkpoints at 4 LCM steps, its final LoRA at 1/2/4/8 steps),
    # writing <run>/eval.json (runs already evaluated are skipped), then build the report
    python -m demo.sweep evaluate outputs/sweep/psi_k outputs/sweep/w outputs/sweep/rank
    python -m demo.sweep report outputs/sweep/psi_k outputs/sweep/w outputs/sweep/rank   # docs/demo_sweep.*

`report` retrains and re-evaluates nothing: it reads each run's config.json, eval.json and
metrics.jsonl. Every LoRA is sampled on its own grid (the `lcm.spec` its file carries). The
metrics are demo.bench's (prompt accuracy, Frechet distance of evaluator features against real
images) on the same prompts and per-image seeds for every run. The plot needs matplotlib.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import torch

STEPS = (1, 2, 4, 8)
CURVE_STEPS = (4, 1)                            # the paper's figure: 4-step sampling vs training iterations;
                                                # 1 step too (4 steps saturate on the demo world)
SOLVER_NAMES = {"ddim": "DDIM", "dpmsolver": "DPM-Solver", "dpmsolver++": "DPM-Solver++"}

#----------------------------------------------------------------------------
# Finding runs.


def _lora(cfg: dict) -> dict:
    """The trained LoRA's config of a run's config.json (objective.lora; runs before the objective
    group kept it at the top level as `lora`)."""
    return (cfg.get("objective") or {}).get("lora") or cfg["lora"]


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
                            steps_trained=t["max_steps"]))
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
# Evaluating (writes <run>/eval.json).


def evaluate(runs: list[dict], teacher: str, evaluator: str, n: int, seed: int, force: bool = False) -> None:
    from demo.bench import generate, score
    from demo.evaluator import DemoEvaluator
    from demo.world import fixed_prompt_set
    from lcm.pipeline import Pipeline
    from lcm.runs.logger import log_summary
    from models.lora import remove_lora
    ev = DemoEvaluator.load(evaluator)
    ref = ev.reference_stats(2048, seed=1, style="plain")
    prompts = fixed_prompt_set(n, seed=0)
    pipe = Pipeline.from_checkpoint(teacher)

    def metrics(lora: str, steps_list) -> dict:
        pipe.load_lora(lora, name="lcm")                 # its own spec (grid) comes with the file
        out = {"num_ddim_timesteps": pipe.spec.num_ddim_timesteps}
        for steps in steps_list:
            images, _ = generate(pipe, prompts, seed, steps=steps, guidance_scale=1.0, solver="lcm")
            m = score(ev, images, prompts, ref)
            out[str(steps)] = dict(acc=m["acc"], fd=m["fd"])
        remove_lora(pipe.unet, "lcm")
        pipe.adapter_specs.pop("lcm", None)
        return out

    for r in runs:
        path = os.path.join(r["run"], "eval.json")
        res = {}
        if os.path.exists(path) and not force:
            with open(path) as f:
                res = json.load(f)
        todo = [s for s in CURVE_STEPS if f"curve{s}" not in res and not (s == 4 and "curve" in res)]
        if res and not todo:
            continue
        t0 = time.perf_counter()
        final = res.get("final") or metrics(r["lora"], STEPS)
        if "curve" in res:                               # files written before the 1-step curve existed
            res["curve4"] = res.pop("curve")
        for s in todo:
            curve = {str(step): metrics(f, (s,))[str(s)] for step, f in checkpoints(r["run"])}
            curve[str(r["steps_trained"])] = final[str(s)]
            res[f"curve{s}"] = curve
        res.update(n_prompts=n, seed=seed, final=final, seconds=res.get("seconds", 0) + time.perf_counter() - t0)
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
        summary = {f"eval/{key}_{s}steps": final[str(s)][key] for s in STEPS for key in ("acc", "fd")}
        log_summary(r["run"], summary)                   # the run's wandb summary, if it logged to wandb
        print(f"{r['run']}: " + " ".join(f"{s} st. {100 * final[str(s)]['acc']:.1f}%/{final[str(s)]['fd']:.0f}"
                                         for s in STEPS), flush=True)

#----------------------------------------------------------------------------
# Reporting (from the run dirs only).


def load_results(runs: list[dict]) -> list[dict]:
    """Runs with their eval.json and the wall time of training (from metrics.jsonl) attached."""
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
        out.append(r)
    return out


def plot(runs: list[dict], path: str) -> None:
    """The paper's figure form: metric vs training step, one line per k, one panel per Psi (rows:
    1-step accuracy, 1-step and 4-step Frechet distance)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [r for r in runs if r["sweep"] == "psi_k"] or runs
    solvers = [s for s in SOLVER_NAMES if any(r["psi"] == s for r in grid)]
    rows = [(1, "acc", "prompt accuracy, 1 step (%)"), (1, "fd", "Frechet distance, 1 step"),
            (4, "fd", "Frechet distance, 4 steps")]
    rows = [row for row in rows if all(f"curve{row[0]}" in r for r in grid)]
    fig, axes = plt.subplots(len(rows), len(solvers), figsize=(4 * len(solvers), 3 * len(rows)), sharey="row",
                             squeeze=False)
    for col, psi in enumerate(solvers):
        for r in sorted((r for r in grid if r["psi"] == psi), key=lambda r: r["k"]):
            for i, (steps, key, _) in enumerate(rows):
                c = r[f"curve{steps}"]
                xs = sorted(int(s) for s in c)
                ys = [(100 if key == "acc" else 1) * c[str(x)][key] for x in xs]
                axes[i, col].plot(xs, ys, "o-", label=f"k = {r['k']}")
        axes[0, col].set_title(f"teacher solver: {SOLVER_NAMES[psi]}")
        axes[-1, col].set_xlabel("training step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    for i, (_, _, label) in enumerate(rows):
        axes[i, 0].set_ylabel(label)
    axes[0, 0].legend()
    fig.suptitle("Demo world: LCM-LoRA (EMA target, guidance 1.0) vs training step, per skipping step k and Psi")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(runs: list[dict], header: str) -> str:
    cols = ("sweep", "Psi", "k", "w range", "rank", "train steps")
    lines = [header, "", "| " + " | ".join(cols) + " | " + " | ".join(f"acc {s} st." for s in STEPS) + " | "
             + " | ".join(f"FD {s} st." for s in STEPS) + " |", "|" + "---|" * 2 + "---:|" * (len(cols) - 2 + 2 * len(STEPS))]
    order = {"psi_k": 0, "w": 1, "rank": 2}
    for r in sorted(runs, key=lambda r: (order.get(r["sweep"], 3), list(SOLVER_NAMES).index(r["psi"]), r["k"],
                                          r["w"], r["rank"])):
        m = r["metrics"]
        lines.append(f"| {r['sweep']} | {SOLVER_NAMES[r['psi']]} | {r['k']} | [{r['w'][0]:g}, {r['w'][1]:g}] | "
                     f"{r['rank']} | {r['steps_trained']} | "
                     + " | ".join(f"{100 * m[s]['acc']:.1f}%" for s in STEPS) + " | "
                     + " | ".join(f"{m[s]['fd']:.1f}" for s in STEPS) + " |")
    return "\n".join(lines)


def report(sweeps: list[str], out: str, header_file: str | None = None) -> list[dict]:
    runs = load_results(runs_in(sweeps))
    if not runs:
        raise SystemExit(f"no evaluated runs under {sweeps}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(runs, f, indent=1)
    header = "# Demo world: LCM-LoRA ablations"
    if header_file and os.path.exists(header_file):
        with open(header_file) as f:
            header = f.read().rstrip()
    with open(out + ".md", "w") as f:
        f.write(markdown(runs, header) + f"\n\n![Psi x k sweep]({os.path.basename(out)}.png)\n")
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="re-evaluate runs that have an eval.json")
    ap.add_argument("--out", default="docs/demo_sweep", help="report: writes <out>.json, <out>.md, <out>.png")
    ap.add_argument("--header", default=None, help="report: a Markdown file put above the table")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.command == "evaluate":
        runs = runs_in(a.sweeps)
        if not runs:
            raise SystemExit(f"no finished runs under {a.sweeps}")
        evaluate(runs, a.teacher, a.evaluator, a.n, a.seed, a.force)
    else:
        report(a.sweeps, a.out, a.header)


if __name__ == "__main__":
    main()
