"""demo.matrix (issue 32's report command): discovery of method, seed, LoRA and sampler from run dirs,
the cost columns, the seed grouping, verdicts against the baseline and the md/json contents. Fake run
dirs (config.json + metrics.jsonl + a LoRA file: the bundled demo LCM-LoRA's weights under each
objective's lcm.spec); the evaluation is faked with known numbers, and once run for real on the demo
teacher (1 prompt x 2 images, 1 step)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from demo import matrix
from lcm.consistency import ConsistencySpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
TEACHER = os.path.join(ASSETS, "demo_teacher.safetensors")
TARGETS = {   # method -> (objective _target_, objective config, lora name, exported spec)
    "LCD": ("lcm.objectives.lcd_lora.LCDLoRA", {"teacher_solver": "ddim", "k": 20}, "lcm", ConsistencySpec()),
    "TCD": ("lcm.objectives.tcd.TCD", {"teacher_solver": "ddim"}, "tcd", ConsistencySpec(objective="tcd")),
    "PCM": ("lcm.objectives.pcm.PCM", {"teacher_solver": "ddim", "phases": 4, "cfg_solver": True}, "pcm",
            ConsistencySpec(objective="pcm", phases=4)),
    "DMD2": ("lcm.objectives.dmd2.DMD2", {"steps": 4, "gen_every": 5, "backward_simulation": True, "gan": False},
             "dmd2", ConsistencySpec(num_ddim_timesteps=4)),
    "sCM": ("lcm.objectives.scm.SCM", {"jvp_method": "autograd"}, "scm", ConsistencySpec(sigma_data=1.0, objective="scm")),
    "rCM": ("lcm.objectives.rcm.RCM", {"steps": 4, "gen_every": 5, "dmd_weight": 0.01}, "rcm",
            ConsistencySpec(sigma_data=1.0, objective="scm")),
}


@pytest.fixture(scope="module")
def lora_tensors():
    return load_file(os.path.join(ASSETS, "demo_lcm_lora.safetensors"))


def make_run(root, method: str, seed: int, tensors: dict, rate: float = 16.0, mem: float = 1000.0,
             batch: int = 32, scale: float = 1.0) -> str:
    """A finished run dir: config.json, metrics.jsonl (3 logged steps) and <lora name>.safetensors with its spec."""
    target, obj, name, spec = TARGETS[method]
    run = root / f"{method.lower()}_s{seed}"
    run.mkdir(parents=True)
    cfg = dict(model=dict(path=TEACHER, prediction_type=None, dtype="float32", lora=[]),
               objective=dict(_target_=target, lora=dict(name=name, rank=16, alpha=16), **obj),
               train=dict(seed=seed, max_steps=400, batch_size=batch),
               overrides=[f"experiment=demo_{method.lower()}_lora", f"train.seed={seed}"])
    (run / "config.json").write_text(json.dumps(cfg))
    logs = [dict(step=10 * (i + 1), loss=0.1, samples_per_s=rate * f, peak_mem_mb=mem + i) for i, f in enumerate((0.5, 1, 2))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs))
    save_file({k: v * scale if "lora_up" in k else v for k, v in tensors.items()}, str(run / f"{name}.safetensors"),
              metadata=spec.to_metadata())
    return str(run)


def test_discovery_names_method_seed_lora_and_sampler(tmp_path, lora_tensors):
    runs = {m: matrix.discover(make_run(tmp_path, m, 3, lora_tensors)) for m in TARGETS}
    want = {"LCD": ("lcm", None), "TCD": ("tcd", 0.3), "PCM": ("pcm", None), "DMD2": ("lcm", None),
            "sCM": ("scm", None), "rCM": ("scm", None)}
    for m, r in runs.items():
        assert (r.method, r.train_seed, (r.solver, r.eta)) == (m, 3, want[m])
        assert r.lora.endswith(f"{TARGETS[m][2]}.safetensors") and len(r.lora_id) == 16
    assert runs["DMD2"].steps == [1, 2, 4]                     # lcm on its 4-point grid: 8 steps is not on it
    assert runs["PCM"].steps == runs["LCD"].steps == runs["sCM"].steps == [1, 2, 4, 8]
    assert runs["PCM"].spec["phases"] == 4
    methods = matrix.methods_for(matrix.name_runs(list(runs.values())), 2, 3.0)
    assert methods[0].teacher and methods[0].lora_scales == {}
    for m in methods[1:]:                                        # exactly one adapter on per method
        assert list(m.lora_scales.values()) == [1.0] and m.guidance_scale == 1.0
    assert next(m for m in methods if m.name == "TCD").eta == 0.3


def test_unknown_objective_is_named_by_its_class(tmp_path, lora_tensors):
    run = make_run(tmp_path, "LCD", 0, lora_tensors)
    cfg = json.load(open(os.path.join(run, "config.json")))
    cfg["objective"]["_target_"] = "lcm.objectives.lcf.LCF"
    json.dump(cfg, open(os.path.join(run, "config.json"), "w"))
    r = matrix.discover(run)
    assert (r.method, r.solver, r.cost["unet_passes_per_step"]) == ("LCF", "lcm", None)


def test_cost_columns(tmp_path, lora_tensors):
    c = {m: matrix.discover(make_run(tmp_path, m, 0, lora_tensors)).cost for m in TARGETS}
    assert c["LCD"]["unet_passes_per_step"] == c["TCD"]["unet_passes_per_step"] == 4.0   # 2 teacher + target + student
    assert c["PCM"]["unet_passes_per_step"] == 4.0
    # DMD2, 4-step grid (backsim mean 1.5), gen_every 5: generator 1.5 + 1 + 2 + 1 = 5.5, fake 1.5 + 2 = 3.5
    assert c["DMD2"]["unet_passes_per_student_step"] == pytest.approx(5.5 + 4 * 3.5)
    assert c["DMD2"]["unet_passes_per_step"] == pytest.approx((5.5 + 4 * 3.5) / 5)
    assert c["sCM"]["unet_passes_per_step"] == 4.0
    assert c["rCM"]["unet_passes_per_student_step"] == pytest.approx(4 + 1 + 1.5 + 3 + 4 * 3.5)
    assert c["LCD"]["seconds_per_step"] == pytest.approx(32 / 16.0)      # batch / median samples_per_s
    assert c["DMD2"]["seconds_per_student_step"] == pytest.approx(5 * 32 / 16.0)
    assert c["LCD"]["peak_mem_mb"] == 1002.0 and c["LCD"]["train_steps"] == c["LCD"]["student_steps"] == 400
    assert c["DMD2"]["student_steps"] == 400 // 5
    assert c["DMD2"]["train_minutes"] == pytest.approx(400 * 32 / 16.0 / 60)   # train steps x s / step


def fake_evaluation(effect: dict):
    """A run_evaluation stand-in: per (method, steps, seed) accuracy effect[method] + seed noise, with
    bootstrap replicates from one shared draw (so verdicts are paired), FD 100 - 10 x accuracy."""
    def run(runs, world, work, *a, **k):
        from lcm.evaluation import stats
        g = torch.Generator().manual_seed(0)
        draw = stats.draw(64, 1, 200, g)
        rows, reps = [], {}
        cells = [(matrix.TEACHER_NAME, 2, None, 0.95)] + [(r.name, s, r.train_seed, effect[r.method] + 0.01 * r.train_seed)
                                                           for r in runs for s in r.steps]
        for name, s, seed, p in cells:
            correct = (torch.rand(64, generator=g) < p).double()
            acc, rep = correct.mean().item(), stats.mean_replicates(correct, draw)
            fd, rep_fd = 100 - 10 * acc, 100 - 10 * rep
            rows.append(dict(method=name, steps=s, train_seed=seed, solver="x", guidance_scale=1.0, nfe=s,
                             demo_acc=acc, demo_acc_ci=stats.interval(acc, rep, "prompt"),
                             demo_fd=fd, demo_fd_ci=stats.interval(fd, rep_fd, "prompt"), demo_diversity_collapsed=0.0))
            reps[(name, s, seed)] = {"demo_acc": (acc, "prompt", rep), "demo_fd": (fd, "prompt", rep_fd)}
        return rows, reps
    return run


def test_report_groups_seeds_and_writes_every_run_and_verdict(tmp_path, lora_tensors, monkeypatch):
    runs = [make_run(tmp_path / "runs", m, s, lora_tensors) for m in ("LCD", "PCM", "DMD2") for s in (0, 1, 2)]
    monkeypatch.setattr(matrix, "run_evaluation", fake_evaluation({"LCD": 0.9, "PCM": 0.3, "DMD2": 0.88}))
    out = str(tmp_path / "docs" / "matrix")
    doc = matrix.main([*runs, "--out", out, "--steps", "1", "4", "8"])
    saved = json.load(open(out + ".json"))
    md = open(out + ".md").read()
    assert os.path.getsize(out + ".png") > 0
    assert [r["run"] for r in saved["runs"]] == [os.path.basename(r) for r in runs]   # outside cwd: base names
    assert {r["train_seed"] for r in saved["runs"]} == {0, 1, 2} and str(tmp_path) not in json.dumps(saved) + md
    for r in saved["runs"]:
        assert r["run"] in md and set(r["results"]["1"]["demo_acc"]) == {"estimate", "ci"}
    by = {m["name"]: m for m in saved["methods"]}
    assert set(by) == {"LCD", "PCM", "DMD2"} and all(m["n_seeds"] == 3 for m in by.values())
    lv = by["LCD"]["results"]["1"]["demo_acc"]
    assert lv["n_seeds"] == 3 and lv["ci"][0] < lv["mean"] < lv["ci"][1] and lv["gen_ci"] is not None
    assert "8" not in by["DMD2"]["results"]                       # not on DMD2's grid
    v = {(x["method"], x["steps"], x["metric"]): x for x in saved["verdicts"]}
    assert set(v) == {(m, s, k) for m in ("PCM", "DMD2") for s in ((1, 4, 8) if m == "PCM" else (1, 4))
                      for k in ("demo_acc", "demo_fd")}
    assert v[("PCM", 1, "demo_acc")]["excludes_0"] and v[("PCM", 1, "demo_acc")]["better"] is False
    assert v[("PCM", 1, "demo_fd")]["better"] is False            # higher FD: worse
    for x in v.values():
        assert {"diff", "gen_ci", "seed_ci", "excludes_0", "n_seeds"} <= set(x) and x["n_seeds"] == [3, 3]
    assert "## Verdicts against LCD" in md and "## Cost of training" in md and "python -m demo.matrix" in md
    assert f"Training time of the 9 runs: {sum(r['cost']['train_minutes'] for r in saved['runs']):.0f} min" in md
    summary = md.split("## Summary\n\n", 1)[1].split("\n\n## ", 1)[0].splitlines()
    assert [row.split(" | ")[:2] for row in summary[2:5]] == [["| LCD", "3"], ["| PCM", "3"], ["| DMD2", "3"]]
    assert summary[4].split(" | ")[4] == "-" and summary[-1].startswith("Teacher (DDIM 2 steps")   # DMD2: no 8
    fd = summary[summary.index("") + 1:]                          # the Frechet table, without the cost columns
    assert fd[0].startswith("| method | seeds | Frechet distance") and fd[0].count(" | ") == 4
    assert [row.split(" | ")[0] for row in fd[2:5]] == ["| LCD", "| PCM", "| DMD2"] and "; FD " in summary[-1]
    assert saved["command"] == doc["command"] and saved["command"].endswith("--steps 1 4 8")


def test_runs_of_one_method_and_seed_are_refused(tmp_path, lora_tensors):
    a = make_run(tmp_path / "a", "LCD", 0, lora_tensors)
    b = make_run(tmp_path / "b", "LCD", 0, lora_tensors)
    with pytest.raises(SystemExit, match="train.seed=0"):
        matrix.name_runs([matrix.discover(a), matrix.discover(b)])


def test_real_evaluation_on_the_demo_teacher(tmp_path, lora_tensors):
    """The real path: lcm.evaluation's grid on the demo teacher, 1 prompt x 2 images at 1 step, and resume."""
    torch.set_num_threads(1)
    runs = [make_run(tmp_path / "runs", "LCD", s, lora_tensors, scale=1.0 - 0.5 * s) for s in (0, 1)]
    runs.append(make_run(tmp_path / "runs", "sCM", 0, lora_tensors))
    out, work = str(tmp_path / "matrix"), str(tmp_path / "work")
    args = [*runs, "--out", out, "--work", work, "--n-prompts", "1", "--seeds-per-prompt", "2", "--steps", "1",
            "--teacher-steps", "2", "--n-ref", "64", "--bootstrap", "50"]
    doc = matrix.main(args)
    assert doc["metrics"] == ["demo_acc", "demo_fd", "demo_diversity"]
    by = {(r["name"], r["train_seed"]): r for r in doc["runs"]}
    assert set(by) == {("LCD", 0), ("LCD", 1), ("sCM", 0)}
    fd = [by[k]["results"]["1"]["demo_fd"]["estimate"] for k in (("LCD", 0), ("LCD", 1), ("sCM", 0))]
    assert len(set(fd)) == 3                                     # each row sampled its own LoRA
    assert doc["methods"][0]["results"]["1"]["demo_fd"]["n_seeds"] == 2
    assert doc["teacher"]["steps"] == 2 and doc["verdicts"]
    assert os.path.isfile(os.path.join(work, "demo", "results.json"))
    batches = lambda: {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))   # noqa: E731
                       for d, _, fs in os.walk(work) for f in fs if f.startswith("batch_")}
    mtimes = batches()
    again = matrix.main(args)                                    # resumed: no batch regenerated, same numbers
    assert batches() == mtimes and len(mtimes) == 4              # teacher + 3 runs, one batch each
    assert again["runs"] == doc["runs"]


