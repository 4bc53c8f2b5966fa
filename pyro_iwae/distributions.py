"""Distributions of the paper's networks, with log-densities summed over the event
before the cheap terms are added: one pass fewer over ``[k, batch, dim]`` tensors
than ``Normal(...).to_event(1)`` and ``Bernoulli(...).to_event(1)``, same values."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions.utils import broadcast_all


class _OneEventDim(dist.Independent):
    """An ``Independent`` over the rightmost dim, expandable although its
    subclasses take other arguments than ``Independent``."""

    def expand(self, batch_shape, _instance=None) -> _OneEventDim:
        new = self._get_checked_instance(type(self), _instance)
        shape = torch.Size(batch_shape) + self.event_shape
        dist.Independent.__init__(new, self.base_dist.expand(shape), 1, False)
        new._validate_args = self._validate_args
        self._expand_parameters(new, shape)
        return new

    def _expand_parameters(self, new: _OneEventDim, shape: torch.Size) -> None:
        """Sets on ``new`` the subclass's own parameters, expanded to ``shape``."""


class DiagonalNormal(_OneEventDim):
    """A Gaussian with diagonal covariance over the rightmost dim, parameterised by
    its mean ``loc`` and log standard deviation ``log_scale`` (same shapes)."""

    def __init__(
        self,
        loc: torch.Tensor,
        log_scale: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        self.log_scale = log_scale
        super().__init__(
            dist.Normal(loc, log_scale.exp()), 1, validate_args=validate_args
        )

    def _expand_parameters(self, new: DiagonalNormal, shape: torch.Size) -> None:
        new.log_scale = self.log_scale.expand(shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        base = self.base_dist
        squares = ((value - base.loc) / base.scale).pow(2).sum(-1)
        dim = self.event_shape[0]
        return (
            -0.5 * squares - self.log_scale.sum(-1) - 0.5 * dim * math.log(2 * math.pi)
        )


class BernoulliImage(_OneEventDim):
    """Independent Bernoulli pixels over the rightmost dim, from their ``logits``."""

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        super().__init__(dist.Bernoulli(logits=logits), 1, validate_args=validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.base_dist.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(
            -1
        )
