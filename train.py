"""Composition root for training: compose the Hydra config, build the model and data, call the trainer.

    python train.py experiment=smoke                 # tiny model + bundled images, CPU, seconds
    python train.py model=sd15 model.path=/m.safetensors data=folder data.root=/imgs
    python train.py -m train.k=1,5,20,50             # a sweep, one run dir per job
    torchrun --nproc_per_node=2 train.py ...         # DDP (gloo on CPU); rank 0 logs and saves
    python train.py hydra.run.dir=<run> resume=true  # continue a run from its newest checkpoint
    python train.py task=encode ... encode.out=/c    # the latent cache of data= (then data=latents data.urls=/c)
"""
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lcm.cli import USER_ERRORS, help_text, missing_value_message, preflight_message, run_or_exit

log = logging.getLogger("train")
DTYPES = ("float32", "float16", "bfloat16")
ARCH_KEYS = ("family", "text_family", "unet", "vae", "text", "default_size", "randomize")
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


def build_pipeline(model: dict, loras: list | None = None):
    """A Pipeline from an original checkpoint (model.path) or from architecture kwargs (no path), with
    `loras` (paths or {path, scale, name}; default: model.lora) loaded frozen."""
    import torch

    from lcm.pipeline import Pipeline
    if model.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {model['dtype']!r}")
    dtype = getattr(torch, model.get("dtype", "float32"))
    if model.get("path") == "???":
        raise ValueError(missing_value_message("model.path"))
    if model.get("path"):
        pipe = Pipeline.from_checkpoint(model["path"], device="cpu", dtype=dtype,
                                        prediction_type=model.get("prediction_type"))
    else:
        missing = [k for k in ("family", "unet", "vae", "text") if not model.get(k)]
        if missing:
            raise ValueError(f"model.path is not set, so the model is built from its architecture, but "
                             f"model.{missing[0]} is missing: set model.path=/path/to/model.safetensors "
                             "or give model.family/unet/vae/text (see conf/experiment/smoke.yaml)")
        pipe = Pipeline.from_architecture(**{k: model[k] for k in ARCH_KEYS if k in model}, dtype=dtype,
                                          prediction_type=model.get("prediction_type"),
                                          seed=int(model.get("seed", 0)))
    pipe.load_loras(model.get("lora") if loras is None else loras)
    for p in [*pipe.unet.parameters(), *pipe.vae.parameters(), *pipe.text.parameters()]:
        p.requires_grad_(False)
    return pipe


def run_dir_of(dist) -> str:
    """One output dir for all processes: Hydra's dir on rank 0, broadcast to the others."""
    from hydra.core.hydra_config import HydraConfig
    path = [os.path.abspath(HydraConfig.get().runtime.output_dir)]
    if dist.world > 1:
        import torch.distributed as td
        td.broadcast_object_list(path, src=0)
    return path[0]


def train_config(train: dict):
    """The loop's TrainConfig from cfg.train; the rest of cfg.train are the objective's knobs, which
    conf/objective/*.yaml reads as ${train.<key>} (so train.k etc. work as documented)."""
    from dataclasses import fields

    from lcm.training.loop import TrainConfig
    return TrainConfig(**{f.name: train[f.name] for f in fields(TrainConfig) if f.name in train})


def sweep_name() -> str | None:
    """The sweep folder's name in a Hydra multirun (e.g. outputs/sweep/psi_k -> psi_k), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hc = HydraConfig.get()
    return os.path.basename(os.path.normpath(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None


def overrides() -> list[str]:
    """This job's command-line overrides (logged as config, so a sweep's runs say what differs)."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task)


def instantiate(node):
    """hydra.utils.instantiate, with a constructor's own error (e.g. a bad train.loss) raised as is."""
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
    from lcm.training.distributed import init_distributed
    from lcm.training.loop import train
    dist = init_distributed(cfg.model.device)
    run_dir = run_dir_of(dist)
    config = OmegaConf.to_container(cfg, resolve=True)
    objective = instantiate(cfg.objective)
    pipe = build_pipeline(config["model"], config.get("lora"))
    if (config.get("vae") or {}).get("tiny"):             # validation decodes with TAESD (training encodes with the VAE)
        pipe.load_tiny_vae(config["vae"]["tiny"])
    data = build_data(cfg, pipe)
    tcfg = train_config(config["train"])
    logger = instantiate(cfg.logger)
    sweep = sweep_name()
    if sweep and logger.group is None:                    # a multirun: its jobs are one wandb group
        logger.group = sweep
    config["overrides"] = overrides()
    if tcfg.val_prompts is None and config["model"].get("prompts"):
        tcfg.val_prompts = list(config["model"]["prompts"])
    result = train(pipe, data, tcfg, run_dir, objective, logger, cfg.resume, config, dist,
                   save_base=not config["model"].get("path"))
    if dist.rank == 0:
        print(result["export"] if result["status"] == "done" else f"stopped at step {result['step']}: {run_dir}")
    return result


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    def job():
        preflight(cfg)
        if cfg.get("task", "train") not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
        encode_task(cfg) if cfg.get("task") == "encode" else run(cfg)
    hint = lambda e: f" (set it on the command line, e.g. {e.full_key}=...)" if isinstance(e, MissingMandatoryValue) else ""  # noqa: E731
    run_or_exit("train.py", job, cfg.debug, USER_ERRORS + (TypeError, MissingMandatoryValue), hint)


if __name__ == "__main__":
    if int(os.environ.get("RANK", 0)) > 0:       # one run dir, chosen on rank 0 (hydra#2070)
        sys.argv += ["hydra.run.dir=.", "hydra/job_logging=stdout"]
    OmegaConf.register_new_resolver("knobs", knobs)
    main()
