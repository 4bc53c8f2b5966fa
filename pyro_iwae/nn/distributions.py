"""Distributions of the paper's networks, with one event dim (the rightmost).

Same values as ``Normal(...).to_event(1)`` and ``Bernoulli(...).to_event(1)``, but
each is one object instead of an ``Independent`` around a base distribution, and
log-densities are summed over the event before the cheap terms are added: Pyro's
plates expand every site's distribution at every step, so construction and
expansion are on the training loop's hot path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import register_kl
from torch.distributions.utils import lazy_property

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _OneEventDim(TorchDistribution):
    """A distribution whose parameters all have the shape ``batch + (event,)``."""

    _params: tuple[str, ...] = ()

    def __init__(self, shape: torch.Size, validate_args: bool | None) -> None:
        super().__init__(shape[:-1], shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> _OneEventDim:
        batch_shape = torch.Size(batch_shape)
        # Each plate around a site expands its distribution again, mostly to the
        # shape it already has; distributions are immutable, so reuse it.
        if _instance is None and batch_shape == self.batch_shape:
            return self
        new = self._get_checked_instance(type(self), _instance)
        shape = batch_shape + self.event_shape
        for name in self._params:
            setattr(new, name, getattr(self, name).expand(shape))
        _OneEventDim.__init__(new, shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


class DiagonalNormal(_OneEventDim):
    """A Gaussian with diagonal covariance over the rightmost dim, parameterised by
    its mean ``loc`` and log standard deviation ``log_scale`` (broadcastable)."""

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.independent(constraints.real, 1)
    has_rsample = True
    _params = ("loc", "log_scale", "scale")

    def __init__(
        self,
        loc: torch.Tensor,
        log_scale: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if loc.shape != log_scale.shape:
            loc, log_scale = torch.broadcast_tensors(loc, log_scale)
        self.loc, self.log_scale = loc, log_scale
        # Before any expansion, so that exp runs over the unexpanded parameters.
        self.scale = log_scale.exp()
        super().__init__(loc.shape, validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def stddev(self) -> torch.Tensor:
        return self.scale

    @property
    def variance(self) -> torch.Tensor:
        return self.scale.pow(2)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        squares = ((value - self.loc) / self.scale).pow(2).sum(-1)
        dim = self.event_shape[0]
        return -0.5 * squares - self.log_scale.sum(-1) - dim * _HALF_LOG_2PI

    def entropy(self) -> torch.Tensor:
        return self.event_shape[0] * (0.5 + _HALF_LOG_2PI) + self.log_scale.sum(-1)


@register_kl(DiagonalNormal, DiagonalNormal)
def _kl_diagonal_normal(p: DiagonalNormal, q: DiagonalNormal) -> torch.Tensor:
    # Closed form, as for Normal(...).to_event(1), so TraceMeanField_ELBO can use it.
    variance_ratio = (p.scale / q.scale).pow(2)
    mahalanobis = ((p.loc - q.loc) / q.scale).pow(2)
    log_ratio = 2 * (p.log_scale - q.log_scale)
    return 0.5 * (variance_ratio + mahalanobis - 1 - log_ratio).sum(-1)


class BernoulliImage(_OneEventDim):
    """Independent Bernoulli pixels over the rightmost dim, from their ``logits``."""

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    _params = ("logits",)

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape, validate_args)

    @lazy_property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    @property
    def variance(self) -> torch.Tensor:
        return self.probs * (1 - self.probs)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(
            -1
        )


class ContinuousBernoulliImage(_OneEventDim):
    """Independent continuous Bernoulli values in [0, 1] over the rightmost dim
    (Loaiza-Ganem & Cunningham 2019), from their ``logits``: the density
    ``C(p) p^x (1 - p)^(1 - x)`` with its normalising constant ``C(p)``, as
    :class:`torch.distributions.ContinuousBernoulli`, summed over the event."""

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.unit_interval, 1)
    has_rsample = True
    _params = ("logits",)

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape, validate_args)

    @lazy_property
    def _pixels(self) -> torch.distributions.ContinuousBernoulli:
        return torch.distributions.ContinuousBernoulli(
            logits=self.logits, validate_args=False
        )

    @property
    def mean(self) -> torch.Tensor:
        return self._pixels.mean

    @property
    def variance(self) -> torch.Tensor:
        return self._pixels.variance

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        return self._pixels.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self._pixels.log_prob(value).sum(-1)