def test_compose_world_evaluates_seen_and_heldout_prompt_sets(tmp_path, lora_tensors):
    """World compose: two evaluate run dirs (prompt sets compose and compose_heldout), the held-out accuracy
    as compose_acc_heldout. The demo teacher stands in for the compose teacher (only the plumbing is checked)."""
    torch.set_num_threads(1)
    runs = [make_run(tmp_path / "runs", m, 0, lora_tensors) for m in ("LCD", "TCD")]
    work = tmp_path / "work"
    doc = matrix.main([*runs, "--world", "compose", "--out", str(tmp_path / "matrix"), "--work", str(work),
                       "--n-prompts", "1", "--seeds-per-prompt", "2", "--steps", "1", "--teacher-steps", "1",
                       "--n-ref", "32", "--bootstrap", "20"])
    assert doc["metrics"] == ["compose_acc", "compose_acc_heldout", "compose_fd", "compose_diversity"]
    assert {p.name for p in work.iterdir()} == {"compose", "compose_heldout"}
    heldout = json.load(open(work / "compose_heldout" / "results.json"))["rows"]
    assert {r["method"] for r in heldout} == {"teacher", "LCD", "TCD"} and "compose_fd" not in heldout[0]
    assert set(doc["runs"][1]["results"]["1"]) >= {"compose_acc", "compose_acc_heldout", "compose_fd"}
    assert "held-out pairs" in open(str(tmp_path / "matrix") + ".md").read()


