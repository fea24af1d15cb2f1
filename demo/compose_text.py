"""The compose teacher's pretrained parts: both text towers read compose captions, the VAE's decoder knows
compose images, and the untrained teacher file that `train.py experiment=compose_teacher` starts from.

Text (CLIP pretraining's stand-in, as demo/text.py): linear heads predict every attribute of the caption
(shape, colour, size of both objects, in caption order, and the relation) from the features the UNet
will see, i.e. each tower's penultimate block output (no final norm: SDXL's choice, compose_arch.tower)
at every position from EOT on, and from the pooled vector (tower 1's projected EOT feature, which
reaches the UNet through label_emb). Only split="train" captions are used: the held-out
(shape, colour) pairs are never seen (their words are: each appears in other pairs).

    L = mean over towers, positions p >= EOT, columns a of CE(W_a h_p + b_a, label_a) + mean_a CE(pooled)

Word dropout: each size / colour / shape word is replaced by a filler ("some", "plain", "thing") with
probability word_drop, its column left out of the loss, so every attribute is read with its neighbours
unknown. Train captions are read 100% (seed 0, the saved towers). The held-out captions are NOT read
reliably: all 7 columns right (tower 0 / tower 1 / pooled) 49% / 17% / 19% for the saved towers, and
0-55% per head over seeds 0, 1 x word_drop 0, 0.25 (the unseen pair's shape or colour is read as a seen
one). Dropout helped a little on average (pooled 26% vs 12%, tower 0 25% vs 18%, tower 1 34% either way).

    python -m demo.compose_text --threads 1 text --steps 800 --out outputs/compose/text.safetensors    # ~8 min
    python -m demo.compose_text --threads 1 vae --steps 1500 --out outputs/compose/vae.safetensors --eval 256   # ~9 min
    python -m demo.compose_text --threads 1 base --text outputs/compose/text.safetensors \
        --vae outputs/compose/vae.safetensors --base-out outputs/compose/base_init.safetensors
The heads are dropped; the towers are frozen in the teacher. After training (conf/experiment/compose_teacher.yaml):

    python -m demo.compose_text bundle --from outputs/compose/teacher/model.safetensors --steps 16000

writes assets/compose_teacher.safetensors: every tensor in float16 (the file is 19 MB; the pipeline
computes in float32), the world spec back in the metadata, machine paths scrubbed, and `lcm.teacher_legs`:
the training legs so far (a leg continues from the bundled file, `model.path=` it, with a fresh optimizer).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from demo.compose import OBJECT_VOCAB, RELATIONS, fixed_prompt_set, parse_caption, world_spec
from demo.compose_arch import (DEMO_TEACHER, TEACHER_ARCH, finetune_decoder, load_vae, new_unet,
                               reconstruction_accuracy, save_teacher, save_vae)
from demo.compose_evaluator import COLUMNS
from models.text import TextConditioner, tokenize

VOCAB = {c: OBJECT_VOCAB[c[:-1]] if c != "relation" else RELATIONS for c in COLUMNS}   # caption order
FILLERS = {"size": "some", "colour": "plain", "shape": "thing"}                      # word dropout
IGNORE = -100                                       # a dropped word's label: left out of the loss
N_TRAIN, N_HELDOUT = 6240, 2784                      # every caption of each split (fixed_prompt_set cycles beyond)

#----------------------------------------------------------------------------
# Captions -> tokens per tower, the positions the heads read, labels.

def caption_labels(prompts: list[str]) -> torch.Tensor:
    """(B, 7) label indices in COLUMNS (caption) order."""
    return torch.tensor([[VOCAB[c].index(parse_caption(p).flat()[c]) for c in COLUMNS] for p in prompts])


def drop_words(prompts: list[str], p: float, g: torch.Generator) -> tuple[list[str], torch.Tensor]:
    """Captions with each size / colour / shape word replaced by its FILLERS word with probability p, and
    the (B, 7) mask of the replaced columns (COLUMNS order)."""
    drop = torch.rand(len(prompts), len(COLUMNS), generator=g) < p
    drop[:, COLUMNS.index("relation")] = False
    out = []
    for prompt, row in zip(prompts, drop.tolist()):
        w = {c: FILLERS[c[:-1]] if d else v for (c, v), d in zip(parse_caption(prompt).flat().items(), row)}
        out.append(f"a {w['size1']} {w['colour1']} {w['shape1']} {w['relation']} a {w['size2']} {w['colour2']} {w['shape2']}")
    return out, drop


def tower_tokens(prompts: list[str], text: TextConditioner) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per tower: tokens (B, 77) with its padding, and the mask (B, 77) of positions >= EOT."""
    out = []
    for t in text.towers:
        tokens = tokenize(prompts, t.pad_token_id, t.context_length)
        eot = tokens.argmax(dim=-1)                                   # EOT is the largest id (its first copy)
        out.append((tokens, torch.arange(tokens.shape[1])[None, :] >= eot[:, None]))
    return out


