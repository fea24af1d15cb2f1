"""Jacobian-vector products of a network: the directional derivative d/dh fn(p + h v) at h = 0, e.g.
the dF/dtau along (dx/dtau, 1) of continuous-time consistency (sCM, Lu & Song, arXiv 2410.11081;
docs/method.md Sec. 15).

    autograd  forward-mode AD (torch.func.jvp); exact. The UNet's attention takes its softmax path
              under it (models/unet.py `attention_math`): SDPA's fused kernels have no forward-AD rule.
    fd        central difference [fn(p + h v) - fn(p - h v)] / 2h, O(h^2) (FastGen,
              `_estimate_jvp_finite_difference`): two more forwards, any kernel, no tangent memory.

Both keep no graph (the grad-carrying F_theta is a second, ordinary forward) and run every evaluation
inside torch.random.fork_rng, so each one, and the caller's next forward, draw the same dropout masks.
"""
from typing import Callable

import torch

Fn = Callable[..., torch.Tensor]

#----------------------------------------------------------------------------


def _same_rng(device: torch.device):
    """fork_rng over the CPU and `device`: the block starts from the caller's RNG state and leaves it as it was."""
    return torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)


def _jvp_autograd(fn: Fn, primals: tuple, tangents: tuple, fd_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-mode AD, as sCM runs it under no_grad (FastGen `sCM.py` `_jvp`)."""
    with _same_rng(primals[0].device):
        return torch.func.jvp(fn, primals, tangents)


def _rms(a: torch.Tensor) -> torch.Tensor:
    return a.double().square().mean().sqrt()


def fd_step(primals: tuple, tangents: tuple, fd_eps: float) -> torch.Tensor:
    """Step h (0-dim float64, no host sync): no primal moves by more than fd_eps of its RMS, floored
    at 1e-3 (FastGen: eps = 1e-3 |tau| >= 1e-6, per sample; here one h for the whole batch)."""
    ratios = torch.stack([_rms(p).clamp_min(1e-3) / _rms(v) for p, v in zip(primals, tangents)])  # inf where v = 0
    return fd_eps * ratios.min().nan_to_num(posinf=1.0)               # all tangents 0: any h gives 0


def _jvp_fd(fn: Fn, primals: tuple, tangents: tuple, fd_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Central difference (FastGen): points formed in float64, fn run in the primals' dtype (float64
    primals and a float64 model give a float64 estimate), the difference taken in float64."""
    h = fd_step(primals, tangents, fd_eps)

    def at(sign: int) -> torch.Tensor:                                # fn(p + sign h v); sign 0: fn(p) exactly
        with _same_rng(primals[0].device):
            return fn(*((p.double() + sign * h * v.double()).to(p.dtype) for p, v in zip(primals, tangents)))

    out, plus, minus = at(0), at(1), at(-1)
    return out, ((plus.double() - minus.double()) / (2 * h)).to(out.dtype)


JVP_METHODS: dict[str, Callable] = {"autograd": _jvp_autograd, "fd": _jvp_fd}

#----------------------------------------------------------------------------


def jvp(fn: Fn, primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...],
        method: str = "autograd", fd_eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), J_fn(primals) tangents), both detached, no graph kept; method in JVP_METHODS,
    fd_eps the relative finite-difference step (method="fd" only)."""
    if method not in JVP_METHODS:
        raise ValueError(f"method must be one of {sorted(JVP_METHODS)}, got {method!r}")
    primals, tangents = tuple(primals), tuple(tangents)
    if [p.shape for p in primals] != [v.shape for v in tangents]:
        raise ValueError(f"tangents must match primals in number and shape: "
                         f"{[tuple(v.shape) for v in tangents]} vs {[tuple(p.shape) for p in primals]}")
    with torch.no_grad():
        out, d = JVP_METHODS[method](fn, primals, tangents, fd_eps)
    return out.detach(), d.detach()
