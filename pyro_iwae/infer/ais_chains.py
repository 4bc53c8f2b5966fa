"""The chains of annealed importance sampling (:mod:`pyro_iwae.infer.ais`): their
states, the densities along the path from the guide to the posterior, and the
Hamiltonian Monte Carlo transitions with step sizes tuned per temperature."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from torch.distributions import constraints

from ..errors import AISError, ParticleBroadcastError
from .diagnostics import _broadcastable, _with_particle_dim
from .enumeration import Unenumerated
from .estimable import checked_particles
from .objectives import IWELBO
from .support import is_point_mass
from .traces import _log_prob, latent_sites


class ChainSettings(NamedTuple):
    """The options of an AIS run (see :func:`~pyro_iwae.ais_log_likelihood`)."""

    num_steps: int
    num_chains: int
    schedule: str
    num_leapfrog_steps: int
    step_size: float
    target_accept: float
    tune_chains: int
    chunk_size: int | None
    max_plate_nesting: int


class Point(NamedTuple):
    r"""The chains' densities at a state, per chain and point (``[chains,
    *plate_shape]``): ``log_q``, the log density of the proposal (the guide's
    sites, and the prior of the model's sites the guide leaves out); ``log_w``,
    :math:`\log p(x, z) - ` ``log_q``; ``log_redrawn``, the part of ``log_q``
    from the sites :meth:`Chains.redraw` proposes afresh (0 without such sites);
    ``grad``, the gradient of :math:`\log \pi_\beta` with respect to the sites
    HMC moves (None when not asked for); ``drawn``, the values of sites drawn
    afresh at this evaluation."""

    log_q: torch.Tensor
    log_w: torch.Tensor
    log_redrawn: torch.Tensor | float
    grad: dict[str, torch.Tensor] | None
    drawn: dict[str, torch.Tensor]


class Chains:
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
        settings: ChainSettings,
    ) -> None:
        # The chains move or redraw every latent site: marks for enumeration, which
        # IWELBO would follow, do not apply.
        model, guide = Unenumerated()(model), Unenumerated()(guide)
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.num_chains = num_chains
        self.settings = settings
        self.elbo = IWELBO(
            num_particles=num_chains, max_plate_nesting=settings.max_plate_nesting
        )
        try:
            # Raises without a data plate, before any annealing.
            particles = checked_particles(
                lambda: self.elbo.particles(model, guide, *args, **kwargs), "AIS"
            )
        except ParticleBroadcastError as e:
            raise e.for_evaluator("AIS") from None
        # Checked: the later runs replay the chains' values, drawn for as many.
        self.elbo._dims_check = None
        self.local_dims = particles.local_dims
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
        self.derived = [name for name, site, _ in sites if is_point_mass(site["fn"])]
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
    ) -> Point:
        r"""The densities at ``z`` (see :class:`Point`) and, if ``beta`` is
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
            model, guide = self._replaying(leaves)
            particles = self.elbo.particles(model, guide, *self.args, **self.kwargs)
            model_trace = particles.traces[0][0]
            log_q, log_redrawn = self._proposal(particles.guide_log_prob, model_trace)
            log_w = particles.log_weights
            drawn = {
                name: _with_particle_dim(
                    model_trace.nodes[name]["value"].detach(),
                    self.plate_dims,
                    self.event_dims[name],
                )
                for name in self.redrawn
                if redraw
            }
            grad = None
            if beta is not None:
                grad = self._gradient(log_q + beta * log_w, leaves, z)
        return Point(log_q.detach(), log_w.detach(), log_redrawn, grad, drawn)

    def _replaying(self, leaves: dict[str, torch.Tensor]) -> tuple[Callable, Callable]:
        """Model and guide with their latent sites replayed at ``leaves`` (the
        guide's sites, and the model's the guide leaves out); the sites missing
        from ``leaves`` are drawn afresh."""
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
        return model, poutine.replay(self.guide, trace=guide_trace)

    def _proposal(
        self, guide_log_prob: torch.Tensor, model_trace: Trace
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(log_q, log_redrawn)`` of :class:`Point`, from the guide's log density
        and the model's trace."""
        if not self.prior_sites:
            return guide_log_prob, 0.0
        nesting = self.plate_dims - 1
        log_prior = _log_prob(model_trace, self.prior_sites, nesting, self.local_dims)
        # The prior of these sites is part of the proposal: it cancels from
        # log w and belongs to log q.
        log_q = guide_log_prob + log_prior
        log_redrawn: torch.Tensor | float = 0.0
        if self.redrawn:
            log_redrawn = _log_prob(
                model_trace, self.redrawn, nesting, self.local_dims
            ).detach()
        return log_q, log_redrawn

    def _gradient(
        self,
        log_pi: torch.Tensor,
        leaves: dict[str, torch.Tensor],
        z: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The gradient of ``log_pi`` with respect to the moved sites among
        ``leaves``, in the shape of their values in ``z``."""
        # Chains and points are independent: the gradient of the sum is each
        # one's own gradient.
        moved = [name for name in self.moved if name in leaves]
        grads = (
            torch.autograd.grad(
                log_pi.sum(), [leaves[name] for name in moved], allow_unused=True
            )
            if moved
            else ()
        )
        return {
            name: (
                torch.zeros_like(z[name])
                if g is None
                else _with_particle_dim(g, self.plate_dims, self.event_dims[name])
            )
            for name, g in zip(moved, grads, strict=True)
        }

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
        self, z: dict[str, torch.Tensor], point: Point, beta: float
    ) -> tuple[dict[str, torch.Tensor], Point]:
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
        merged = Point(
            pick(new.log_q, point.log_q), pick(new.log_w, point.log_w), 0.0, grad, {}
        )
        return state, merged

    def transition(
        self,
        z: dict[str, torch.Tensor],
        point: Point,
        beta: float,
        step_size: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        r"""One HMC transition of the sites of :attr:`moved` (the others held)
        leaving :math:`\pi_\beta` invariant, from ``z`` with densities ``point``;
        returns the new state and the acceptance probability per chain and point."""
        if not self.moved:
            return z, torch.ones_like(point.log_w)
        # In each site's dtype: a step size of the weights' (float64 where the
        # data are) moved float32 latents into float64, which the networks refuse.
        eps = {
            name: _broadcastable(step_size, z[name]).to(z[name].dtype)
            for name in self.moved
        }
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


def tuned_step_sizes(groups: list[Chains], betas: list[float]) -> torch.Tensor:
    """The leapfrog step sizes that :meth:`Chains.anneal` adapts as it goes, of
    the chains of all ``groups`` (of one model, guide and data) run in lockstep,
    one group at a time (for memory): after each transition the step size moves
    by the mean acceptance probability over all their chains, as for one group
    of as many; at least one transition (``len(betas) > 2``).

    :returns: ``[len(betas) - 2, 1, *plate_shape]``, one per transition.
    """
    settings, states = groups[0].settings, [group.start for group in groups]
    total = sum(group.num_chains for group in groups)
    step_size, used = None, []
    # As in anneal: a diverging trajectory must not raise in validation.
    with pyro.validation_enabled(False):
        for beta in betas[1:-1]:
            rate: torch.Tensor | float = 0.0
            for i, group in enumerate(groups):
                point = group.densities(states[i], beta)
                if step_size is None:
                    step_size = torch.full_like(point.log_w[:1], settings.step_size)
                if group.redrawn:
                    states[i], point = group.redraw(states[i], point, beta)
                states[i], accept_prob = group.transition(
                    states[i], point, beta, step_size
                )
                rate = rate + accept_prob.sum(0, keepdim=True) / total
            used.append(step_size)
            step_size = step_size * torch.exp(rate - settings.target_accept)
    return torch.stack(used)


def _real_support(fn: Any) -> bool:
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


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
