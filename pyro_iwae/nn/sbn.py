"""Sigmoid belief networks: binary latent layers, the setting of VIMCO (Mnih and
Rezende 2016) on MNIST. Their guide has no ``rsample``: train it with
``IWELBO(estimator="vimco")``.
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from .distributions import BernoulliImage
from .models import DATA_PLATE, OBSERVED_SITE
from .networks import PyroNetwork
from .registry import register_guide, register_model

__all__ = ["SBN_UNITS", "SBNGuide", "SBNModel", "sbn_architecture", "sbn_sites"]

#: Binary units per latent layer (Mnih and Rezende 2016 use 200 per layer).
SBN_UNITS = 200


def sbn_sites(layers: int) -> tuple[str, ...]:
    """Names of the latent sites, ``h1`` next to the data, then ``h2``, ..."""
    return tuple(f"h{i + 1}" for i in range(layers))


def _check_layers(layers: int) -> None:
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"an SBN needs stochastic_layers >= 1, got {layers!r}")


@register_model("sbn")
class SBNModel(PyroNetwork):
    """p(x, h) of a sigmoid belief network: ``h_L ~ Bernoulli(sigmoid(b))``,
    ``h_l | h_{l+1} ~ Bernoulli(sigmoid(W h_{l+1} + c))`` and Bernoulli pixels
    from a linear map of ``h_1``.

    :param stochastic_layers: latent layers of ``units`` binary units each.
    :param data_mean: optional ``[x_dim]`` training mean; the pixel bias starts at
        its logit.
    """

    def __init__(
        self,
        x_dim: int = 784,
        stochastic_layers: int = 1,
        data_mean: torch.Tensor | None = None,
        units: int = SBN_UNITS,
    ) -> None:
        super().__init__()
        self.x_dim = x_dim
        layers = stochastic_layers
        _check_layers(layers)
        self.sites = sbn_sites(layers)
        self.prior_logits = nn.Parameter(torch.zeros(units))
        # Layer i maps h_{i+2} to the logits of h_{i+1} (h_1 nearest x).
        self.latent_layers = nn.ModuleList(
            nn.Linear(units, units) for _ in range(layers - 1)
        )
        self.pixels = nn.Linear(units, x_dim)
        if data_mean is not None:
            with torch.no_grad():
                bias = self.pixels.bias
                bias.copy_(torch.logit(data_mean.to(bias).clamp(1e-3, 1 - 1e-3)))

    def forward(self, x: torch.Tensor) -> None:
        """Scores ``x``, a ``[batch, x_dim]`` tensor of 0/1 values."""
        self.register_with_pyro()
        self.check_images(x)
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            h = pyro.sample(self.sites[-1], BernoulliImage(self.prior_logits))
            for name, layer in zip(
                reversed(self.sites[:-1]), reversed(self.latent_layers), strict=True
            ):
                h = pyro.sample(name, BernoulliImage(layer(h)))
            pyro.sample(OBSERVED_SITE, BernoulliImage(self.pixels(h)), obs=x)


@register_guide("sbn")
class SBNGuide(PyroNetwork):
    """q(h|x) of a sigmoid belief network: ``h_1 | x ~ Bernoulli(sigmoid(W x + c))``,
    then ``h_{l+1} | h_l`` likewise (linear layers, as Mnih and Rezende 2016)."""

    def __init__(
        self, x_dim: int = 784, stochastic_layers: int = 1, units: int = SBN_UNITS
    ) -> None:
        super().__init__()
        self.x_dim = x_dim
        layers = stochastic_layers
        _check_layers(layers)
        self.sites = sbn_sites(layers)
        sizes = (x_dim,) + (units,) * layers
        self.layers = nn.ModuleList(
            nn.Linear(sizes[i], sizes[i + 1]) for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> None:
        """Samples the binary latents given ``x``, a ``[batch, x_dim]`` tensor."""
        self.register_with_pyro()
        self.check_images(x)
        h = x
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            for name, layer in zip(self.sites, self.layers, strict=True):
                h = pyro.sample(name, BernoulliImage(layer(h)))


def sbn_architecture(
    stochastic_layers: int = 1, x_dim: int = 784, data_mean: torch.Tensor | None = None
) -> tuple[SBNModel, SBNGuide]:
    """An SBN model and guide with ``stochastic_layers`` layers of 200 binary units,
    called as ``model(x)`` / ``guide(x)`` like :func:`~pyro_iwae.paper_architecture`.
    (Registered as ``"sbn"``: the classes are their own builders.)"""
    model = SBNModel(x_dim, stochastic_layers, data_mean)
    return model, SBNGuide(x_dim, stochastic_layers)
