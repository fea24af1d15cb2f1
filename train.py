"""Composition root for training: compose the Hydra config, build the model and data, call the trainer.

    python train.py experiment=smoke                 # tiny model + bundled images, CPU, seconds
    python train.py model=sd15 model.path=/m.safetensors data=folder data.root=/imgs
    python train.py -m objective.k=1,5,20,50         # a sweep, one run dir per job
    torchrun --nproc_per_node=2 train.py ...         # DDP (gloo on CPU); rank 0 logs and saves
    python train.py hydra.run.dir=<run> resume=true  # continue a run from its newest checkpoint
    python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu ...   # SLURM jobs, requeued on time-out
    python train.py -m hparams_search=demo_lora experiment=demo_lcm_lora       # Optuna; returns optimize.metric
    python train.py task=encode ... encode.out=/c    # the latent cache of data= (then data=latents data.urls=/c)
"""
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lcm.cli import USER_ERRORS, help_text, preflight_message, renamed_key_message, run_or_exit
from lcm.sampling.build import build_pipeline
from lcm.training.distributed import slurm_env

log = logging.getLogger("train")
CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
CPU_OVERRIDES = "model.device=cpu model.dtype=float32 train.mixed_precision=no"
TASKS = ("train", "encode")


def preflight(cfg: DictConfig) -> None:
    """One-line errors before anything is built: a mandatory (???) value unset, CUDA where there is none."""
    from hydra.core.hydra_config import HydraConfig
    if msg := preflight_message(OmegaConf.missing_keys(cfg), HydraConfig.get().runtime.choices.get("model"),
                                cfg.model.get("device", "cpu"), CPU_OVERRIDES):
        raise ValueError(msg)


def knobs(*, _root_: DictConfig) -> str:
    """Resolver for the --help template (conf/hydra/help/train.yaml): every knob with its yaml comment."""
    text = help_text(CONF, OmegaConf.to_container(_root_, resolve=False))
    return text.replace("$", "$$")                    # the template then goes through string.Template


def run_dir_of(dist) -> str:
    """One output dir for all processes: Hydra's dir on rank 0, broadcast to the others."""
    from hydra.core.hydra_config import HydraConfig
    path = [os.path.abspath(HydraConfig.get().runtime.output_dir)]
    if dist.world > 1:
        import torch.distributed as td
        td.broadcast_object_list(path, src=0)
    return path[0]


def train_config(train: dict):
    """The loop's TrainConfig from cfg.train (the objective's knobs are cfg.objective)."""
    from lcm.training.loop import TrainConfig
    return TrainConfig(**train)


def validation_config(validation: dict, model: dict):
    """cfg.validation; its prompts default to the model preset's."""
    from lcm.training.validation import ValidationConfig
    v = ValidationConfig(**validation)
    if v.prompts is None and model.get("prompts"):
        v.prompts = list(model["prompts"])
    return v


def optimizer_factory(cfg: DictConfig):
    """cfg.optimizer (a Hydra _partial_): params, lr -> optimizer; a missing package is a one-line error."""
    target = cfg.optimizer.get("_target_", "")
    module = target.split(".")[0]
    import importlib.util
    if module and importlib.util.find_spec(module) is None:
        raise ValueError(f"optimizer={group_choice('optimizer')} needs the package {module} "
                         f"(pip install {module}); or use optimizer=adamw")
    return instantiate(cfg.optimizer)


def group_choice(group: str) -> str:
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get().runtime.choices.get(group)