def make_heads(text: TextConditioner) -> nn.ModuleDict:
    """One linear head per column on each tower's features and on the pooled vector."""
    dims = {f"tower{i}": t.config["width"] for i, t in enumerate(text.towers)}
    dims["pooled"] = text.towers[text.pooled_from].config["proj_dim"]
    return nn.ModuleDict({k: nn.ModuleList(nn.Linear(d, len(VOCAB[c])) for c in COLUMNS) for k, d in dims.items()})


def features(text: TextConditioner, toks: list) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each tower's context features (B, 77, width) and the pooled vector (B, proj_dim)."""
    hidden, pooled = [], None
    for i, (t, (tokens, _)) in enumerate(zip(text.towers, toks)):
        h, p = t(tokens, return_pooled=i == text.pooled_from)
        hidden.append(h)
        pooled = p if i == text.pooled_from else pooled
    return hidden, pooled


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labels that are not IGNORE (0 if none is)."""
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / (labels != IGNORE).sum().clamp(min=1)


def heads_loss(text: TextConditioner, heads: nn.ModuleDict, toks: list, labels: torch.Tensor) -> torch.Tensor:
    """The pretraining loss (module docstring) of a batch; labels (B, 7), IGNORE where a word was dropped."""
    hidden, pooled = features(text, toks)
    loss = 0.0
    for i, (h, (_, mask)) in enumerate(zip(hidden, toks)):
        loss = loss + sum(_ce(head(h)[mask], labels[:, a, None].expand(mask.shape)[mask])
                          for a, head in enumerate(heads[f"tower{i}"])) / len(COLUMNS)
    return loss + sum(_ce(head(pooled), labels[:, a]) for a, head in enumerate(heads["pooled"])) / len(COLUMNS)

#----------------------------------------------------------------------------

def pretrain_towers(text_config: dict, steps: int = 800, batch: int = 128, lr: float = 3e-3, seed: int = 0,
                    word_drop: float = 0.25, n_captions: int = N_TRAIN, eval_n: int | None = None, log_every: int = 100
                    ) -> tuple[TextConditioner, nn.ModuleDict, dict[str, dict[str, float]]]:
    """Pretrain both towers (TextConditioner(**text_config)) on the first n_captions train captions; returns
    them frozen, the heads, and the accuracy per head set and column on eval_n (None: all) train and
    held-out captions."""
    torch.manual_seed(seed)
    text = TextConditioner(**text_config)
    heads = make_heads(text)
    prompts = fixed_prompt_set(n_captions, seed=0, split="train")
    labels = caption_labels(prompts)
    opt = torch.optim.AdamW([*text.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(prompts), (batch,), generator=g).tolist()
        captions, dropped = drop_words([prompts[i] for i in idx], word_drop, g)
        loss = heads_loss(text, heads, tower_tokens(captions, text), labels[idx].masked_fill(dropped, IGNORE))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"text step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    text.eval().requires_grad_(False)
    heads.eval().requires_grad_(False)
    acc = {split: caption_accuracy(text, heads, fixed_prompt_set(eval_n or n, seed=0, split=split))
           for split, n in (("train", N_TRAIN), ("heldout", N_HELDOUT))}
    return text, heads, acc


@torch.no_grad()
def caption_accuracy(text: TextConditioner, heads: nn.ModuleDict, prompts: list[str]) -> dict[str, dict[str, float]]:
    """Per head set (tower0, tower1: right at EOT and at the last position; pooled) and column: accuracy,
    plus 'all' (every column right)."""
    toks, labels = tower_tokens(prompts, text), caption_labels(prompts)
    hidden, pooled = features(text, toks)
    rows = torch.arange(len(prompts))
    out = {}
    for name, hs in heads.items():
        if name == "pooled":
            ok = torch.stack([hd(pooled).argmax(-1) == labels[:, a] for a, hd in enumerate(hs)], 1)
        else:
            i = int(name[-1])
            h, eot = hidden[i], toks[i][0].argmax(-1)
            ok = torch.stack([(hd(h[rows, eot]).argmax(-1) == labels[:, a]) & (hd(h[:, -1]).argmax(-1) == labels[:, a])
                              for a, hd in enumerate(hs)], 1)
        out[name] = {c: round(ok[:, a].float().mean().item(), 4) for a, c in enumerate(COLUMNS)}
        out[name]["all"] = round(ok.all(1).float().mean().item(), 4)
    return out


def save_towers(text: TextConditioner, path: str, accuracy: dict | None = None) -> None:
    """Both towers (TextConditioner names: towers.0.*, towers.1.*) with their config and the world."""
    meta = {"lcm.text_config": json.dumps(text.config), "world": json.dumps(world_spec()),
            "accuracy": json.dumps(accuracy or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in text.state_dict().items()}, path, metadata=meta)


def load_towers(path: str) -> tuple[TextConditioner, dict]:
    """Inverse of save_towers: the frozen TextConditioner and the accuracy it was saved with."""
    with safetensors.safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "lcm.text_config" not in meta or json.loads(meta.get("world", "{}")) != json.loads(json.dumps(world_spec())):
        raise ValueError(f"{path} is not a compose-world text file of this version (demo/compose.py changed?): "
                         "rerun `python -m demo.compose_text text`")
    text = TextConditioner(**json.loads(meta["lcm.text_config"]))
    text.load_state_dict(safetensors.torch.load_file(path), strict=True)
    return text.eval().requires_grad_(False), json.loads(meta.get("accuracy", "{}"))

#----------------------------------------------------------------------------

def bundle_teacher(source: str, out: str, steps: int) -> str:
    """source's tensors in float16 with portable metadata and the training legs so far: a file that
    continues training (model.path=out) appends its leg to the legs of the file it started from."""
    from demo.scrub import scrub_metadata
    with safetensors.safe_open(source, "pt") as f:
        meta = dict(f.metadata() or {})
    start = json.loads(meta.get("lcm.train_config", "{}")).get("model", {}).get("path", "")
    legs = []
    if os.path.basename(start) == os.path.basename(out) and os.path.isfile(out):
        with safetensors.safe_open(out, "pt") as f:
            legs = json.loads((f.metadata() or {}).get("lcm.teacher_legs", "[]"))
    legs.append({"steps": steps, "from": os.path.basename(start)})
    state = {k: v.half() if v.is_floating_point() else v for k, v in safetensors.torch.load_file(source).items()}
    meta = scrub_metadata(meta) | {"world": json.dumps(world_spec()), "lcm.teacher_legs": json.dumps(legs)}
    tmp = out + ".tmp"
    safetensors.torch.save_file(state, tmp, metadata=meta)
    os.chmod(tmp, 0o644)                                  # a bundled asset: readable by everyone
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("text", help="pretrain both towers on the train captions")
    t.add_argument("--out", default="outputs/compose/text.safetensors")
    t.add_argument("--steps", type=int, default=800)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--word-drop", type=float, default=0.25, help="probability of replacing an attribute word")
    v = sub.add_parser("vae", help="the demo teacher's VAE: fine-tune its decoder on compose images, evaluate it")
    v.add_argument("--from", dest="source", default=DEMO_TEACHER, help="a model file or a VAE file")
    v.add_argument("--out", default="outputs/compose/vae.safetensors")
    v.add_argument("--steps", type=int, default=1500, help="decoder steps (0: evaluate only)")
    v.add_argument("--lr", type=float, default=5e-4)
    v.add_argument("--eval", type=int, default=256, help="reconstructed real images scored by the compose evaluator")
    b = sub.add_parser("base", help="write the untrained teacher: random-init UNet + VAE + towers")
    b.add_argument("--text", required=True)
    b.add_argument("--vae", default=DEMO_TEACHER)
    b.add_argument("--base-out", default="outputs/compose/base_init.safetensors")
    b.add_argument("--seed", type=int, default=0)
    u = sub.add_parser("bundle", help="the trained teacher as the bundled asset (float16, portable metadata)")
    u.add_argument("--from", dest="source", required=True, help="the run's model.safetensors (or a checkpoint's)")
    u.add_argument("--out", default=os.path.join(os.path.dirname(DEMO_TEACHER), "compose_teacher.safetensors"))
    u.add_argument("--steps", type=int, required=True, help="optimizer steps of this leg")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.cmd == "bundle":
        print(bundle_teacher(a.source, a.out, a.steps))
        return
    if a.cmd == "text":
        text, _, acc = pretrain_towers(TEACHER_ARCH["text"], a.steps, lr=a.lr, seed=a.seed, word_drop=a.word_drop)
        print("caption accuracy:", json.dumps(acc), flush=True)
        save_towers(text, a.out, acc)
        print(a.out)
    elif a.cmd == "vae":
        vae = load_vae(a.source)
        if a.eval:
            for split in ("train", "heldout"):
                print(f"before ({split}):", json.dumps(reconstruction_accuracy(vae, a.eval, split=split)), flush=True)
        if a.steps:
            vae = finetune_decoder(vae, a.steps, lr=a.lr)
            acc = {s: reconstruction_accuracy(vae, a.eval, split=s) for s in ("train", "heldout")} if a.eval else {}
            print("after:", json.dumps(acc), flush=True)
            save_vae(vae, a.out, {"reconstruction_accuracy": json.dumps(acc)})
            print(a.out)
    else:
        text, acc = load_towers(a.text)
        unet = new_unet(TEACHER_ARCH, a.seed)
        save_teacher(a.base_out, unet, load_vae(a.vae), text, TEACHER_ARCH, {"text_accuracy": json.dumps(acc)})
        print(a.base_out)


if __name__ == "__main__":
    main()
