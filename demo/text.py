"""The demo teacher's text encoder: a tiny open_clip tower pretrained to read demo captions.

SD's UNet reads a text encoder that CLIP pretraining taught to tell "a red circle on a blue
background" from "a blue circle on a red background". A frozen random tower cannot (the UNet of the
first demo teacher learnt shape and background near chance), so the demo tower gets a stand-in
for that pretraining: linear heads predict each content attribute of the caption (ground truth
from demo.world.parse_caption) from the features the UNet will see, i.e. ln_final of the last
block (layer "last", final_norm, as demo.arch.TEACHER_ARCH says), at every position from EOT on.
Under the causal mask those positions have read the whole caption, so every one of them names all
five attributes; the UNet's cross-attention can read any of them.

    L = mean over positions p >= EOT and attributes a of CE(W_a h_p + b_a, label_a)

    python -m demo.text --threads 1 --out outputs/demo2/text.safetensors     # ~1 min on 1 core
The heads are dropped; the tower is then frozen inside the teacher (demo.vae --text PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from demo.arch import TEACHER_ARCH
from demo.world import CONTENT, VOCAB, fixed_prompt_set, parse_caption, world_spec
from models.text import TextConditioner, tokenize

N_CAPTIONS = 920                                   # every valid content caption of the world

#----------------------------------------------------------------------------


def caption_batch(prompts: list[str], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens (B, 77), mask (B, 77) of positions >= EOT, labels (B, 5) in CONTENT order."""
    tokens = tokenize(prompts, pad_token_id)
    eot = tokens.argmax(dim=-1)                                         # EOT has the largest id
    mask = torch.arange(tokens.shape[1])[None, :] >= eot[:, None]
    labels = torch.tensor([[VOCAB[k].index(getattr(parse_caption(p), k)) for k in CONTENT] for p in prompts])
    return tokens, mask, labels


def attribute_logits(hidden: torch.Tensor, heads: nn.ModuleList) -> list[torch.Tensor]:
    """Per content attribute, logits (B, L, n_values) from hidden (B, L, C)."""
    return [head(hidden) for head in heads]


def pretrain_text(text_config: dict, steps: int = 400, batch: int = 128, lr: float = 3e-3, seed: int = 0,
                  log_every: int = 50) -> tuple[TextConditioner, dict[str, float]]:
    """Pretrain a one-tower TextConditioner on all demo captions; returns it and its accuracy per
    attribute (read at the EOT position and at the last position, over all 920 captions)."""
    torch.manual_seed(seed)
    text = TextConditioner(towers=[text_config], pooled_from=None)
    tower = text.towers[0]
    width = tower.config["width"]
    heads = nn.ModuleList(nn.Linear(width, len(VOCAB[k])) for k in CONTENT)
    tokens, mask, labels = caption_batch(fixed_prompt_set(N_CAPTIONS), tower.pad_token_id)
    opt = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, N_CAPTIONS, (batch,), generator=g)
        hidden, _ = tower(tokens[idx], return_pooled=False)                # (B, 77, C), ln_final'ed
        m = mask[idx]
        loss = sum(F.cross_entropy(lg[m], labels[idx, a][:, None].expand(m.shape)[m])
                   for a, lg in enumerate(attribute_logits(hidden, heads))) / len(CONTENT)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"text step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    text.eval().requires_grad_(False)
    return text, caption_accuracy(text, heads, tokens, labels)


@torch.no_grad()
def caption_accuracy(text: TextConditioner, heads: nn.ModuleList, tokens: torch.Tensor,
                     labels: torch.Tensor) -> dict[str, float]:
    """Head accuracy per attribute at EOT and at the last position (both must be right)."""
    hidden, _ = text.towers[0](tokens, return_pooled=False)
    eot = tokens.argmax(dim=-1)
    rows = torch.arange(len(tokens))
    out = {}
    for a, (k, lg) in enumerate(zip(CONTENT, attribute_logits(hidden, heads))):
        ok = (lg[rows, eot].argmax(-1) == labels[:, a]) & (lg[:, -1].argmax(-1) == labels[:, a])
        out[k] = ok.float().mean().item()
    return out


def save_text(text: TextConditioner, path: str, accuracy: dict[str, float] | None = None) -> None:
    """The tower (open_clip names, without the conditioner's `towers.0.` prefix) and its config."""
    meta = {"lcm.text_config": json.dumps(text.config), "world": json.dumps(world_spec()),
            "accuracy": json.dumps(accuracy or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = {k: v.contiguous() for k, v in text.towers[0].state_dict().items()}
    safetensors.torch.save_file(sd, path, metadata=meta)


def load_text(path: str) -> TextConditioner:
    """Inverse of save_text: a frozen one-tower TextConditioner."""
    with safetensors.safe_open(path, framework="pt") as f:
        cfg = json.loads((f.metadata() or {})["lcm.text_config"])
    text = TextConditioner(**cfg)
    text.towers[0].load_state_dict(safetensors.torch.load_file(path), strict=True)
    return text.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo2/text.safetensors")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    (tower_cfg,) = TEACHER_ARCH["text"]["towers"]
    text, acc = pretrain_text(tower_cfg, a.steps, lr=a.lr, seed=a.seed)
    print("caption accuracy (EOT and last position):", json.dumps(acc), flush=True)
    save_text(text, a.out, acc)
    print(a.out)


if __name__ == "__main__":
    main()
