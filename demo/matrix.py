"""The distillation matrix's report (issue 32): every distilled LoRA of the given training run dirs,
each sampled with its own sampler at the step counts it supports, in one evaluation through the
project's evaluation runner (lcm/evaluation), with the cost of each method from its run dirs.

    python -m demo.matrix outputs/matrix/{lcd,tcd,pcm,dmd2,scm,rcm}_s{0,1,2} --out docs/matrix --world compose
    python -m demo.matrix outputs/compare/lcd outputs/compare/tcd --out docs/matrix --n-prompts 16   # the demo world

Writes <out>.json (every run with its method, training seed, cost and numbers; per method the mean over
seeds with its t-interval; the verdicts against --baseline), <out>.md (a table per metric: method x
steps, the cost table, the verdicts, the command line) and <out>.png (accuracy, Frechet distance and diversity vs
steps, one line per method, 95% error bars). It needs nothing but the run dirs: config.json (the
objective, train.seed, train.max_steps, train.batch_size, the teacher's model.path), metrics.jsonl
(samples_per_s, peak_mem_mb) and the exported LoRA <objective.lora.name>.safetensors with its lcm.spec.

The evaluation is evaluate.py's: one lcm.evaluation.Method per run (its LoRA alone at scale 1, every
other adapter at 0, the run's train_seed) plus the teacher row, lcm.evaluation.run_grid in a resumable
run dir under --work (killed reports continue where they stopped; a cell's folder is keyed by its
settings and the adapter's name carries the LoRA file's hash, so adding runs reuses finished cells),
the registered metrics with their bootstrap intervals (lcm/evaluation/stats.py, docs/statistics.md).
World compose runs it twice: on the prompt set `compose` (seen shape-colour pairs: accuracy, FD,
diversity) and on `compose_heldout` (accuracy only, reported as compose_acc_heldout).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import statistics
import sys

from demo import matrix_claims
from demo.matrix_report import WORLDS, write

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
STEPS = (1, 2, 4, 8)
ORDER = ("LCD", "TCD", "PCM", "DMD2", "sCM", "rCM")
METHOD_OF_CLASS = {"LCDLoRA": "LCD", "TCD": "TCD", "PCM": "PCM", "DMD2": "DMD2", "SCM": "sCM", "RCM": "rCM"}
SAMPLER_OF = {"LCD": ("lcm", None), "TCD": ("tcd", 0.3), "PCM": ("pcm", None), "DMD2": ("lcm", None),
              "sCM": ("scm", None), "rCM": ("scm", None)}   # (solver, eta); DMD2: lcm on its exported k-grid
TEACHER_NAME = "teacher"


LOWER_IS_BETTER = ("demo_fd", "compose_fd")

#----------------------------------------------------------------------------
# A run dir: method, seed, LoRA, spec, sampler, cost.


@dataclasses.dataclass
class Run:
    path: str                                 # the run dir as given on the command line
    method: str                               # LCD / TCD / PCM / DMD2 / sCM / rCM, else the objective's class name
    train_seed: int | None                    # config.json train.seed
    configuration: str                        # the overrides but the seed (lcm.training.cluster.configuration)
    lora: str                                 # the exported LoRA file
    lora_id: str                              # its content hash (16 hex digits)
    spec: dict                                # its lcm.spec (objective, num_ddim_timesteps, phases, ...)
    solver: str                               # the sampler it is evaluated with
    eta: float | None                         # TCD's gamma
    steps: list[int]                          # the requested step counts its sampler supports
    teacher: str                              # config.json model.path
    model: dict                               # config.json model (dtype, prediction_type)
    cost: dict                                # see cost_of
    name: str = ""                            # its row's method name (the method, + [configuration] if needed)

    @property
    def adapter(self) -> str:
        """The adapter name in the evaluation's pipeline: method, seed and the file's hash (cells stay valid)."""
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.method).strip("_")
        return f"{slug}_s{self.train_seed}_{self.lora_id[:8]}"


def read_spec(path: str) -> dict:
    """The lcm.spec of a LoRA file as a dict (ConsistencySpec fields); the default LCM spec when absent."""
    from safetensors import safe_open

    from lcm.consistency import ConsistencySpec
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    spec = ConsistencySpec.from_metadata(meta) or ConsistencySpec()
    return dataclasses.asdict(spec)


def supported_steps(solver: str, spec: dict, requested) -> list[int]:
    """The requested step counts this LoRA's sampler supports: a k-grid sampler (lcm, tcd) at most the
    spec's grid size (DMD2's 4-point grid: 1, 2, 4), PCM the counts that do not cut a phase (M % n == 0
    or n % M == 0), sCM any."""
    from lcm.sampling.samplers import get
    out = [int(n) for n in requested]
    if get(solver).k_grid:
        out = [n for n in out if n <= spec["num_ddim_timesteps"]]
    if spec.get("phases"):
        out = [n for n in out if spec["phases"] % n == 0 or n % spec["phases"] == 0]
    return out


def find_lora(run: str, cfg: dict) -> str:
    """<objective.lora.name>.safetensors at the run dir's top, else its single top-level .safetensors."""
    name = ((cfg.get("objective") or {}).get("lora") or {}).get("name")
    if name and os.path.isfile(p := os.path.join(run, f"{name}.safetensors")):
        return p
    files = sorted(f for f in os.listdir(run) if f.endswith(".safetensors"))
    if len(files) != 1:
        raise SystemExit(f"{run}: expected the exported LoRA {name or '<name>'}.safetensors at the top, found "
                         f"{files or 'none'}; is the run finished?")
    return os.path.join(run, files[0])


