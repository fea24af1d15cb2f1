"""The demo world's evaluation: the LCM paper's table in miniature, and the style composition.

    python -m demo.bench                      # writes docs/demo_results.md, docs/demo_*.png
    python -m demo.bench --n 8 --cfg 3 --cfg-n 8 --out /tmp/bench8.md   # the labelled grids alone (seconds): the
                                              # same images as a full run (per-image seeds, its first 8 prompts)

Rows: DDIM and DPM-Solver++(2M) on the teacher at its best CFG (2 UNet calls per step), LCM-LoRA
at guidance 1.0 (1 call per step), at 1, 2, 4, 8 steps; reference: the teacher, DDIM 50 steps at
its best CFG (chosen among --cfg by overall prompt accuracy). Metrics from the demo evaluator
(demo/evaluator.py): prompt accuracy (all 5 content attributes right) as the CLIP-score stand-in,
Frechet distance of its features against real plain images as the FID stand-in. Every row uses
the same prompts and the same per-image seeds, so Frechet distances compare at equal sample counts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from demo.evaluator import DemoEvaluator, feature_stats, frechet_distance
from demo.world import fixed_prompt_set
from lcm.pipeline import Pipeline

STEPS = (1, 2, 4, 8)

#----------------------------------------------------------------------------


def generate(pipe: Pipeline, prompts: list[str], seed: int, batch: int = 64, **kw) -> tuple[torch.Tensor, float]:
    """Images (N,3,H,W) in [-1,1] and the wall time per image in seconds."""
    t0, out = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        out.append(pipe(prompts[i:i + batch], seed=seed + i, output="tensor", progress=False, **kw))
    return torch.cat(out) * 2 - 1, (time.perf_counter() - t0) / len(prompts)


def score(ev: DemoEvaluator, images: torch.Tensor, prompts: list[str], ref) -> dict:
    """Prompt accuracy (overall and per attribute) and Frechet distance to the reference stats."""
    acc = ev.prompt_accuracy(images, prompts)
    return dict(acc=acc["overall"], per_attr=acc, fd=frechet_distance(feature_stats(ev.features(images)), ref))


def save_grid(columns: list[torch.Tensor], path: str, upscale: int = 2) -> None:
    """columns: list of (N,3,H,W) in [-1,1]; one row per prompt, one column per tensor."""
    from PIL import Image
    img = torch.cat([torch.cat(list(c), dim=1) for c in columns], dim=2)          # (3, N*H, C*W)
    img = img.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)


def labelled_grid(columns: list[torch.Tensor], col_labels: list[str], row_labels: list[str], path: str) -> None:
    """An image grid (columns: (N, 3, H, W) in [-1, 1]) with column titles and row captions; without
    matplotlib, save_grid's unlabelled grid."""
    try:
        import matplotlib
    except ImportError:
        save_grid(columns, path)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(columns[0]), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 0.95 * cols, 0.6 + 0.95 * rows), squeeze=False)
    for j, (col, title) in enumerate(zip(columns, col_labels)):
        for i in range(rows):
            ax = axes[i, j]
            ax.imshow(((col[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).float().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=6)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=5, rotation=0, ha="right", va="center", wrap=True)
    fig.tight_layout(pad=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a) -> dict:
    ev = DemoEvaluator.load(a.evaluator)
    ref = ev.reference_stats(a.n_ref, seed=1, style="plain")
    prompts = fixed_prompt_set(a.n, seed=0)
    pipe = Pipeline.from_checkpoint(a.teacher)
    res = dict(n=a.n, n_ref=a.n_ref, seed=a.seed, threads=torch.get_num_threads(), rows=[])

    def row(name, solver, steps, s, nfe, **kw):
        imgs, dt = generate(pipe, prompts, a.seed, solver=solver, steps=steps, guidance_scale=s, **kw)
        r = dict(method=name, solver=solver, steps=steps, guidance=s, nfe=nfe, sec_per_image=dt,
                 **score(ev, imgs, prompts, ref))
        res["rows"].append(r)
        print(f"{name:24s} {steps:2d} steps s={s:<4} acc {r['acc']:.3f} fd {r['fd']:.3f} "
              f"{dt * 1000:.1f} ms/img", flush=True)
        return imgs

    # Teacher reference: DDIM 50 at its best CFG, searched on the first cfg_n prompts at cfg_steps.
    search = []
    for s in a.cfg:
        imgs, _ = generate(pipe, prompts[:a.cfg_n], a.seed, solver="ddim", steps=a.cfg_steps, guidance_scale=s)
        search.append(dict(guidance=s, **score(ev, imgs, prompts[:a.cfg_n], ref)))
        print(f"CFG search: DDIM {a.cfg_steps} s={s} acc {search[-1]['acc']:.3f} fd {search[-1]['fd']:.3f}", flush=True)
    best_s = max(search, key=lambda r: (r["acc"], -r["fd"]))["guidance"]
    res["best_cfg"], res["cfg_search"] = best_s, [{k: v for k, v in r.items() if k != "per_attr"} for r in search]
    teacher_imgs = row("teacher DDIM (best CFG)", "ddim", a.teacher_steps, best_s, 2 * a.teacher_steps)
    best = res["rows"][-1]
    for solver, name in (("ddim", "DDIM"), ("dpmsolver++", "DPM-Solver++(2M)")):
        for n in STEPS:
            row(name, solver, n, best["guidance"], 2 * n)
    pipe.load_lora(a.lcm, name="lcm")
    lcm_imgs = [row("LCM-LoRA", "lcm", n, 1.0, n) for n in STEPS]
    k = min(8, a.n)
    labelled_grid([teacher_imgs[:k]] + [x[:k] for x in lcm_imgs],
                  [f"teacher DDIM {a.teacher_steps}, s = {best_s:g}"] + [f"LCM-LoRA {n} step{'s' * (n > 1)}, s = 1"
                                                                        for n in STEPS], prompts[:k], a.grid)

    # Style LoRA (0.8) + LCM-LoRA (1.0), 4 steps: style and content accuracy.
    if a.style and os.path.exists(a.style):
        pipe.load_lora(a.style, name="style")
        comp = {}
        for name, scales in (("lcm only", {"lcm": 1.0, "style": 0.0}),
                             ("style 0.8 + lcm 1.0", {"lcm": 1.0, "style": 0.8})):
            pipe.set_lora_scales(scales)
            imgs, dt = generate(pipe, prompts, a.seed, solver="lcm", steps=4, guidance_scale=1.0)
            comp[name] = dict(style_acc=ev.style_accuracy(imgs, "outlined"),
                              content_acc=ev.prompt_accuracy(imgs, prompts)["overall"], imgs=imgs[:k])
            print(f"{name:24s} outlined {comp[name]['style_acc']:.3f} content {comp[name]['content_acc']:.3f}")
        labelled_grid([comp["lcm only"]["imgs"], comp["style 0.8 + lcm 1.0"]["imgs"]],
                      ["LCM-LoRA, 4 steps", "style 0.8 + LCM-LoRA 1.0, 4 steps"], prompts[:k], a.style_grid)
        res["style"] = {n: {k2: v for k2, v in c.items() if k2 != "imgs"} for n, c in comp.items()}
    return res


def markdown(res: dict, a) -> str:
    """The results as the README's table (LCM paper Table 1 layout)."""
    lines = ["# Demo world results", "",
             f"Produced by `{a.command}` ({res['n']} prompts of `fixed_prompt_set(seed=0)`, image i seeded "
             f"{res['seed']}+i, Frechet distance against {res['n_ref']} real plain images, evaluator "
             f"features; CPU, {res['threads']} threads, batch 64; wall time = per image).", "",
             f"Teacher best CFG: s = {res['best_cfg']} (searched over {a.cfg} with DDIM {a.cfg_steps} on the "
             f"first {a.cfg_n} prompts: " + ", ".join(f"s={r['guidance']}: {100 * r['acc']:.1f}%"
                                                     for r in res["cfg_search"]) + ").", "",
             "| method | steps | guidance s | NFE | prompt acc. | Frechet dist. | ms / image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['steps']} | {r['guidance']} | {r['nfe']} | {100 * r['acc']:.1f}% | "
                     f"{r['fd']:.3f} | {1000 * r['sec_per_image']:.1f} |")
    lines += ["", "Per-attribute accuracy:", "",
              "| method | steps | s | shape | colour | size | position | background |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        p = r["per_attr"]
        lines.append(f"| {r['method']} | {r['steps']} | {r['guidance']} | " +
                     " | ".join(f"{100 * p[k]:.0f}%" for k in ("shape", "colour", "size", "position", "background")) + " |")
    if "style" in res:
        lines += ["", "Style LoRA + LCM-LoRA, 4 LCM steps, guidance 1.0 (style = classified outlined; content = "
                  "all 5 content attributes right):", "", "| adapters | style acc. | content acc. |", "|---|---:|---:|"]
        for n, c in res["style"].items():
            lines.append(f"| {n} | {100 * c['style_acc']:.1f}% | {100 * c['content_acc']:.1f}% |")
    lines += ["", "![teacher DDIM 50 vs LCM-LoRA 1/2/4/8](demo_grid.png)", "",
              "Columns: teacher DDIM 50 steps at its best CFG, then LCM-LoRA at 1, 2, 4, 8 steps (s = 1); "
              "rows: the first 8 prompts, same seeds.", ""]
    if "style" in res:
        lines += ["![LCM-LoRA 4 steps without / with the style LoRA](demo_style.png)", "",
                  "Left: LCM-LoRA alone, 4 steps; right: style LoRA (0.8) + LCM-LoRA (1.0), same prompts and seeds.", ""]
    lines += ["## Reproduce the bundled weights", "", "```bash",
              *(r.replace("BENCH_ARGS", a.command.removeprefix("python -m demo.bench ")) for r in REPRODUCE), "```"]
    return "\n".join(lines) + "\n"


REPRODUCE = [
    "export OMP_NUM_THREADS=1      # on a shared 2-core CPU, 2 OpenMP threads ran ~10x slower",
    "# 1. the VAE: crops then whole images, two decoder fine-tunes (first run, outputs/demo), then a",
    "#    decoder fine-tune with lr decay and a whole-VAE fine-tune, both shape-weighted (outputs/demo2)",
    "python -m demo.vae --threads 1 --steps 1000 --full-steps 60 --out outputs/demo/vae_long.safetensors --base-out ''",
    "python -m demo.vae --threads 1 --from-vae outputs/demo/vae_long.safetensors --decoder-steps 600 --full-steps 0 \\",
    "    --out outputs/demo/vae_dec.safetensors --base-out ''",
    "python -m demo.vae --threads 1 --from-vae outputs/demo/vae_dec.safetensors --decoder-steps 800 \\",
    "    --full-steps 150 --fg-weight 4 --decoder-seed 2 --out outputs/demo/vae_dec2.safetensors --base-out ''",
    "python -m demo.vae --threads 1 --from-vae outputs/demo/vae_dec2.safetensors --decoder-steps 700 \\",
    "    --full-steps 250 --fg-weight 4 --decoder-seed 3 --decay --out outputs/demo2/vae_dec3.safetensors --base-out ''",
    "python -m demo.vae --threads 1 --from-vae outputs/demo2/vae_dec3.safetensors --decoder-steps 500 --encoder \\",
    "    --full-steps 200 --fg-weight 4 --decoder-seed 4 --decay --out outputs/demo2/vae_enc4.safetensors --base-out ''",
    "# 2. the text tower pretrained on the captions, and the untrained teacher file",
    "python -m demo.text --threads 1 --steps 400 --out outputs/demo2/text.safetensors",
    "python -m demo.vae --threads 1 --from-vae outputs/demo2/vae_enc4.safetensors \\",
    "    --text outputs/demo2/text.safetensors --base-out outputs/demo2/base_init.safetensors",
    "# 3. the teacher (exported = EMA), its LCM-LoRA and the style LoRA",
    "python train.py experiment=demo_teacher hydra.run.dir=outputs/demo2/teacher",
    "cp outputs/demo2/teacher/model.safetensors assets/demo_teacher.safetensors",
    "python train.py experiment=demo_lcm_lora hydra.run.dir=outputs/demo2/lcm_lora",
    "cp outputs/demo2/lcm_lora/lcm.safetensors assets/demo_lcm_lora.safetensors",
    "python train.py experiment=demo_style hydra.run.dir=outputs/demo2/style",
    "cp outputs/demo2/style/style.safetensors assets/demo_style_lora.safetensors",
    "python -m demo.bench BENCH_ARGS",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="assets/demo_teacher.safetensors")
    ap.add_argument("--lcm", default="assets/demo_lcm_lora.safetensors")
    ap.add_argument("--style", default="assets/demo_style_lora.safetensors")
    ap.add_argument("--evaluator", default="assets/demo_evaluator.safetensors")
    ap.add_argument("--n", type=int, default=128, help="prompts (one image each)")
    ap.add_argument("--n-ref", type=int, default=2048, help="real images for the Frechet reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.5, 3.0, 5.0, 7.5])
    ap.add_argument("--cfg-n", type=int, default=64, help="prompts used for the CFG search")
    ap.add_argument("--cfg-steps", type=int, default=25, help="DDIM steps of the CFG search")
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/demo_results.md")
    ap.add_argument("--grid", default="docs/demo_grid.png")
    ap.add_argument("--style-grid", default="docs/demo_style.png")
    a = ap.parse_args(argv)
    a.command = "python -m demo.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(a.threads)
    res = run(a)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(markdown(res, a))
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(a.out)


if __name__ == "__main__":
    main()
