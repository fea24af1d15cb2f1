"""Gaussian data x0 ~ N(mu, diag(s0^2)): the PF-ODE in closed form (the solvers' test oracle, a toy).

Every marginal is Gaussian, p_t = N(alpha_t mu, std_t^2) with std_t^2 = alpha_t^2 s0^2 + sigma_t^2;
the ideal noise prediction is eps_hat(x, t) = -sigma_t grad log p_t(x) = sigma_t (x - alpha_t mu) / std_t^2,
and the PF-ODE keeps the standardised coordinate (x - alpha_t mu) / std_t fixed, so every solver's
exact answer and the exact consistency function f(x_t, t) = flow(x_t, t, 0) are known.
"""
from dataclasses import dataclass

import torch

from solvers.schedule import Schedule


@dataclass
class GaussianData:
    mu: torch.Tensor                  # (D,) data mean
    s0: torch.Tensor                  # (D,) data std
    schedule: Schedule

    @classmethod
    def random(cls, dim: int, schedule: Schedule, seed: int = 0) -> "GaussianData":
        """mu ~ U[-1, 1), s0 ~ U[0.1, 2.1), float64."""
        g = torch.Generator().manual_seed(seed)
        mu = torch.rand(dim, generator=g, dtype=torch.float64, device="cpu") * 2 - 1
        return cls(mu, torch.rand(dim, generator=g, dtype=torch.float64, device="cpu") * 2 + 0.1, schedule)

    def std(self, t) -> torch.Tensor:
        """std_t = sqrt(alpha_t^2 s0^2 + sigma_t^2), the marginal's std (D,)."""
        return (self.schedule.alpha(t) ** 2 * self.s0**2 + self.schedule.sigma(t) ** 2).sqrt()

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """eps_hat(x, t) = sigma_t (x - alpha_t mu) / std_t^2 for x (..., D)."""
        return self.schedule.sigma(t) * (x - self.schedule.alpha(t) * self.mu) / self.std(t) ** 2

    def flow(self, x: torch.Tensor, t, u) -> torch.Tensor:
        """The exact PF-ODE map x_t -> x_u = alpha_u mu + std_u / std_t (x_t - alpha_t mu)."""
        return self.schedule.alpha(u) * self.mu + self.std(u) / self.std(t) * (x - self.schedule.alpha(t) * self.mu)
