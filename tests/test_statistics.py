"""lcm/evaluation/stats.py: bootstrap interval coverage on a metric with known truth, the paired
comparison, diversity of collapsed vs distinct images, the Frechet bootstrap, training-seed summaries,
and `_ci` keys in results.json after an evaluation and after its resume (docs/statistics.md)."""
import json
import os
import time

import pytest
import torch

from lcm.evaluation import stats
from lcm.evaluation.stats import Bootstrap, compare, draw, frechet_replicates, mean_metric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prompt_bootstrap_interval_covers_the_true_accuracy():
    """Bernoulli(p) correctness per prompt, 200 independent evaluations: the 95% interval covers p ~95%."""
    g = torch.Generator().manual_seed(0)
    p, P, k = 0.3, 100, 2
    r = draw(P, k, 1000, torch.Generator().manual_seed(1))
    acc = mean_metric("acc", lambda f: f[:, 0])
    covered = 0
    for _ in range(200):
        correct = (torch.rand(P, 1, generator=g) < p).float().repeat_interleave(k, 0)   # prompt-level truth
        est = acc(correct, [])["acc"]
        lo, hi = stats.interval(est, acc.replicates(correct, [], r)["acc"], "prompt")
        covered += lo <= p <= hi
    assert 0.88 <= covered / 200 <= 0.99, covered


def _rows_and_boot(a: torch.Tensor, b: torch.Tensor, k: int = 1):
    """Two methods' per-image correctness on the same prompts, through Bootstrap like run_grid."""
    boot, acc, rows = Bootstrap(1000, 0), mean_metric("acc", lambda f: f[:, 0]), []
    for name, f in (("base", a), ("new", b)):
        row = dict(method=name, steps=1) | acc(f, [])
        r = boot.resample(len(f) // k, k)
        rows.append(row | boot.intervals((name, 1, None), row, {"acc": ("prompt", acc.replicates(f, [], r)["acc"])}))
    return rows, boot


def test_paired_comparison_finds_a_known_difference_and_not_a_null_one():
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(200, 1, generator=g) < 0.5).float()
    better = torch.maximum(base, (torch.rand(200, 1, generator=g) < 0.25).float())   # +~12.5 points, same prompts
    rows, boot = _rows_and_boot(base, better)
    c, = compare(rows, boot, "base")
    assert c["diff"] == pytest.approx(rows[1]["acc"] - rows[0]["acc"]) and c["diff"] > 0.08
    assert c["excludes_0"] and c["ci"][0] > 0
    # the unpaired intervals overlap more than the paired one lets on: pairing removes the prompt noise
    assert c["ci"][1] - c["ci"][0] < (rows[1]["acc_ci"][1] - rows[1]["acc_ci"][0]) * 1.5
    rows, boot = _rows_and_boot(base, base.clone())
    c, = compare(rows, boot, "base")
    assert c["diff"] == 0 and not c["excludes_0"]
    same = (torch.rand(200, 1, generator=g) < 0.5).float()                       # same p, other draws
    c, = compare(*_rows_and_boot(base, same), "base")
    assert c["ci"][0] <= 0 <= c["ci"][1] and not c["excludes_0"]
    with pytest.raises(ValueError, match="names no evaluated method"):
        compare(rows, boot, "nope")


