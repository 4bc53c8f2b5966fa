"""Distributions of the paper's networks, with one event dim (the rightmost).

Same values as ``Normal(...).to_event(1)`` and ``Bernoulli(...).to_event(1)``, but
each is one object instead of an ``Independent`` around a base distribution, and
log-densities are summed over the event before the cheap terms are added: Pyro's
plates expand every site's distribution at every step, so construction and
expansion are on the training loop's hot path.
"""

from __future__ import annotations

import math
from fractions import Fraction
from math import comb, factorial

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
    (Loaiza-Ganem & Cunningham 2019), from their ``logits`` L: the density
    ``exp(L x) / N(L)`` on [0, 1] with ``N(L) = (e^L - 1) / L``, which is
    ``C(p) p^x (1 - p)^(1 - x)`` for ``p = sigmoid(L)``, summed over the event.

    Unlike :class:`torch.distributions.ContinuousBernoulli`, which clamps the
    probabilities in its normaliser, mean and draws to [eps, 1 - eps] (|L| above
    about 16 in float32, 37 in float64) but not in ``L x``, it is normalised,
    and its moments and draws exact, at every logit.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.unit_interval, 1)
    has_rsample = True
    _params = ("logits",)

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = logits
        super().__init__(logits.shape, validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return _cb_mean(self.logits)

    @property
    def variance(self) -> torch.Tensor:
        return _cb_variance(self.logits)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        logits = self.logits.expand(shape)
        uniform = torch.rand(shape, dtype=logits.dtype, device=logits.device)
        return _cb_icdf(logits, uniform)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (self.logits * value - _cb_log_normaliser(self.logits)).sum(-1)


# Below this |L| the continuous Bernoulli's log normaliser and mean come from
# their Taylor series in L, and below _CB_VARIANCE_SERIES its variance: the
# closed forms lose digits to cancellation there (and are 0 / 0 at L = 0). The
# series converge for |L| < 2 pi, and have terms enough to reach float64's
# precision at the switch, where both forms agree to a few epsilons.
_CB_SERIES = 0.5
_CB_VARIANCE_SERIES = 2.0
# The draws' series (in |L|) is used below this, the form with log1p below
# _CB_LOG1P, and one in log space above it (log1p's needs e^-|L| beside 1).
_CB_DRAW_SERIES = 0.01
_CB_LOG1P = 1.0


def _bernoulli_numbers(count: int) -> list[Fraction]:
    """B_2, B_4, ..., B_(2 count)."""
    numbers = [Fraction(1)]
    for m in range(1, 2 * count + 1):
        numbers.append(-sum(comb(m + 1, k) * numbers[k] for k in range(m)) / (m + 1))
    return numbers[2::2]


# Taylor coefficients of log N(L) - L / 2 (of L^2, L^4, ...), of the mean
# - 1/2 (of L, L^3, ...) and of the variance (of 1, L^2, ...): from
# log N(L) = L / 2 + sum_n B_2n L^2n / (2n (2n)!).
_B = list(enumerate(_bernoulli_numbers(20), start=1))
_CB_LOG_NORMALISER_TERMS = tuple(
    float(b / (2 * n * factorial(2 * n))) for n, b in _B[:10]
)
_CB_MEAN_TERMS = tuple(float(b / factorial(2 * n)) for n, b in _B[:10])
_CB_VARIANCE_TERMS = tuple(float(b * (2 * n - 1) / factorial(2 * n)) for n, b in _B)


def _polynomial(x: torch.Tensor, coefficients: tuple) -> torch.Tensor:
    """sum_i coefficients[i] x^i (numbers or tensors; two or more), by Horner's
    rule."""
    result = coefficients[-1]
    for c in coefficients[-2::-1]:
        result = result * x + c
    return result


def _split(logits: torch.Tensor, below: float) -> tuple[torch.Tensor, ...]:
    """(|L| < below, L there and 0 elsewhere, |L| but ``below`` there): each
    branch gets values where it is finite, so that torch.where's unused branch
    gives no inf or NaN gradients."""
    size = logits.abs()
    small = size < below
    return small, torch.where(small, logits, 0.0), torch.where(small, below, size)


def _cb_log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """log N(L) = log((e^L - 1) / L), the log of the integral of e^(L x)."""
    small, near, size = _split(logits, _CB_SERIES)
    # N(L) = e^max(L, 0) (1 - e^-|L|) / |L|: nothing overflows.
    far = logits.clamp(min=0) + torch.log(-torch.expm1(-size)) - torch.log(size)
    series = near / 2 + near**2 * _polynomial(near**2, _CB_LOG_NORMALISER_TERMS)
    return torch.where(small, series, far)


def _cb_mean(logits: torch.Tensor) -> torch.Tensor:
    """The mean d log N / dL = 1 / (1 - e^-L) - 1 / L."""
    small, near, size = _split(logits, _CB_SERIES)
    # The mean at -|L|, 1/|L| - 1/(e^|L| - 1), without overflow.
    low = 1 / size + torch.exp(-size) / torch.expm1(-size)
    far = torch.where(logits > 0, 1 - low, low)
    series = 0.5 + near * _polynomial(near**2, _CB_MEAN_TERMS)
    return torch.where(small, series, far)


def _cb_variance(logits: torch.Tensor) -> torch.Tensor:
    """The variance d^2 log N / dL^2 = 1 / L^2 - e^-|L| / (1 - e^-|L|)^2."""
    small, near, size = _split(logits, _CB_VARIANCE_SERIES)
    far = 1 / size**2 - torch.exp(-size) / torch.expm1(-size) ** 2
    return torch.where(small, _polynomial(near**2, _CB_VARIANCE_TERMS), far)


def _cb_icdf(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The value below which a fraction ``uniform`` of the mass lies: from
    e^(L x) = 1 + u (e^L - 1), x = log1p(u expm1(L)) / L."""
    small, near, size = _split(logits, _CB_DRAW_SERIES)
    # Away from 0, draw y for the logit -a = -|L| from t (u, or 1 - u for
    # L > 0), and flip it for L > 0: the same value, and nothing overflows.
    positive = logits > 0
    t = torch.where(positive, 1 - uniform, uniform)
    # y = -log(1 - t + t e^-a) / a
    mid = torch.where(size < _CB_LOG1P, size, _CB_DRAW_SERIES)
    y_mid = -torch.log1p(t * torch.expm1(-mid)) / mid
    far = size.clamp(min=_CB_LOG1P)
    # log(1 - t) and log t from u directly: 1 - t would round t's complement.
    log_t = torch.where(positive, torch.log1p(-uniform), torch.log(uniform))
    log_not_t = torch.where(positive, torch.log(uniform), torch.log1p(-uniform))
    y_far = -torch.logaddexp(log_not_t, log_t - far) / far
    # Rounding can put y an epsilon outside [0, 1].
    y = torch.where(size < _CB_LOG1P, y_mid, y_far).clamp(0, 1)
    # Near 0, the series in the signed L (so that the slope at 0 is right),
    # with r = u (1 - u) and w = 1 - 2 u.
    r, w = uniform * (1 - uniform), 1 - 2 * uniform
    terms = (
        1 / 2,
        w / 6,
        (1 - 6 * r) / 24,
        w * (1 - 12 * r) / 120,
        (120 * r**2 - 30 * r + 1) / 720,
        w * (360 * r**2 - 60 * r + 1) / 5040,
    )
    x_near = uniform + r * near * _polynomial(near, terms)
    return torch.where(small, x_near, torch.where(positive, 1 - y, y))
