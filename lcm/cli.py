"""What the two composition roots share on the command line: one-line messages for a config that
cannot run, and the `--help` knob listing rendered from the comments of the yaml files in conf/.

Plain Python only (no Hydra, no OmegaConf): the roots pass the composed config as a dict.
"""
import os
import re
import sys
from typing import Callable

# Example values named by the "is not set" messages (the released file names, as in the README).
EXAMPLE_CHECKPOINT = {
    "sd15": "/weights/v1-5-pruned-emaonly.safetensors",
    "sd21": "/weights/v2-1_768-ema-pruned.safetensors",
    "sdxl": "/weights/sd_xl_base_1.0.safetensors",
    "ssd1b": "/weights/SSD-1B.safetensors",
}
WHAT_IT_TAKES = {
    "data.root": ("a folder of images with a .txt caption beside each (or a metadata.jsonl)",
                  "/data/my_images"),
    "data.urls": ("webdataset tar shards: local paths, globs, brace lists {000..009}, pipe: commands or URLs", '"[/data/shards/*.tar]"'),
}

#----------------------------------------------------------------------------
# One-line messages for configs that cannot run (the roots print them and exit with code 2).

def missing_value_message(key: str, model_choice: str | None = None) -> str:
    """'<key> is not set: <what it takes>, e.g. <key>=<example>' for a mandatory (???) config value."""
    if key == "model.path":
        example = EXAMPLE_CHECKPOINT.get(model_choice or "", EXAMPLE_CHECKPOINT["sd15"])
        return (f"model.path is not set: point it at an original single-file checkpoint "
                f"(.safetensors or .ckpt), e.g. model.path={example}")
    if key in WHAT_IT_TAKES:
        what, example = WHAT_IT_TAKES[key]
        return f"{key} is not set: give {what}, e.g. {key}={example}"
    return f"{key} is not set: give it on the command line, e.g. {key}=..."


def cuda_message(device: str, cpu_overrides: str) -> str | None:
    """None if `device` can be used here; else one line naming the overrides that run on the CPU."""
    if not str(device).startswith("cuda"):
        return None
    import torch
    if torch.cuda.is_available():
        return None
    return (f"model.device={device} but CUDA is not available on this machine; "
            f"to run on the CPU add: {cpu_overrides}")

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError)   # a bad value or file: one line


def preflight_message(missing: list[str], model_choice: str | None, device: str, cpu_overrides: str) -> str | None:
    """Why a composed config cannot run, in one line (a mandatory ??? value unset, model.path first;
    CUDA asked for where there is none), or None."""
    if missing:
        return missing_value_message(sorted(missing, key=lambda k: (k != "model.path", k))[0], model_choice)
    return cuda_message(device, cpu_overrides)


def run_or_exit(prog: str, fn: Callable[[], object], debug: bool, errors: tuple = USER_ERRORS,
                hint: Callable[[Exception], str] | None = None) -> None:
    """fn(); a user error becomes `<prog>: error: <first line>` on stderr and exit code 2 (debug: raise)."""
    try:
        fn()
    except errors as e:
        if debug:
            raise
        msg = (str(e).splitlines() or [type(e).__name__])[0] + (hint(e) if hint else "")
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)

#----------------------------------------------------------------------------
# Config keys that moved: the objective's knobs to objective.*, validation to validation.*, the
# optimizer to its own group. An old key on the command line is a one-line error naming the new one.

RENAMED = {f"train.{k}": f"objective.{k}" for k in (
    "k", "w_min", "w_max", "w_fixed", "loss", "huber_c", "teacher_solver", "ema_decay", "w_embedding_dim",
    "p_uncond", "lora_scale", "train_text_encoder")} | {
    "train.lora_ema_decay": "objective.ema_decay (objective=lcf: objective.lora_ema_decay)",
    "train.validate_every": "validation.every", "train.val_prompts": "validation.prompts",
    "train.val_seeds": "validation.seeds", "train.val_steps": "validation.steps",
    "train.val_guidance": "validation.guidance", "train.val_teacher_steps": "validation.teacher_steps",
    "train.val_teacher_guidance": "validation.teacher_guidance", "train.val_metrics": "validation.metrics",
    "train.val_metric_options": "validation.metric_options", "train.betas": "optimizer.betas",
    "train.adam_eps": "optimizer.eps", "train.weight_decay": "optimizer.weight_decay",
    "train.optimizer": "the optimizer group (optimizer=adamw | optimizer=adamw8bit)",
    "train=lora_distill_sdxl": "train=lora_distill objective.w_min=3.0 (or experiment=sdxl_lcm_lora)",
    "train=lcf": "train=lora_distill (objective=lcf holds its ema_decay)"}


