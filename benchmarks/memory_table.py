"""Per-GPU memory of the training state (weights, gradients, AdamW, EMA, teacher) from parameter counts:
LCM-LoRA vs full LCD, DDP vs FSDP (train.distributed=fsdp, lcm/training/fsdp.py), with and without
train.frozen_storage=bfloat16. No GPU, nothing allocated: the SD1.5 and SDXL UNets are built on the
meta device from the repo's presets (models.unet.UNET_PRESETS) and the LoRA injected as training does.

    python benchmarks/memory_table.py                 # N = 8 and 16 GPUs
    python benchmarks/memory_table.py --gpus 4 8 16 --rank 64

Model (bytes per parameter; P = UNet, P_s = student = P + the w-embedding, L = LoRA rank r):
- AdamW states fp32 (m, v: 8), gradients fp32 (4), trainables fp32 (4): the trainer's precision policy.
- frozen base / teacher: 4 (fp32) or 2 (train.frozen_storage=bfloat16 / float16).
- DDP replicates everything and keeps a second fp32 copy of the gradients in its buckets (4).
- LCM-LoRA (objective=lcd_lora, mu = 0 as the reference): one UNet = base + LoRA; no EMA
  (objective.ema_decay adds 4 L). DDP: s P + 20 L. DMD2-LoRA (objective=dmd2): one UNet = base + the
  generator's LoRA + the fake score's (same rank), each with its gradients and AdamW: s P + 40 L.
- full LCD (objective=lcd): student + gradients + AdamW + EMA target (4+4+8+4 = 20 P_s) + teacher s P.
  DDP: 24 P_s + s P. FSDP: (20 P_s + s P) / N sharded, plus the working set of the unit being run:
  its gathered parameters (bf16 under train.mixed_precision=bf16: 2) and unsharded gradients before
  the reduce-scatter (4), for it and the prefetched next unit: 2 x 6 x (largest unit).
- Not counted: activations (batch, resolution, train.gradient_checkpointing), the VAE and text
  encoders (SD1.5 ~0.6 GB, SDXL ~1.7 GB in fp16, replicated), CUDA context and allocator slack.
FSDP with a LoRA is not offered (lcm/training/loop.py refuses it); its column shows what it would be.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lcm.training.fsdp import blocks                                           # noqa: E402
from models import lora as lora_lib                                   # noqa: E402
from models.unet import UNET_PRESETS, UNetModel                       # noqa: E402

GiB = 2**30
W_EMBEDDING = 256                   # train.w_embedding_dim: time_cond_proj (256 -> model_channels), no bias


def counts(family: str, rank: int) -> dict:
    """Parameter counts of a family's UNet on the meta device: P, the largest FSDP unit, the LoRA."""
    with torch.device("meta"):
        unet = UNetModel(**UNET_PRESETS[family])
        P = sum(p.numel() for p in unet.parameters())
        unit = max(sum(p.numel() for p in b.parameters()) for b in blocks(unet))
        root = P - sum(sum(p.numel() for p in b.parameters()) for b in blocks(unet))
        L = sum(p.numel() for p in lora_lib.inject_lora(unet, "lcm", rank, rank))
    return dict(P=P, P_s=P + W_EMBEDDING * UNET_PRESETS[family]["model_channels"], unit=max(unit, root), L=L,
                units=len(blocks(unet)) + 1)


def per_gpu(c: dict, objective: str, frozen: int, n: int | None) -> float:
    """Bytes per GPU; n=None: DDP, else FSDP over n GPUs."""
    P, P_s, L, unit = c["P"], c["P_s"], c["L"], c["unit"]
    if objective in ("lora", "dmd2"):                                  # DMD2: two LoRAs (G and the fake score)
        L = 2 * L if objective == "dmd2" else L
        if n is None:
            return frozen * P + 20 * L                                 # base + LoRA, grads, buckets, AdamW
        return (frozen * P + 16 * L) / n + 2 * (2 + 4) * unit          # (hypothetical)
    if n is None:
        return 24 * P_s + frozen * P                                   # student, grads, buckets, AdamW, EMA + teacher
    return (20 * P_s + frozen * P) / n + 2 * (2 + 4) * unit


def table(gpus: list[int], rank: int) -> str:
    head = ["model", "objective", "frozen_storage", "trainable params", "DDP"] + [f"FSDP N={n}" for n in gpus]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    notes = []
    for family, name in (("sd15", "SD1.5"), ("sdxl", "SDXL")):
        c = counts(family, rank)
        notes.append(f"{name}: P = {c['P'] / 1e6:.1f} M, LoRA rank {rank} L = {c['L'] / 1e6:.1f} M, "
                     f"{c['units']} FSDP units, the largest {c['unit'] / 1e6:.1f} M")
        for objective, label, trainable in (("lora", f"LCM-LoRA r{rank}", c["L"]),
                                            ("dmd2", f"DMD2-LoRA r{rank} (G + fake score)", 2 * c["L"]),
                                            ("full", "full LCD", c["P_s"])):
            for frozen, fs in ((4, "null (fp32)"), (2, "bfloat16")):
                cells = [f"{per_gpu(c, objective, frozen, None) / GiB:.1f} GiB"]
                for n in gpus:
                    v = f"{per_gpu(c, objective, frozen, n) / GiB:.1f} GiB"
                    cells.append(f"({v})" if objective != "full" else v)
                rows.append("| " + " | ".join([name, label, fs, f"{trainable / 1e6:.1f} M", *cells]) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + \
        "\n- (parentheses): FSDP with a LoRA is not offered (train.distributed=fsdp refuses it)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args()
    print("Per-GPU training state (no activations), Adam/grads/trainables fp32, FSDP all-gathers in bf16\n")
    print(table(args.gpus, args.rank))


if __name__ == "__main__":
    main()