def test_diversity_is_zero_and_flagged_for_a_repeated_image_and_positive_for_distinct_images():
    import demo.metrics  # noqa: F401  (registers demo_diversity)
    from demo.world import real_batch
    from lcm.evaluation import MetricSet
    k, P = 4, 6
    images, _ = real_batch(P * k, seed=3)
    ms = MetricSet(["demo_diversity"], {"seeds_per_prompt": k}).build()
    prompts = [f"prompt {j}" for j in range(P) for _ in range(k)]
    collapsed = images[::k].repeat_interleave(k, 0)                                 # one image per prompt, k times
    f = ms.features(collapsed, prompts)
    out = ms.reduce(f, prompts)
    assert out["demo_diversity"] == pytest.approx(0, abs=1e-6) and out["demo_diversity_collapsed"] == 1.0
    out = ms.reduce(ms.features(images, prompts), prompts)
    assert out["demo_diversity"] > 0.05 and out["demo_diversity_collapsed"] == 0.0
    reps = ms.replicates(ms.features(images, prompts), prompts, draw(P, k, 200))
    lo, hi = stats.interval(out["demo_diversity"], reps["demo_diversity"][1], "prompt")
    assert 0 < lo <= out["demo_diversity"] <= hi
    with pytest.raises(ValueError, match="seeds_per_prompt >= 2"):
        stats.diversity_per_prompt(f, 1)


def test_frechet_bootstrap_matches_the_distance_contains_the_estimate_and_shrinks_with_n():
    from demo.evaluator import feature_stats, frechet_distance
    g = torch.Generator().manual_seed(0)
    ref = feature_stats(torch.randn(4096, 128, generator=g))
    x = 0.2 + 1.1 * torch.randn(1024, 128, generator=g)
    ident = torch.arange(256)[None]                                               # the identity "resample"
    assert frechet_replicates(x[:256], ref.mu, ref.sigma, ident).item() == pytest.approx(
        frechet_distance(x[:256], ref), rel=1e-6)
    widths = []
    for n in (256, 1024):
        est = frechet_distance(x[:n], ref)
        lo, hi = stats.interval(est, frechet_replicates(x[:n], ref.mu, ref.sigma, draw(n, 1, 200).images), "image")
        assert lo <= est <= hi
        widths.append(hi - lo)
    assert widths[1] < 0.7 * widths[0], widths                                   # ~ 1 / sqrt(n)
    t0 = time.perf_counter()                                                      # the default demo cell: 128 images
    reps = frechet_replicates(x[:128], ref.mu, ref.sigma, draw(128, 1, 1000).images)
    dt = time.perf_counter() - t0
    assert len(reps) == 1000 and dt < 20, f"1000 Frechet resamples of 128 x 128 took {dt:.1f}s"


def test_kid_bootstrap_interval_contains_the_estimate():
    from lcm.evaluation.metrics import kid_from_features, kid_linear_terms
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 16, generator=g) + 0.3, torch.randn(400, 16, generator=g)
    est = kid_from_features(x, y, 20, 200)["kid"]
    reps = 2 * kid_linear_terms(x, y)[draw(300, 1, 500).images].mean(1)
    lo, hi = stats.interval(est, reps, "image")
    assert lo < est < hi and lo > 0                                               # a real shift: KID > 0


def test_seed_summary_is_the_mean_and_t_interval_over_training_seeds():
    rows = [dict(method="LCM", solver="lcm", steps=4, guidance_scale=1.0, nfe=4, seconds_per_image=0.01, train_seed=s,
                 acc=v, acc_ci=[v - 0.05, v + 0.05])
            for s, v in enumerate([0.60, 0.70, 0.65])]
    s, = stats.seed_summary(rows)
    assert s["n_seeds"] == 3 and s["mean"] == pytest.approx(0.65) and s["std"] == pytest.approx(0.05)
    half = 4.303 * 0.05 / 3 ** 0.5                                                # t_0.975 with 2 dof
    assert s["ci"] == pytest.approx([0.65 - half, 0.65 + half]) and s["within_seed_ci_width"] == pytest.approx(0.1)
    assert stats.t_quantile(30) == pytest.approx(2.042, abs=2e-3)
    from lcm.evaluation.report import markdown
    assert "## Over training seeds" in markdown(rows)