def unet_passes(method: str, obj: dict) -> dict | None:
    """UNet forward passes of one training step, from the objective's config. A batched cond/uncond pair
    counts 2 (per sample), a JVP 1 (its compute is ~4x a forward: README, benchmarks/jvp.py), backward
    passes are not counted. Returns {per_train_step (the mean over a gen_every cycle), per_student_step
    (one student / generator update with the fake-score updates between: the whole cycle), gen_every}, or
    None where the count is not known (a GAN head, an unknown objective). Sources:
      LCD, TCD: conf/objective/lcd_lora.yaml and tcd.yaml "2 teacher + 1 target + 1 student"; the teacher's
        passes are its solver Psi's (lcm.sampling.samplers: psi_calls, 2 for DDIM, 4 for DPM-Solver(++));
      PCM: conf/objective/pcm.yaml, the same with Psi without CFG (cfg_solver=false) at half;
      DMD2: lcm/objectives/dmd2.py loss(): every step runs k ~ U{0..steps-1} no-grad generator passes of
        backward simulation (mean (steps-1)/2); a generator step + 1 generator with grad + 2 real score
        (teacher, CFG) + 1 fake score; a fake-score step + 1 generator no-grad + 1 fake score with grad;
      sCM: lcm/objectives/scm.py scm_step(): 2 teacher (CFG) + 1 JVP (2 forwards with jvp_method=fd) + 1 student;
      rCM: lcm/objectives/rcm.py loss(): a student step = sCM's + 1 generator pass batched into the grad
        pass + backward simulation + DMD2's 2 real + 1 fake (when dmd_weight > 0); fake-score steps as DMD2's."""
    from lcm.sampling.samplers import TEACHER_SOLVERS
    psi = TEACHER_SOLVERS.get(obj.get("teacher_solver") or "ddim")
    R = int(obj.get("gen_every") or 1)
    backsim = (int(obj.get("steps") or 4) - 1) / 2 if obj.get("backward_simulation", True) else 0.0
    fake = backsim + 2                                               # DMD2 / rCM fake-score step
    jvp = 2 if obj.get("jvp_method") == "fd" else 1
    if method in ("LCD", "TCD") and psi:
        student = psi + 2.0
    elif method == "PCM" and psi:
        student = (psi if obj.get("cfg_solver", True) else psi / 2) + 2.0
    elif method == "DMD2" and not obj.get("gan"):
        student = backsim + 4
    elif method == "sCM":
        student = 3.0 + jvp
    elif method == "rCM":
        student = 3.0 + jvp + ((1 + backsim + 3) if float(obj.get("dmd_weight", 0.01)) > 0 else 0)
    else:
        return None
    if method not in ("DMD2", "rCM"):
        R, fake = 1, 0.0
    cycle = student + (R - 1) * fake
    return dict(per_train_step=cycle / R, per_student_step=cycle, gen_every=R)


