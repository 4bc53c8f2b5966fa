"""The paper's generative models: Bernoulli images from Gaussian latent layers."""

from __future__ import annotations

import pyro
import torch
from torch import nn

from .distributions import BernoulliImage, DiagonalNormal
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


class PaperModel(PyroNetwork):
    """p(x, z) of Burda et al. (2016): ``z_L ~ N(0, I)``, Gaussian layers
    ``p(z_l | z_{l+1})`` and ``x ~ Bernoulli(logits(z_1))``, tanh hidden units.

    :param stochastic_layers: 1 (latent 50, hidden 200-200) or 2 (latents 100 and
        50; hidden 100-100 between them, 200-200 to the pixels).
    :param x_dim: number of pixels.
    :param data_mean: optional ``[x_dim]`` mean grey level of the training data; the
        output bias starts at its logit (see :meth:`set_output_bias`).
    """

    def __init__(
        self,
        stochastic_layers: int = 1,
        x_dim: int = 784,
        data_mean: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        arch = check_stochastic_layers(stochastic_layers)
        latent, hidden = arch["latent"], arch["model_hidden"]
        self.x_dim = x_dim
        self.latent_dims = latent
        # Layer l maps z_{l+2} to the Gaussian over z_{l+1} (0-based, z_1 nearest x).
        self.latent_layers = nn.ModuleList(
            GaussianLayer((latent[i + 1], *hidden[i + 1]), latent[i])
            for i in range(len(latent) - 1)
        )
        self.pixels = nn.Sequential(
            mlp((latent[0], *hidden[0])), nn.Linear(hidden[0][-1], x_dim)
        )
        if data_mean is not None:
            self.set_output_bias(data_mean)

    def set_output_bias(self, data_mean: torch.Tensor) -> None:
        """Sets the output bias to ``logit(clip(data_mean, 1e-3, 1 - 1e-3))``."""
        with torch.no_grad():
            bias = self.pixels[-1].bias
            bias.copy_(torch.logit(data_mean.to(bias).clamp(1e-3, 1 - 1e-3)))

    def forward(self, x: torch.Tensor) -> None:
        """Scores ``x``, a ``[batch, x_dim]`` tensor of 0/1 values."""
        self.register_with_pyro()
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
            pyro.sample(OBSERVED_SITE, BernoulliImage(self.pixels(z)), obs=x)


@register_model("paper")
def paper_model(
    x_dim: int = 784, stochastic_layers: int = 1, data_mean: torch.Tensor | None = None
) -> PaperModel:
    return PaperModel(stochastic_layers, x_dim, data_mean)
