"""demo.sweep report and demo.compare over training seeds: per configuration the mean over seeds with
its t-interval beside the generation interval, paired verdicts against a reference configuration,
intervals in every cell, and caches keyed by what was evaluated (another --seed or --n re-evaluates).
Fake run dirs with fabricated scores, and the real demo pipeline on 2-3 prompts at 1 step."""
import json
import os
import shutil

import pytest
import torch

from demo import compare, sweep
from lcm.evaluation import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
P, B = 100, 300                                   # prompts and bootstrap resamples of the fake evaluations


def _fake_scores(correct: torch.Tensor, feats: torch.Tensor, ref, draw) -> tuple[dict, dict]:
    """score_cell's output for fabricated per-prompt correctness and evaluator features."""
    from demo.evaluator import feature_stats, frechet_distance
    est = dict(acc=correct.mean().item(), fd=frechet_distance(feature_stats(feats), ref))
    reps = dict(acc=stats.mean_replicates(correct, draw), fd=stats.frechet_replicates(feats, ref.mu, ref.sigma, draw.images))
    out = {k: est[k] for k in est} | {f"{k}_ci": stats.interval(est[k], reps[k], u) for k, u in sweep.METRICS}
    return dict(out, n=len(correct)), reps


def _sweep_run(folder, name, k, seed, p_correct, g, ref, draw, key=None, overrides=None):
    """A finished run dir of a seed x config sweep with an evaluated eval.json (+ replicates)."""
    run = folder / name
    run.mkdir(parents=True)
    train = {"max_steps": 100, "seed": seed}
    objective = {"k": k, "w_min": 2.0, "w_max": 4.0, "teacher_solver": "ddim", "ema_decay": 0.95,
                 "lora": {"rank": 16, "alpha": 16}}
    ov = overrides if overrides is not None else [f"objective.k={k}", f"train.seed={seed}", "resume=true"]
    (run / "config.json").write_text(json.dumps({"train": train, "objective": objective, "overrides": ov}))
    (run / "lcm.safetensors").write_bytes(b"")
    if key is None:                               # an eval.json written before intervals: point estimates only
        final = {str(s): dict(acc=0.5, fd=150.0) for s in sweep.STEPS}
        (run / "eval.json").write_text(json.dumps(dict(n_prompts=64, seed=0, final=final, curve4={"100": final["4"]},
                                                       curve1={"100": final["1"]})))
        return run
    final, boot = {}, {}
    for s in sweep.STEPS:
        p = p_correct if s == 1 else 0.9          # the configurations differ at 1 step only
        correct = (torch.rand(P, generator=g) < p).double()
        feats = torch.randn(P, 8, generator=g, dtype=torch.float64) + (0.5 if s == 1 and p_correct < 0.5 else 0.0)
        final[str(s)], reps = _fake_scores(correct, feats, ref, draw)
        boot.update({f"{m}/{s}": v for m, v in reps.items()})
    k_ = dict(key, lora=f"lora-{name}")
    (run / "eval.json").write_text(json.dumps(dict(key=k_, n_prompts=P, seed=0, final=final,
                                                   curve4={"50": final["4"], "100": final["4"]},
                                                   curve1={"50": final["1"], "100": final["1"]})))
    sweep.save_replicates(str(run / sweep.BOOT_FILE), boot, k_)
    return run


