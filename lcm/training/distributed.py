"""Process group set-up from torchrun's environment, or from SLURM's when srun started one process per task
(a `hydra/launcher=slurm` job: submitit runs `srun` with tasks_per_node = GPUs)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def all_min(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([float(x)], device=self.device)
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MIN)
        return t.item()

    def all_min_tensor(self, x: torch.Tensor) -> list[float]:
        """The elementwise minimum over ranks of a small device tensor, read to the host once."""
        t = x.detach().reshape(-1).float()
        if self.world > 1:
            torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MIN)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

#----------------------------------------------------------------------------
# SLURM -> torchrun's variables. Only inside an srun step (SLURM_STEP_ID set), so a plain `python train.py`
# in a batch script or salloc shell with --ntasks=8 stays one process instead of waiting for 7 peers.

def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: 'gpu[01-03,07],cpu5' -> 'gpu01', 'a1,b2' -> 'a1', 'n[9]' -> 'n9'."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot read the SLURM nodelist {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]   # zero padding kept


def slurm_port(job_id: str) -> int:
    """A rendezvous port from the job id: jobs sharing a node (an array's tasks) get different ports."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def slurm_env(env: dict) -> dict:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from SLURM's variables; {} when torchrun set
    them already or this is not a multi-task srun step. MASTER_ADDR/PORT given in env are kept."""
    if "RANK" in env or "SLURM_STEP_ID" not in env or int(env.get("SLURM_NTASKS", 1)) <= 1:
        return {}
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]),
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env["SLURM_JOB_ID"]))}


def init_distributed(device: str = "cpu") -> Dist:
    """Join the torchrun (or SLURM srun) process group if there is one (gloo on CPU, nccl on CUDA)."""
    os.environ.update(slurm_env(os.environ))
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)
