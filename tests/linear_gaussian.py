"""A linear-Gaussian model with closed-form log p(x) and posterior, for exact tests.

z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D), all in float64.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

LATENT_DIM, OBS_DIM, SIGMA = 2, 3, 0.7


class LinearGaussian:
    def __init__(self, seed: int = 0, diagonal_posterior: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(OBS_DIM, LATENT_DIM, generator=g, dtype=torch.float64)
        if diagonal_posterior:
            # Orthogonal columns make W^T W, and so the posterior, diagonal: a
            # mean-field guide can then be the exact posterior.
            q, _ = torch.linalg.qr(self.W)
            self.W = q * self.W.norm(dim=0)
        self.b = torch.randn(OBS_DIM, generator=g, dtype=torch.float64)
        precision = torch.eye(LATENT_DIM, dtype=torch.float64) + self.W.T @ self.W / (
            SIGMA**2
        )
        self.post_cov = torch.linalg.inv(precision)
        # posterior mean = A (x - b)
        self.A = self.post_cov @ self.W.T / SIGMA**2

    def sample_data(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, LATENT_DIM, generator=g, dtype=torch.float64)
        noise = SIGMA * torch.randn(n, OBS_DIM, generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + noise

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + SIGMA**2 * torch.eye(
            OBS_DIM, dtype=torch.float64, device=self.W.device
        )
        return dist.MultivariateNormal(self.b, cov).log_prob(x)

    def post_loc(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b) @ self.A.T

    def model(self, data: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        with pyro.plate("data", data.shape[0], subsample=idx) as i:
            z = pyro.sample(
                "z",
                dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1),
            )
            pyro.sample(
                "x", dist.Normal(z @ self.W.T + self.b, SIGMA).to_event(1), obs=data[i]
            )

    def exact_guide(self, data: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        tril = torch.linalg.cholesky(self.post_cov)
        with pyro.plate("data", data.shape[0], subsample=idx) as i:
            pyro.sample(
                "z", dist.MultivariateNormal(self.post_loc(data[i]), scale_tril=tril)
            )

    def diagonal_guide(self, shift: float = 0.5, inflate: float = 1.5) -> callable:
        """A mean-field guide, mean shifted and standard deviation inflated."""
        scale = inflate * self.post_cov.diagonal().sqrt()

        def guide(data: torch.Tensor, idx: torch.Tensor | None = None) -> None:
            with pyro.plate("data", data.shape[0], subsample=idx) as i:
                loc = self.post_loc(data[i]) + shift
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

        return guide


class PriorSiteModel:
    """The linear-Gaussian model plus latents that guides leave to the prior:
    x | z, u ~ N(W z + b + u c, sigma^2 I), u ~ Bernoulli(1/2) ("bernoulli") or
    N(0, 1) ("normal"); "mixed" has both, u ~ Bernoulli(1/2) and v ~ N(0, 1):
    x | z, u, v ~ N(W z + b + u c + v d, sigma^2 I)."""

    def __init__(self, lg: LinearGaussian, kind: str) -> None:
        self.lg, self.kind = lg, kind
        self.c = torch.tensor([0.8, -0.5, 0.3], dtype=torch.float64)
        self.d = torch.tensor([-0.4, 0.6, 0.9], dtype=torch.float64)

    def prior(self, data: torch.Tensor) -> dist.Distribution:
        if self.kind in ("bernoulli", "mixed"):
            return dist.Bernoulli(data.new_tensor(0.5))
        return dist.Normal(data.new_tensor(0.0), 1.0)

    def model(self, data: torch.Tensor) -> None:
        lg = self.lg
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            )
            u = pyro.sample("u", self.prior(data))
            loc = z @ lg.W.T + lg.b + u.unsqueeze(-1) * self.c
            if self.kind == "mixed":
                v = pyro.sample("v", dist.Normal(data.new_tensor(0.0), 1.0))
                loc = loc + v.unsqueeze(-1) * self.d
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=data)

    def _gaussian_part(self) -> torch.Tensor:
        """The columns of the Gaussian latents' map to x: z's, then v's or u's."""
        columns = [self.lg.W]
        if self.kind != "bernoulli":
            columns.append((self.d if self.kind == "mixed" else self.c).unsqueeze(-1))
        return torch.cat(columns, -1)

    def _per_discrete_value(self, x: torch.Tensor) -> list[tuple]:
        """(log p(x, u), E[Gaussian latents | x, u]) for each value of the Bernoulli
        u (one entry, u = 0 with log p(u) = 0, without one)."""
        lg, w = self.lg, self._gaussian_part()
        eye = torch.eye(OBS_DIM, dtype=torch.float64, device=w.device)
        values = (0, 1) if self.kind in ("bernoulli", "mixed") else (0,)
        log_prior = -math.log(len(values))
        post_cov = torch.linalg.inv(
            torch.eye(w.shape[-1], dtype=torch.float64) + w.T @ w / SIGMA**2
        )
        parts = []
        for u in values:
            centred = x - lg.b - u * self.c
            log_px = dist.MultivariateNormal(
                torch.zeros_like(lg.b), w @ w.T + SIGMA**2 * eye
            ).log_prob(centred)
            mean = centred @ (post_cov @ w.T / SIGMA**2).T
            parts.append((log_px + log_prior, mean))
        return parts

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._per_discrete_value(x)
        return torch.stack([log_joint for log_joint, _ in parts]).logsumexp(0)

    def posterior_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Site name -> E[site | x]: ``[N, LATENT_DIM]`` for z, ``[N]`` for u
        (P(u = 1 | x) for a Bernoulli u) and v."""
        parts = self._per_discrete_value(x)
        log_joint = torch.stack([lj for lj, _ in parts])
        probs = (log_joint - log_joint.logsumexp(0)).exp()
        means = [mean for _, mean in parts]
        gaussian = sum(p.unsqueeze(-1) * m for p, m in zip(probs, means, strict=True))
        means = {"z": gaussian[:, :LATENT_DIM]}
        if self.kind == "bernoulli":
            means["u"] = probs[1]
        elif self.kind == "mixed":
            means["u"], means["v"] = probs[1], gaussian[:, LATENT_DIM]
        else:
            means["u"] = gaussian[:, LATENT_DIM]
        return means