def renamed_key_message(args: list[str]) -> str | None:
    """A one-line error for the first command-line override that uses a moved key, else None."""
    for a in args:
        key = a.lstrip("+~").split("=", 1)[0]
        for old, new in RENAMED.items():
            if (a.lstrip("+~").startswith(old + ".") or (("=" in old) and a.lstrip("+~") == old)
                    or ("=" not in old and key == old)):
                return f"{old} was renamed: use {new} (README, python train.py --help)"
    return None


#----------------------------------------------------------------------------
# yaml comments -> meanings. The config files are the source of truth: a key's meaning is the
# trailing `# ...` of its line, else the comment line right above it. Hydra drops comments, so the
# files are read here line by line (block mappings; flow values and list items are values).

KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w\-+/@]*)\s*:(?:\s|$)(.*)$")


def split_comment(text: str) -> tuple[str, str]:
    """'value  # comment' -> ('value', 'comment'), ignoring '#' inside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


class YamlNotes:
    """What one config file says about itself: package, header, key meanings, defaults entries."""

    def __init__(self, path: str):
        self.package: str | None = None               # from a '# @package' line
        self.header = ""                              # first line of the comment block opening the file
        self.meanings: dict[str, str] = {}            # dotted key (in the file) -> meaning
        self.defaults: list[tuple[str, str, str]] = []  # (group, option, meaning) of its defaults list
        stack: list[tuple[int, str]] = []             # (indent, key) of the enclosing mappings
        above, in_defaults, seen_key = "", False, False
        last, last_indent = None, 0                   # the last key with a trailing comment, its indent
        with open(path) as f:
            lines = f.read().splitlines()
        for line in lines:
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if not stripped:
                above, last = "", None
                continue
            if stripped.startswith("#"):
                text = stripped.lstrip("#").strip()
                if text.startswith("@package"):
                    self.package = text.split()[1] if len(text.split()) > 1 else None
                elif last is not None and indent > last_indent + 4:   # a wrapped trailing comment
                    self.meanings[last] += " " + text
                elif not seen_key:
                    self.header = self.header or text
                else:
                    above = text
                continue
            seen_key, last = True, None
            if stripped.startswith("- "):             # a list item: a defaults entry, else a value
                if in_defaults:
                    entry, meaning = split_comment(stripped[2:])
                    group, _, option = entry.removeprefix("override ").strip().partition(":")
                    self.defaults.append((group.strip().lstrip("/"), option.strip(), meaning))
                above = ""
                continue
            m = KEY_LINE.match(line)
            if not m:
                above = ""
                continue
            while stack and stack[-1][0] >= indent:
                stack.pop()
            key = m.group(2)
            in_defaults = indent == 0 and key == "defaults"
            _, meaning = split_comment(m.group(3))
            dotted = ".".join([k for _, k in stack] + [key])
            if key not in ("defaults", "_target_") and (meaning or above):
                self.meanings[dotted] = meaning or above
            if meaning:
                last, last_indent = dotted, indent
            stack.append((indent, key))
            above = ""


def config_files(conf_dir: str, config_name: str, choices: dict) -> list[tuple[str, str]]:
    """(yaml path, package prefix) of every file composing the config, in comment-precedence order:
    group options, then the primary config, then files in the global package (experiments)."""
    groups, globals_ = [], []

    def add(group: str, option: str, seen: tuple = ()):
        path = os.path.join(conf_dir, group, f"{option}.yaml")
        if option in (None, "", "null") or not os.path.isfile(path) or path in seen:
            return
        notes = YamlNotes(path)
        for g, o, _ in notes.defaults:                # a same-group parent (experiment: `- smoke`)
            if not o and g != "_self_":
                add(group, g, seen + (path,))
        pkg = group.replace("/", ".") if notes.package in (None, "_group_") else notes.package
        (globals_ if pkg == "_global_" else groups).append((path, "" if pkg == "_global_" else pkg))

    for group, option in choices.items():
        if not group.startswith("hydra"):
            add(group, option)
    return groups + [(os.path.join(conf_dir, f"{config_name}.yaml"), "")] + globals_


def all_meanings(files: list[tuple[str, str]]) -> dict[str, str]:
    """Dotted key -> meaning over all files; a later file's comment wins."""
    out = {}
    for path, prefix in files:
        for key, meaning in YamlNotes(path).meanings.items():
            out[f"{prefix}.{key}" if prefix else key] = meaning
    return out