def test_published_claims_are_decided_from_the_differences(tmp_path, lora_tensors, monkeypatch):
    """demo.matrix_claims: a claim holds, fails or stays open by the same intervals as the verdicts (PCM's
    large deficit resolves either way, DMD2's 2-point gap does not), against another method or the teacher,
    and a missing method is `not run`."""
    runs = [make_run(tmp_path / "runs", m, s, lora_tensors) for m in ("LCD", "PCM", "DMD2") for s in (0, 1, 2)]
    monkeypatch.setattr(matrix, "run_evaluation", fake_evaluation({"LCD": 0.9, "PCM": 0.3, "DMD2": 0.88}))
    test = lambda m, v, e, steps=(1, 4): dict(method=m, versus=v, metric="demo_acc", steps=list(steps), expect=e)  # noqa: E731
    claims = [dict(paper="P", claim="PCM beats LCD", source="abstract", test=test("PCM", "LCD", "higher")),
              dict(paper="P", claim="PCM trails LCD", source="s. 4", test=test("PCM", "LCD", "lower")),
              dict(paper="D", claim="DMD2 matches LCD", source="README", test=test("DMD2", "LCD", "same")),
              dict(paper="D", claim="DMD2 beats LCD", source="README", test=test("DMD2", "LCD", "higher")),
              dict(paper="D", claim="PCM below its teacher", source="x", test=test("PCM", "teacher", "lower", (1,))),
              dict(paper="R", claim="rCM beats DMD2", source="abstract", test=test("rCM", "DMD2", "higher"))]
    path = tmp_path / "claims.yaml"
    import yaml
    path.write_text(yaml.safe_dump(claims))
    out = str(tmp_path / "matrix")
    doc = matrix.main([*runs, "--out", out, "--steps", "1", "4", "--claims", str(path)])
    got = {c["claim"]: c["outcome"] for c in doc["claims"]}
    assert got == {"PCM beats LCD": "contradicted", "PCM trails LCD": "reproduced", "DMD2 matches LCD": "consistent",
                   "DMD2 beats LCD": "not resolved", "PCM below its teacher": "reproduced", "rCM beats DMD2": "not run"}
    v = {(x["method"], x["steps"]): x for x in doc["verdicts"] if x["metric"] == "demo_acc"}
    assert doc["claims"][1]["results"][0]["diff"] == v[("PCM", 1)]["diff"]    # the verdicts' numbers
    md = open(out + ".md").read()
    assert "## Published claims" in md and "**partly" not in md and md.count("**reproduced**") == 2
    path.write_text(yaml.safe_dump([dict(paper="P", claim="c", source="s", test=dict(method="PCM"))]))
    with pytest.raises(SystemExit, match="claim 1 lacks test.versus"):
        matrix.main([*runs, "--out", out, "--claims", str(path)])


