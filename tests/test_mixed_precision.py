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
LOSS_RTOL, GRAD_COS = 5e-2, 0.9


def loss_and_grads(images, cfg: dict, amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One forward + backward as lcm/training/loop.py does it (autocast around the forward); the loss,
    the flattened gradient of the trainables and their dtypes."""
    pipe = build_pipeline(SMOKE_MODEL)
    obj = instantiate(cfg)
    torch.manual_seed(0)
    obj.setup(pipe)
    obj.student.train()
    enc = LatentEncoder(pipe, torch.device("cpu"), train_text=obj.trains_text)
    batch = next(iter(make_loader(images, 2, 0, 0, 1, 0, 0)))
    gens = step_generators(0, 0, 0, 2)
    with obj.step_context(0, 0):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            z, cond, uncond = enc(batch, gens)
            loss = obj.loss(obj.student, z, cond, uncond, gens)[0].mean()
        loss.backward()
    assert all(p.grad is not None for _, p in obj.trainables), "a trainable got no gradient"
    grads = torch.cat([p.grad.flatten() for _, p in obj.trainables])
    return loss.detach().float(), grads, [p.dtype for _, p in obj.trainables]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CASES)
def test_bf16_step_equals_fp32_step(images, cfg):  # noqa: F811
    l32, g32, _ = loss_and_grads(images, cfg, None)
    l16, g16, dtypes = loss_and_grads(images, cfg, torch.bfloat16)
    assert set(dtypes) == {torch.float32}                                    # trainables stay fp32
    assert torch.isfinite(l16) and abs(l16 - l32) <= LOSS_RTOL * abs(l32), (l32, l16)
    cos = torch.nn.functional.cosine_similarity(g32, g16.float(), dim=0)
    assert cos > GRAD_COS, float(cos)
