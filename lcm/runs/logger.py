"""The run's resolved config, metrics.jsonl and wandb (rank 0 only); the config as shared files record it
(credentials redacted, paths as file names)."""
from __future__ import annotations

import json
import logging
import ntpath
import os
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def write_config(run_dir: str, config: dict) -> None:
    """The resolved config (credentials redacted), written once per run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(redact(config), f, indent=1)


WANDB_FILE = "wandb_run.json"         # the wandb run a run dir logged to (id, project, group, mode)


@dataclass
class LoggerConfig:
    mode: str = "offline"               # online | offline | disabled (env WANDB_MODE wins)
    project: str = "lcm-lora"
    entity: str | None = None
    name: str | None = None
    tags: list = field(default_factory=list)
    group: str | None = None            # wandb group; a Hydra multirun defaults it to the sweep folder's name


class RunLogger:
    def __init__(self, run_dir: str, cfg: LoggerConfig, config: dict, run_id: str | None):
        self.path, self.wandb = os.path.join(run_dir, "metrics.jsonl"), None
        mode = os.environ.get("WANDB_MODE") or cfg.mode
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        if mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags),
                                    group=cfg.group, dir=run_dir, mode=mode, id=run_id,
                                    resume="allow" if run_id else None, config=redact(config))
            self.wandb.define_metric("*", step_metric="step")   # our step axis; wandb's own stays monotonic
            with open(os.path.join(run_dir, WANDB_FILE), "w") as f:   # lets later tools add to this run
                json.dump(dict(id=self.wandb.id, project=cfg.project, entity=cfg.entity, group=cfg.group,
                               mode=mode), f)
        self.run_id = self.wandb.id if self.wandb is not None else run_id

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({"step": step, **metrics})

    def image(self, key: str, path: str, step: int, caption: str) -> None:
        if self.wandb is not None:
            import wandb
            self.wandb.log({"step": step, key: wandb.Image(path, caption=caption)})

    def summary(self, metrics: dict) -> None:
        """Final figures of the run: wandb's run summary and <run_dir>/summary.json."""
        with open(os.path.join(os.path.dirname(self.path), "summary.json"), "w") as f:
            json.dump(metrics, f)
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def log_summary(run_dir: str, metrics: dict) -> bool:
    """Add final figures (e.g. an evaluation made after training) to the run's wandb summary, resuming
    the run it logged to (offline: a new offline segment of the same run id, merged by `wandb sync`).
    Returns False when the run did not log to wandb."""
    path = os.path.join(run_dir, WANDB_FILE)
    if not os.path.exists(path) or os.environ.get("WANDB_MODE") == "disabled":
        return False
    import wandb
    with open(path) as f:
        info = json.load(f)
    run = wandb.init(id=info["id"], project=info["project"], entity=info["entity"], group=info["group"],
                     dir=run_dir, mode=info["mode"], resume="allow")
    run.summary.update(metrics)
    run.finish()
    return True


def redact(config, keys=("token", "key", "secret", "password")):
    """A copy of a nested config with values of credential-like keys replaced by '***'."""
    if isinstance(config, dict):
        return {k: "***" if any(s in str(k).lower() for s in keys) and v else redact(v, keys)
                for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v, keys) for v in config]
    return config


#----------------------------------------------------------------------------
# Portable metadata: a file shared with others (an exported LoRA or model, a PNG, results.json) names
# files, never the directories of the machine it was made on.

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")                           # C:\... or C:/...
_EMBEDDED = re.compile(r"([=\[,]|: )(~?/(?!/)[^\s,\[\]{}'\"]+)")   # a path as an override's value or list item


def portable(config, roots: tuple[str, ...] = ()):
    """A copy of a nested config whose path strings are base names: absolute, ~ and Windows paths, paths
    relative to an existing file under cwd or `roots`, and paths given as `key=/path` or list items;
    any other mention of cwd, the checkout, home or a root (e.g. the run dir) loses that prefix."""
    dirs = {os.path.abspath(os.path.expanduser(d)).rstrip(os.sep)
            for d in (*roots, os.getcwd(), CHECKOUT, os.path.expanduser("~")) if d}
    return _portable(config, sorted((d for d in dirs if d), key=len, reverse=True))


def _portable(x, dirs: list[str]):
    if isinstance(x, dict):
        return {k: _portable(v, dirs) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_portable(v, dirs) for v in x]
    if not isinstance(x, str):
        return x
    if _is_path(x, dirs):
        return _base(x)
    x = _EMBEDDED.sub(lambda m: m.group(1) + _base(m.group(2)), x)
    for d in dirs:                                       # longest first: the run dir before the checkout
        x = x.replace(d + os.sep, "").replace(d, os.path.basename(d))
    return x


def _is_path(s: str, dirs: list[str]) -> bool:
    if "\n" in s or "://" in s or len(s) < 2:
        return False
    if s.startswith("/") or (s.startswith("~") and "/" in s) or _DRIVE.match(s):
        return True
    return "/" in s and any(os.path.exists(os.path.join(d, s)) for d in dirs)


def _base(path: str) -> str:
    if _DRIVE.match(path):
        return ntpath.basename(path.rstrip("\\/"))
    return os.path.basename(os.path.normpath(os.path.expanduser(path)))


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint (they will be logged again)."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(lines)