def test_configurations_of_one_method_are_named_by_their_own_overrides(tmp_path, lora_tensors):
    """The Psi x k ablation's rows: LCD runs of several configurations get [the overrides they do not
    share]; the configuration with none of its own is plain LCD; seeds still group."""
    paths = []
    for extra, seed in (([], 0), ([], 1), (["objective.k=50", "objective.teacher_solver=ddim"], 0),
                        (["objective.k=50", "objective.teacher_solver=dpmsolver++"], 0)):
        run = make_run(tmp_path / f"r{len(paths)}", "LCD", seed, lora_tensors)
        cfg = json.load(open(os.path.join(run, "config.json")))
        cfg["overrides"] += extra
        json.dump(cfg, open(os.path.join(run, "config.json"), "w"))
        paths.append(run)
    names = [r.name for r in matrix.name_runs([matrix.discover(p) for p in paths])]
    assert names == ["LCD", "LCD", "LCD [objective.k=50 objective.teacher_solver=ddim]",
                     "LCD [objective.k=50 objective.teacher_solver=dpmsolver++]"]


def test_the_shipped_claims_name_what_the_compose_matrix_reports():
    """docs/matrix_claims.yaml loads, and each test names a matrix method (or the teacher), a metric of the
    compose world and step counts its methods' samplers support (DMD2: 1, 2, 4), so no claim is `not run`
    by a typo."""
    from demo.matrix_claims import load
    claims = load(os.path.join(ROOT, "docs", "matrix_claims.yaml"))
    keys = {"compose_acc", "compose_acc_heldout", "compose_fd", "compose_diversity"}   # test_compose_world_...'s
    for c in claims:
        t = c["test"]
        assert t["method"] in matrix.ORDER and (t["versus"] in matrix.ORDER or t["versus"] == matrix.TEACHER_NAME)
        assert t["metric"] in keys and set(t["steps"]) <= set(matrix.STEPS)
        if "DMD2" in (t["method"], t["versus"]):
            assert set(t["steps"]) <= {1, 2, 4}


