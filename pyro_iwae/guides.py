"""Guides q(z|x) for the paper's models."""

from __future__ import annotations

import pyro
import torch
from torch import nn

from .distributions import DiagonalNormal
from .models import DATA_PLATE, LATENT_SITES, PaperModel, check_stochastic_layers
from .networks import GaussianLayer, PyroNetwork
from .registry import register_guide


class PaperGuide(PyroNetwork):
    """q(z|x) of Burda et al. (2016): ``q(z_1|x) q(z_2|z_1) ...``, each a diagonal
    Gaussian from a tanh MLP (784-200-200-50 for one stochastic layer; 784-200-200-100
    then 100-100-100-50 for two).
    """

    def __init__(self, stochastic_layers: int = 1, x_dim: int = 784) -> None:
        super().__init__()
        arch = check_stochastic_layers(stochastic_layers)
        sizes = (x_dim, *arch["latent"])
        self.layers = nn.ModuleList(
            GaussianLayer((sizes[i], *arch["guide_hidden"][i]), sizes[i + 1])
            for i in range(stochastic_layers)
        )

    def forward(self, x: torch.Tensor) -> None:
        """Samples the latents given ``x``, a ``[batch, x_dim]`` tensor."""
        self.register_with_pyro()
        h = x
        # On the data's device: else Pyro makes its indices on the CPU every call.
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            for name, layer in zip(LATENT_SITES, self.layers, strict=False):
                h = pyro.sample(name, DiagonalNormal(*layer(h)))


@register_guide("paper")
def paper_guide(x_dim: int = 784, stochastic_layers: int = 1) -> PaperGuide:
    return PaperGuide(stochastic_layers, x_dim)


def paper_architecture(
    stochastic_layers: int = 1,
    x_dim: int = 784,
    data_mean: torch.Tensor | None = None,
) -> tuple[PaperModel, PaperGuide]:
    """The paper's model and guide for 1 or 2 stochastic layers.

    Both are ``nn.Module`` s called as ``model(x)`` / ``guide(x)`` with ``x`` a
    ``[batch, x_dim]`` float tensor of 0/1 values, the data plate at dim -1.
    ``data_mean`` ([x_dim] grey levels) sets the decoder's output bias.
    """
    return PaperModel(stochastic_layers, x_dim, data_mean), PaperGuide(
        stochastic_layers, x_dim
    )
