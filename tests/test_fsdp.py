"""train.distributed=fsdp (lcm/training/fsdp.py): 2 CPU processes over gloo, torchrun, the full-LCD smoke model
(student, EMA target and teacher all sharded) against one process with the same global batch; resume
from a sharded checkpoint; the export; the refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from lcm.runs import state as run_state
from lcm.training import distributed
from lcm.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_MODEL = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/experiment/smoke.yaml")).model)
COMMON = ["experiment=smoke_lcd", "train.max_steps=4", "validation.every=0", "train.checkpoint_every=2",
          "train.log_every=1", "objective.loss=l2", "logger=none"]


def losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def run_in_process(over: list[str]) -> dict:
    """train.py's run() in this process (one process: no torchrun), as the CLI composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import train as cli
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("train", overrides=over, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cli.run(cfg)


def torchrun_phases(out: str) -> None:
    """This file under torchrun (2 ranks, gloo): the sharded run, then a resume from its step-2
    checkpoint, in one launch (each launch costs ~10 s of imports per rank on 2 cores)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.abspath(__file__), out], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def phases(out: str) -> None:
    """Run on each torchrun rank: `two` (2 ranks x batch 2, sharded, validation at the last step:
    rank 0 samples the gathered EMA target and teacher), then `resumed` from two's step-2 checkpoint
    (what a run stopped after 2 steps leaves) to step 4, in a new run dir."""
    fsdp = [*COMMON, "train.batch_size=2", "train.distributed=fsdp"]
    run_in_process([*fsdp, "validation.every=4", f"hydra.run.dir={out}/two"])
    run_in_process([*fsdp, f"hydra.run.dir={out}/resumed", f"resume={out}/two/checkpoints/step_0000002"])


def flat(state: dict) -> dict[str, torch.Tensor]:
    return run_state.flatten_state(state)[0]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_and_resume_is_exact(tmp_path):
    one, two, res = (str(tmp_path / d) for d in ("one", "two", "resumed"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                                 # as each rank (OMP_NUM_THREADS=1)
    try:
        run_in_process([*COMMON, "train.batch_size=4", f"hydra.run.dir={one}"])   # one process, batch 4
    finally:
        torch.set_num_threads(threads)
    torchrun_phases(str(tmp_path))                                           # two (fsdp), then resumed
    la, lb = losses(one), losses(two)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]                        # same samples, same noise
    torch.testing.assert_close(torch.tensor([lb[s] for s in la]), torch.tensor(list(la.values())),
                               atol=1e-6, rtol=1e-5)
    assert os.path.isfile(os.path.join(two, "validation", "step_0000004.png"))

    # the export (the EMA target, updated on the shards) loads and matches the single-process one
    from lcm.pipeline import Pipeline
    a, b = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert a.keys() == b.keys()
    va, vb = (torch.cat([t[k].float().flatten() for k in sorted(a)]) for t in (a, b))
    assert (va - vb).abs().max() <= 1e-4 and (va - vb).norm() <= 1e-5 * va.norm()
    pipe = Pipeline.from_checkpoint(os.path.join(two, "model.safetensors"))
    assert pipe.unet.time_cond_proj_dim is not None                        # the full LCM with its w-embedding
    img = pipe(["a red circle"], steps=1, height=32, width=32, output="tensor", progress=False)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()

    # the sharded run's checkpoint is the single-process file: same tensors (names, shapes), same skeleton
    sa, sb = (run_state.load_state(os.path.join(d, "checkpoints", "step_0000004", run_state.STATE_FILE)) for d in (one, two))
    fa, fb = flat(sa), flat(sb)
    drop = ("s.rng.", "s.world_size")
    fa, fb = ({k: v for k, v in f.items() if not k.startswith(drop)} for f in (fa, fb))
    assert fa.keys() == fb.keys() and all(fa[k].shape == fb[k].shape for k in fa)
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert len(sb["rng"]) == sb["world_size"] == 2

    # stopped after 2 steps (its step-2 checkpoint) and resumed on 2 sharded ranks: exactly the same run
    lr = losses(res)
    assert sorted(lr) == [3, 4] and all(lr[s] == lb[s] for s in lr), (lr, lb)
    c = load_file(os.path.join(res, "model.safetensors"))
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)    # bit for bit
    sc = flat(run_state.load_state(os.path.join(res, "checkpoints", "step_0000004", run_state.STATE_FILE)))
    sb_t = flat(sb)
    assert all(torch.equal(sb_t[k], sc[k]) for k in sb_t if not k.startswith("s.rng."))

    # ... and it resumes in one plain process (ddp / fsdp / world sizes are interchangeable)
    pipe, obj, opt = single_process_lcd()
    path = os.path.join(two, "checkpoints", "step_0000004")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step, _ = run_state.restore_training_state(path, obj.trainables, opt, sched, scaler, obj.ema, 0, 1)
    assert step == 4
    assert all(torch.equal(p, sb["trainables"][n]) for n, p in obj.trainables)
    assert all(torch.equal(v, sb["ema"][k]) for k, v in obj.ema.state_dict().items())
    assert same_optimizer_state(opt.state_dict(), sb["optimizer"])


def single_process_lcd():
    """The smoke LCD objective placed in one process, with its AdamW (as the trainer builds them)."""
    from lcm.objectives.lcd import LCD
    from train import build_pipeline
    cfg = loop.TrainConfig(lr=1e-5, batch_size=2)
    pipe, obj = build_pipeline(SMOKE_MODEL), LCD(lora=None, ema_decay=0.95)
    loop.place(pipe, obj, cfg, distributed.Dist())
    return pipe, obj, loop.make_optimizer(obj, cfg).single


def same_optimizer_state(a: dict, b: dict) -> bool:
    return (a["param_groups"] == b["param_groups"] and list(a["state"]) == list(b["state"])
            and all(a["state"][i].keys() == b["state"][i].keys() for i in a["state"])
            and all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i]))


def test_optimizer_state_name_and_index_layouts_round_trip():
    """lcm.training.fsdp converts get_optimizer_state_dict's name-keyed layout to optimizer.state_dict()'s
    index-keyed one (what the state file holds) and back, exactly."""
    from lcm.training import fsdp
    _, obj, opt = single_process_lcd()
    for _, p in obj.trainables:
        p.grad = torch.randn_like(p)
    opt.step()
    names = [n for n, _ in obj.trainables]
    by_name = fsdp.optimizer_by_name(opt.state_dict(), names)
    assert set(by_name["state"]) == set(names) and by_name["param_groups"][0]["params"] == names
    assert same_optimizer_state(fsdp.optimizer_by_index(by_name, names), opt.state_dict())


def test_fsdp_refuses_lora_and_fp16_in_one_line():
    from lcm.objectives.base import LoRAConfig
    from lcm.objectives.lcd import LCD
    from lcm.objectives.lcd_lora import LCDLoRA
    from train import build_pipeline
    pipe = build_pipeline(SMOKE_MODEL)
    for obj, kw in ((LCDLoRA(lora=LoRAConfig(rank=4, alpha=4)), {}), (LCD(lora=None), dict(mixed_precision="fp16"))):
        with pytest.raises(ValueError, match="train.distributed=fsdp") as e:
            loop.check_config(loop.TrainConfig(distributed="fsdp", **kw), obj, pipe)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="train.distributed must be one of ddp, fsdp"):
        loop.check_config(loop.TrainConfig(distributed="zero3"), LCD(lora=None), pipe)


if __name__ == "__main__":                                  # a torchrun rank of torchrun_phases
    phases(sys.argv[1])
