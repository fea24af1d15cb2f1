"""Sweeps where researchers run them (README "Sweeps on a cluster"): SLURM's variables -> torchrun's, the
slurm / Optuna presets as they compose, a 2-job sweep through hydra-submitit-launcher's local executor, a
2-trial Optuna search, and (slow) a job signalled as SLURM signals it before its time
limit: it saves, submitit requeues it, and the requeued job resumes and ends with the LoRA of an uninterrupted
run, bit for bit.

No cluster here: the local executor runs the same launcher, pickles, signal handlers and requeue protocol
(its requeue is an exit code its controller restarts on; SLURM's is `scontrol requeue`, not run here)."""
import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lcm.training import cluster
from lcm.training.distributed import first_host, slurm_env, slurm_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
SMOKE = ["experiment=smoke", "logger=none", "validation.every=0", "train.log_every=1"]


def _train(args, timeout=300):
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _last_loss(run_dir):
    return cluster.objective_value(str(run_dir), "loss")

#----------------------------------------------------------------------------
# SLURM's environment -> RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT


@pytest.mark.parametrize("nodelist, host", [
    ("node[01-03,07]", "node01"), ("gpu[7,9-12]", "gpu7"), ("a1,b2", "a1"), ("n[9]", "n9"),
    ("single", "single"), ("rack1-n[003-004],rack2-n[001]", "rack1-n003")])
def test_first_host_of_a_compact_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_env_maps_an_srun_task():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
           "SLURM_JOB_NODELIST": "gpu[04-05]", "SLURM_JOB_ID": "123456"}
    assert slurm_env(env) == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu04",
                              "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert slurm_port("123456") != slurm_port("123457")              # two array tasks on one node
    assert slurm_env({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"})["MASTER_ADDR"] == "h"
    assert slurm_env({**env, "RANK": "0"}) == {}                      # torchrun's variables win
    assert slurm_env({k: v for k, v in env.items() if k != "SLURM_STEP_ID"}) == {}   # the batch script itself
    assert slurm_env({**env, "SLURM_NTASKS": "1"}) == {}              # one task: no process group


def test_two_srun_tasks_join_one_gloo_group(tmp_path):
    """init_distributed from SLURM's variables alone (no torchrun): 2 processes all-reduce."""
    code = ("from lcm.training.distributed import init_distributed; import torch\n"
            "d = init_distributed('cpu'); t = torch.tensor([d.rank + 1.0]); torch.distributed.all_reduce(t)\n"
            "print(d.rank, d.world, int(t.item())); torch.distributed.destroy_process_group()\n")
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              env={**env, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r), "SLURM_NTASKS": "2",
                                   "SLURM_LOCALID": str(r), "SLURM_JOB_NODELIST": "localhost",
                                   "SLURM_JOB_ID": str(os.getpid())}) for r in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [["0", "2", "3"], ["1", "2", "3"]]

#----------------------------------------------------------------------------
# The presets as Hydra composes them


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_slurm_preset_composes_one_process_per_gpu():
    from omegaconf import OmegaConf
    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                    "hydra.launcher.gpus_per_node=4", "hydra.sweep.dir=/s"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["tasks_per_node"] == 4 and launcher["nodes"] == 2        # one process per GPU
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0   # requeued on time-out
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}" and cfg.resume is False
    from submitit.slurm.slurm import _make_sbatch_string                  # the sbatch script it would submit
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    sbatch = _make_sbatch_string(command="python -m x", folder="/s/.submitit/%j", map_count=3,
                                 ntasks_per_node=params.pop("tasks_per_node"), job_name=params.pop("name"),
                                 time=params.pop("timeout_min"), mem=None, stderr_to_stdout=False,
                                 **{k: v for k, v in params.items() if k not in ("mem_gb", "stderr_to_stdout")})
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--signal=USR2@300",
                 "--array=0-2%3"):
        assert line in sbatch, line


