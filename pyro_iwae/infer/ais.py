r"""Annealed importance sampling (AIS) from the guide to the posterior, and
bidirectional Monte Carlo (BDMC) bounds on :math:`\log p(x)`.

AIS (Neal 2001) moves chains through the geometric path

.. math:: \log \pi_\beta(z) = \log q(z|x) + \beta\,(\log p(x, z) - \log q(z|x)),
    \quad 0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

from the guide to the posterior, with one Hamiltonian Monte Carlo transition per
intermediate distribution, and weighs each chain by
:math:`\sum_t (\beta_t - \beta_{t-1}) \log w(z_{t-1})`,
:math:`\log w = \log p(x, z) - \log q(z|x)`: an unbiased estimate of
:math:`p(x)`, so its log is a stochastic lower bound on :math:`\log p(x)`. Run in
reverse from an exact posterior sample (for data simulated from the model, the
latents that made it), the same path gives a stochastic upper bound (Grosse et al.
2015, *Sandwiching the marginal likelihood using bidirectional Monte Carlo*;
Wu et al. 2017, *On the quantitative analysis of decoder-based generative models*).

The chains and their HMC transitions are in :mod:`pyro_iwae.infer.ais_chains`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..errors import AIS_NOT_SEQUENTIAL, AISError
from .ais_chains import Chains, ChainSettings, tuned_step_sizes
from .arguments import check_batch
from .diagnostics import (
    effective_sample_size,
    pareto_khat,
    relative_stderr,
)
from .estimable import trace_shapes_dropped
from .evaluation import (
    DEFAULT_MEMORY_BUDGET,
    check_count,
    chunk_sizes,
    evaluating,
    local_shape,
    resolve_chunk_size,
)

SCHEDULES = ("sigmoid", "linear")
#: Acceptance rate the HMC step size is adapted toward (as Wu et al. 2017).
TARGET_ACCEPT = 0.65
#: Sharpness of the sigmoid schedule (Grosse et al. 2015 use 4).
SIGMOID_SHARPNESS = 4.0


class AISResult(NamedTuple):
    """Per-point AIS estimates; every field but ``log_weights`` has shape ``[batch]``.

    - ``log_likelihood``: the estimate of log p(x), in nats: a stochastic lower
      bound (forward AIS) or upper bound (reverse AIS);
    - ``stderr``: its delta-method standard error over chains, in nats (NaN for
      one chain): the Monte Carlo error only, not the bound's bias;
    - ``ess``, ``khat``: Kish's effective sample size (1 to ``num_chains``) and
      the Pareto k-hat (NaN for 20 chains or fewer) of the chains' weights;
    - ``acceptance_rate``: the HMC acceptance probability, averaged over chains
      and transitions (NaN with ``num_steps=1``: no transitions);
    - ``step_size``: the tuned leapfrog step size of the transition nearest the
      posterior (NaN with ``num_steps=1``);
    - ``log_weights``: ``[num_chains, batch]``, each chain's log weight: an
      estimate of log p(x) (forward) or of -log p(x) (reverse).
    """

    log_likelihood: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    log_weights: torch.Tensor


class BDMCResult(NamedTuple):
    """Forward (``lower``) and reverse (``upper``) AIS on the same points: a
    sandwich lower <= log p(x) <= upper, in expectation."""

    lower: AISResult
    upper: AISResult

    @property
    def gap(self) -> torch.Tensor:
        """Upper minus lower bound per point, in nats: a bound on either's error."""
        return self.upper.log_likelihood - self.lower.log_likelihood


def ais_schedule(num_steps: int, schedule: str = "sigmoid") -> torch.Tensor:
    r"""Inverse temperatures :math:`0 = \beta_0 < \dots < \beta_T = 1`,
    ``T = num_steps``: a float64 tensor of shape ``[num_steps + 1]``.

    ``"linear"``: :math:`t / T`. ``"sigmoid"`` (Grosse et al. 2015):
    :math:`\sigma(\delta (2t/T - 1))` rescaled to run from 0 to 1,
    :math:`\delta` = :data:`SIGMOID_SHARPNESS`: finer steps at both ends than in
    the middle.
    """
    check_count("num_steps", num_steps)
    t = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    if schedule == "linear":
        return t
    if schedule == "sigmoid":
        s = torch.sigmoid(SIGMOID_SHARPNESS * (2 * t - 1))
        betas = (s - s[0]) / (s[-1] - s[0])
        # Exact ends: beta_T = 1 makes the last target the posterior itself.
        betas[0], betas[-1] = 0.0, 1.0
        return betas
    raise ValueError(
        f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}"
    )


