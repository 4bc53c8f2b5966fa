"""A user's own guide builder, imported by path (user_guides:build_guide) and
through an entry point by tests/test_guides_zoo.py."""

import pyro
import torch
from torch import nn

from pyro_iwae import DATA_PLATE
from pyro_iwae.nn.distributions import DiagonalNormal


class MeanFieldGuide(nn.Module):
    """q(z1|x): a diagonal Gaussian from one linear map of x."""

    def __init__(self, x_dim: int, z_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(x_dim, 2 * z_dim)

    def forward(self, x: torch.Tensor) -> None:
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        with pyro.plate(DATA_PLATE, x.shape[0]):
            pyro.sample("z1", DiagonalNormal(loc, log_scale))


def build_guide(x_dim: int, stochastic_layers: int, latent_dim: int = 50):
    if stochastic_layers != 1:
        raise ValueError("this guide has one stochastic layer; drop --layers")
    return MeanFieldGuide(x_dim, latent_dim)


class _OtherSiteGuide(MeanFieldGuide):
    """Samples its latent under another name than the model's ("zz", not "z1")."""

    def forward(self, x: torch.Tensor) -> None:
        loc, log_scale = self.encoder(x).chunk(2, dim=-1)
        with pyro.plate(DATA_PLATE, x.shape[0]):
            pyro.sample("zz", DiagonalNormal(loc, log_scale))


def build_other_site_guide(x_dim: int, stochastic_layers: int, latent_dim: int = 50):
    return _OtherSiteGuide(x_dim, latent_dim)


def build_small_guide(x_dim: int, stochastic_layers: int):
    """A latent of 10 units, whatever the model's is."""
    return MeanFieldGuide(x_dim, 10)