def instantiate(node):
    """hydra.utils.instantiate, with a constructor's own error (e.g. a bad objective.loss) raised as is."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as _instantiate
    try:
        return _instantiate(node, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise e.__cause__ from None
        raise


def build_data(cfg: DictConfig, pipe):
    """The dataset data= names (indexed or streamed, lcm/data/); data=latents checked against the model."""
    from lcm.data.encode import check_latents
    data = instantiate(cfg.data)
    check_latents(data, pipe)
    return data


def encode_task(cfg: DictConfig) -> dict:
    """task=encode: write the VAE moments and text embeddings of data= into encode.out (lcm/data/encode.py).
    Under torchrun rank r encodes units r, r + world, ... (no process group: ranks never wait on each
    other); whichever rank finishes last writes manifest.json."""
    import torch

    from lcm.data.encode import encode, finish
    out = cfg.encode.get("out")
    if not out:
        raise ValueError("encode.out is not set: give a folder for the latent shards, e.g. encode.out=/data/latents")
    out = os.path.abspath(out)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(cfg.model.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    config = OmegaConf.to_container(cfg, resolve=True)
    pipe = build_pipeline(config["model"], config.get("lora"))
    data = instantiate(cfg.data)
    enc, train = config["encode"], config["train"]
    stats = encode(pipe, data, out, rank=rank, world=world, device=device, shard_size=int(enc["shard_size"]),
                   batch_size=int(enc["batch_size"]), vae_chunk=int(train.get("vae_chunk", 0)),
                   mixed_precision=train.get("mixed_precision", "no"), dtype=enc.get("dtype"),
                   overwrite=bool(enc.get("overwrite")))
    log.info("rank %d encoded %d units (%d samples, %d skipped, %d kept) in %.1f s", rank, stats["units"],
             stats["samples"], stats["skipped"], stats["kept"], stats["seconds"])
    if finish(out, data, pipe, int(enc["shard_size"]), enc.get("dtype"), config["model"].get("path")) is not None:
        print(os.path.join(out, "manifest.json"))
    else:
        print(f"rank {rank}: done; other ranks are still writing units (the last to finish writes manifest.json)")
    return stats


def run(cfg: DictConfig) -> dict:
    """Build everything the config names and train; returns the trainer's summary."""
    from lcm.training import cluster
    from lcm.training.distributed import init_distributed
    from lcm.training.loop import train
    dist = init_distributed(cfg.model.device)
    run_dir = run_dir_of(dist)
    config = OmegaConf.to_container(cfg, resolve=True)
    objective = instantiate(cfg.objective)
    pipe = build_pipeline(config["model"], config.get("lora"),    # validation decodes with vae.tiny if given
                          tiny=(config.get("vae") or {}).get("tiny") or None)
    data = build_data(cfg, pipe)
    tcfg = train_config(config["train"])
    vcfg = validation_config(config["validation"], config["model"])
    logger = instantiate(cfg.logger)
    sweep = cluster.sweep_name()
    if sweep and logger.group is None:                    # a multirun: its jobs are one wandb group
        logger.group = sweep
    config["overrides"] = cluster.overrides()
    config["configuration"] = cluster.configuration(config["overrides"])   # wandb groups seeds by it
    config["seed"] = tcfg.seed
    resume = cluster.launcher_resume(cfg.resume)          # a submitit job: its latest checkpoint, if any
    result = train(pipe, data, tcfg, run_dir, objective, logger, resume, config, dist,
                   save_base=not config["model"].get("path"), validation=vcfg, optimizer=optimizer_factory(cfg))
    cluster.requeue_if_stopped(result)                    # a submitit job stopped by SLURM's signal: requeued
    metric = OmegaConf.select(cfg, "optimize.metric", default="loss")    # what a sweep optimises (optuna)
    result["value"] = cluster.objective_value(run_dir, metric) if dist.rank == 0 else None
    if dist.rank == 0:
        print(result["export"] if result["status"] == "done" else f"stopped at step {result['step']}: {run_dir}")
    return result


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    out = {}

    def job():
        preflight(cfg)
        if cfg.get("task", "train") not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
        out.update(encode_task(cfg) if cfg.get("task") == "encode" else run(cfg))
    hint = lambda e: f" (set it on the command line, e.g. {e.full_key}=...)" if isinstance(e, MissingMandatoryValue) else ""  # noqa: E731
    run_or_exit("train.py", job, cfg.debug, USER_ERRORS + (TypeError, MissingMandatoryValue), hint)
    return out.get("value")                               # rank 0 of a training run: optimize.metric's value


if __name__ == "__main__":
    if msg := renamed_key_message(sys.argv[1:]):
        print(f"train.py: error: {msg}", file=sys.stderr)
        sys.exit(2)
    os.environ.update(slurm_env(os.environ))    # `srun python train.py`: RANK etc. from SLURM's variables
    if int(os.environ.get("RANK", 0)) > 0:       # one run dir, chosen on rank 0 (hydra#2070)
        sys.argv += ["hydra.run.dir=.", "hydra/job_logging=stdout"]
    OmegaConf.register_new_resolver("knobs", knobs)
    main()