def test_results_json_carries_intervals_and_n_after_a_run_and_after_its_resume(tmp_path):
    import demo.metrics  # noqa: F401
    from lcm.evaluation import Method, MetricSet, load_prompts, run_grid
    from lcm.evaluation.report import write_report
    from lcm.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(os.path.join(ROOT, "assets", "demo_teacher.safetensors"))
    pipe.load_lora(os.path.join(ROOT, "assets", "demo_lcm_lora.safetensors"), name="lcm")
    prompts = load_prompts("demo", 4, 2, 0)
    methods = [Method("teacher", "ddim", [1], 3.0, teacher=True), Method("LCM-LoRA", "lcm", [1])]
    keys = ("demo_acc", "demo_fd", "demo_diversity")

    def evaluate():
        ms = MetricSet(["demo_accuracy", "demo_fd", "demo_diversity"], {"demo_n_ref": 64})
        boot = Bootstrap(200, 0)
        rows = run_grid(pipe, methods, prompts, ms, str(tmp_path), batch_size=8, progress=False, boot=boot)
        write_report(str(tmp_path), rows, {}, "t", with_plot=False, comparisons=compare(rows, boot, "teacher"))
        return json.load(open(tmp_path / "results.json"))
    first = evaluate()
    for row in first["rows"]:
        assert row["n_images"] == 8 and row["n_prompts"] == 4
        assert all(len(row[f"{k}_ci"]) == 2 and row[f"{k}_ci"][0] <= row[k] <= row[f"{k}_ci"][1] for k in keys)
        assert list(row).index("demo_acc_ci") == list(row).index("demo_acc") + 1
    assert {c["metric"] for c in first["comparisons"]} == set(keys)
    assert all({"diff", "ci", "excludes_0"} <= set(c) for c in first["comparisons"])
    md = open(tmp_path / "results.md").read()
    assert "Paired differences to teacher" in md and " [" in md
    resumed = evaluate()                                                          # every batch read back from disk
    assert resumed["rows"] == first["rows"] and resumed["comparisons"] == first["comparisons"]


def test_one_method_per_training_seed_lora_gives_seed_rows_and_a_seed_summary(tmp_path):
    """The recipe of docs/statistics.md: each seed's LoRA loaded at scale 0 under its own name, one
    method per seed switching it on (lora_scales) with train_seed; results.md gets the seed table."""
    import demo.metrics  # noqa: F401
    from lcm.evaluation import Method, MetricSet, load_prompts, run_grid
    from lcm.evaluation.report import markdown
    from lcm.pipeline import Pipeline
    pipe = Pipeline.from_checkpoint(os.path.join(ROOT, "assets", "demo_teacher.safetensors"))
    lora = os.path.join(ROOT, "assets", "demo_lcm_lora.safetensors")
    pipe.load_loras([{"path": lora, "name": "s0", "scale": 0.0}, {"path": lora, "name": "s1", "scale": 0.0}])
    methods = [Method("LCM-LoRA", "lcm", [1], lora_scales={f"s{s}": 1.0}, train_seed=s) for s in (0, 1)]
    ms = MetricSet(["demo_accuracy"], {})
    rows = run_grid(pipe, methods, load_prompts("demo", 4, 1, 0), ms, str(tmp_path), batch_size=4, progress=False,
                    boot=Bootstrap(100, 0))
    assert [r["train_seed"] for r in rows] == [0, 1] and rows[0]["demo_acc"] == rows[1]["demo_acc"]   # same file
    s, = stats.seed_summary(rows)
    assert s["n_seeds"] == 2 and s["std"] == 0 and "## Over training seeds" in markdown(rows)
    assert pipe.adapter_scales() == {"s0": 0.0, "s1": 0.0}


