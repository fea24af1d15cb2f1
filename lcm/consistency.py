"""The consistency function on SD latents (docs/method.md Sec. 2) and the w-embedding (Sec. 3.2)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from models.checkpoint import json_object
from solvers.schedule import TimeLike, expand_as

#----------------------------------------------------------------------------
# Boundary scalings (LCM reference code / LCMScheduler): s = timestep_scaling * t on the raw integer t,
# c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 + sigma_data^2).

def boundary_scalings(t: TimeLike, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out), float64 tensors of t's shape; c_skip(0) = 1, c_out(0) = 0."""
    s = torch.as_tensor(t, dtype=torch.float64, device=t.device if torch.is_tensor(t) else "cpu") * timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2).sqrt()


def f_theta(z: torch.Tensor, x0_hat: torch.Tensor, t: TimeLike,
            sigma_data: "float | ConsistencySpec" = 0.5, timestep_scaling: float = 10.0) -> torch.Tensor:
    """f_theta(z, t) = c_skip(t) z + c_out(t) x0_hat; z, x0_hat (B, ...), t () or (B,); or pass a spec."""
    if isinstance(sigma_data, ConsistencySpec):
        sigma_data, timestep_scaling = sigma_data.sigma_data, sigma_data.timestep_scaling
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    return expand_as(c_skip, z) * z + expand_as(c_out, z) * x0_hat

#----------------------------------------------------------------------------
# The spec a few-step checkpoint was distilled with; the sampler grid and scalings must agree with it.

META_KEY = "lcm.spec"
OBJECTIVES = ("lcm", "tcd", "pcm", "scm")   # which few-step sampler the weights expect (solver of the same name)


@dataclass(frozen=True)
class ConsistencySpec:
    num_ddim_timesteps: int = 50       # origin grid size N; skip k = T // N (docs/method.md Sec. 3, step 2)
    sigma_data: float = 0.5            # boundary scalings (LCM only; TCD and PCM use the DDIM form); sCM: TrigFlow's
                                       # sigma_d, a record only (its sampler is x0_hat at SD timesteps for any sigma_d)
    timestep_scaling: float = 10.0     # s = timestep_scaling * t inside c_skip / c_out only
    objective: str = "lcm"             # lcm | tcd | pcm | scm: the distillation objective = the matching sampler
    phases: int | None = None          # PCM: the number of phases M (its default step count); else None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"spec objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if (self.phases is not None) != (self.objective == "pcm"):
            raise ValueError(f"spec phases={self.phases!r}: PCM specs need a phase count M >= 1, others none")
        if self.phases is not None and not 1 <= self.phases <= self.num_ddim_timesteps:
            raise ValueError(f"PCM phases M={self.phases} must be in [1, num_ddim_timesteps={self.num_ddim_timesteps}]")

    def to_metadata(self) -> dict[str, str]:
        """{'lcm.spec': json} for safetensors metadata (an LCM spec omits objective and phases, so
        files read as before)."""
        d = asdict(self)
        if self.objective == "lcm":
            d.pop("objective"), d.pop("phases")
        return {META_KEY: json.dumps(d, sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "ConsistencySpec | None":
        """Inverse of to_metadata; None if the metadata holds no LCM spec; unknown fields, wrong types
        and junk raise one ValueError naming the file (`meta.path` of models.checkpoint.FileMetadata)."""
        if META_KEY not in meta:
            return None
        where = f"{meta.path}: " if getattr(meta, "path", None) else ""
        kw = json_object(meta, META_KEY, where)
        unknown = set(kw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{where}unknown LCM spec fields {sorted(unknown)[:5]} in {META_KEY} metadata "
                             f"(known: {[f.name for f in fields(cls)]})")
        ok = {"num_ddim_timesteps": lambda v: type(v) is int and 1 <= v <= 1000,
              "sigma_data": lambda v: type(v) in (int, float) and 0 < v < float("inf"),
              "timestep_scaling": lambda v: type(v) in (int, float) and 0 < v < float("inf"),
              "objective": lambda v: v in OBJECTIVES,
              "phases": lambda v: v is None or (type(v) is int and 1 <= v <= 1000)}
        bad = [f"{k}={v!r:.40}" for k, v in kw.items() if not ok[k](v)]
        if bad:
            raise ValueError(f"{where}{META_KEY} metadata has invalid values {', '.join(bad)} (num_ddim_timesteps: "
                             "an integer in [1, 1000]; sigma_data, timestep_scaling: positive numbers; objective: "
                             f"one of {', '.join(OBJECTIVES)}; phases: null or an integer >= 1)")
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}{META_KEY} metadata: {e}") from None

    def check_matches(self, other: "ConsistencySpec", what: str = "checkpoint") -> None:
        """Raise if two specs disagree (e.g. a sampler configured differently from the checkpoint)."""
        if self != other:
            raise ValueError(f"LCM spec mismatch: {what} was distilled with {other}, but sampling uses "
                             f"{self}; use the {what}'s num_ddim_timesteps/sigma_data/timestep_scaling")

    def consistency_fn(self, x0_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        """denoise_fn(z, t) = f_theta(z, x0_fn(z, t), t) for solvers.lcm.sample_lcm."""
        return lambda z, t: f_theta(z, x0_fn(z, t), t, self.sigma_data, self.timestep_scaling)

#----------------------------------------------------------------------------
# w-embedding (VDM / diffusers get_guidance_scale_embedding): [sin(1000 w f_i), cos(1000 w f_i)],
# f_i = exp(-log(10000) i / (half - 1)).

def guidance_embedding(w: torch.Tensor, dim: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w (B,) in the LCM convention (w = s - 1) -> (B, dim)."""
    assert w.ndim == 1, f"w must be (B,), got {tuple(w.shape)}"
    half = dim // 2
    c = torch.log(torch.tensor(10000.0, dtype=dtype, device="cpu")) / (half - 1)    # in dtype, as the reference
    f = torch.exp(torch.arange(half, dtype=dtype, device="cpu") * -c).to(w.device)
    arg = (w * 1000.0).to(dtype)[:, None] * f[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