def test_sweep_report_summarises_seeds_and_compares_configurations_with_the_reference(tmp_path):
    from demo.evaluator import feature_stats
    g = torch.Generator().manual_seed(0)
    ref = feature_stats(torch.randn(500, 8, generator=g, dtype=torch.float64))
    draw = sweep.resample(P, B, 0)
    key = dict(prompts="fake", n=P, seed=0, bootstrap=B, bootstrap_seed=0)
    folder = tmp_path / "psi_k"
    for seed in (0, 1, 2):                        # k = 20 (the recipe: the default reference) and k = 50, 3 seeds each
        _sweep_run(folder, f"k20_s{seed}", 20, seed, 0.3, g, ref, draw, key)
        _sweep_run(folder, f"k50_s{seed}", 50, seed, 0.8, g, ref, draw, key)
    _sweep_run(folder, "k5_old", 5, 0, None, g, ref, draw)          # an old eval.json: no key, no intervals
    out = str(tmp_path / "docs" / "sweep")
    runs = sweep.report([str(folder)], out)
    assert len(runs) == 7
    doc = json.load(open(out + ".json"))
    labels = {c["label"]: c for c in doc["configurations"]}
    k20, k50 = "psi_k DDIM k=20 w=[2, 4] rank=16 100 st.", "psi_k DDIM k=50 w=[2, 4] rank=16 100 st."
    assert labels[k20]["seeds"] == [0, 1, 2] and labels[k50]["seeds"] == [0, 1, 2] and doc["reference"] == k20

    # the seed summary is the mean and t-interval of the three runs' estimates
    s, = [s for s in doc["seed_summary"] if s["configuration"] == k50 and s["steps"] == 1 and s["metric"] == "acc"]
    accs = [json.load(open(folder / f"k50_s{i}" / "eval.json"))["final"]["1"]["acc"] for i in range(3)]
    m = sum(accs) / 3
    half = 4.303 * torch.tensor(accs).std().item() / 3 ** 0.5
    assert s["mean"] == pytest.approx(m) and s["ci"] == pytest.approx([m - half, m + half]) and s["n_seeds"] == 3
    assert s["gen_ci"][0] < m < s["gen_ci"][1] and s["within_seed_ci_width"] > 0

    # k = 50 vs k = 20: resolved at 1 step (+50 points), not at 2 steps (same distribution)
    d = {(x["configuration"], x["steps"], x["metric"]): x for x in doc["differences"]}
    big, null = d[(k50, 1, "acc")], d[(k50, 2, "acc")]
    assert big["excludes_0"] is True and big["gen_ci"][0] > 0.3 and big["seed_ci"][0] > 0.15
    assert null["excludes_0"] is False
    assert d[(k50, 1, "fd")]["diff"] < 0                       # k = 20's 1-step features are shifted: worse FD
    old = d[("psi_k DDIM k=5 w=[2, 4] rank=16 100 st.", 1, "acc")]
    assert old["gen_ci"] is None and old["seed_ci"] is None and old["excludes_0"] is None

    md = open(out + ".md").read()
    assert "## Over training seeds" in md and f"## Differences to {k20}" in md
    row = next(ln for ln in md.splitlines() if ln.startswith(f"| {k50} | 1 | 0, 1, 2 |"))
    assert f"{100 * m:.1f} [{100 * (m - half):.1f}, {100 * (m + half):.1f}]" in row
    assert any(ln.startswith(f"| {k50} | 1 | accuracy | 3 vs 3 | **") and ln.endswith("| **yes** |") for ln in md.splitlines())
    cell = json.load(open(folder / "k50_s1" / "eval.json"))["final"]["1"]
    assert f"| {100 * cell['acc']:.1f}% [{100 * cell['acc_ci'][0]:.1f}, {100 * cell['acc_ci'][1]:.1f}] |" in md
    assert "| psi_k | DDIM | 5 | [2, 4] | 16 | 100 | 0 | 50.0% | 50.0% |" in md   # old file: as before, seed column added
    assert os.path.getsize(out + ".png") > 10_000

    # the plot's error bars: the t-interval over the 3 seeds at each checkpoint
    pts = sweep._curve_points([r for r in runs if r["k"] == 50], 1, "acc")
    assert [p[0] for p in pts] == [50, 100] and pts[0][2] == pytest.approx((100 * half, 100 * half))
    with pytest.raises(SystemExit, match="matches 0 configurations"):
        sweep.report([str(folder)], out, reference="k=7")
    sweep.report([str(folder)], out, reference="k=50")
    assert json.load(open(out + ".json"))["reference"] == k50


def test_runs_alike_without_recorded_overrides_are_not_merged_as_seeds(tmp_path):
    from demo.evaluator import feature_stats
    g = torch.Generator().manual_seed(0)
    ref = feature_stats(torch.randn(500, 8, generator=g, dtype=torch.float64))
    draw, key = sweep.resample(P, 50, 0), dict(n=P)
    for name in ("a", "b"):                       # same recorded config, same seed: two configurations
        _sweep_run(tmp_path / "s", name, 20, 0, 0.5, g, ref, draw, key, overrides=[])
    groups = sweep.group_configs(sweep.load_results(sweep.runs_in([str(tmp_path / "s")])))
    assert [len(x["runs"]) for x in groups] == [1, 1] and len({x["label"] for x in groups}) == 2