def test_optuna_preset_composes():
    cfg = _compose(["hparams_search=demo_lora", "experiment=demo_lcm_lora", "hydra.sweep.dir=/s"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimize.metric == "val/demo_acc_2steps"
    assert cfg.hydra.sweeper.storage == "sqlite:////s/optuna.db" and cfg.hydra.sweeper.study_name == "demo_lora"
    assert set(cfg.hydra.sweeper.params) == {"train.lr", "objective.lora.rank"}
    assert cfg.validation.metrics == ["demo_accuracy"] and cfg.validation.every == cfg.train.max_steps
    assert _compose([]).optimize.metric == "loss"                        # default: the final loss

#----------------------------------------------------------------------------
# Real sweeps on the smoke model


def test_submitit_local_sweep_two_jobs(tmp_path):
    """hydra/launcher=submitit_local: one job per point, each in its sweep subdir, returning its last loss."""
    sweep = tmp_path / "sweep"
    _train(["-m", "hydra/launcher=submitit_local", *SMOKE, "train.max_steps=2", "train.checkpoint_every=2",
            "train.seed=0,1", f"hydra.sweep.dir={sweep}"])
    losses = [_last_loss(sweep / str(j)) for j in (0, 1)]
    assert all((sweep / str(j) / "lcm.safetensors").is_file() for j in (0, 1)) and losses[0] != losses[1]
    cfgs = [json.load(open(sweep / str(j) / "config.json")) for j in (0, 1)]   # wandb groups seeds by these
    assert [c["seed"] for c in cfgs] == [0, 1] and cfgs[0]["configuration"] == cfgs[1]["configuration"]
    assert "train.max_steps=2" in cfgs[0]["configuration"] and "seed" not in cfgs[0]["configuration"]
    results = sorted(glob.glob(str(sweep / ".submitit" / "*" / "*_result.pkl")))
    returned = sorted(pickle.load(open(p, "rb"))[1].return_value for p in results)   # ("success", JobReturn)
    assert len(results) == 2 and returned == sorted(losses)


def test_optuna_two_trials(tmp_path):
    """hparams_search=demo_lora on the smoke model, 2 trials: the study in <sweep>/optuna.db holds the
    trials' final losses (optimize.metric=loss) and the best one is reported."""
    import optuna
    import yaml
    sweep = tmp_path / "search"
    _train(["-m", "hparams_search=demo_lora", *SMOKE, "validation.metrics=[]", "optimize.metric=loss",
            "optimize.direction=minimize", "train.max_steps=2", "train.checkpoint_every=2",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", f"hydra.sweep.dir={sweep}"])
    study = optuna.load_study(study_name="demo_lora", storage=f"sqlite:///{sweep}/optuna.db")
    values = [t.value for t in study.trials]
    assert len(values) == 2 and sorted(values) == sorted(_last_loss(sweep / str(j)) for j in (0, 1))
    best = yaml.safe_load(open(sweep / "optimization_results.yaml"))
    assert best["best_value"] == min(values) and set(best["best_params"]) == {"train.lr", "objective.lora.rank"}


def test_objective_value_falls_back_to_the_loss(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "val/a": 0.25}\n'
                                            '{"step": 3, "loss": 1.0}\n')
    assert cluster.objective_value(str(tmp_path), "val/a") == 0.25 and cluster.objective_value(str(tmp_path)) == 1.0
    assert cluster.objective_value(str(tmp_path), "val/missing") == 1.0
    assert cluster.objective_value(str(tmp_path / "none")) != cluster.objective_value(str(tmp_path / "none"))  # NaN

#----------------------------------------------------------------------------
# Requeue: SLURM's pre-timeout signal mid-run -> save, submitit requeue, resume, same LoRA


def _task_pids(sweep) -> list[int]:
    """The submitit task processes (python -m submitit.core._submit <sweep>/.submitit/...) of this sweep."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(f"{d}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(sweep) in cmd:
            pids.append(int(os.path.basename(d)))
    return pids


@pytest.mark.slow                                        # ~40 s
def test_signalled_job_is_requeued_and_resumes_bit_exact(tmp_path):
    steps = ["train.max_steps=8", "train.checkpoint_every=1", "train.seed=3"]
    _train([*SMOKE, *steps, f"hydra.run.dir={tmp_path / 'ref'}"])           # uninterrupted
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *SMOKE, *steps,
                             f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpts, deadline = sweep / "0" / "checkpoints", time.time() + 240
    while not (ckpts / "step_0000002").is_dir():                          # the job has saved at step 2
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    pids = _task_pids(sweep)
    assert len(pids) == 1
    os.kill(pids[0], cluster.preempt_signal())                           # as SLURM's --signal=USR2@delay
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(open(p).read() for p in glob.glob(str(sweep / ".submitit" / "*" / "*.err")) +
                   glob.glob(str(sweep / ".submitit" / "*" / "*.out")))
    assert "Requeued job" in logs and "saved step" in logs, logs[-3000:]
    stopped = int(logs.split("saved step ")[1].split()[0])
    assert 2 <= stopped < 8                                              # stopped mid-run, then resumed
    a, b = load_file(tmp_path / "ref" / "lcm.safetensors"), load_file(sweep / "0" / "lcm.safetensors")
    bits = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731
    assert a.keys() == b.keys() and all(bits(a[k]).equal(bits(b[k])) for k in a)