#----------------------------------------------------------------------------
# Rendering: `key: default  # meaning`, nested mappings indented, long lists one item a line.

YAML_WORDS = ("null", "true", "false", "~", "yes", "no", "on", "off")   # read as non-strings
PLAIN = re.compile(r"^[^\s'\"#&*!|>%@`,\[\]{}:-][^#:]*$|^\$\{.*\}.*$")


def flow(value) -> str:
    """A value in yaml flow style, on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    s = str(value)
    if s and PLAIN.match(s) and s.strip() == s and s.lower() not in YAML_WORDS:
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_knobs(config: dict, meanings: dict[str, str], prefix: str = "", indent: int = 0,
                 column: int = 40, width: int = 100) -> list[str]:
    """Lines `key: default  # meaning` for a nested config dict (defaults unresolved, as written)."""
    lines = []
    for key, value in config.items():
        if key in ("_target_", "_convert_"):          # the class a group builds: not a knob
            continue
        dotted = f"{prefix}{key}"
        head = " " * indent + f"{key}:"
        meaning = meanings.get(dotted, "")
        nested = isinstance(value, dict) and value
        text = head if nested else f"{head} {flow(value)}"
        block = isinstance(value, list) and value and len(text) > width
        if block:
            text = head
        if meaning:
            text = f"{text.ljust(column)}  # {meaning}" if len(text) < column + 30 else f"{text}  # {meaning}"
        lines.append(text)
        if nested:
            lines += render_knobs(value, meanings, dotted + ".", indent + 2, column, width)
        elif block:
            lines += [" " * (indent + 2) + f"- {flow(v)}" for v in value]
    return lines


def render_groups(conf_dir: str, config_name: str, choices: dict) -> list[str]:
    """Per config group of the primary's defaults: `group=choice  # meaning`, its options, and the
    first header line of the chosen file."""
    lines = []
    for group, _, meaning in YamlNotes(os.path.join(conf_dir, f"{config_name}.yaml")).defaults:
        folder = os.path.join(conf_dir, group)
        if group.startswith("hydra") or not os.path.isdir(folder):
            continue
        options = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
        choice = choices.get(group)
        head = f"{group}={flow(choice)}"
        lines.append(f"{head.ljust(40)}  # {meaning}" if meaning else head)
        lines.append(f"    one of: {', '.join(options)}")
        chosen = os.path.join(folder, f"{choice}.yaml")
        if os.path.isfile(chosen) and YamlNotes(chosen).header:
            lines.append(f"    {choice}: {YamlNotes(chosen).header}")
    return lines


def help_text(conf_dir: str, root: dict) -> str:
    """The --help body from the composed config (with its `hydra` node, unresolved): the config
    groups in effect, then every knob with its default and meaning."""
    config = {k: v for k, v in root.items() if k != "hydra"}
    config_name, choices = root["hydra"]["job"]["config_name"], root["hydra"]["runtime"]["choices"]
    files = config_files(conf_dir, config_name, choices)
    groups = render_groups(conf_dir, config_name, choices)
    out = ["Config groups (group=option; the choice shown is the one in effect):", *groups, ""] if groups else []
    out += ["Knobs (key: default  # meaning; defaults as written, ${...} resolved at run time):",
            *render_knobs(config, all_meanings(files))]
    return "\n".join(out)
