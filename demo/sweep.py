"""The demo world's ablation: LCM-LoRA quality vs the skipping step k and the LoRA rank (a plot).

    # the sweeps (Hydra multirun, one run dir per job; ~2.5 CPU-minutes per job)
    # (as recorded: 100 steps, target = the student (mu = 0), the session-2 demo recipe)
    python train.py -m experiment=demo_lcm_lora train.max_steps=100 train.lora_ema_decay=null \
        train.k=1,5,10,20,50 hydra.sweep.dir=outputs/sweep/k
    python train.py -m experiment=demo_lcm_lora train.max_steps=100 train.lora_ema_decay=null \
        objective.lora.rank=4,64 'objective.lora.alpha=${objective.lora.rank}' hydra.sweep.dir=outputs/sweep/rank
    # evaluate every run's LoRA at 1, 2, 4 LCM steps; writes docs/demo_sweep.{json,md,png}
    python -m demo.sweep outputs/sweep/k outputs/sweep/rank

Each job reads its k and rank from its config.json; the metrics are demo.bench's (prompt
accuracy, Frechet distance of evaluator features against real images), on the same prompts and
per-image seeds for every run. The plot needs matplotlib (installed by requirements-test.txt).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import torch

from demo.bench import generate, score
from demo.evaluator import DemoEvaluator
from demo.world import fixed_prompt_set
from lcm.pipeline import Pipeline
from models.lora import remove_lora

STEPS = (1, 2, 4)

#----------------------------------------------------------------------------


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
            out.append(dict(run=run, lora=lora, k=cfg["train"]["k"], rank=_lora(cfg)["rank"],
                            alpha=_lora(cfg)["alpha"], steps_trained=cfg["train"]["max_steps"]))
    return out


def evaluate(runs: list[dict], teacher: str, evaluator: str, n: int, seed: int) -> list[dict]:
    ev = DemoEvaluator.load(evaluator)
    ref = ev.reference_stats(2048, seed=1, style="plain")
    prompts = fixed_prompt_set(n, seed=0)
    pipe = Pipeline.from_checkpoint(teacher)
    for r in runs:
        pipe.load_lora(r["lora"], name="lcm")
        r["metrics"] = {}
        for steps in STEPS:
            images, _ = generate(pipe, prompts, seed, steps=steps, guidance_scale=1.0, solver="lcm")
            m = score(ev, images, prompts, ref)
            r["metrics"][steps] = dict(acc=m["acc"], fd=m["fd"])
            print(f"k={r['k']:>2} rank={r['rank']:>2} {steps} steps: acc {m['acc']:.3f} fd {m['fd']:.1f}", flush=True)
        remove_lora(pipe.unet, "lcm")
    return runs


def plot(runs: list[dict], path: str, k_rank: int, k_fixed: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharey="row")
    sweeps = [("skipping step k", "k", [r for r in runs if r["rank"] == k_rank]),
              (f"LoRA rank (alpha = rank; k = {k_fixed})", "rank", [r for r in runs if r["k"] == k_fixed])]
    for col, (title, key, rs) in enumerate(sweeps):
        rs = sorted({r[key]: r for r in rs}.values(), key=lambda r: r[key])
        xs = [r[key] for r in rs]
        for steps in STEPS:
            axes[0, col].plot(xs, [100 * r["metrics"][steps]["acc"] for r in rs], "o-", label=f"{steps} steps")
            axes[1, col].plot(xs, [r["metrics"][steps]["fd"] for r in rs], "o-", label=f"{steps} steps")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(alpha=0.3)
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel(title)
    axes[0, 0].set_ylabel("prompt accuracy (%)")
    axes[1, 0].set_ylabel("Frechet distance (log; lower is better)")
    axes[0, 0].legend()
    fig.suptitle("Demo world: LCM-LoRA (guidance 1.0) vs skipping step k and LoRA rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(runs: list[dict], cmd: str) -> str:
    lines = ["# Demo world: LCM-LoRA vs skipping step k and LoRA rank", "",
             "Runs: `python train.py -m experiment=demo_lcm_lora train.max_steps=100 train.lora_ema_decay=null train.k=1,5,10,20,50 hydra.sweep.dir=outputs/sweep/k` "
             "and `python train.py -m experiment=demo_lcm_lora train.max_steps=100 train.lora_ema_decay=null objective.lora.rank=4,64 'objective.lora.alpha=${objective.lora.rank}' "
             "hydra.sweep.dir=outputs/sweep/rank` (100 steps with the reference target mu = 0: the k = 20, rank 16 point is the first bundled LoRA; the bundled one now trains 600 steps with an EMA target, see demo_results.md); "
             f"evaluated by `{cmd}` (64 prompts, the same per-image seeds for every run; Frechet distances "
             "at 64 samples sit higher than docs/demo_results.md's at 128).", "",
             "| k | rank | alpha | train steps | " + " | ".join(f"acc {s} st." for s in STEPS) + " | "
             + " | ".join(f"FD {s} st." for s in STEPS) + " |",
             "|---:|---:|---:|---:|" + "---:|" * (2 * len(STEPS))]
    for r in sorted(runs, key=lambda r: (r["rank"], r["k"])):
        m = r["metrics"]
        lines.append(f"| {r['k']} | {r['rank']} | {r['alpha']} | {r['steps_trained']} | "
                     + " | ".join(f"{100 * m[s]['acc']:.1f}%" for s in STEPS) + " | "
                     + " | ".join(f"{m[s]['fd']:.1f}" for s in STEPS) + " |")
    return "\n".join(lines + ["", "![k and rank sweep](demo_sweep.png)", ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", help="Hydra sweep folders (their job dirs hold config.json + lcm.safetensors)")
    ap.add_argument("--teacher", default="assets/demo_teacher.safetensors")
    ap.add_argument("--evaluator", default="assets/demo_evaluator.safetensors")
    ap.add_argument("--n", type=int, default=64, help="prompts per evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/demo_sweep", help="writes <out>.json, <out>.md, <out>.png")
    ap.add_argument("--rank", type=int, default=16, help="the rank of the k sweep's runs")
    ap.add_argument("--k", type=int, default=20, help="the k of the rank sweep's runs")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = runs_in(a.sweeps)
    if not runs:
        raise SystemExit(f"no finished runs under {a.sweeps}")
    runs = evaluate(runs, a.teacher, a.evaluator, a.n, a.seed)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(runs, f, indent=1)
    cmd = "python -m demo.sweep " + " ".join(a.sweeps) + (f" --n {a.n}" if a.n != 64 else "")
    with open(a.out + ".md", "w") as f:
        f.write(markdown(runs, cmd))
    plot(runs, a.out + ".png", a.rank, a.k)
    print(a.out + ".md", a.out + ".png")


if __name__ == "__main__":
    main()


def _lora(cfg: dict) -> dict:
    """The trained LoRA's config of a run's config.json (objective.lora; runs before the objective
    group kept it at the top level as `lora`)."""
    return (cfg.get("objective") or {}).get("lora") or cfg["lora"]
