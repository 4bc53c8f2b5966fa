"""The paper's generative models: Bernoulli images from Gaussian latent layers,
and their variants: other likelihoods, hidden layers, activations and latent
sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import torch
from torch import nn

from .distributions import DiagonalNormal
from .likelihoods import Likelihood
from .networks import GaussianLayer, PyroNetwork, mlp
from .registry import register_model

#: Name of the plate over data points (dim -1) in the paper's model and guide.
DATA_PLATE = "data"
#: Name of the observed site: a ``[batch, x_dim]`` tensor of 0/1 pixels.
OBSERVED_SITE = "x"
#: Names of the latent sites, from the one next to the data (``z1``) upwards.
LATENT_SITES = ("z1", "z2")

#: Latent sizes and hidden sizes (model side, top down) of the paper's architectures.
ARCHITECTURES = {
    1: {"latent": (50,), "model_hidden": ((200, 200),), "guide_hidden": ((200, 200),)},
    2: {
        "latent": (100, 50),
        "model_hidden": ((200, 200), (100, 100)),
        "guide_hidden": ((200, 200), (100, 100)),
    },
}


def check_stochastic_layers(stochastic_layers: int) -> dict:
    if stochastic_layers not in ARCHITECTURES:
        raise ValueError(f"stochastic_layers must be 1 or 2, got {stochastic_layers!r}")
    return ARCHITECTURES[stochastic_layers]


def architecture(
    stochastic_layers: int = 1,
    hidden: Sequence[int] | None = None,
    latent_dim: int | None = None,
) -> dict:
    """The sizes of :data:`ARCHITECTURES`, with ``hidden`` (the hidden sizes
    between x and ``z1``, on both sides; may be empty) and ``latent_dim`` (the
    size of the top latent: ``z1`` with one stochastic layer, ``z2`` with two)
    in place of the paper's where given."""
    arch = check_stochastic_layers(stochastic_layers)
    if hidden is not None:
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and h >= 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {hidden}")
        arch = {
            **arch,
            "model_hidden": (hidden, *arch["model_hidden"][1:]),
            "guide_hidden": (hidden, *arch["guide_hidden"][1:]),
        }
    if latent_dim is not None:
        if not (isinstance(latent_dim, int) and latent_dim >= 1):
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        arch = {**arch, "latent": (*arch["latent"][:-1], latent_dim)}
    return arch


class PaperModel(PyroNetwork):
    """p(x, z) of Burda et al. (2016): ``z_L ~ N(0, I)``, Gaussian layers
    ``p(z_l | z_{l+1})`` and ``x ~ Bernoulli(logits(z_1))``, tanh hidden units;
    or a variant of it, with the keyword arguments.

    :param stochastic_layers: 1 (latent 50, hidden 200-200) or 2 (latents 100 and
        50; hidden 100-100 between them, 200-200 to the pixels).
    :param x_dim: number of pixels.
    :param data_mean: optional ``[x_dim]`` mean grey level of the training data; the
        output bias starts at its logit (see :meth:`set_output_bias`).
    :param likelihood: p(x|z1), one of :data:`~pyro_iwae.LIKELIHOODS`.
    :param sigma: the fixed standard deviation of the ``"gaussian"`` likelihood;
        None: learned, one per dimension.
    :param hidden: see :func:`~pyro_iwae.nn.models.architecture`.
    :param latent_dim: likewise.
    :param activation: hidden units, ``"tanh"`` or ``"relu"``.
    """

    def __init__(
        self,
        stochastic_layers: int = 1,
        x_dim: int = 784,
        data_mean: torch.Tensor | None = None,
        *,
        likelihood: str = "bernoulli",
        sigma: float | None = None,
        hidden: Sequence[int] | None = None,
        activation: str = "tanh",
        latent_dim: int | None = None,
    ) -> None:
        super().__init__()
        arch = architecture(stochastic_layers, hidden, latent_dim)
        latent, hidden = arch["latent"], arch["model_hidden"]
        self.x_dim = x_dim
        self.latent_dims = latent
        # Layer l maps z_{l+2} to the Gaussian over z_{l+1} (0-based, z_1 nearest x).
        self.latent_layers = nn.ModuleList(
            GaussianLayer((latent[i + 1], *hidden[i + 1]), latent[i], activation)
            for i in range(len(latent) - 1)
        )
        sizes = (latent[0], *hidden[0])
        self.pixels = nn.Sequential(mlp(sizes, activation), nn.Linear(sizes[-1], x_dim))
        self.likelihood = Likelihood(likelihood, x_dim, sigma)
        if data_mean is not None:
            self.set_output_bias(data_mean)

    def set_output_bias(self, data_mean: torch.Tensor) -> None:
        """Sets the output bias to ``logit(clip(data_mean, 1e-3, 1 - 1e-3))``
        (to ``data_mean`` for the Gaussian likelihood)."""
        with torch.no_grad():
            bias = self.pixels[-1].bias
            bias.copy_(self.likelihood.initial_bias(data_mean.to(bias)))

    def forward(self, x: torch.Tensor) -> None:
        """Scores ``x``, a ``[batch, x_dim]`` tensor (of 0/1 values for the
        Bernoulli likelihood)."""
        self.register_with_pyro()
        self.check_images(x)
        names = LATENT_SITES[: len(self.latent_dims)]
        # On the data's device: else Pyro makes its indices on the CPU every call.
        with pyro.plate(DATA_PLATE, x.shape[0], device=x.device):
            top = self.latent_dims[-1]
            zeros = x.new_zeros(top)
            z = pyro.sample(names[-1], DiagonalNormal(zeros, zeros))
            for name, layer in zip(
                reversed(names[:-1]), reversed(self.latent_layers), strict=True
            ):
                z = pyro.sample(name, DiagonalNormal(*layer(z)))
            pyro.sample(OBSERVED_SITE, self.likelihood(self.pixels(z)), obs=x)


@register_model("paper")
def paper_model(
    x_dim: int = 784,
    stochastic_layers: int = 1,
    data_mean: torch.Tensor | None = None,
    **variant: Any,
) -> PaperModel:
    """The paper's model; ``variant``: the keyword arguments of :class:`PaperModel`
    (``likelihood``, ``sigma``, ``hidden``, ``activation``, ``latent_dim``)."""
    return PaperModel(stochastic_layers, x_dim, data_mean, **variant)
