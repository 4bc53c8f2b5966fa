"""Diagnostics of importance weights, and sampling-importance-resampling.

Kish's effective sample size, the Pareto k-hat of the weights' tail (Vehtari et
al., *Pareto smoothed importance sampling*), both per data point, and posterior
draws per point resampled from the guide's importance-weighted particles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro.poutine.trace_struct import Trace

from ..errors import ProgramError
from .evaluation import check_count, local_shape, log_weight_chunks, particle_chunks
from .traces import latent_sites

#: k-hat above which an importance-sampling estimate is unreliable (Vehtari et al.).
KHAT_THRESHOLD = 0.7
# The Pareto fit needs a few tail weights to mean anything; the loo package and
# ArviZ give up below 5.
_MIN_TAIL = 5
# Tail weights whose logs span at most this many machine epsilons count as equal.
_FLAT = 1000


def effective_sample_size(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""Kish's effective sample size :math:`(\sum_i w_i)^2 / \sum_i w_i^2` of the
    weights :math:`w_i = \exp(\text{log\_weights}_i)` along ``dim``.

    Computed in log space, so any offset of the log weights is harmless. Between
    1 (one weight dominates) and K, the size of ``dim`` (equal weights).

    :returns: ``log_weights``'s shape without ``dim``.
    """
    return torch.exp(2 * log_weights.logsumexp(dim) - (2 * log_weights).logsumexp(dim))


