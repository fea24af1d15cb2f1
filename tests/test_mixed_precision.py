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