def cost_of(run: str, cfg: dict, method: str) -> dict:
    """The cost of a run: unet_passes, seconds_per_step = train.batch_size / the median samples_per_s of
    metrics.jsonl (one training step, generator and fake-score steps alike), seconds_per_student_step =
    that x gen_every, peak_mem_mb = the largest peak_mem_mb logged (the trainer's peak: CUDA allocated,
    else the process RSS), train_steps = train.max_steps, student_steps = train_steps / gen_every (the
    student / generator optimizer updates), train_minutes = seconds_per_step x train_steps / 60 (the run's
    training time at its median speed, pauses and resumes not counted)."""
    rows = []
    if os.path.isfile(p := os.path.join(run, "metrics.jsonl")):
        with open(p) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
    rates = [r["samples_per_s"] for r in rows if isinstance(r.get("samples_per_s"), (int, float)) and r["samples_per_s"] > 0]
    mems = [r["peak_mem_mb"] for r in rows if isinstance(r.get("peak_mem_mb"), (int, float))]
    batch = (cfg.get("train") or {}).get("batch_size")
    passes = unet_passes(method, cfg.get("objective") or {})
    R = passes["gen_every"] if passes else int((cfg.get("objective") or {}).get("gen_every") or 1)
    sec = batch / statistics.median(rates) if rates and batch else None
    steps = (cfg.get("train") or {}).get("max_steps")
    return dict(unet_passes_per_step=passes and passes["per_train_step"],
                unet_passes_per_student_step=passes and passes["per_student_step"], gen_every=R,
                seconds_per_step=sec, seconds_per_student_step=sec and sec * R,
                peak_mem_mb=max(mems) if mems else None, train_steps=steps, student_steps=steps and steps // R,
                batch_size=batch, logged_steps=len(rates), train_minutes=sec and steps and sec * steps / 60)


