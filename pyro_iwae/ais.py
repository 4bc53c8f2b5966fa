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

The module runs past 500 lines because forward AIS, reverse AIS and their shared
HMC kernel, schedule and step-size tuning are one piece of logic.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from .diagnostics import (
    _broadcastable,
    _with_particle_dim,
    effective_sample_size,
    pareto_khat,
    relative_stderr,
)
from .enumeration import Unenumerated
from .errors import PyroIwaeError
from .evaluation import (
    DEFAULT_MEMORY_BUDGET,
    check_count,
    chunk_sizes,
    evaluating,
    local_shape,
    resolve_chunk_size,
)
from .objectives import IWELBO
from .traces import _log_prob, latent_sites

SCHEDULES = ("sigmoid", "linear")
#: Acceptance rate the HMC step size is adapted toward (as Wu et al. 2017).
TARGET_ACCEPT = 0.65
#: Sharpness of the sigmoid schedule (Grosse et al. 2015 use 4).
SIGMOID_SHARPNESS = 4.0


class AISError(PyroIwaeError, ValueError):
    """A model or guide that AIS cannot anneal; the message says what to use."""


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


class _Settings(NamedTuple):
    num_steps: int
    num_chains: int
    schedule: str
    num_leapfrog_steps: int
    step_size: float
    target_accept: float
    tune_chains: int
    chunk_size: int | None
    max_plate_nesting: int


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
    separate run of ``tune_chains`` chains whose weights are thrown away: it starts
    at ``step_size`` and after each transition moves toward ``target_accept`` by
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
    settings = _Settings(
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
    return _run(model, guide, args, kwargs, settings, latents)[0]


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
    lower, step_sizes = _run(model, guide, args, kwargs, settings, None)
    upper, _ = _run(model, guide, args, kwargs, settings, latents, step_sizes)
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


def _split_options(options: dict[str, Any]) -> tuple[_Settings, dict[str, Any]]:
    """The AIS settings among ``options`` (defaults from :func:`ais_log_likelihood`)
    and the keyword arguments left for model and guide."""
    defaults = inspect.signature(ais_log_likelihood).parameters
    rest = dict(options)
    settings = _Settings(
        **{name: rest.pop(name, defaults[name].default) for name in _Settings._fields}
    )
    return settings, rest


def _run(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    settings: _Settings,
    latents: dict[str, torch.Tensor] | None,
    step_sizes: torch.Tensor | None = None,
) -> tuple[AISResult, torch.Tensor]:
    """Forward AIS (``latents`` None) or reverse AIS from ``latents``, with the
    step sizes ``step_sizes`` (``[num_steps - 1, 1, *plate_shape]``, in forward
    order) or tuned afresh; returns the result and the step sizes."""
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
            tuning = _Chains(
                model,
                guide,
                args,
                kwargs,
                min(settings.tune_chains, chunk_size),
                settings,
            )
            step_sizes = tuning.anneal(tuning.start, betas, None)[2]
        for size in chunk_sizes(settings.num_chains, chunk_size):
            chains = _Chains(model, guide, args, kwargs, size, settings)
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


def _check(settings: _Settings) -> None:
    for name in ("num_chains", "num_leapfrog_steps", "tune_chains"):
        check_count(name, getattr(settings, name))
    if not settings.step_size > 0 or not 0 < settings.target_accept < 1:
        raise ValueError(
            "step_size must be > 0 and target_accept in (0, 1), got "
            f"{settings.step_size} and {settings.target_accept}"
        )


class _Point(NamedTuple):
    r"""The chains' densities at a state, per chain and point (``[chains,
    *plate_shape]``): ``log_q``, the log density of the proposal (the guide's
    sites, and the prior of the model's sites the guide leaves out); ``log_w``,
    :math:`\log p(x, z) - ` ``log_q``; ``log_redrawn``, the part of ``log_q``
    from the sites :meth:`_Chains.redraw` proposes afresh (0 without such sites);
    ``grad``, the gradient of :math:`\log \pi_\beta` with respect to the sites
    HMC moves (None when not asked for); ``drawn``, the values of sites drawn
    afresh at this evaluation."""

    log_q: torch.Tensor
    log_w: torch.Tensor
    log_redrawn: torch.Tensor | float
    grad: dict[str, torch.Tensor] | None
    drawn: dict[str, torch.Tensor]


class _Chains:
    r"""``num_chains`` AIS chains per data point: the particle plate of
    :class:`IWELBO`, left of the data plate.

    A chain's state holds every latent site: the guide's, and the model's that
    the guide leaves out (a latent "left to the prior"), which the proposal
    :math:`q(z|x)\,p(u|z)` draws from the model (:func:`log_likelihood`'s
    proposal). Such a site must be in the state: drawn afresh at every density
    evaluation, it would make :math:`\log \pi_\beta` random, and the HMC
    transitions and the weights inconsistent (0.3 to 1 nat low on the
    linear-Gaussian model with such a site). HMC moves the sites with real
    support; the model's other sites (discrete, constrained) are moved by
    :meth:`redraw`.

    Latent values have IWELBO's particle shape ``[chains, *plate_shape,
    *event_shape]``; per-chain, per-point quantities ``[chains, *plate_shape]``,
    size 1 at plates other than the data plate.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        num_chains: int,
        settings: _Settings,
    ) -> None:
        # The chains move or redraw every latent site: marks for enumeration, which
        # IWELBO would follow, do not apply.
        model, guide = Unenumerated()(model), Unenumerated()(guide)
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.settings = settings
        self.elbo = IWELBO(
            num_particles=num_chains, max_plate_nesting=settings.max_plate_nesting
        )
        particles = self.elbo.particles(model, guide, *args, **kwargs)
        self.local_dims = particles.local_dims
        # Raises without a data plate, before any annealing.
        local_shape(self.local_dims, particles.log_weights[0])
        self.plate_dims = particles.log_weights.dim()
        model_trace, self.template = particles.traces[0]
        self.prior_template = model_trace
        self.shapes, self.event_dims, self.start = {}, {}, {}
        self.moved, self.prior_sites, self.redrawn = [], [], []
        sites = [(name, site, True) for name, site in latent_sites(self.template)]
        sites += [
            (name, site, False)
            for name, site in latent_sites(model_trace)
            if name not in self.template.nodes
        ]
        # A guide's Delta site (Pyro's autoguides put the latents at a function of
        # an auxiliary site) follows the sites it is computed from: held in the
        # state, it would be a second, inconsistent copy of them.
        self.derived = [name for name, site, _ in sites if _is_delta(site["fn"])]
        for name, site, in_guide in sites:
            if name in self.derived:
                continue
            if _real_support(site["fn"]):
                self.moved.append(name)
            elif in_guide:
                _refuse_guide_site(name, site["fn"])
            else:
                self.redrawn.append(name)
            if not in_guide:
                self.prior_sites.append(name)
            self.shapes[name] = site["value"].shape
            self.event_dims[name] = site["fn"].event_dim
            self.start[name] = _with_particle_dim(
                site["value"].detach(), self.plate_dims, site["fn"].event_dim
            )

    def exact(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``latents`` broadcast to every chain."""
        if set(latents) != set(self.start):
            raise ValueError(
                f"latents must give exactly the latent sites of model and guide "
                f"{sorted(self.start)}, got {sorted(latents)}"
            )
        start = {}
        for name, like in self.start.items():
            value = torch.as_tensor(latents[name], dtype=like.dtype, device=like.device)
            try:
                start[name] = torch.broadcast_to(value, like.shape)
            except RuntimeError as error:
                raise ValueError(
                    f"latents[{name!r}] has shape {tuple(value.shape)}; expected "
                    f"the site's shape in one run of model and guide, "
                    f"{tuple(like.shape[1:])} or broadcastable to it"
                ) from error
        return start

    def densities(
        self, z: dict[str, torch.Tensor], beta: float | None, redraw: bool = False
    ) -> _Point:
        r"""The densities at ``z`` (see :class:`_Point`) and, if ``beta`` is
        given, the gradient of :math:`\log \pi_\beta = \log q + \beta \log w`
        with respect to the sites HMC moves. With ``redraw``, the sites of
        :attr:`redrawn` are drawn afresh from the model, given the rest of ``z``.
        """
        with torch.enable_grad():
            leaves = {
                name: value.detach()
                .requires_grad_(beta is not None and name in self.moved)
                .reshape(self.shapes[name])
                for name, value in z.items()
                if not (redraw and name in self.redrawn)
            }
            guide_trace = self.template.copy()
            for name, site in latent_sites(self.template):
                if name in self.derived:
                    guide_trace.remove_node(name)
                else:
                    guide_trace.nodes[name] = {**site, "value": leaves[name]}
            model = self.model
            if self.prior_sites:
                prior_trace = Trace()
                for name in self.prior_sites:
                    if name in leaves:
                        site = self.prior_template.nodes[name]
                        prior_trace.add_node(name, **{**site, "value": leaves[name]})
                model = poutine.replay(model, trace=prior_trace)
            particles = self.elbo.particles(
                model,
                poutine.replay(self.guide, trace=guide_trace),
                *self.args,
                **self.kwargs,
            )
            model_trace = particles.traces[0][0]
            log_q, log_w = particles.guide_log_prob, particles.log_weights
            log_redrawn = 0.0
            if self.prior_sites:
                nesting = self.plate_dims - 1
                log_prior = _log_prob(
                    model_trace, self.prior_sites, nesting, self.local_dims
                )
                # The prior of these sites is part of the proposal: it cancels from
                # log w and belongs to log q.
                log_q = log_q + log_prior
                if self.redrawn:
                    log_redrawn = _log_prob(
                        model_trace, self.redrawn, nesting, self.local_dims
                    ).detach()
            drawn = {
                name: _with_particle_dim(
                    model_trace.nodes[name]["value"].detach(),
                    self.plate_dims,
                    self.event_dims[name],
                )
                for name in self.redrawn
                if redraw
            }
            if beta is None:
                return _Point(log_q.detach(), log_w.detach(), log_redrawn, None, drawn)
            # Chains and points are independent: the gradient of the sum is each
            # one's own gradient.
            moved = [name for name in self.moved if name in leaves]
            grads = (
                torch.autograd.grad(
                    (log_q + beta * log_w).sum(),
                    [leaves[name] for name in moved],
                    allow_unused=True,
                )
                if moved
                else ()
            )
        grad = {
            name: (
                torch.zeros_like(z[name])
                if g is None
                else _with_particle_dim(g, self.plate_dims, self.event_dims[name])
            )
            for name, g in zip(moved, grads, strict=True)
        }
        return _Point(log_q.detach(), log_w.detach(), log_redrawn, grad, drawn)

    def kinetic(self, momentum: dict[str, torch.Tensor]) -> torch.Tensor:
        """Half the squared norm of ``momentum`` per chain and point."""
        total = 0.0
        for name, value in momentum.items():
            event_dim = self.event_dims[name]
            energy = 0.5 * value.square()
            if event_dim:
                energy = energy.sum(list(range(-event_dim, 0)))
            others = [
                d
                for d in range(1 - self.plate_dims, 0)
                if d not in self.local_dims and energy.shape[d] > 1
            ]
            total = total + (energy.sum(others, keepdim=True) if others else energy)
        return total

    def redraw(
        self, z: dict[str, torch.Tensor], point: _Point, beta: float
    ) -> tuple[dict[str, torch.Tensor], _Point]:
        r"""A Metropolis-Hastings step leaving :math:`\pi_\beta` invariant that
        proposes the sites of :attr:`redrawn` afresh from the model given the rest
        of ``z`` (where ``point`` holds the densities, with their gradient);
        returns the new state and its densities.

        With the proposal :math:`p(u'|\cdot)`, the acceptance ratio is
        :math:`\pi_\beta(z, u')\,p(u|\cdot) / (\pi_\beta(z, u)\,p(u'|\cdot))`:
        the proposal's density cancels from :math:`\log q`, leaving
        :math:`\beta` times the change of :math:`\log w` (and the change of the
        density of any latent the redrawn sites are parents of). Without this
        step AIS stays unbiased (a kernel that leaves these sites where they are
        still leaves :math:`\pi_\beta` invariant) but the chains keep the
        prior's spread over them at every temperature, which more steps do not
        shrink.
        """
        new = self.densities(z, beta, redraw=True)
        log_ratio = (new.log_q - new.log_redrawn + beta * new.log_w) - (
            point.log_q - point.log_redrawn + beta * point.log_w
        )
        # NaN (an impossible proposal) rejects.
        accept = torch.rand_like(log_ratio).log() < log_ratio
        state = {**z, **new.drawn}

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(_broadcastable(accept, a), a, b)

        state = {name: pick(state[name], value) for name, value in z.items()}
        grad = {name: pick(g, point.grad[name]) for name, g in new.grad.items()}
        merged = _Point(
            pick(new.log_q, point.log_q), pick(new.log_w, point.log_w), 0.0, grad, {}
        )
        return state, merged

    def transition(
        self,
        z: dict[str, torch.Tensor],
        point: _Point,
        beta: float,
        step_size: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        r"""One HMC transition of the sites of :attr:`moved` (the others held)
        leaving :math:`\pi_\beta` invariant, from ``z`` with densities ``point``;
        returns the new state and the acceptance probability per chain and point."""
        if not self.moved:
            return z, torch.ones_like(point.log_w)
        eps = {name: _broadcastable(step_size, z[name]) for name in self.moved}
        momentum = {name: torch.randn_like(z[name]) for name in self.moved}
        energy = self.kinetic(momentum) - (point.log_q + beta * point.log_w)
        moved, grad = dict(z), point.grad
        for step in range(self.settings.num_leapfrog_steps):
            # Velocity Verlet: half a momentum step at the ends, whole ones between.
            first = 0.5 if step == 0 else 1.0
            momentum = {
                name: p + first * eps[name] * grad[name] for name, p in momentum.items()
            }
            for name in self.moved:
                moved[name] = moved[name] + eps[name] * momentum[name]
            end = self.densities(moved, beta)
            grad = end.grad
        momentum = {
            name: p + 0.5 * eps[name] * grad[name] for name, p in momentum.items()
        }
        new_energy = self.kinetic(momentum) - (end.log_q + beta * end.log_w)
        # NaN (a diverged trajectory) rejects, as does an infinite energy.
        accept_prob = (energy - new_energy).clamp(max=0).exp().nan_to_num(0.0)
        accept = torch.rand_like(accept_prob) < accept_prob
        state = {
            name: torch.where(_broadcastable(accept, value), moved[name], value)
            for name, value in z.items()
        }
        return state, accept_prob

    def anneal(
        self,
        z: dict[str, torch.Tensor],
        betas: list[float],
        step_sizes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the chains from ``z`` along ``betas``, with the leapfrog step sizes
        ``step_sizes`` (``[len(betas) - 2, 1, *plate_shape]``, one per transition)
        or, if None, step sizes adapted as they go.

        :returns: the chains' log weights ``[chains, *plate_shape]``, the mean
            acceptance probability per point ``[1, *plate_shape]`` (NaN without
            transitions), and the step sizes used.
        """
        log_weight, step_size, used, rates = 0.0, None, [], []
        # A diverging leapfrog trajectory can hand a distribution an infinite
        # parameter; the Metropolis step rejects it, validation would raise.
        with pyro.validation_enabled(False):
            for t in range(1, len(betas)):
                beta, last = betas[t], t == len(betas) - 1
                point = self.densities(z, None if last else beta)
                log_weight = log_weight + (beta - betas[t - 1]) * point.log_w
                if last:
                    break
                if step_sizes is not None:
                    step_size = step_sizes[t - 1]
                elif step_size is None:
                    step_size = torch.full_like(
                        point.log_w[:1], self.settings.step_size
                    )
                used.append(step_size)
                if self.redrawn:
                    z, point = self.redraw(z, point, beta)
                z, accept_prob = self.transition(z, point, beta, step_size)
                rates.append(accept_prob.mean(0, keepdim=True))
                if step_sizes is None:
                    step_size = step_size * torch.exp(
                        rates[-1] - self.settings.target_accept
                    )
        if not used:
            per_point = point.log_w[:1]
            nan = torch.full_like(per_point, math.nan)
            return log_weight, nan, nan.unsqueeze(0)[:0]
        return log_weight, torch.stack(rates).mean(0), torch.stack(used)


def _real_support(fn: Any) -> bool:
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _is_delta(fn: Any) -> bool:
    while not isinstance(fn, dist.Delta):
        fn = getattr(fn, "base_dist", None)
        if fn is None:
            return False
    return True


def _refuse_guide_site(name: str, fn: Any) -> None:
    if fn.support.is_discrete:
        raise AISError(
            f"AIS moves the guide's latents by HMC, which cannot move its discrete "
            f"site {name!r} ({type(fn).__name__}); estimate log p(x) by importance "
            "sampling instead: log_likelihood (--method iwae from the command line)"
        )
    raise AISError(
        f"AIS needs guide sites with real support (HMC moves in R^d), but {name!r} "
        f"({type(fn).__name__}) has support {fn.support}; sample it unconstrained "
        "and transform it in the model, or use log_likelihood (--method iwae)"
    )
