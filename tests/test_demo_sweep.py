"""demo.sweep: finds finished Hydra jobs by their config.json, tabulates and plots k and rank."""
import json
import os

from demo.sweep import markdown, plot, runs_in


def test_runs_are_found_tabulated_and_plotted(tmp_path):
    jobs = [(1, 16), (20, 16), (50, 16), (20, 4), (20, 64)]
    for i, (k, rank) in enumerate(jobs):
        run = tmp_path / "sweep" / str(i)
        run.mkdir(parents=True)
        lora = {"rank": rank, "alpha": rank}                    # objective.lora; older runs: top-level lora
        layout = {"objective": {"lora": lora}} if i % 2 else {"lora": lora}
        (run / "config.json").write_text(json.dumps({"train": {"k": k, "max_steps": 100}, **layout}))
        if i != 2:                                              # job 2 unfinished: no LoRA file yet
            (run / "lcm.safetensors").write_bytes(b"")
    runs = runs_in([str(tmp_path / "sweep")])
    assert sorted((r["k"], r["rank"]) for r in runs) == sorted(j for i, j in enumerate(jobs) if i != 2)
    for r in runs:
        r["metrics"] = {s: dict(acc=0.5 + r["k"] / 200, fd=100.0 / r["rank"]) for s in (1, 2, 4)}
    md = markdown(runs, "cmd")
    assert "| 20 | 64 | 64 | 100 | 60.0% | 60.0% | 60.0% | 1.6 | 1.6 | 1.6 |" in md
    plot(runs, str(tmp_path / "sweep.png"), k_rank=16, k_fixed=20)
    assert os.path.getsize(tmp_path / "sweep.png") > 10_000