@pytest.fixture(scope="module")
def demo_pipe():
    from demo.evaluator import DemoEvaluator
    from lcm.pipeline import Pipeline
    torch.set_num_threads(1)
    return (Pipeline.from_checkpoint(os.path.join(ASSETS, "demo_teacher.safetensors")),
            DemoEvaluator.load(os.path.join(ASSETS, "demo_evaluator.safetensors")))


@pytest.fixture
def count_generate(monkeypatch):
    """Counts demo.bench.generate calls by their prompt count."""
    import demo.bench
    calls, real = [], demo.bench.generate

    def counted(pipe, prompts, *a, **kw):
        calls.append(len(prompts))
        return real(pipe, prompts, *a, **kw)
    monkeypatch.setattr(demo.bench, "generate", counted)
    return calls


def test_sweep_evaluate_reevaluates_when_asked_for_another_seed_or_n(tmp_path, demo_pipe, count_generate, monkeypatch):
    monkeypatch.setattr(sweep, "STEPS", (1,))
    monkeypatch.setattr(sweep, "CURVE_STEPS", (1,))
    run = tmp_path / "psi_k" / "k20"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"max_steps": 600, "seed": 0}, "objective": {
        "k": 20, "w_min": 2.0, "w_max": 4.0, "teacher_solver": "ddim", "lora": {"rank": 16, "alpha": 16}}}))
    shutil.copy(os.path.join(ASSETS, "demo_lcm_lora.safetensors"), run / "lcm.safetensors")
    runs = sweep.runs_in([str(tmp_path / "psi_k")])
    pipe, ev = demo_pipe
    kw = dict(teacher=os.path.join(ASSETS, "demo_teacher.safetensors"), n_ref=32, bootstrap=40, pipe=pipe, ev=ev,
              evaluator=os.path.join(ASSETS, "demo_evaluator.safetensors"))

    def evaluate(n, seed):
        count_generate.clear()
        sweep.evaluate(runs, n=n, seed=seed, **kw)
        return json.load(open(run / "eval.json"))
    first = evaluate(2, 0)
    assert count_generate == [2] and first["key"]["n"] == 2 and first["key"]["seed"] == 0
    cell = first["final"]["1"]
    assert cell["acc_ci"][0] <= cell["acc"] <= cell["acc_ci"][1] and len(cell["fd_ci"]) == 2 and cell["n"] == 2
    assert set(sweep.load_replicates(str(run / sweep.BOOT_FILE), first["key"])) == {"acc/1", "fd/1"}
    assert evaluate(2, 0) == first and count_generate == []            # the same request: the cache
    other = evaluate(2, 1)                                              # another generation seed: evaluated again
    assert count_generate == [2] and other["key"]["seed"] == 1 and other["final"]["1"]["fd"] != cell["fd"]
    assert evaluate(3, 1)["final"]["1"]["n"] == 3 and count_generate == [3]   # another n
    assert sweep.load_replicates(str(run / sweep.BOOT_FILE), first["key"]) is None   # replicates follow the key


def test_compare_caches_by_request_and_reports_seeds_with_intervals(tmp_path, demo_pipe, count_generate, monkeypatch):
    from lcm.pipeline import Pipeline
    monkeypatch.setattr(compare, "STEPS", (1, 2))
    monkeypatch.setattr(compare, "SAMPLERS", {"LCD (LCM-LoRA)": [("lcm", {})]})
    monkeypatch.setattr(compare, "TEACHER", dict(solver="ddim", steps=2, guidance_scale=3.0))
    monkeypatch.setattr(Pipeline, "from_checkpoint", classmethod(lambda cls, *a, **k: demo_pipe[0]))
    runs = []
    for seed in (0, 1):                           # two training seeds of one configuration (the same file here)
        run = tmp_path / "compare" / f"lcd_s{seed}"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"train": {"max_steps": 400, "seed": seed}, "overrides": [
            "experiment=demo_lcm_lora", f"train.seed={seed}"]}))
        shutil.copy(os.path.join(ASSETS, "demo_lcm_lora.safetensors"), run / "lcd.safetensors")
        runs.append(str(run))
    out = str(tmp_path / "docs" / "cmp")

    def main(*args):
        count_generate.clear()
        compare.main([*runs, "--out", out, "--n", "2", "--n-ref", "32", "--bootstrap", "40", "--keep", "1", *args])
        return json.load(open(out + ".json"))
    first = main()
    # the teacher (2 prompts), then per run 2 cells of 2 prompts (1 and 2 steps)
    assert count_generate == [2, 2, 2, 2, 2]
    again = main()                                # cached: only the teacher and the 1-step grid images (keep = 1)
    assert count_generate == [2, 1, 1] and again["rows"] == first["rows"]
    reseeded = main("--seed", "1")                # the bug of issue 28: another seed used to reuse the cache
    assert count_generate == [2, 2, 2, 2, 2] and reseeded["seed"] == 1
    assert all(r["key"]["seed"] == 1 for r in reseeded["rows"])
    assert reseeded["rows"][0]["metrics"]["1"]["fd"] != first["rows"][0]["metrics"]["1"]["fd"]
    assert json.load(open(os.path.join(runs[0], "compare.json")))["key"]["seed"] == 1

    conf, = reseeded["configurations"]
    assert conf["label"] == "LCD (LCM-LoRA) / lcm" and conf["seeds"] == [0, 1]
    s = next(x for x in reseeded["seed_summary"] if x["steps"] == 1 and x["metric"] == "fd")
    assert s["n_seeds"] == 2 and s["std"] == 0 and s["ci"] == pytest.approx([s["mean"], s["mean"]])
    assert reseeded["differences"] == [] and reseeded["teacher"]["fd_ci"][0] <= reseeded["teacher"]["fd"]
    md = open(out + ".md").read()
    assert "| train seed |" in md and "## Over training seeds" in md and "Teacher reference" in md
    assert os.path.getsize(out + "_metrics.png") > 10_000 and os.path.getsize(out + ".png") > 5_000