def ais_log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_steps: int = 1000,
    num_chains: int = 16,
    schedule: str = "sigmoid",
    num_leapfrog_steps: int = 10,
    step_size: float = 0.1,
    target_accept: float = TARGET_ACCEPT,
    tune_chains: int = 4,
    chunk_size: int | None = None,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> AISResult:
    r"""AIS estimate of :math:`\log p(x)` for each point of the data plate, from the
    guide :math:`q(z|x)` to the posterior :math:`p(z|x)`.

    Each of ``num_chains`` chains per point starts at :math:`z_0 \sim q(z|x)` and
    takes one HMC transition (``num_leapfrog_steps`` leapfrog steps, identity mass)
    at each of the ``num_steps - 1`` intermediate distributions of
    :func:`ais_schedule`; the estimate is the log of the mean of the chains'
    weights, a stochastic lower bound (its expectation is below log p(x), and it
    tends to log p(x) as ``num_steps`` grows). ``num_steps=1`` is plain importance
    sampling with ``num_chains`` particles (:func:`~pyro_iwae.log_likelihood`).
    The leapfrog step size, per point and per transition, is tuned first by a
    separate run of ``tune_chains`` chains whose weights are thrown away (drawn
    ``chunk_size`` at a time, as the estimate's, in lockstep): it starts at
    ``step_size`` and after each transition moves toward ``target_accept`` by
    their mean acceptance probability (multiplied by exp(rate - target)). Adapting
    on the estimate's own chains would make each chain's kernel depend on its
    state and bias the estimate (the mean weight overestimated p(x) by 2% on the
    linear-Gaussian model). Each chain costs about ``num_steps *
    (num_leapfrog_steps + 1)`` evaluations of model and guide with gradients.
    Chains run ``chunk_size`` at a time (by default sized to half of
    ``log_likelihood``'s memory budget, for the backward pass), without parameter
    gradients and with modules in eval mode.

    Model and guide follow :func:`~pyro_iwae.log_likelihood`'s contract (a data
    plate encloses every sample site); the guide's latent sites must have real
    support (``Normal``, ``MultivariateNormal``, flows on them, ...): HMC moves in
    :math:`\mathbb{R}^d`. A guide's ``Delta`` sites (as in Pyro's autoguides)
    follow the sites they are computed from. A latent site of the model that the
    guide does not sample is drawn from its prior at the start, as
    :func:`~pyro_iwae.log_likelihood` draws it, and is then part of the chain:
    moved by HMC if its support is real, else by a Metropolis-Hastings step that
    proposes it afresh from the prior at each transition. ``*args, **kwargs`` go
    to model and guide.

    :returns: an :class:`AISResult`, per point.
    """
    settings = ChainSettings(
        num_steps,
        num_chains,
        schedule,
        num_leapfrog_steps,
        step_size,
        target_accept,
        tune_chains,
        chunk_size,
        max_plate_nesting,
    )
    return _run(model, guide, args, kwargs, settings, None)[0]


def ais_upper_bound(
    model: Callable,
    guide: Callable,
    *args: Any,
    latents: dict[str, torch.Tensor],
    **options: Any,
) -> AISResult:
    r"""Reverse AIS: a stochastic upper bound on :math:`\log p(x)` per point.

    The chains start at ``latents`` (site name -> value of the shape one run of
    model and guide gives it, e.g. ``[batch, latent_dim]``, for every latent site:
    the guide's, but for its ``Delta`` sites, and the model's that the guide does
    not sample), which must be an exact sample of
    :math:`p(z|x)`: the latents that generated simulated data (see
    :func:`sample_joint`). They follow :func:`ais_schedule` backwards, from the
    posterior to the guide; each chain's log weight estimates
    :math:`-\log p(x)` without bias in :math:`1/p(x)`, so minus the log of the
    chains' mean weight is above log p(x) in expectation. Not an upper bound for
    real data, whose exact latents are unknown.

    ``options``: the settings of :func:`ais_log_likelihood`, with its defaults;
    other keyword arguments go to model and guide.
    """
    settings, kwargs = _split_options(options)
    caller = "ais_upper_bound"
    return _run(model, guide, args, kwargs, settings, latents, caller=caller)[0]


def bidirectional_log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    latents: dict[str, torch.Tensor],
    num_steps: int = 1000,
    num_chains: int = 16,
    **options: Any,
) -> BDMCResult:
    """Bidirectional Monte Carlo: forward :func:`ais_log_likelihood` and reverse
    :func:`ais_upper_bound` from ``latents`` on the same data, a sandwich around
    log p(x) for data simulated from the model (see :func:`sample_joint`).

    ``num_steps``, ``num_chains`` and the other settings in ``options`` as
    :func:`ais_log_likelihood`; both directions use the same tuned step sizes.
    """
    settings, kwargs = _split_options(
        dict(options, num_steps=num_steps, num_chains=num_chains)
    )
    caller = "bidirectional_log_likelihood"
    lower, step_sizes = _run(model, guide, args, kwargs, settings, None, None, caller)
    upper, _ = _run(model, guide, args, kwargs, settings, latents, step_sizes, caller)
    return BDMCResult(lower, upper)


