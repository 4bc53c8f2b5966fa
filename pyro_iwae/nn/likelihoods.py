"""Likelihoods p(x|z) of the models' observed site, by name.

Each is a proper density (or mass function) in nats, its normalising constant
included, so that log-likelihoods compare across likelihoods:

- ``"bernoulli"``: independent Bernoulli values in {0, 1} (the paper's);
- ``"gaussian"``: independent Gaussians, of a fixed standard deviation
  ``sigma`` or, with ``sigma=None``, one learned per output dimension;
- ``"continuous-bernoulli"``: independent continuous Bernoulli values in
  [0, 1] (Loaiza-Ganem & Cunningham 2019).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .distributions import BernoulliImage, ContinuousBernoulliImage, DiagonalNormal

__all__ = ["CONTINUOUS", "LIKELIHOODS", "Likelihood", "support_problem"]

LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian", "continuous-bernoulli")
#: Likelihoods of continuous data: their NLL is also reported in bits/dim.
CONTINUOUS: tuple[str, ...] = ("gaussian", "continuous-bernoulli")


def check_likelihood(name: str, sigma: float | None = None) -> None:
    """:raises ValueError: for an unknown name, or a ``sigma`` it does not take."""
    if name not in LIKELIHOODS:
        raise ValueError(
            f"unknown likelihood {name!r}; choose one of: {', '.join(LIKELIHOODS)}"
        )
    if sigma is not None and name != "gaussian":
        raise ValueError(f"sigma applies to the gaussian likelihood, not to {name}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive number, got {sigma}")


class Likelihood(nn.Module):
    """Maps the decoder's output (``[..., x_dim]``) to the distribution of x.

    :param name: one of :data:`LIKELIHOODS`.
    :param x_dim: size of x.
    :param sigma: the Gaussian's fixed standard deviation; None learns one per
        dimension (from 1). Only for ``"gaussian"``.
    """

    def __init__(self, name: str, x_dim: int, sigma: float | None = None) -> None:
        super().__init__()
        check_likelihood(name, sigma)
        self.name = name
        if name == "gaussian" and sigma is None:
            self.log_sigma = nn.Parameter(torch.zeros(x_dim))
        elif name == "gaussian":
            self.register_buffer("log_sigma", torch.full((x_dim,), math.log(sigma)))

    def forward(self, output: torch.Tensor) -> torch.distributions.Distribution:
        if self.name == "bernoulli":
            return BernoulliImage(output)
        if self.name == "continuous-bernoulli":
            return ContinuousBernoulliImage(output)
        return DiagonalNormal(output, self.log_sigma.expand(output.shape))

    def initial_bias(self, data_mean: torch.Tensor) -> torch.Tensor:
        """The decoder's output bias that gives about the data's mean: the
        mean itself (Gaussian) or its logit (clipped to [1e-3, 1 - 1e-3])."""
        if self.name == "gaussian":
            return data_mean
        return torch.logit(data_mean.clamp(1e-3, 1 - 1e-3))


def support_problem(
    likelihood: str | None,
    x: torch.Tensor,
    what: str = "data",
    fix: str | None = None,
) -> str | None:
    """One sentence on why values ``x`` lie outside the support of
    ``likelihood`` (None: a model's own, of a support unknown here: only
    finite values are asked for), or None if they fit; ``fix`` (None: advice
    for training) ends it where the values are finite."""
    if not bool(torch.isfinite(x).all()):
        return f"the {what} hold nan or infinite values; remove them"
    if likelihood in ("gaussian", None) or not x.numel():
        return None
    low, high = float(x.min()), float(x.max())
    if likelihood == "continuous-bernoulli" and (low < 0 or high > 1):
        return (
            f"the {what} hold values in [{low:g}, {high:g}], outside [0, 1], the "
            "support of the continuous-bernoulli likelihood; "
            + (fix or "scale them into [0, 1] or use likelihood='gaussian'")
        )
    if likelihood == "bernoulli" and not bool(((x == 0) | (x == 1)).all()):
        advice = fix or (
            "use binarize='dynamic' or binarize='static' for values in [0, 1], "
            "or likelihood='continuous-bernoulli'"
            if low >= 0 and high <= 1
            else "use likelihood='gaussian', or scale them into [0, 1] and binarise"
        )
        return (
            f"the {what} hold values other than 0 and 1 (in [{low:g}, {high:g}]), "
            f"outside the support of the bernoulli likelihood; {advice}"
        )
    return None
