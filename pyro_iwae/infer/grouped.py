"""The bounds of Rainforth et al. (2018), *Tighter variational bounds are not
necessarily better*: :class:`MIWELBO`, :class:`CIWELBO` and :class:`PIWELBO`,
each an :class:`~pyro_iwae.infer.objectives.IWELBO` that groups or mixes its
particles."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import check_count
from .log_weights import Particles
from .objectives import IWELBO, _check_vimco, _mean_of_others, leave_one_out_signal

__all__ = ["CIWELBO", "MIWELBO", "PIWELBO"]


class MIWELBO(IWELBO):
    r"""The multiply importance weighted bound MIWAE(M, K) of Rainforth et al. (2018):
    the mean of ``num_groups`` (M) independent :class:`IWELBO` bounds of
    ``num_particles`` (K) particles each,

    .. math:: \frac{1}{M} \sum_m \log \frac{1}{K} \sum_k w_{mk}.

    All M K particles are drawn at once; other arguments as :class:`IWELBO`.
    """

    def __init__(
        self,
        num_particles: int = 8,
        num_groups: int = 8,
        estimator: str = "iwae",
        **kwargs: Any,
    ) -> None:
        _check_not_estimator(type(self), "num_groups", num_groups)
        num_groups = check_count("num_groups", num_groups)
        num_particles = check_count("num_particles", num_particles)
        # The leave-one-out baseline is taken within each group.
        _check_vimco(estimator, num_particles)
        super().__init__(
            num_particles=num_groups * num_particles, estimator=estimator, **kwargs
        )
        self.num_groups = num_groups
        self.group_size = num_particles

    _takes_strata = False

    @property
    def _global_group_size(self) -> int:
        return self.group_size

    _global_score_draws = True

    def _grouped(self, log_weights: torch.Tensor) -> torch.Tensor:
        return log_weights.reshape(
            (self.num_groups, self.group_size) + log_weights.shape[1:]
        )

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        grouped = self._grouped(log_weights)
        return (grouped.logsumexp(1) - math.log(self.group_size)).mean(0)

    def _path_factor(self, log_weights: torch.Tensor) -> torch.Tensor | None:
        if self.estimator != "dreg":
            return None
        return self._grouped(log_weights).softmax(1).reshape(log_weights.shape)

    def _guide_bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return MIWELBO.bound(self, log_weights)

    def _score_signal(self, log_weights: torch.Tensor) -> torch.Tensor:
        if self.estimator == "reinforce":
            return super()._score_signal(log_weights)
        # Only the particle's own group depends on it; the other groups' bounds
        # are part of its baseline.
        signal = leave_one_out_signal(self._grouped(log_weights), dim=1)
        return (signal / self.num_groups).reshape(log_weights.shape)

    def _global_score_signal(
        self, log_weights: torch.Tensor, particles: Particles, objective: torch.Tensor
    ) -> torch.Tensor:
        # Each group draws its own global values: only its own term of the
        # objective depends on them, and (vimco) the mean of the other groups'
        # terms is its baseline.
        local = self._grouped(log_weights).logsumexp(1) - math.log(self.group_size)
        if not particles.unscaled:
            local = local * particles.scale
        group_global = particles.global_log_weight.detach()
        terms = local.flatten(1).sum(1) + self._grouped(group_global).flatten(1).mean(1)
        if self.estimator == "vimco" and self.num_groups > 1:
            terms = terms - _mean_of_others(terms, 0)
        signal = terms.repeat_interleave(self.group_size)
        return signal.reshape((-1,) + (1,) * (group_global.dim() - 1))


class CIWELBO(IWELBO):
    r"""The combination bound CIWAE(beta) of Rainforth et al. (2018):
    ``beta`` times the ELBO plus ``1 - beta`` times the IWAE bound, on the same
    ``num_particles`` particles,

    .. math:: \beta \frac{1}{K} \sum_k \log w_k
        + (1 - \beta) \log \frac{1}{K} \sum_k w_k.

    With ``estimator="dreg"`` the ELBO part takes the path gradient alone (as
    ``stl``, unbiased for the ELBO) and the IWAE part the DReG gradient.
    """

    #: Its ELBO part weighs each value's particles on their own.
    _takes_strata_scores = False

    def __init__(
        self,
        num_particles: int = 64,
        beta: float = 0.5,
        estimator: str = "iwae",
        **kwargs: Any,
    ) -> None:
        _check_beta(beta)
        super().__init__(num_particles=num_particles, estimator=estimator, **kwargs)
        self.beta = beta

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return self.beta * log_weights.mean(0) + (1 - self.beta) * super().bound(
            log_weights
        )

    def _path_factor(self, log_weights: torch.Tensor) -> torch.Tensor | None:
        if self.estimator != "dreg":
            return None
        # d bound / d log w_i is beta/K + (1 - beta) w_i; DReG wants
        # beta/K + (1 - beta) w_i^2 on the path gradient.
        w = log_weights.softmax(0)
        elbo_part = self.beta / self.num_particles
        plain = elbo_part + (1 - self.beta) * w
        # At beta = 0 an underflowed weight gets no gradient to scale: 0, not 0/0.
        return torch.where(plain > 0, (elbo_part + (1 - self.beta) * w**2) / plain, 0.0)

    def _score_signal(self, log_weights: torch.Tensor) -> torch.Tensor:
        if self.estimator == "reinforce":
            return super()._score_signal(log_weights)
        # The same baseline in both parts: log w_i replaced by the mean of the
        # others' log weights.
        elbo_part = log_weights - _mean_of_others(log_weights, 0)
        return self.beta / self.num_particles * elbo_part + (
            1 - self.beta
        ) * leave_one_out_signal(log_weights)


class PIWELBO(MIWELBO):
    """The partial bound PIWAE(M, K) of Rainforth et al. (2018): the model is
    trained on the :class:`IWELBO` bound of all M K particles (the loss is its
    negative), the guide on the :class:`MIWELBO` bound of the same particles.

    The gradient reaching the guide is reweighted per particle from the IWAE
    coefficient to the MIWAE one (their ratio is computed in log space, exactly);
    a particle whose IWAE weight underflows (a log-weight more than about 87
    nats, in float32, below the best of all M K) passes no gradient.
    """

    _reweights_paths = True

    @property
    def _global_group_size(self) -> int:
        # The model's bound pools all M K particles: they share one draw.
        return self.num_particles

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        return IWELBO.bound(self, log_weights)

    def _path_factor(self, log_weights: torch.Tensor) -> torch.Tensor | None:
        grouped = self._grouped(log_weights)
        # (1/M) softmax within the group over softmax over all particles:
        ratio = (
            log_weights.logsumexp(0)
            - grouped.logsumexp(1, keepdim=True)
            - math.log(self.num_groups)
        ).exp()
        if self.estimator == "dreg":
            ratio = ratio * grouped.softmax(1)
        factor = ratio.expand_as(grouped).reshape(log_weights.shape)
        # A group whose IWAE weights underflow has an infinite ratio and no
        # gradient to scale: it passes none, not inf * 0 = NaN.
        return torch.where(factor.isfinite(), factor, 0.0)


def _check_not_estimator(cls: type, name: str, value: Any) -> None:
    """:raises ValueError: for a string as ``name``, the second parameter of
    ``cls``: the estimator, placed where ``IWELBO(5, "dreg")`` places it."""
    if isinstance(value, str):
        kind = "an integer >= 1" if name == "num_groups" else "a number in [0, 1]"
        raise ValueError(
            f"{name} must be {kind}, got {value!r} (str); the second argument of "
            f"{cls.__name__} is {name}: pass estimator={value!r} by name"
        )


def _check_beta(beta: Any) -> None:
    """:raises ValueError: unless ``beta`` is a number in [0, 1] (not a bool)."""
    _check_not_estimator(CIWELBO, "beta", beta)
    try:
        value = None if isinstance(beta, bool) else float(beta)
    except (TypeError, ValueError, RuntimeError):  # None, a list, a long tensor
        value = None
    if value is None:
        raise ValueError(
            f"beta must be a number in [0, 1], got {beta!r} ({type(beta).__name__})"
        )
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