def test_seed_level_is_the_t_interval_over_seeds_beside_the_generation_interval_of_the_mean():
    g = torch.Generator().manual_seed(0)
    r = draw(100, 1, 500, torch.Generator().manual_seed(1))
    acc = mean_metric("acc", lambda f: f[:, 0])
    seeds = [(torch.rand(100, 1, generator=g) < p).float() for p in (0.6, 0.7, 0.65)]
    values = [acc(c, [])["acc"] for c in seeds]
    reps = [acc.replicates(c, [], r)["acc"] for c in seeds]
    cis = [stats.interval(v, x, "prompt") for v, x in zip(values, reps)]
    s = stats.seed_level(values, cis, reps)
    m = sum(values) / 3
    sd = (sum((v - m) ** 2 for v in values) / 2) ** 0.5
    assert s["n_seeds"] == 3 and s["mean"] == pytest.approx(m) and s["std"] == pytest.approx(sd)
    assert s["ci"] == pytest.approx([m - 4.303 * sd / 3 ** 0.5, m + 4.303 * sd / 3 ** 0.5])
    # the seed mean's generation interval: the seeds' replicates averaged, so narrower than one seed's
    assert s["gen_ci"] == pytest.approx(stats.interval(m, torch.stack(reps).double().mean(0), "prompt"))
    assert s["gen_ci"][1] - s["gen_ci"][0] < s["within_seed_ci_width"]
    one = stats.seed_level(values[:1], cis[:1], reps[:1])
    assert one["ci"] is None and one["std"] is None and one["gen_ci"] == pytest.approx(cis[0])


def test_welch_interval_covers_a_known_difference_of_three_seeds_each():
    g = torch.Generator().manual_seed(0)
    covered, R = 0, 400
    for _ in range(R):
        a = (0.70 + 0.02 * torch.randn(3, generator=g)).tolist()
        b = (0.65 + 0.04 * torch.randn(3, generator=g)).tolist()           # unequal spreads
        lo, hi = stats.welch_interval(a, b)["ci"]
        covered += lo <= 0.05 <= hi
    assert 0.93 <= covered / R <= 0.995, covered
    assert stats.welch_interval([0.5], [0.4, 0.6]) is None


def test_config_difference_needs_both_the_prompt_and_the_seed_interval_to_exclude_0():
    g = torch.Generator().manual_seed(0)
    P, r = 200, draw(200, 1, 500, torch.Generator().manual_seed(1))
    acc = mean_metric("acc", lambda f: f[:, 0])
    base = (torch.rand(P, 1, generator=g) < 0.5).float()

    def seeds(extra: float):                   # 3 trainings: the base's prompts plus ~extra more right each
        cs = [torch.maximum(base, (torch.rand(P, 1, generator=g) < extra).float()) for _ in range(3)]
        return [acc(c, [])["acc"] for c in cs], [acc.replicates(c, [], r)["acc"] for c in cs]
    (a, ra), (b, rb) = seeds(0.5), seeds(0.02)
    d = stats.config_difference(a, b, ra, rb)
    assert d["diff"] > 0.15 and d["gen_ci"][0] > 0 and d["seed_ci"][0] > 0 and d["excludes_0"] is True
    assert d["n_seeds"] == [3, 3]
    (c, rc) = seeds(0.02)
    null = stats.config_difference(c, b, rc, rb)
    assert null["excludes_0"] is False and null["seed_ci"][0] <= 0 <= null["seed_ci"][1]
    # the prompts say "different", the seeds disagree: not resolved
    wild = [b[0] + 0.1, b[0] - 0.05, b[0] + 0.12]
    shifted = [x + 0.1 for x in rb]
    w = stats.config_difference(wild, [b[0]] * 3, shifted, [rb[0]] * 3)
    assert w["gen_ci"][0] > 0 and w["seed_ci"][0] < 0 < w["seed_ci"][1] and w["excludes_0"] is False
    # one seed a side: the paired bootstrap alone, as evaluate.py's compare()
    one = stats.config_difference(a[:1], b[:1], ra[:1], rb[:1])
    assert one["seed_ci"] is None and one["excludes_0"] == (one["gen_ci"][0] > 0)
    assert stats.config_difference(a[:1], b[:1])["excludes_0"] is None     # no replicates, no seeds: no verdict