def test_the_run_queue_lists_every_cell_once_with_existing_presets():
    """demo/matrix_queue.sh's job list: 6 methods x 3 seeds, then 15 Psi x k runs (the k = 50 pair first;
    DDIM k = 20 is the matrix's LCD row), unique run dirs, presets that exist, the LoRA name each exports."""
    import subprocess
    src = open(os.path.join(ROOT, "demo", "matrix_queue.sh")).read()
    fn = src[src.index("job_list() {"):src.index("\n}\n") + 3]
    out = subprocess.run(["bash", "-c", fn + "job_list"], capture_output=True, text=True, check=True).stdout.split("\n")
    jobs = [ln.split() for ln in out if ln.strip()]
    assert len(jobs) == 18 + 15 and len({j[0] for j in jobs}) == len(jobs)
    for d, name, exp, *rest in jobs:
        preset = exp.removeprefix("experiment=")
        assert os.path.isfile(os.path.join(ROOT, "conf", "experiment", preset + ".yaml"))
        assert name == preset.split("_")[1] and f"train.seed={d[-1]}" in rest
    psi = [j for j in jobs if "matrix_psi" in j[0]]
    assert [j[0] for j in jobs[:18]] == [j[0] for j in jobs if "matrix_psi" not in j[0]]
    assert all("objective.k=50" in j for j in psi[:6]) and not any("k20" in j[0] and "ddim" in j[0] for j in psi)