def test_compare_report_gives_paired_verdicts_against_the_reference(tmp_path):
    from demo.evaluator import feature_stats
    g = torch.Generator().manual_seed(0)
    ref = feature_stats(torch.randn(500, 8, generator=g, dtype=torch.float64))
    draw, rows = sweep.resample(P, B, 0), []
    for method, p, seeds in (("LCD (LCM-LoRA)", 0.9, (0, 1, 2)), ("PCM", 0.4, (0, 1, 2)), ("TCD", 0.9, (0,))):
        for seed in seeds:
            metrics, boot = {}, {}
            for s in compare.STEPS:
                m, reps = _fake_scores((torch.rand(P, generator=g) < p).double(),
                                       torch.randn(P, 8, generator=g, dtype=torch.float64), ref, draw)
                metrics[str(s)] = m
                boot.update({f"{k}/{s}": v for k, v in reps.items()})
            rows.append(dict(run=f"{method}_{seed}", method=method, sampler="x", spec={}, train_steps=400,
                             train_seed=seed, configuration="", key=dict(n=P, lora=method + str(seed)),
                             metrics=metrics, boot=boot))
    teacher = dict(acc=0.98, acc_ci=[0.95, 1.0], fd=140.0, fd_ci=[135.0, 145.0])
    out = str(tmp_path / "cmp")
    doc = compare.write(out, rows, teacher, "# t", dict(n=P))
    assert doc["reference"] == "LCD (LCM-LoRA) / x"
    d = {(x["configuration"], x["steps"], x["metric"]): x for x in doc["differences"]}
    pcm, tcd = d[("PCM / x", 1, "acc")], d[("TCD / x", 1, "acc")]
    assert pcm["excludes_0"] is True and pcm["seed_ci"][1] < 0 and pcm["n_seeds"] == [3, 3]
    assert tcd["seed_ci"] is None and tcd["n_seeds"] == [1, 3] and tcd["gen_ci"][0] < 0 < tcd["gen_ci"][1]
    assert tcd["excludes_0"] is False
    md = open(out + ".md").read()
    assert "## Differences to LCD (LCM-LoRA) / x" in md and "| PCM / x | 1 | accuracy | 3 vs 3 | **" in md
    assert os.path.getsize(out + "_metrics.png") > 10_000


def test_compare_names_a_run_by_its_objective(tmp_path):
    """DMD2 exports an LCM spec, rCM an sCM one: the method (and sampler) comes from the run's config."""
    for target, spec, method in (("lcm.objectives.dmd2.DMD2", "lcm", "DMD2"), ("lcm.objectives.rcm.RCM", "scm", "rCM"),
                                 ("lcm.objectives.lcd_lora.LCDLoRA", "lcm", "LCD (LCM-LoRA)")):
        run = tmp_path / method.split()[0]
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"objective": {"_target_": target}}))
        assert compare.method_of(str(run), spec) == method and compare.SAMPLERS[method]
    assert compare.method_of(str(tmp_path / "no_config"), "tcd") == "TCD"
