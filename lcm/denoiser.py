"""The UNet as the solvers see it: (UNet, prediction type, schedule, conditioning, guidance) -> a
solvers.wrappers.GuidedModel with .eps(x, t) / .x0(x, t). The Pipeline's samplers, the trainer's
validation (through the Pipeline), the LCD teacher, student and target all call the UNet here."""
from __future__ import annotations

import torch
from torch import nn

from lcm.consistency import guidance_embedding
from models.text import Conditioning
from solvers.schedule import Schedule
from solvers.wrappers import GuidedModel, NetFn


def unet_net_fn(unet: nn.Module, cond: Conditioning, uncond: Conditioning | None = None,
                w: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> NetFn:
    """net_fn(x, t, with_uncond) -> raw UNet output (fp32) over [cond] or [cond; uncond].

    w (B,): the LCM guidance weight fed to a w-embedding UNet (a full LCM; ignored otherwise).
    t: () (broadcast to the batch) or (B,) / (2B,) per sample. dtype: the UNet's input dtype."""
    w_dim = getattr(unet, "time_cond_proj_dim", None)
    emb = None if w is None or w_dim is None else guidance_embedding(w.float(), w_dim)   # on w's device
    both = None if uncond is None else cond.cat(uncond)

    def net(x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
        c = both if with_uncond else cond
        if c is None:
            raise ValueError("guidance_scale != 1 needs an unconditional branch")
        tb = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
        e = None if emb is None else (torch.cat([emb, emb]) if with_uncond else emb).to(x.device, dtype or x.dtype)
        return unet(x if dtype is None else x.to(dtype), tb, c.context, y=c.y, timestep_cond=e).float()
    return net


def denoiser(unet: nn.Module, prediction_type: str, schedule: Schedule, cond: Conditioning,
             uncond: Conditioning | None = None, guidance_scale: float | torch.Tensor = 1.0,
             w: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> GuidedModel:
    """The guided UNet: eps_hat = eps_u + s (eps_c - eps_u) (CFG once, in solvers.wrappers); s a float
    or (B,) per sample; s == 1 runs the conditional branch only."""
    return GuidedModel(unet_net_fn(unet, cond, uncond, w, dtype), prediction_type, schedule, guidance_scale)
