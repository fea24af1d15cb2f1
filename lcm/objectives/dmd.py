"""Distribution matching (DMD, arXiv 2311.18828; DMD2, arXiv 2405.14867) as pure functions: the
normalised real-minus-fake gradient, its surrogate loss, the diffusion-GAN losses and the
generator's backward simulation. The objective (lcm/objectives/dmd2.py) and the notebook
(notebooks/distribution_matching.ipynb) call these; docs/method.md Sec. 14 derives them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from solvers.schedule import Schedule, expand_as

#----------------------------------------------------------------------------
# The distribution-matching gradient (DMD2 code: sd_guidance.py compute_distribution_matching_loss).

def dm_gradient(x: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor) -> torch.Tensor:
    """grad = (mu_fake - mu_real) / mean_{C,H,W} |x - mu_real| per sample, in float64 (DMD Eq. 8's
    weighting as the DMD2 code computes it); x the generator's sample, mu_* the real (teacher, CFG)
    and fake denoisings of x noised. Moving x along -grad moves it towards the real distribution."""
    x, mu_real, mu_fake = x.double(), mu_real.double(), mu_fake.double()
    w = (x - mu_real).abs().flatten(1).mean(1)               # (B,) per-sample L1 to the teacher's denoising
    return torch.nan_to_num((mu_fake - mu_real) / expand_as(w, x))


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample surrogate 1/2 mean((x - sg(x - grad))^2) (B,): its gradient in x is grad / numel(x_i),
    so the batch mean has gradient grad / numel(batch), as the reference's mean over the batch."""
    target = (x.double() - grad).detach()
    return 0.5 * (x.double() - target).pow(2).flatten(1).mean(1).to(x.dtype)

#----------------------------------------------------------------------------
# The diffusion GAN (DMD2 Sec. 4.2): non-saturating logistic losses on a classifier of noised latents.

def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """softplus(-D(fake)) per sample (B,): the generator wants its samples called real."""
    return F.softplus(-logits_fake.float()).flatten(1).mean(1)


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)) per sample (B,)."""
    return (F.softplus(logits_fake.float()) + F.softplus(-logits_real.float())).flatten(1).mean(1)

#----------------------------------------------------------------------------
# Backward simulation (DMD2 Sec. 4.4): the generator's k-step inputs from its own samples.

def backward_simulation(generate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                        renoise: list[torch.Tensor], grid: list[int], k: int, schedule: Schedule
                        ) -> tuple[torch.Tensor, int]:
    """(x_in, t_in): the input the generator sees at step k of its grid (descending, e.g. [999, 749,
    499, 249]) when sampling from `noise`: k generator calls (the caller runs them without grad),
    each re-noised to the next grid point with renoise[j] (like z). k = 0: x_in = noise at grid[0]."""
    x = noise
    for j in range(k):
        x0 = generate(x, torch.full((x.shape[0],), grid[j], device=x.device, dtype=torch.long))
        x = schedule.add_noise(x0, renoise[j], grid[j + 1])
    return x, grid[k]
