"""demo.sweep: finds finished Hydra jobs by their config.json, and `report` builds the table and the
paper-form plot from the run dirs alone (config.json + eval.json), without retraining."""
import json
import os

from demo.sweep import checkpoints, report, runs_in


def test_runs_are_found_and_reported_from_their_dirs(tmp_path):
    jobs = [("ddim", 1, 16), ("ddim", 20, 16), ("dpmsolver", 50, 16), ("dpmsolver++", 20, 16), ("ddim", 20, 64)]
    for i, (psi, k, rank) in enumerate(jobs):
        run = tmp_path / "psi_k" / str(i)
        (run / "checkpoints" / "step_0000050").mkdir(parents=True)
        (run / "checkpoints" / "step_0000050" / "lcm.safetensors").write_bytes(b"")
        lora = {"rank": rank, "alpha": rank}                    # objective.lora; older runs: top-level lora
        layout = {"objective": {"lora": lora}} if i % 2 else {"lora": lora}
        train = {"k": k, "max_steps": 100, "w_min": 2.0, "w_max": 4.0, "teacher_solver": psi}
        (run / "config.json").write_text(json.dumps({"train": train, **layout}))
        if i == 2:                                              # job 2 unfinished: no LoRA file yet
            continue
        (run / "lcm.safetensors").write_bytes(b"")
        if i == 4:                                              # finished, not evaluated: left out of the report
            continue
        final = {str(s): dict(acc=0.5 + k / 200, fd=100.0 / rank) for s in (1, 2, 4, 8)}
        curve = {"50": dict(acc=0.4, fd=90.0), "100": final["4"]}
        (run / "eval.json").write_text(json.dumps(dict(final=final, curve4=curve, curve1=curve)))
    runs = runs_in([str(tmp_path / "psi_k")])
    assert sorted((r["psi"], r["k"], r["rank"]) for r in runs) == sorted(j for i, j in enumerate(jobs) if i != 2)
    assert checkpoints(str(tmp_path / "psi_k" / "0")) == [(50, str(tmp_path / "psi_k/0/checkpoints/step_0000050/lcm.safetensors"))]
    out = str(tmp_path / "docs" / "sweep")
    reported = report([str(tmp_path / "psi_k")], out)
    assert len(reported) == 3
    md = open(out + ".md").read()
    assert "| psi_k | DPM-Solver++ | 20 | [2, 4] | 16 | 100 | 60.0% | 60.0% | 60.0% | 60.0% | 6.2 |" in md
    assert os.path.getsize(out + ".png") > 10_000
