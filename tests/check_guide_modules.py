"""A user's guide with a bug that no error reveals, for ``check-guide``: its
sampler and its density disagree (check_guide_modules:build_guide); and a model
that does not broadcast over a leading particle dimension
(check_guide_modules:build_flat_model)."""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_iwae import DATA_PLATE


class SkewedGuide(nn.Module):
    """q(z1|x) = N(0, I) through ``z = loc(x) + M eps``, written with
    ``LowerCholeskyAffine(loc, M)`` but with ``M`` a full matrix: the transform
    samples with every entry of ``M`` and scores (log q) with its lower triangle
    alone. Trained with DReG or STL, its gradient is biased."""

    def __init__(self, x_dim: int, z_dim: int) -> None:
        super().__init__()
        self.loc = nn.Linear(x_dim, z_dim)
        generator = torch.Generator().manual_seed(0)
        self.matrix = nn.Parameter(
            torch.eye(z_dim) + 0.3 * torch.randn(z_dim, z_dim, generator=generator)
        )

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            base = dist.Normal(x.new_zeros(self.matrix.shape[0]), 1.0).to_event(1)
            affine = dist.transforms.LowerCholeskyAffine(self.loc(x), self.matrix)
            pyro.sample("z1", dist.TransformedDistribution(base, [affine]))


def build_guide(x_dim: int, stochastic_layers: int, latent_dim: int = 50):
    return SkewedGuide(x_dim, latent_dim)


class FlatModel(nn.Module):
    """p(z1) p(x|z1) with a decoder fed ``z1.view(batch, -1)``: it runs with one
    particle, but not with several drawn at once."""

    def __init__(self, x_dim: int, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Linear(z_dim, x_dim)

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z1", prior)
            logits = self.decoder(z.view(x.shape[0], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def build_flat_model(
    x_dim: int, stochastic_layers: int, data_mean: torch.Tensor | None = None
):
    return FlatModel(x_dim, 50)