def sample_joint(model: Callable, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """One draw (x, z) from the model: site name -> value for every sample site,
    observed ones sampled afresh (``poutine.uncondition``) rather than taken from
    the data; without gradients, modules in eval mode.

    The observed values are data with known latents: run the model and guide on
    them and pass the latent values to :func:`bidirectional_log_likelihood`.
    """
    with evaluating(model):
        trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _split_options(options: dict[str, Any]) -> tuple[ChainSettings, dict[str, Any]]:
    """The AIS settings among ``options`` (defaults from :func:`ais_log_likelihood`)
    and the keyword arguments left for model and guide."""
    defaults = inspect.signature(ais_log_likelihood).parameters
    rest = dict(options)
    settings = ChainSettings(
        **{
            name: rest.pop(name, defaults[name].default)
            for name in ChainSettings._fields
        }
    )
    return settings, rest


@trace_shapes_dropped()
def _run(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    settings: ChainSettings,
    latents: dict[str, torch.Tensor] | None,
    step_sizes: torch.Tensor | None = None,
    caller: str = "ais_log_likelihood",
) -> tuple[AISResult, torch.Tensor]:
    """Forward AIS (``latents`` None) or reverse AIS from ``latents``, with the
    step sizes ``step_sizes`` (``[num_steps - 1, 1, *plate_shape]``, in forward
    order) or tuned afresh; returns the result and the step sizes. Errors for
    the data name ``caller``."""
    if kwargs.get("vectorize_particles", True) is False:
        raise AISError(AIS_NOT_SEQUENTIAL)
    kwargs = {k: v for k, v in kwargs.items() if k != "vectorize_particles"}
    check_batch(args, kwargs, caller)
    betas = ais_schedule(settings.num_steps, settings.schedule).tolist()
    _check(settings)
    # The backward pass keeps the forward's intermediates: half the budget.
    chunk_size = resolve_chunk_size(
        model,
        guide,
        args,
        kwargs,
        settings.chunk_size,
        settings.max_plate_nesting,
        memory_budget=DEFAULT_MEMORY_BUDGET // 2,
    )
    log_weights, acceptance = [], 0.0
    with evaluating(model, guide):
        if step_sizes is None and settings.num_steps > 1:
            # All tune_chains chains, chunk_size at a time as the estimate's.
            tuning = [
                Chains(model, guide, args, kwargs, size, settings)
                for size in chunk_sizes(settings.tune_chains, chunk_size)
            ]
            step_sizes = tuned_step_sizes(tuning, betas)
        for size in chunk_sizes(settings.num_chains, chunk_size):
            chains = Chains(model, guide, args, kwargs, size, settings)
            if latents is None:
                chunk = chains.anneal(chains.start, betas, step_sizes)
            else:
                reverse = None if step_sizes is None else step_sizes.flip(0)
                chunk = chains.anneal(chains.exact(latents), betas[::-1], reverse)
            log_weights.append(chunk[0])
            acceptance = acceptance + chunk[1] * size / settings.num_chains
    if step_sizes is None:
        step_sizes = chunk[2]  # no transitions: empty
    log_weights = torch.cat(log_weights)
    estimate = log_weights.logsumexp(0) - math.log(settings.num_chains)
    if latents is not None:
        estimate = -estimate
    last_step = (
        step_sizes[-1] if len(step_sizes) else torch.full_like(acceptance, math.nan)
    )
    per_point = [
        estimate,
        relative_stderr(log_weights),
        effective_sample_size(log_weights),
        pareto_khat(log_weights),
        acceptance[0],
        last_step[0],
    ]
    dims = chains.local_dims
    result = AISResult(
        *(local_shape(dims, t) for t in per_point),
        log_weights=torch.stack([local_shape(dims, w) for w in log_weights]),
    )
    return result, step_sizes


def _check(settings: ChainSettings) -> None:
    for name in ("num_chains", "num_leapfrog_steps", "tune_chains"):
        check_count(name, getattr(settings, name))
    if not settings.step_size > 0 or not 0 < settings.target_accept < 1:
        raise ValueError(
            "step_size must be > 0 and target_accept in (0, 1), got "
            f"{settings.step_size} and {settings.target_accept}"
        )