def relative_stderr(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""Delta-method standard error of :math:`\log \frac{1}{K}\sum_i w_i`, in nats.

    :math:`\mathrm{sd}(w) / (\sqrt{K}\, \bar w)` with the unbiased sd, which is
    :math:`\sqrt{(K / \mathrm{ESS} - 1) / (K - 1)}`; NaN for K = 1.

    :returns: ``log_weights``'s shape without ``dim``.
    """
    return _stderr_of_ess(
        effective_sample_size(log_weights, dim), log_weights.shape[dim]
    )


def _stderr_of_ess(ess: torch.Tensor, num_samples: int) -> torch.Tensor:
    if num_samples == 1:
        return torch.full_like(ess, math.nan)
    # ESS can exceed K by a rounding error when the weights are all equal.
    return ((num_samples / ess - 1).clamp(min=0) / (num_samples - 1)).sqrt()


def tail_length(num_samples: int) -> int:
    """M, the number of largest weights the Pareto tail is fitted to, out of
    ``num_samples``: ``ceil(min(K / 5, 3 sqrt(K)))`` as in PSIS."""
    return math.ceil(min(0.2 * num_samples, 3 * math.sqrt(num_samples)))


def pareto_khat(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""Pareto :math:`\hat k` of the importance weights' upper tail along ``dim``.

    Fits a generalized Pareto distribution to the excesses of the largest
    M = :func:`tail_length` (K) weights over the next largest, by the method of
    Zhang & Stephens (2009) with the weakly informative prior of PSIS (as
    :func:`pyro.ops.stats.fit_generalized_pareto`, vectorized). The weights have
    finite variance for k < 1/2; above :data:`KHAT_THRESHOLD` (0.7) an
    importance-sampling estimate from them is unreliable. Fitted in log space:
    invariant to a constant added to the log weights, and finite however far
    they spread. ``-inf`` where the M + 1 largest weights are equal up to
    rounding (their logs span under 1000 machine epsilons: a flat tail, as with
    the exact posterior for guide); ``+inf`` where a quarter or more of the M
    largest equal the threshold (the (M+1)-th) but not all: the tail's mass on
    a few weights, most often one, and no finite fit; NaN where M < 5 (K <= 20).

    :returns: ``log_weights``'s shape without ``dim``.
    """
    num_samples = log_weights.shape[dim]
    moved = log_weights.movedim(dim, -1)
    top = moved.topk(min(tail_length(num_samples) + 1, num_samples), dim=-1).values
    return _khat_of_top(top, num_samples)


def _khat_of_top(top: torch.Tensor, num_samples: int) -> torch.Tensor:
    """k-hat from the largest log weights ``top`` (..., at least M + 1), sorted in
    descending order along the last dim, of ``num_samples`` in all."""
    m = tail_length(num_samples)
    if m < _MIN_TAIL:
        return torch.full(top.shape[:-1], math.nan, dtype=top.dtype, device=top.device)
    top = top[..., : m + 1]
    # Equal up to rounding (an exact guide's weights differ by rounding errors of
    # the log densities): no tail to fit, and the fit would divide by zero.
    flat = top[..., 0] - top[..., m] <= _FLAT * torch.finfo(top.dtype).eps
    # The logs of the excesses w_i - w_M over the threshold weight, relative to
    # the largest weight: weights whose logs span more than ~745 nats underflow
    # in float64, logs of their differences do not. Float64 because the excesses
    # can be tiny differences of weights.
    dtype, top = top.dtype, top.double()
    above = top[..., :m] - top[..., m:]
    log_excess = (top[..., :m] - top[..., :1]) + torch.log(-torch.expm1(-above))
    # Weights equal to the threshold's (-inf ones too) exceed it by nothing.
    log_excess = torch.where(above > 0, log_excess, -math.inf).flip(-1)
    # A quarter or more of the excesses 0 but not all: the tail's mass is on a
    # few weights (one, most often, far above the rest), and the fit has no
    # finite answer: as unreliable as weights get.
    quartile = log_excess[..., _quartile(m)]
    degenerate = (quartile == -math.inf) & ~flat
    skip = (flat | degenerate).unsqueeze(-1)
    log_excess = torch.where(skip, torch.zeros_like(log_excess), log_excess)
    khat = _fit_pareto_shape(log_excess)
    khat = khat.masked_fill(degenerate, math.inf).masked_fill(flat, -math.inf)
    return khat.to(dtype)


def _quartile(n: int) -> int:
    """The index of the excess that scales the fit's grid, of ``n`` ascending."""
    return int(n / 4 - 0.5)


def _fit_pareto_shape(log_excess: torch.Tensor) -> torch.Tensor:
    """Shape k of a generalized Pareto fitted to the excesses whose logs are the
    rows of ``log_excess`` (..., N), sorted ascending, the quartile finite: Pyro's
    ``fit_generalized_pareto`` (Zhang & Stephens 2009, PSIS prior), on every row
    at once, in log space, so that excesses spanning any range are fitted.

    Pyro's grid of b = k / sigma is ``b_j = 1 / x_N - c_j / (3 x_q)`` (x_q the
    quartile, c_j = sqrt(grid / (j - 1/2)) - 1 > 0); with y = x / x_N, r_j =
    c_j / (3 y_q) and b_j x_N = 1 - r_j, each log(1 - b_j x_i) is
    log(1 - y_i + r_j y_i), a sum of positive terms, and each profile term
    log(-b_j / k_j) is log|1 - r_j| - log|k_j| up to a constant, which the
    softmax over the grid drops."""
    n = log_excess.shape[-1]
    grid = 30 + int(math.sqrt(n))
    j = torch.arange(1, grid + 1, dtype=log_excess.dtype, device=log_excess.device)
    log_y = log_excess - log_excess[..., -1:]
    log_one_minus_y = torch.log(-torch.expm1(log_y))  # -inf at y = 1
    log_c = torch.log((grid / (j - 0.5)).sqrt() - 1)
    log_r = log_c - math.log(3) - log_y[..., _quartile(n), None]

    def k_at(log_r: torch.Tensor) -> torch.Tensor:
        """mean_i log(1 - b x_i) at each log r (..., G): (..., G)."""
        terms = torch.logaddexp(
            log_one_minus_y.unsqueeze(-2), log_r.unsqueeze(-1) + log_y.unsqueeze(-2)
        )
        return terms.mean(-1)

    k = k_at(log_r)
    # log|1 - r| = log|expm1(log r)|, without overflow for large r.
    log_b = torch.where(
        log_r > 0,
        log_r + torch.log(-torch.expm1(-log_r.clamp(min=0))),
        torch.log(-torch.expm1(log_r.clamp(max=0))),
    )
    profile = n * (log_b - torch.log(k.abs()) - k - 1)
    # Pyro drops grid points of weight below 1e-30, NaNs among them.
    weights = profile.nan_to_num(-math.inf).softmax(-1)
    weights = torch.where(weights > 1e-30, weights, torch.zeros_like(weights))
    # The posterior mean of b: 1 - r with r the weighted mean of the r_j.
    log_weights = weights.log() - weights.sum(-1, keepdim=True).log()
    k_post = k_at((log_weights + log_r).logsumexp(-1, keepdim=True)).squeeze(-1)
    # The prior: shrink toward 1/2 as if 10 more points had k = 1/2.
    return (k_post * n + 5.0) / (n + 10.0)


class Diagnostics(NamedTuple):
    """Per-point importance-sampling estimate and diagnostics, each of shape
    ``[batch]``: ``log_likelihood`` (nats), its delta-method ``stderr`` (nats),
    Kish's ``ess`` of the K weights (1 to K; where the guide enumerates sites,
    a particle's weight is the mean of its weights per value, see
    ``Particles.particle_log_weights``), and
    the Pareto ``khat`` of their tail (> 0.7: unreliable)."""

    log_likelihood: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor


def log_likelihood_with_diagnostics(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    max_plate_nesting: int = 1,
    chunk_size: int | None = None,
    compile: bool | str | None = False,
    vectorize_particles: bool = True,
    **kwargs: Any,
) -> Diagnostics:
    """:func:`~pyro_iwae.log_likelihood` (the same estimate, from the same random
    draws, also with ``compile``), with its standard error, ESS and Pareto k-hat
    per point.

    Chunked like ``log_likelihood``: the running sums of the weights and of their
    squares, and the M + 1 largest weights for k-hat (M = :func:`tail_length`,
    at most 3 sqrt(K) + 1), are all that is kept between chunks.
    ``vectorize_particles=False`` draws the particles one at a time, for programs
    that do not broadcast over them (see :func:`~pyro_iwae.log_likelihood`).
    """
    sum_w = sum_w2 = top = None
    count = 0  # weights: K, one per particle
    tail = min(tail_length(num_samples) + 1, num_samples)
    for particles in log_weight_chunks(
        model,
        guide,
        *args,
        num_samples=num_samples,
        chunk_size=chunk_size,
        max_plate_nesting=max_plate_nesting,
        compile=compile,
        vectorize_particles=vectorize_particles,
        caller="log_likelihood_with_diagnostics",
        **kwargs,
    ):
        log_w = particles.log_weights
        count += log_w.shape[0]
        chunk_w, chunk_w2 = log_w.logsumexp(0), (2 * log_w).logsumexp(0)
        if sum_w is None:
            sum_w, sum_w2, candidates = chunk_w, chunk_w2, log_w
        else:
            sum_w = torch.logaddexp(sum_w, chunk_w)
            sum_w2 = torch.logaddexp(sum_w2, chunk_w2)
            candidates = torch.cat([top, log_w])
        top = candidates.topk(min(tail, candidates.shape[0]), dim=0).values
    # As log_likelihood takes it (combine_chunks).
    count = max(count, num_samples)
    ess = torch.exp(2 * sum_w - sum_w2)
    stderr = _stderr_of_ess(ess, count)
    khat = _khat_of_top(top.movedim(0, -1), count)
    return Diagnostics(
        *(
            local_shape(particles.local_dims, t)
            for t in (sum_w - math.log(count), stderr, ess, khat)
        )
    )


def importance_resample(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int,
    num_draws: int,
    chunk_size: int | None = None,
    max_plate_nesting: int = 1,
    vectorize_particles: bool = True,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    r"""Approximate posterior draws per data point by sampling-importance-resampling.

    For each point x, ``num_samples`` particles :math:`z_i \sim q(z|x)` are weighed
    by :math:`p(x, z_i) / q(z_i|x)` and ``num_draws`` of them drawn with
    replacement in proportion to their weights: draws from the IWAE's implied
    posterior, which tends to p(z|x) as ``num_samples`` grows. Particles come
    ``chunk_size`` at a time (a weighted reservoir keeps each draw exact), so memory
    does not grow with ``num_samples``. ``vectorize_particles=False`` draws the
    particles one at a time, for programs that do not broadcast over them (see
    :func:`~pyro_iwae.log_likelihood`).

    :returns: latent site name (the guide's, and the model's that the guide leaves
        to the prior) -> tensor ``[num_draws, *plate_shape, *event_shape]``
        with ``max_plate_nesting`` plate dims (``[num_draws, batch, latent_dim]``
        for the paper's guides): the format of ``pyro.infer.Predictive``'s
        ``posterior_samples``.
    :raises ParticleBroadcastError: if the programs do not broadcast over the
        particles (pass ``vectorize_particles=False``).
    """
    check_count("num_draws", num_draws)
    draws: dict[str, torch.Tensor] = {}
    total = None
    for particles in particle_chunks(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        chunk_size,
        max_plate_nesting,
        vectorize_particles,
        "importance_resample",
    ):
        if particles.strata_shape is not None:
            raise ProgramError(
                "importance_resample draws particles, and the guide enumerates "
                "sites (infer={'enumerate': 'parallel'}); draw them instead, or "
                "enumerate them in the model"
            )
        log_w = particles.log_weights
        chunk_total = log_w.logsumexp(0)
        total = chunk_total if total is None else torch.logaddexp(total, chunk_total)
        # Each draw picks a particle within the chunk, then takes it over the draw
        # it holds with probability (chunk's weight) / (weight of all so far).
        picks = torch.distributions.Categorical(logits=log_w.movedim(0, -1)).sample(
            (num_draws,)
        )
        keep_new = (
            torch.rand_like(picks, dtype=log_w.dtype) < (chunk_total - total).exp()
        )
        for name, value in _latent_values(particles.traces, log_w.dim()).items():
            new = _gather(value, picks)
            held = draws.get(name)
            draws[name] = (
                new
                if held is None
                else torch.where(_broadcastable(keep_new, new), new, held)
            )
    return draws


def _latent_values(
    traces: list[tuple[Trace, Trace]], plate_dims: int
) -> dict[str, torch.Tensor]:
    """Each latent site's values ``[particles] + plate_shape + event_shape`` from
    the pairs of model and guide traces: one pair of all the particles, or one
    pair per particle (``vectorize_particles=False``). A latent the guide leaves
    out is drawn from the model with the rest of its particle: its resampled
    values are posterior draws too."""
    values: dict[str, list[torch.Tensor]] = {}
    for model_trace, guide_trace in traces:
        sites = [*latent_sites(guide_trace)]
        sites += [
            (name, site)
            for name, site in latent_sites(model_trace)
            if name not in guide_trace.nodes
        ]
        for name, site in sites:
            value = _with_particle_dim(site["value"], plate_dims, site["fn"].event_dim)
            values.setdefault(name, []).append(value)
    return {
        name: parts[0] if len(parts) == 1 else torch.cat(parts)
        for name, parts in values.items()
    }


def _with_particle_dim(
    value: torch.Tensor, plate_dims: int, event_dim: int
) -> torch.Tensor:
    """``value`` with all ``plate_dims`` batch dims (particle dim first) present."""
    missing = plate_dims + event_dim - value.dim()
    return value.reshape((1,) * missing + value.shape)


def _broadcastable(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` with trailing singleton dims to broadcast against ``like``."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


def _gather(value: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Particles ``picks`` (``[draws] + plate_shape``) of ``value`` (``[particles] +
    plate_shape + event``), per point: ``[draws] + value.shape[1:]``."""
    index = _broadcastable(picks, value)
    index = index.expand((picks.shape[0],) + value.shape[1:])
    return value.gather(0, index)