@pytest.mark.parametrize("page", ["docs/matrix.md", "docs/matrix_psi.md"])
def test_the_readme_copies_the_matrix_summary_as_the_report_wrote_it(page):
    """The README's tables and teacher line of the matrix and of the Psi x k ablation are their pages'
    summaries, verbatim: a report rerun from more seeds without the README updated (or a hand-edited number)
    fails here."""
    readme, text = (open(os.path.join(ROOT, f)).read() for f in ("README.md", page))
    assert "## Summary\n\n" in text, f"{page} has no summary: rerun its report command (it ends the page)"
    block = text.split("## Summary\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert block in readme, f"README.md's summary of {page} differs from the page's: copy it from there"


def test_the_shown_interval_hides_neither_the_seeds_nor_the_prompts():
    from demo.matrix_report import shown_ci
    tie = dict(n_seeds=2, mean=0.5, ci=[0.5, 0.5], gen_ci=[0.45, 0.56])   # two seeds that tie: zero-width t
    assert shown_ci(tie) == [0.45, 0.56]
    assert shown_ci(dict(n_seeds=3, mean=0.5, ci=[0.3, 0.7], gen_ci=[0.45, 0.56])) == [0.3, 0.7]
    assert shown_ci(dict(n_seeds=3, mean=0.5, ci=[0.3, 0.52], gen_ci=[0.45, 0.56])) == [0.3, 0.56]
    assert shown_ci(dict(n_seeds=1, mean=0.5, ci=None, gen_ci=[0.45, 0.56])) == [0.45, 0.56]
    wide = dict(n_seeds=2, mean=0.9, ci=[0.7, 1.1], gen_ci=[0.85, 0.95])      # few seeds: t leaves [0, 1]
    assert shown_ci(wide, "compose_acc") == [0.7, 1.0] and shown_ci(wide, "compose_fd") == [0.7, 1.1]
