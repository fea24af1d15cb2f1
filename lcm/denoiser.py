"""The UNet as the solvers see it: unet_net gives the one network contract net(x, t, cond, w)
(solvers.wrappers.NetFn), guided() turns any such net into a solvers.wrappers.GuidedModel with
.eps(x, t) / .x0(x, t). The Pipeline's samplers, the trainer's validation (through the Pipeline), the
LCD teacher, student and target all call the UNet here."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from lcm.consistency import guidance_embedding
from models.text import Conditioning
from solvers.schedule import Schedule
from solvers.wrappers import GuidedModel, NetFn


def unet_net(unet: nn.Module, ctx: Callable[[], ContextManager] = contextlib.nullcontext,
             dtype: torch.dtype | None = None) -> NetFn:
    """net(x, t, cond, w) -> raw UNet output (fp32) (B, ...), each call inside ctx() (e.g. the teacher's
    adapters off, the EMA adapter on). w (B,): the LCM guidance fed to a w-embedding UNet (a full LCM;
    ignored otherwise, and may be None). t: () (broadcast to the batch) or (B,). dtype: the UNet's input dtype."""
    w_dim = getattr(getattr(unet, "module", unet), "time_cond_proj_dim", None)   # DDP keeps the UNet in .module

    def net(x: torch.Tensor, t: torch.Tensor, cond: Conditioning, w: torch.Tensor | None) -> torch.Tensor:
        tb = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
        e = None if w is None or w_dim is None else guidance_embedding(w.float(), w_dim).to(x.device, dtype or x.dtype)
        with ctx():
            return unet(x if dtype is None else x.to(dtype), tb, cond.context, y=cond.y, timestep_cond=e).float()
    return net


def guided(net: NetFn, cond: Conditioning, uncond: Conditioning | None, w: torch.Tensor | None, schedule: Schedule,
           prediction_type: str, guidance_scale: float | torch.Tensor = 1.0) -> GuidedModel:
    """The net as the solvers see it (.x0 / .eps / .x0_eps): eps_hat = eps_u + s (eps_c - eps_u) over one
    batched pass of [cond; uncond] (CFG once, in solvers.wrappers); s a float or (B,) per sample; s == 1
    runs the conditional branch only."""
    both = None if uncond is None else cond.cat(uncond)
    w2 = None if w is None else torch.cat([w, w])

    def branches(x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
        if not with_uncond:
            return net(x, t, cond, w)
        if both is None:
            raise ValueError("guidance_scale != 1 needs an unconditional branch")
        return net(x, t, both, w2)
    return GuidedModel(branches, prediction_type, schedule, guidance_scale)


def denoiser(unet: nn.Module, prediction_type: str, schedule: Schedule, cond: Conditioning,
             uncond: Conditioning | None = None, guidance_scale: float | torch.Tensor = 1.0,
             w: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> GuidedModel:
    """The guided UNet of the samplers (guided() over unet_net())."""
    return guided(unet_net(unet, dtype=dtype), cond, uncond, w, schedule, prediction_type, guidance_scale)