def discover(run: str, steps=STEPS) -> Run:
    """A finished training run dir -> its Run (method from objective._target_, sampler from the table)."""
    from demo.sweep import configuration, file_id, train_seed
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{run}: no config.json (not a training run dir)")
    with open(path) as f:
        cfg = json.load(f)
    cls = str((cfg.get("objective") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
    method = METHOD_OF_CLASS.get(cls, cls)
    lora = find_lora(run, cfg)
    spec = read_spec(lora)
    solver, eta = SAMPLER_OF.get(method, (spec["objective"], None))
    if spec["objective"] != solver:
        raise SystemExit(f"{run}: {method} is sampled with solver={solver}, but {lora}'s lcm.spec says "
                         f"objective={spec['objective']}")
    seed = train_seed(cfg)
    model = cfg.get("model") or {}
    return Run(path=run, method=method, train_seed=None if seed is None else int(seed), configuration=configuration(cfg),
               lora=lora, lora_id=file_id(lora), spec=spec, solver=solver, eta=eta,
               steps=supported_steps(solver, spec, steps), teacher=str(model.get("path")), model=model,
               cost=cost_of(run, cfg, method))


def name_runs(runs: list[Run]) -> list[Run]:
    """Row names: the method, with [the overrides that set its configuration apart] when one method has
    runs of several configurations (overrides common to all of them left out; the method alone for the
    configuration with none of its own); runs sorted by method (ORDER), configuration, seed. Two runs of
    one name and seed are an error."""
    confs: dict = {}
    for r in runs:
        confs.setdefault(r.method, set()).add(r.configuration)
    common = {m: set.intersection(*(set(c.split()) for c in cs)) for m, cs in confs.items()}
    for r in runs:
        own = " ".join(o for o in r.configuration.split() if o not in common[r.method])
        r.name = r.method + (f" [{own}]" if len(confs[r.method]) > 1 and own else "")
    rank = lambda r: (ORDER.index(r.method) if r.method in ORDER else len(ORDER), r.name,   # noqa: E731
                      -1 if r.train_seed is None else r.train_seed)
    runs = sorted(runs, key=rank)
    seen = {}
    for r in runs:
        if (r.name, r.train_seed) in seen:
            raise SystemExit(f"{r.path} and {seen[(r.name, r.train_seed)]}: the same method, configuration and "
                             f"train.seed={r.train_seed}")
        seen[(r.name, r.train_seed)] = r.path
    return runs

#----------------------------------------------------------------------------
# The evaluation: lcm.evaluation's grid over one Method per run plus the teacher.


def methods_for(runs: list[Run], teacher_steps: int, teacher_guidance: float) -> list:
    """The grid's methods: the teacher (DDIM, CFG, every LoRA at 0), then each run with its own LoRA at 1
    (the others stay at their loaded scale 0), its sampler preset (conf/solver/<solver>.yaml) and seed."""
    from lcm.evaluation import Method
    from lcm.sampling.samplers import load_preset
    out = [Method(name=TEACHER_NAME, solver="ddim", steps=[int(teacher_steps)], guidance_scale=float(teacher_guidance),
                  teacher=True)]
    for r in runs:
        pre = load_preset(CONF, r.solver)
        out.append(Method(name=r.name, solver=pre["name"], steps=list(r.steps), guidance_scale=float(pre["guidance_scale"]),
                          eta=r.eta if r.eta is not None else pre.get("eta"), spacing=pre.get("spacing"),
                          lora_scales={r.adapter: 1.0}, train_seed=r.train_seed))
    return out


def run_evaluation(runs: list[Run], world: str, work: str, n_prompts: int, seeds_per_prompt: int, seed: int,
                   teacher_steps: int, teacher_guidance: float, batch_size: int, n_ref: int, bootstrap: int,
                   device: str = "cpu", teacher: str | None = None) -> tuple[list[dict], dict]:
    """Every evaluation of the world in <work>/<prompt set> (an evaluate.py run dir: grid.json, cells/,
    results.json / results.md). Returns (rows, replicates): the runner's rows (one per method x steps x
    train_seed, keys renamed with the evaluation's suffix, each metric beside its `_ci`) merged over the
    evaluations, and {(name, steps, train_seed): {key: (estimate, unit, (B,) bootstrap replicates)}}."""
    import hashlib

    from demo.sweep import file_id
    from lcm.evaluation import MetricSet, load_plugins, load_prompts, run_grid
    from lcm.evaluation.report import SETTINGS, write_report
    from lcm.evaluation.runner import check_grid
    from lcm.evaluation.stats import Bootstrap
    from lcm.sampling.build import build_pipeline
    plugin, evaluations, _, _ = WORLDS[world]
    load_plugins([plugin])
    teacher = teacher or runs[0].teacher
    model = dict(path=teacher, prediction_type=runs[0].model.get("prediction_type"),
                 dtype=runs[0].model.get("dtype", "float32"))
    pipe = build_pipeline(model, [dict(path=r.lora, name=r.adapter, scale=0.0) for r in runs], device=device)
    methods = methods_for(runs, teacher_steps, teacher_guidance)
    options = dict(demo_n_ref=n_ref, compose_n_ref=n_ref, device=device)
    merged: dict = {}
    reps: dict = {}
    for ev in evaluations:
        out = os.path.join(work, ev.prompts)
        prompts = load_prompts(ev.prompts, n_prompts, seeds_per_prompt, seed)
        ms = MetricSet(list(ev.metrics), options | {"cache_dir": out}).build()
        try:
            check_grid(out, dict(model=file_id(teacher), dtype=model["dtype"], world=world, prompts=hashlib.sha1(
                "\n".join(prompts.prompts).encode()).hexdigest(), n=len(prompts), seed=prompts.seed,
                metrics=list(ev.metrics), evaluator=[file_id(p) for p in evaluator_files(world)]))
        except ValueError as e:
            raise SystemExit(f"--work {work}: {e}".replace("hydra.run.dir=...", "another --work")) from None
        boot = Bootstrap(int(bootstrap), 0)
        title = f"demo.matrix evaluation: {len(prompts)} images of prompts={ev.prompts}"
        config = dict(world=world, prompts=ev.prompts, metrics=list(ev.metrics), n_prompts=n_prompts,
                      seeds_per_prompt=seeds_per_prompt, seed=seed, teacher=teacher, batch_size=batch_size,
                      runs={r.adapter: r.path for r in runs}, bootstrap=bootstrap)
        rows = run_grid(pipe, methods, prompts, ms, out, batch_size=batch_size, boot=boot,
                        on_cell=lambda r, out=out, title=title: write_report(out, r, config, title, with_plot=False))
        write_report(out, rows, config, title, with_plot=False)
        def rename(k: str, sfx: str = ev.suffix) -> str:       # compose_acc -> compose_acc_heldout (and its _ci)
            return k if k in SETTINGS else (k[:-3] + sfx + "_ci" if k.endswith("_ci") else k + sfx)
        for r in rows:
            key = (r["method"], r["steps"], r.get("train_seed"))
            merged.setdefault(key, {}).update({rename(k): v for k, v in r.items()})
        for cell, vals in boot.cells.items():
            reps.setdefault(cell, {}).update({rename(k): v for k, v in vals.items()})
    return list(merged.values()), reps


def evaluator_files(world: str) -> list[str]:
    """The world's evaluator weights (their hash keys the evaluation's run dir)."""
    root = os.path.join(os.path.dirname(CONF), "assets")
    return [os.path.join(root, "demo_evaluator.safetensors" if world == "demo" else "compose_evaluator.safetensors")]

#----------------------------------------------------------------------------
# Numbers: per run, per method over its seeds, verdicts against the baseline.


def metric_keys(world: str, rows: list[dict]) -> list[str]:
    """The keys with an interval, in the world's order (accuracy keys, FD, then the rest)."""
    _, _, acc, fd = WORLDS[world]
    present = [k for r in rows for k in r if f"{k}_ci" in r and not k.endswith("_ci")]
    return list(dict.fromkeys([k for k in (*acc, fd) if k in present] + present))


def level(by: dict, reps: dict, name: str, seeds: list, s: int, k: str):
    """(values, replicates or None, unit, intervals) of metric k at s steps over the row `name`'s training
    seeds (by: rows keyed (name, steps, train_seed); reps: run_evaluation's replicates); None when a seed
    lacks it."""
    cells = [(by.get((name, s, seed)), reps.get((name, s, seed), {}).get(k)) for seed in seeds]
    if not cells or any(c is None or c.get(k) is None for c, _ in cells):
        return None
    rp = [x[2] for _, x in cells] if all(x is not None for _, x in cells) else None
    unit = next((x[1] for _, x in cells if x is not None), "prompt")
    return [c[k] for c, _ in cells], rp, unit, [c.get(f"{k}_ci") for c, _ in cells]


def difference(by: dict, reps: dict, groups: dict, name: str, versus: str, s: int, k: str) -> dict | None:
    """config_difference of row `name` minus `versus` (a row name, or the teacher's single row at its own
    steps) on metric k at s steps; None where either side lacks it."""
    from lcm.evaluation.stats import config_difference
    seeds = lambda n: [m.train_seed for m in groups[n]]   # noqa: E731
    a = level(by, reps, name, seeds(name), s, k) if name in groups else None
    if versus == TEACHER_NAME:
        cell = next(((st, sd) for (n, st, sd) in by if n == TEACHER_NAME), None)
        b = level(by, reps, TEACHER_NAME, [cell[1]], cell[0], k) if cell else None
    else:
        b = level(by, reps, versus, seeds(versus), s, k) if versus in groups else None
    if a is None or b is None:
        return None
    return config_difference(a[0], b[0], a[1], b[1], a[2])


def numbers(runs: list[Run], rows: list[dict], reps: dict, keys: list[str], baseline: str | None,
            claims: list[dict] | None = None) -> dict:
    """The report's numbers.
    runs[i]["results"][steps][key] = {estimate, ci}: one LoRA's value and its 95% bootstrap interval (over
      prompts for accuracy and diversity, over generated images for FD);
    methods[j]["results"][steps][key] = stats.seed_level: n_seeds, mean over seeds, std, ci (95% t-interval
      over the training seeds; None for one seed), gen_ci (the bootstrap interval of the seed mean);
    verdicts = stats.config_difference of each method to the baseline at the same steps: diff, gen_ci (paired
      bootstrap), seed_ci (Welch over seeds, >= 2 seeds each), excludes_0 (every available interval excludes 0);
    teacher[key] = {estimate, ci} of the teacher row;
    claims = demo.matrix_claims.check of the given claims (absent without)."""
    from lcm.evaluation.stats import seed_level
    by = {(r["method"], r["steps"], r.get("train_seed")): r for r in rows}
    out_runs, groups = [], {}
    for run in runs:
        res = {}
        for s in run.steps:
            row = by.get((run.name, s, run.train_seed))
            if row is not None:
                res[str(s)] = {k: dict(estimate=row.get(k), ci=row.get(f"{k}_ci")) for k in keys if k in row}
                res[str(s)].update({k: row[k] for k in row if k.endswith("_collapsed")})
                res[str(s)]["nfe"], res[str(s)]["seconds_per_image"] = row.get("nfe"), row.get("seconds_per_image")
        out_runs.append(dict(run=shown(run.path), method=run.method, name=run.name, train_seed=run.train_seed,
                             configuration=run.configuration, lora=os.path.basename(run.lora), lora_sha=run.lora_id,
                             spec=run.spec, sampler=dict(solver=run.solver, eta=run.eta, guidance_scale=1.0),
                             cost=run.cost, results=res))
        groups.setdefault(run.name, []).append(run)

    methods = []
    for name, members in groups.items():
        res = {}
        for s in sorted({s for m in members for s in m.steps}):
            for k in keys:
                if (lv := level(by, reps, name, [m.train_seed for m in members], s, k)) is not None:
                    vals, rp, unit, cis = lv
                    res.setdefault(str(s), {})[k] = seed_level(vals, cis, rp, unit)
        cost = {c: (min_of if c.startswith(("seconds", "peak")) else mean_of)([m.cost.get(c) for m in members])
                for c in members[0].cost}   # runs share the machine: the fastest is the least disturbed
        methods.append(dict(name=name, method=members[0].method, n_seeds=len(members),
                            seeds=[m.train_seed for m in members], runs=[shown(m.path) for m in members],
                            sampler=dict(solver=members[0].solver, eta=members[0].eta), cost=cost, results=res))
    verdicts = []
    if baseline is not None:
        if baseline not in groups:
            raise SystemExit(f"--baseline {baseline!r} names no method; methods: {', '.join(groups)}")
        for name, members in groups.items():
            if name == baseline:
                continue
            for s in sorted(set(members[0].steps) & set(groups[baseline][0].steps)):
                for k in keys:
                    if (d := difference(by, reps, groups, name, baseline, s, k)) is None:
                        continue
                    better = None if not d["excludes_0"] or direction(k) is None else (d["diff"] > 0) == (direction(k) > 0)
                    verdicts.append(dict(metric=k, method=name, baseline=baseline, steps=s, **d, better=better))
    teacher = {}
    for (name, s, _), r in by.items():
        if name == TEACHER_NAME:
            teacher = dict(steps=s, solver=r.get("solver"), guidance_scale=r.get("guidance_scale"),
                           **{k: dict(estimate=r.get(k), ci=r.get(f"{k}_ci")) for k in keys if k in r})
    out = dict(runs=out_runs, methods=methods, verdicts=verdicts, teacher=teacher)
    if claims:
        out["claims"] = matrix_claims.check(claims, lambda m, v, s, k: difference(by, reps, groups, m, v, s, k))
    return out


def direction(key: str) -> int | None:
    """+1 where higher is better (accuracy), -1 where lower is (Frechet distance), None where neither is
    (diversity: the teacher's value is the reference, not the maximum)."""
    return -1 if key in LOWER_IS_BETTER else (1 if "_acc" in key else None)


def shown(path: str) -> str:
    """A path as the report shows it: relative to the working directory when inside it, else its base
    name (shared files name no home or machine directories: lcm.runs.logger.portable)."""
    a, cwd = os.path.abspath(path), os.getcwd()
    return os.path.relpath(a, cwd) if a.startswith(cwd + os.sep) else os.path.basename(a.rstrip(os.sep))


def command_line(argv: list[str], paths: set[str]) -> str:
    """The command that made the report, its path arguments shown()."""
    return "python -m demo.matrix " + shlex.join([shown(t) if t in paths else t for t in argv])


def numbers_among(values: list) -> list:
    return [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]


def min_of(values: list):
    """The smallest of the numbers among values (None when there are none)."""
    v = numbers_among(values)
    return min(v) if v else None


def mean_of(values: list):
    """The mean of the numbers among values (None when there are none)."""
    v = numbers_among(values)
    return sum(v) / len(v) if v else (values[0] if values and all(x == values[0] for x in values) else None)

def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m demo.matrix", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished training run dirs (config.json, metrics.jsonl, the exported LoRA)")
    p.add_argument("--out", default="docs/matrix", help="writes <out>.md, <out>.json, <out>.png")
    p.add_argument("--world", choices=sorted(WORLDS), default="demo")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="images per prompt (>= 2 for diversity)")
    p.add_argument("--seed", type=int, default=0, help="generation seed: image i is seeded seed + i")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--baseline", default="LCD", help="the method every other is compared with; 'none': no verdicts")
    p.add_argument("--work", default=None, help="the resumable evaluation run dir (default outputs/matrix_eval/<world>)")
    p.add_argument("--teacher", default=None, help="the teacher checkpoint (default: the runs' model.path)")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--teacher-guidance", type=float, default=3.0, help="the teacher row's CFG s (the demo teacher's best)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-ref", type=int, default=2048, help="real images of the Frechet reference")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of every interval")
    p.add_argument("--header", default=None, help="a Markdown file put above the tables")
    p.add_argument("--claims", default=None, help="published claims to check (a YAML list: demo/matrix_claims.py)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    claims = matrix_claims.load(a.claims) if a.claims else None
    runs = name_runs([discover(r, a.steps) for r in a.runs])
    if a.teacher is None and len({r.teacher for r in runs}) > 1:
        raise SystemExit(f"the runs were distilled from different teachers: {sorted({r.teacher for r in runs})}")
    baseline = None if str(a.baseline).lower() == "none" else a.baseline
    work = a.work or os.path.join("outputs", "matrix_eval", a.world)
    rows, reps = run_evaluation(runs, a.world, work, a.n_prompts, a.seeds_per_prompt, a.seed, a.teacher_steps,
                                a.teacher_guidance, a.batch_size, a.n_ref, a.bootstrap, a.device, a.teacher)
    keys = metric_keys(a.world, rows)
    paths = {*a.runs, a.out, work, *(p for p in (a.header, a.teacher, a.claims) if p)}
    doc = dict(command=command_line(argv, paths), world=a.world, n_prompts=a.n_prompts,
               seeds_per_prompt=a.seeds_per_prompt, seed=a.seed, steps=sorted(a.steps), baseline=baseline,
               metrics=keys, evaluations=[dict(prompts=e.prompts, metrics=list(e.metrics), suffix=e.suffix,
                                               work=shown(os.path.join(work, e.prompts))) for e in WORLDS[a.world][1]],
               bootstrap=a.bootstrap, header=open(a.header).read().rstrip() if a.header else None,
               **numbers(runs, rows, reps, keys, baseline, claims))
    for path in write(a.out, doc):
        print(path)
    return doc


if __name__ == "__main__":
    main()
