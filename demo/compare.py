"""LCD vs TCD vs PCM LoRAs distilled from the demo teacher under one budget, each sampled with its own
sampler (the objective its file's `lcm.spec` names; TCD at several gammas), at 1/2/4/8 steps.

    python -m demo.compare outputs/compare/lcd outputs/compare/tcd outputs/compare/pcm \
        --out docs/demo_compare --header docs/demo_compare_header.md

Writes <out>.md (table), <out>.json (every number) and <out>.png (the first prompts: the teacher, then
every method/sampler at 1 and at 4 steps). Each run's numbers are cached in <run>/compare.json
(delete it, or pass --force, to re-evaluate). Metrics as demo.bench: prompt accuracy and Frechet
distance of evaluator features against real images, the same prompts and per-image seeds everywhere.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import torch

STEPS = (1, 2, 4, 8)
SAMPLERS = {"lcm": [("lcm", {}), ("tcd", {"eta": 0.3})], "tcd": [("tcd", {"eta": 0.3}), ("tcd", {"eta": 0.0}), ("tcd", {"eta": 0.7})],
            "pcm": [("pcm", {})]}
NAMES = {"lcm": "LCD (LCM-LoRA)", "tcd": "TCD", "pcm": "PCM"}


def find_lora(run: str) -> str:
    """The exported LoRA of a finished run (the one .safetensors file at its top level)."""
    files = sorted(glob.glob(os.path.join(run, "*.safetensors")))
    if len(files) != 1:
        raise SystemExit(f"{run}: expected one exported LoRA (*.safetensors), found {len(files)}; is the run finished?")
    return files[0]


def label(sampler: str, kw: dict) -> str:
    return sampler + (f" gamma={kw['eta']:g}" if "eta" in kw else "")


def evaluate_run(run: str, pipe, ev, ref, prompts, seed: int, keep: int, force: bool) -> dict:
    """{sampler label: {steps: {acc, fd}}} for one run, cached in <run>/compare.json; and kept images."""
    from demo.bench import generate, score
    from models.lora import remove_lora
    lora = find_lora(run)
    name = pipe.load_lora(lora, name="distilled")
    spec = pipe.spec
    cache = os.path.join(run, "compare.json")
    res = json.load(open(cache)) if os.path.exists(cache) and not force else {}
    images = {}
    t0 = time.perf_counter()
    for sampler, kw in SAMPLERS[spec.objective]:
        lab = label(sampler, kw)
        for steps in STEPS:
            done = str(steps) in res.get(lab, {})
            if done and steps not in (1, 4):
                continue
            imgs, dt = generate(pipe, prompts if not done else prompts[:keep], seed, steps=steps,
                                guidance_scale=1.0, solver=sampler, **kw)
            images[(lab, steps)] = imgs[:keep]
            if not done:
                res.setdefault(lab, {})[str(steps)] = dict(score(ev, imgs, prompts, ref), sec_per_image=dt)
                res[lab][str(steps)].pop("per_attr", None)
    res["spec"] = dict(objective=spec.objective, num_ddim_timesteps=spec.num_ddim_timesteps, phases=spec.phases)
    res["seconds"] = res.get("seconds", 0) + time.perf_counter() - t0
    with open(cache + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(cache + ".tmp", cache)
    remove_lora(pipe.unet, name)
    pipe.adapter_specs.pop(name, None)
    return res, images


def markdown(rows: list[dict], header: str) -> str:
    cols = ["method", "sampler", "train steps", *[f"acc {s} st." for s in STEPS], *[f"FD {s} st." for s in STEPS]]
    out = [header, "", "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        m = r["metrics"]
        out.append(f"| {r['method']} | {r['sampler']} | {r['train_steps']} | "
                   + " | ".join(f"{100 * m[str(s)]['acc']:.1f}%" for s in STEPS) + " | "
                   + " | ".join(f"{m[str(s)]['fd']:.1f}" for s in STEPS) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    from demo.bench import generate, save_grid, score
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=int, default=6, help="prompts shown in the image")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ev = DemoEvaluator.load(a.evaluator)
    ref = ev.reference_stats(2048, seed=1, style="plain")
    prompts = fixed_prompt_set(a.n, seed=0)
    pipe = Pipeline.from_checkpoint(a.teacher)
    teacher, _ = generate(pipe, prompts, a.seed, solver="ddim", steps=25, guidance_scale=3.0)
    t_m = score(ev, teacher, prompts, ref)
    rows, columns = [], [teacher[:a.keep]]
    for run in a.runs:
        cfg = json.load(open(os.path.join(run, "config.json")))
        res, images = evaluate_run(run, pipe, ev, ref, prompts, a.seed, a.keep, a.force)
        for lab in (k for k in res if k not in ("spec", "seconds")):
            rows.append(dict(run=run, method=NAMES[res["spec"]["objective"]], sampler=lab, spec=res["spec"],
                             train_steps=cfg["train"]["max_steps"], metrics=res[lab]))
            columns += [images[(lab, 1)], images[(lab, 4)]]
        print(f"{run}: done", flush=True)
    header = open(a.header).read().rstrip() if a.header else "# Demo world: LCD vs TCD vs PCM"
    header += (f"\n\nTeacher reference (DDIM 25 steps, CFG 3, 50 UNet calls): {100 * t_m['acc']:.1f}% / FD "
               f"{t_m['fd']:.1f}. Image {os.path.basename(a.out)}.png: one row per prompt; columns: the teacher, then "
               "each row of the table at 1 step and at 4 steps, in table order.")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(rows, header) + "\n")
    with open(a.out + ".json", "w") as f:
        json.dump(dict(teacher=dict(acc=t_m["acc"], fd=t_m["fd"]), n=a.n, seed=a.seed, rows=rows), f, indent=1)
    save_grid(columns, a.out + ".png")
    print(open(a.out + ".md").read())


if __name__ == "__main__":
    main()
