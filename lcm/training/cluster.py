"""Runs launched by Hydra's submitit launcher (hydra/launcher=slurm | submitit_local) and Optuna sweeps.

A submitit job resumes its run dir's newest checkpoint if there is one (a requeued job continues, a new one
starts fresh). SLURM sends submitit's signal (USR2, `signal_delay_s` before the time limit; SIGTERM on
preemption) to every task: the loop saves and stops, then the job hands over to submitit's own handler,
which pickles the launcher's checkpoint() (a DelayedSubmission of the same job), requeues it and exits.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal

log = logging.getLogger(__name__)


def submitit_job() -> bool:
    """Inside a job started by submitit (its executor exports SUBMITIT_EXECUTOR=slurm | local)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def preempt_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def launcher_resume(resume):
    """resume=false in a submitit job means 'latest if any': the requeued job finds the checkpoint its
    signal made; a first start finds none and starts fresh. Any other resume= is kept."""
    if submitit_job() and resume in (False, None, "false"):
        return True
    return resume


def requeue_if_stopped(result: dict) -> None:
    """A submitit job the loop stopped on a signal (after saving): let submitit requeue it. Its handler of
    preempt_signal() is back in place once train() returned; on rank > 0 it returns, on rank 0 it requeues
    (SLURM: scontrol requeue; local executor: exit code 144, restarted by its controller) and exits."""
    if submitit_job() and result.get("status") == "terminated":
        log.warning("stopped by a signal in a submitit job: requeueing (the next start resumes step %d)",
                    result["step"])
        signal.raise_signal(preempt_signal())


def sweep_name() -> str | None:
    """The sweep folder's name in a Hydra multirun (e.g. outputs/sweep/psi_k -> psi_k), else None: the wandb
    group of the sweep's jobs (train.py sets logger.group to it unless given)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    return os.path.basename(os.path.normpath(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None


def overrides() -> list[str]:
    """This job's command-line overrides (logged as config, so a sweep's runs say what differs)."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task)


BOOKKEEPING = ("train.seed=", "resume=", "hydra.", "logger", "train.checkpoint_every=", "train.keep_checkpoints=",
               "debug=")


def configuration(overrides: list[str]) -> str:
    """A run's configuration: its command-line overrides without the training seed and bookkeeping, so
    the jobs of a seed x configuration sweep that differ only in train.seed share it (logged as the
    wandb config field `configuration`, beside `seed`, for wandb's grouping; read by demo.sweep)."""
    return " ".join(sorted(o.lstrip("+~") for o in overrides or [] if not o.lstrip("+~").startswith(BOOKKEEPING)))


def objective_value(run_dir: str, metric: str = "loss") -> float:
    """What a sweep's job returns (Optuna optimises it): the last value of `metric` in the run's
    metrics.jsonl, else the last logged loss (e.g. the metric is a validation one and validation was off),
    else NaN (Optuna records a failed trial)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.isfile(path) else []
    for key in dict.fromkeys((metric, "loss")):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            if key != metric:
                log.warning("optimize.metric=%s was never logged in %s; returning the last loss", metric, path)
            return float(values[-1])
    return math.nan


class MakeSweepDir:
    """A Hydra callback (hydra.callbacks) creating hydra.sweep.dir when a multirun starts, before the Optuna
    sweeper opens its sqlite storage there. Duck-typed, so this module (the loop imports it) needs no hydra."""

    def on_multirun_start(self, config, **kwargs) -> None:
        os.makedirs(str(config.hydra.sweep.dir), exist_ok=True)

    def __getattr__(self, name: str):                      # Hydra's other hooks (on_job_start, ...): nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)
