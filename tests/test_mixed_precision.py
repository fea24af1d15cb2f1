"""train.mixed_precision=bf16 on CPU (issue 33 item 4): for every objective in conf/objective (LoRA and
full, with and without EMA), one step's loss and the trainables' gradients under bf16 autocast agree
with the fp32 step within the tolerance stated below; the trainables stay fp32."""
import pytest
import torch

from hydra.utils import instantiate

from lcm.data.build import make_loader
from lcm.data.encoder import LatentEncoder
from lcm.training.loop import step_generators
from tests.test_device_hygiene import CASES, SMOKE_MODEL, images  # noqa: F401  (module fixture)
from train import build_pipeline

# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op). Measured on the smoke model: the
# loss within 1e-2 relative; the gradient's cosine to the fp32 one 0.92-0.94 for the consistency
# objectives (their loss is a small difference of two UNet outputs, where rounding weighs most) and
# higher for diffusion. A trainable that loses its gradient under autocast fails the size check.
# DMD2's generator loss 1/2 |grad|^2 / D is itself a small difference of two passes (the real score's
# CFG): its bf16 loss is 6.7% off, its gradient cosine 0.96 (measured).
LOSS_RTOL, GRAD_COS = 5e-2, 0.9
LOSS_RTOL_OF = {"lcm.objectives.dmd2.DMD2": 1e-1}


def loss_and_grads(images, cfg: dict, amp: torch.dtype | None, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, list, int]:
    """One forward + backward as lcm/training/loop.py does it (autocast around the forward); the loss,
    the flattened gradient of the trainables due at `step` (an objective with several optimizers,
    e.g. DMD2's, updates some of them per step), their dtypes and the number of optimizers."""
    pipe = build_pipeline(SMOKE_MODEL)
    obj = instantiate(cfg)
    torch.manual_seed(0)
    obj.setup(pipe)
    obj.student.train()
    enc = LatentEncoder(pipe, torch.device("cpu"), train_text=obj.trains_text)
    batch = next(iter(make_loader(images, 2, 0, 0, 1, 0, 0)))
    gens = step_generators(0, step, 0, 2)
    with obj.step_context(step, 0):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            z, cond, uncond = enc(batch, gens)
            loss = obj.loss(obj.student, z, cond, uncond, gens)[0].mean()
        loss.backward()
    specs = obj.optimizers()
    due = [p for s in specs if (step % s.every == 0) != s.rest for p in s.params]
    assert due and all(p.grad is not None for p in due), "a trainable got no gradient"
    grads = torch.cat([p.grad.flatten() for p in due])
    return loss.detach().float(), grads, [p.dtype for _, p in obj.trainables], len(specs)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CASES)
def test_bf16_step_equals_fp32_step(images, cfg):  # noqa: F811
    step, n_opt = 0, 1
    while step < n_opt:                                 # each optimizer's first step (DMD2: G, then F)
        l32, g32, _, n_opt = loss_and_grads(images, cfg, None, step)
        l16, g16, dtypes, _ = loss_and_grads(images, cfg, torch.bfloat16, step)
        assert set(dtypes) == {torch.float32}                                # trainables stay fp32
        assert torch.isfinite(l16) and abs(l16 - l32) <= LOSS_RTOL_OF.get(cfg["_target_"], LOSS_RTOL) * abs(l32), (step, l32, l16)
        cos = torch.nn.functional.cosine_similarity(g32, g16.float(), dim=0)
        assert cos > GRAD_COS, (step, float(cos))
        step += 1

#----------------------------------------------------------------------------
# fp16 with its gradient scaler (issue 33 item 4), through the real loop (lcm.training.loop.train).
# Measured on torch 2.14 (CPU): fp16 autocast runs the UNet's convolutions, linears (LoRA included)
# and SDPA in fp16; torch.amp.GradScaler("cpu") scales the loss, unscales before the clip (into the
# fused AdamW) and, on an overflow, skips the step and halves its scale. Nothing is unsupported.

class _RecordingScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler that remembers its instances (the loop builds its own); INIT overrides init_scale."""
    made: list = []
    INIT: float | None = None

    def __init__(self, device="cuda", **kw):
        super().__init__(device, **({**kw, "init_scale": self.INIT} if self.INIT is not None else kw))
        _RecordingScaler.made.append(self)


def fp16_loop(images, run_dir, monkeypatch, device: str = "cpu", init_scale: float | None = None,
              steps: int = 2) -> dict:
    """`steps` steps of the smoke LCM-LoRA (lcd_lora, rank 2) under train.mixed_precision=fp16 on `device`:
    the loop's scaler, the trainables before and after, the dtypes a LoRA layer's forward returned."""
    import os

    from lcm.training import loop
    from lcm.training.distributed import Dist
    from tests.test_device_hygiene import ROOT, variants
    cfg = next(c for i, c in variants(os.path.join(ROOT, "conf/objective/lcd_lora.yaml")) if i.endswith("lora-noema"))
    obj, seen, before = instantiate(cfg), set(), {}
    setup = obj.setup

    def setup_and_watch(pipe):                          # the loop calls objective.setup in place()
        setup(pipe)
        before.update({n: p.detach().clone() for n, p in obj.trainables})
        lora = next(m for m in obj.student.modules() if type(m).__name__ == "LoRALinear")
        lora.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    monkeypatch.setattr(obj, "setup", setup_and_watch)
    monkeypatch.setattr(torch.amp, "GradScaler", _RecordingScaler)
    monkeypatch.setattr(_RecordingScaler, "made", [])
    monkeypatch.setattr(_RecordingScaler, "INIT", init_scale)
    tcfg = loop.TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, log_every=1, checkpoint_every=100,
                            mixed_precision="fp16")
    out = loop.train(build_pipeline(SMOKE_MODEL), images, tcfg, str(run_dir), obj, dist=Dist(0, 1, torch.device(device)))
    (scaler,) = _RecordingScaler.made
    after = {n: p.detach().clone() for n, p in obj.trainables}
    return dict(out=out, scaler=scaler, before=before, after=after, seen=seen)


def test_fp16_step_with_grad_scaler_on_cpu(images, tmp_path, monkeypatch):  # noqa: F811
    r = fp16_loop(images, tmp_path / "ok", monkeypatch)
    assert r["out"]["status"] == "done" and r["out"]["step"] == 2 and r["out"]["nan_skipped"] == 0
    assert r["seen"] == {torch.float16}                                     # autocast did run in fp16
    assert {p.dtype for p in r["after"].values()} == {torch.float32}        # trainables stay fp32
    s = r["scaler"]
    assert s.is_enabled() and torch.isfinite(torch.tensor(s.get_scale()))
    assert s.get_scale() == 2.0 ** 16 and s.state_dict()["_growth_tracker"] == 2   # both steps taken, none skipped
    assert max((r["after"][n] - r["before"][n]).abs().max() for n in r["before"]) > 0    # the LoRA changed


def test_fp16_overflow_is_skipped_by_the_scaler_on_cpu(images, tmp_path, monkeypatch):  # noqa: F811
    """A scale that overflows fp16 (2^100): the scaler skips each step and halves its scale; nothing moves."""
    r = fp16_loop(images, tmp_path / "inf", monkeypatch, init_scale=2.0 ** 100)
    assert r["out"]["status"] == "done" and r["out"]["step"] == 2
    assert r["scaler"].get_scale() == 2.0 ** 98
    assert all(torch.equal(r["after"][n], r["before"][n]) for n in r["before"])
