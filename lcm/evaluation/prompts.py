"""Evaluation prompt sets: a .txt (one caption a line), a .jsonl (field "caption" or "text"), or a
registered name (e.g. the demo world's fixed set, registered by demo/metrics.py); n prompts,
each with `seeds_per_prompt` images. Image i of the set has seed `seed + i`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

SOURCES: dict[str, Callable[[int], list[str]]] = {}     # name -> fn(n) -> the first n captions


def register_prompt_source(name: str, fn: Callable[[int], list[str]]) -> None:
    SOURCES[name] = fn


@dataclasses.dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]                  # one per image (a prompt repeated seeds_per_prompt times)
    seed: int                                 # image i has seed + i
    per_prompt: int = 1                       # seeds_per_prompt: image i shows prompt i // per_prompt

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_prompts(self) -> int:
        return len(self.prompts) // self.per_prompt

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(len(self.prompts))]


def read_captions(path: str) -> list[str]:
    """Captions of a .txt (non-empty lines) or .jsonl (each line an object with caption or text)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts={path}: no such file (a .txt, a .jsonl, or one of: "
                                f"{', '.join(sorted(SOURCES)) or 'no registered sets'})")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if path.endswith(".jsonl"):
        out = []
        for i, ln in enumerate(lines):
            try:
                row = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
            text = row.get("caption", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i + 1}: a .jsonl line needs a string field caption or text")
            out.append(text)
        return out
    return lines


def load_prompts(source: str, n: int | None, seeds_per_prompt: int = 1, seed: int = 0) -> PromptSet:
    """The first n captions of `source` (a file or a registered name), each seeds_per_prompt times."""
    if int(seeds_per_prompt) < 1:
        raise ValueError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    if source in SOURCES:
        if n is None:
            raise ValueError(f"prompts={source} needs n_prompts")
        caps = list(SOURCES[source](int(n)))
    else:
        caps = read_captions(str(source))[:None if n is None else int(n)]
    if not caps:
        raise ValueError(f"prompts={source}: no captions")
    if n is not None and len(caps) < int(n):
        raise ValueError(f"prompts={source} holds {len(caps)} captions, fewer than n_prompts={n}")
    return PromptSet(tuple(c for c in caps for _ in range(int(seeds_per_prompt))), int(seed), int(seeds_per_prompt))
