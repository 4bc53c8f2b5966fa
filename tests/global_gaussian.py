"""The linear-Gaussian model with a global latent, for exact tests of the factored
bound: theta ~ N(0, 1), z_i ~ N(0, I_d), x_i | z_i, theta ~ N(W z_i + b + theta c,
sigma^2 I), in float64. Given theta each point is linear-Gaussian, and theta's
posterior given all points is Gaussian."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from linear_gaussian import LATENT_DIM, OBS_DIM, SIGMA, LinearGaussian


class GlobalGaussian:
    def __init__(self, seed: int = 0) -> None:
        self.lg = LinearGaussian(seed)
        self.c = torch.tensor([0.9, -0.6, 0.4], dtype=torch.float64)
        self.cov = self.lg.W @ self.lg.W.T + SIGMA**2 * torch.eye(
            OBS_DIM, dtype=torch.float64
        )

    def sample_data(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        theta = torch.randn((), generator=g, dtype=torch.float64)
        return self.lg.sample_data(n, seed + 1) + theta * self.c

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_1, ..., x_N), a number."""
        n = x.shape[0]
        cov = torch.block_diag(*[self.cov] * n) + torch.outer(
            self.c.repeat(n), self.c.repeat(n)
        )
        mean = self.lg.b.repeat(n)
        return dist.MultivariateNormal(mean, cov).log_prob(x.reshape(-1))

    def theta_posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of p(theta | x_1..N)."""
        solved = torch.linalg.solve(self.cov, self.c)
        precision = 1 + x.shape[0] * self.c @ solved
        mean = ((x - self.lg.b) @ solved).sum() / precision
        return mean, precision.rsqrt()

    def model(self, data: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        theta = pyro.sample("theta", dist.Normal(data.new_zeros(()), 1.0))
        with pyro.plate("data", data.shape[0], subsample=idx) as i:
            z = pyro.sample(
                "z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            )
            loc = z @ self.lg.W.T + self.lg.b + theta.unsqueeze(-1) * self.c
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=data[i])

    def guide(self, shift: float = 0.0, inflate: float = 1.0, local_shift=0.0):
        """q(theta) the exact posterior of the data set it is made for (shifted and
        inflated on request), q(z_i | x_i, theta) the exact conditional."""
        lg = self.lg
        tril = torch.linalg.cholesky(lg.post_cov)

        def guide(data: torch.Tensor, idx: torch.Tensor | None = None) -> None:
            mean, std = self.theta_posterior(data)
            theta = pyro.sample(
                "theta",
                dist.Normal(
                    pyro.param("theta_loc", mean + shift),
                    pyro.param("theta_log_scale", (std * inflate).log()).exp(),
                ),
            )
            shift_z = pyro.param("z_shift", data.new_tensor(local_shift))
            with pyro.plate("data", data.shape[0], subsample=idx) as i:
                centred = data[i] - theta.unsqueeze(-1) * self.c
                loc = lg.post_loc(centred) + shift_z
                pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=tril))

        return guide
