"""Importance-weighted variational objectives as Pyro :class:`~pyro.infer.ELBO` s:
how :class:`IWELBO` combines the log-weights of its particles
(:mod:`~pyro_iwae.infer.particles`) into a bound, and its gradient estimators.
Rainforth et al.'s bounds are in :mod:`~pyro_iwae.infer.grouped`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.util import torch_item
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan

from ..errors import ConfigError, check_flag, check_plate_nesting
from .hooks import backend_of, check_compile, compiler, compiles
from .particles import (
    ESTIMATORS,
    SCORE_ESTIMATORS,
    STOPPED_ESTIMATORS,
    ParticleELBO,
    Particles,
)
from .traces import PARTICLE_PLATE, reweight_paths

__all__ = [
    "ESTIMATORS",
    "IWELBO",
    "PARTICLE_PLATE",
    "Particles",
    "SCORE_ESTIMATORS",
    "leave_one_out_signal",
]


class IWELBO(ParticleELBO):
    r"""The importance-weighted bound of Burda et al. (2016), per data point.

    For each point :math:`x` of the data plate and particles
    :math:`z_i \sim q(z|x)`, :math:`i = 1..k`:

    .. math:: L_k(x) = \log \frac{1}{k} \sum_i \frac{p(x, z_i)}{q(z_i|x)}.

    The loss is :math:`-s \sum_x L_k(x)`, with :math:`s` the scale of the sample
    sites (``N/B`` under a sub-sampled data plate, or set by ``poutine.scale``):
    the scale multiplies the bound and never enters the logsumexp. Log-probs of
    sites in other plates are summed into each point's log-weight. The data plate
    is the plate that encloses every sample site of model and guide; with none,
    the bound is joint over all sites (then sub-sampling is an error).

    Discrete sites marked ``infer={"enumerate": "parallel"}`` are not sampled: a
    site only the model has is summed out of :math:`p(x, z_i)` exactly, per
    particle; a site of the guide (in the data plate) gives each of its values
    y its own k particles of the sites below it, and the bound becomes
    :math:`\log \sum_y \frac{1}{k} \sum_i p(x, y, z_{yi}) / q(z_{yi}|x, y)`,
    in which q(y) cancels (see the documentation's page on enumeration).

    :param int num_particles: k, the number of importance samples per point.
    :param str estimator: guide gradient: ``"iwae"`` (reparameterised gradient of
        the bound), ``"stl"`` (sticking the landing, Roeder et al. 2017),
        ``"dreg"`` (doubly reparameterised, Tucker et al. 2019), ``"vimco"``
        (Mnih and Rezende 2016: guide sites without ``rsample`` get a
        score-function gradient with a leave-one-out baseline per particle, the
        others the ``"iwae"`` gradient; needs k >= 2) or ``"reinforce"`` (the same
        without a baseline: a reference for variance, not for training). The model
        gradient and the loss value are the same for all.
    :param bool vectorize_particles: draw the k particles in one vectorized plate
        (requires static model structure) rather than in a Python loop.
    :param int max_plate_nesting: the number of plates the model and guide nest,
        not counting the particle plate.
    :param compile: compute :meth:`differentiable_loss` (and so the loss of
        ``IWELBO(...)(model, guide)`` and :meth:`loss_and_grads`) as one compiled
        graph of the loss and its gradients, per input shape, for ``nn.Module``
        models and guides of static structure
        (:class:`~pyro_iwae.compiled.CompiledLoss`; other programs fall back to
        the eager path with one warning). ``True``
        compiles with inductor; a string names another ``torch.compile`` backend;
        ``None`` as a backend runs the traced graph uncompiled; ``"auto"`` lets
        :func:`~pyro_iwae.fit` compile a run long enough for it to pay
        (:func:`~pyro_iwae.runs.auto_compile.choose_fit_compile`), eager elsewhere.
    """

    def __init__(
        self,
        num_particles: int = 5,
        estimator: str = "iwae",
        vectorize_particles: bool = True,
        max_plate_nesting: int = 1,
        compile: bool | str | None = False,
        global_latents: str = "auto",
        **kwargs: Any,
    ) -> None:
        check_plate_nesting(max_plate_nesting)
        check_flag("vectorize_particles", vectorize_particles)
        super().__init__(
            num_particles,
            estimator,
            vectorize_particles,
            max_plate_nesting,
            global_latents,
            **kwargs,
        )
        _check_vimco(estimator, num_particles)
        check_compile(compile)
        self.compile = compile

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        """The per-point bound from ``log_weights`` of shape ``(k,) + plate_shape``
        (``(strata * k,) + plate_shape`` with values enumerated in the guide)."""
        return log_weights.logsumexp(0) - math.log(log_weights.shape[0])

    def _per_particle(
        self, log_weights: torch.Tensor, particles: Particles, pairs: int
    ) -> torch.Tensor:
        """``log_weights`` with the values enumerated in the guide summed out of
        each particle, shape ``(k,) + plate_shape``: log of the particle's estimate
        of p(x), the sum over values (as they are without such values)."""
        shape, plates = particles.strata_shape, log_weights.dim() - 1
        if shape is None:
            return log_weights
        if not self._has_particle_plate:
            # Python-loop particles: the values fill the particle dim's place too.
            values = log_weights.reshape((pairs,) + shape).flatten(
                1, len(shape) - plates
            )
            return values.logsumexp(1) - math.log(values.shape[1])
        values = log_weights.reshape(shape).flatten(0, len(shape) - plates - 2)
        return values.logsumexp(0) - math.log(values.shape[0])

    def _path_factor(self, log_weights: torch.Tensor) -> torch.Tensor | None:
        """Per-particle factor on the gradient that reaches the latent values.

        DReG replaces each normalized weight in the path gradient by its square,
        so the factor is the normalized weight; ``None`` leaves it alone.
        """
        return log_weights.softmax(0) if self.estimator == "dreg" else None

    def _guide_bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        """The per-point bound that the guide is trained on."""
        return self.bound(log_weights)

    def _score_signal(self, log_weights: torch.Tensor) -> torch.Tensor:
        """Per-particle learning signal of the score-function term, shape
        ``(k,) + plate_shape``: the guide's bound less each particle's baseline
        (none for ``reinforce``)."""
        if self.estimator == "reinforce":
            return self._guide_bound(log_weights).expand_as(log_weights)
        return leave_one_out_signal(log_weights)

    def _global_score_signal(
        self, log_weights: torch.Tensor, particles: Particles, objective: torch.Tensor
    ) -> torch.Tensor:
        """Learning signal of the score-function term of the global guide sites
        without ``rsample``, per particle (broadcast to ``global_log_weight``):
        one draw of them for all particles (``_check_global_sites``), so the
        whole ``objective``."""
        return objective

    def _weighted_loss(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, list[tuple[Trace, Trace]]]:
        particles = self.particles(model, guide, *args, **kwargs)
        log_weights, traces = particles.log_weights, particles.traces
        bound = self.bound(log_weights)
        score = particles.score_log_prob
        if score is not None and score.requires_grad:
            # The sampled values of these sites carry no gradient: the score term
            # adds E[signal_i * d log q(h_i)], zero in value.
            signal = self._score_signal(
                self._per_particle(log_weights.detach(), particles, len(traces))
            )
            surrogate = (signal * score).sum(0)
            bound = bound + (surrogate - surrogate.detach())
        if not particles.unscaled:
            bound = bound * particles.scale
        loss = -bound.sum()
        if particles.global_log_weight is not None:
            # An ELBO term in the global latents: one value per group of particles,
            # so the mean over particles is the mean over groups.
            loss = loss - particles.global_log_weight.mean(0).sum()
        global_score = particles.global_score_log_prob
        if global_score is not None and global_score.requires_grad:
            signal = self._global_score_signal(
                log_weights.detach(), particles, -loss.detach()
            )
            surrogate = (signal * global_score).mean(0).sum()
            loss = loss - (surrogate - surrogate.detach())
        # No NaN check here: it would read the value back from the device at every
        # step; loss() and loss_and_grads() check the float they return.
        if loss.requires_grad and log_weights.shape[0] > 1:
            # One particle's factor is 1, nothing to reweight; and a global site,
            # untied at k = 1, has no particle dim to take a factor.
            factor = self._path_factor(log_weights.detach())
            if factor is not None and particles.strata_shape is not None:
                # Per pair of traces, as the values enumerated in the guide index
                # the sites below them.
                shape = particles.strata_shape
                if not self._has_particle_plate:
                    shape = (len(traces),) + shape
                factor = factor.reshape(shape)
            if factor is not None:
                stopped = self.estimator in STOPPED_ESTIMATORS
                reweight_paths(
                    factor, traces, self._has_particle_plate, stopped, self._tied
                )
                if not stopped and particles.guide_log_prob.requires_grad:
                    particles.guide_log_prob.register_hook(lambda g: g * factor)
        return loss, traces

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Returns the negative bound, differentiable with the chosen estimator."""
        if compiles(self.compile):
            loss = compiler().loss(self, model, guide, backend_of(self.compile))
            return loss(*args, **kwargs)
        return self.eager_loss(model, guide, *args, **kwargs)

    def eager_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """:meth:`differentiable_loss` computed eagerly whatever ``compile`` says:
        what a compiled loss traces, and checks its graphs against."""
        return self._weighted_loss(model, guide, args, kwargs)[0]

    def loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> float:
        """Returns an estimate of the negative bound, as a float."""
        with torch.no_grad():
            return _checked_item(self._weighted_loss(model, guide, args, kwargs)[0])

    def loss_and_grads(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> float:
        """Returns the negative bound and accumulates its gradient in ``.grad``."""
        if compiles(self.compile):
            loss = self.differentiable_loss(model, guide, *args, **kwargs)
            # Without trainable parameters the compiled loss is the eager one,
            # with nothing to differentiate: no backward, as below.
            if loss.requires_grad:
                loss.backward()
            return _checked_item(loss)
        loss, traces = self._weighted_loss(model, guide, args, kwargs)
        trainable = any(
            site["type"] == "param"
            for pair in traces
            for trace in pair
            for site in trace.nodes.values()
        )
        if trainable and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return _checked_item(loss)


def leave_one_out_signal(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""VIMCO's learning signal :math:`L - L_{-i}` for each particle ``i`` along
    ``dim`` (Mnih and Rezende 2016, eq. 9-10), in log space.

    :math:`L = \log \frac{1}{k} \sum_j w_j`; :math:`L_{-i}` is the same with
    :math:`\log w_i` replaced by the mean of the other log weights (the geometric
    mean of the other weights). Needs ``k >= 2`` particles along ``dim``.
    """
    lw = log_weights.movedim(dim, 0)
    # Sums of the others' weights from prefix and suffix logsumexps: subtracting
    # w_i from the total would cancel catastrophically when w_i dominates.
    edge = lw.new_full(lw[:1].shape, -math.inf)
    before = torch.cat([edge, lw.logcumsumexp(0)[:-1]])
    after = torch.cat([lw.flip(0).logcumsumexp(0).flip(0)[1:], edge])
    others = torch.logaddexp(before, after)
    baseline = torch.logaddexp(others, _mean_of_others(lw, 0))
    return (lw.logsumexp(0, keepdim=True) - baseline).movedim(0, dim)


def _mean_of_others(log_weights: torch.Tensor, dim: int) -> torch.Tensor:
    """For each entry along ``dim``, the mean of the other entries."""
    k = log_weights.shape[dim]
    # A zero weight (log -inf) makes the mean of the others it is among -inf;
    # the rest is computed from the finite entries, so as not to turn it to NaN.
    zero = log_weights == -math.inf
    finite = log_weights.masked_fill(zero, 0.0)
    # Centred first: sum - x_i would lose digits to large log weights.
    centre = finite.mean(dim, keepdim=True)
    deviation = finite - centre
    mean = centre + (deviation.sum(dim, keepdim=True) - deviation) / (k - 1)
    zero_others = zero.sum(dim, keepdim=True) - zero.long() > 0
    return mean.masked_fill(zero_others, -math.inf)


def _check_vimco(estimator: str, particles_per_bound: int) -> None:
    """:raises ConfigError: for ``vimco`` with fewer than 2 particles a bound."""
    if estimator == "vimco" and particles_per_bound < 2:
        raise ConfigError(
            "estimator='vimco' needs at least 2 particles per bound for its "
            f"leave-one-out baseline, got {particles_per_bound}; pass "
            "num_particles=2 or more, or another estimator",
            literal=True,
        )


def _checked_item(loss: torch.Tensor) -> float:
    value = torch_item(loss)
    warn_if_nan(value, "loss")
    return value
