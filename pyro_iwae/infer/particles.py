"""Drawing k particles of a guide and weighing them against the model: the part
of the importance-weighted objectives (:mod:`~pyro_iwae.infer.objectives`) that
runs the programs: the particle plate or a loop of runs, what the particles share
(the sub-sample, global latents), enumeration, the guide re-run at stopped
parameters, and the log-weights :class:`Particles`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..errors import PlateNestingError, check_count
from .arguments import check_not_empty, cuda_devices, trial_run
from .broadcast import BROADCAST_FAILURES, broadcast_error
from .enumeration import (
    Unenumerated,
    check_enumeration,
    check_strata,
    guide_enumerated,
    marked_parallel,
    merge_strata,
    sampled_instead,
    strata_shape,
)
from .enumeration import enumerates as enumerates_sites
from .estimable import check_batch_dims, check_plate_dims
from .log_weights import (
    Particles,
    cat_particles,
    check_global_sites,
    global_score_log_prob,
    log_p_and_q,
)
from .particle_dims import ParticleDims
from .support import OwnLogProb, check_invertible, keep_own_log_q
from .traces import (
    PARTICLE_PLATE,
    SharedSubsamples,
    TieGlobals,
    TieSequentialGlobals,
    aliased,
    common_scale,
    data_plate_dims,
    detached_distribution,
    factor_plates,
    is_subsampled,
    latent_sites,
    sample_sites,
    score_log_prob,
    stopped_parameters,
)

__all__ = [
    "BROADCAST_FAILURES",
    "ESTIMATORS",
    "GLOBAL_LATENTS",
    "ParticleELBO",
    "Particles",
    "SCORE_ESTIMATORS",
    "trial_run",
]

ESTIMATORS = ("iwae", "stl", "dreg", "vimco", "reinforce")
#: Estimators that give guide sites without ``rsample`` a score-function gradient.
SCORE_ESTIMATORS = ("vimco", "reinforce")
#: Estimators that evaluate log q at stopped guide parameters.
STOPPED_ESTIMATORS = ("stl", "dreg")
#: How latent sites outside the data plate enter the bound.
GLOBAL_LATENTS = ("auto", "joint", "factor")


class ParticleELBO(ELBO):
    """A Pyro :class:`~pyro.infer.ELBO` that draws ``num_particles`` particles of
    the guide and weighs them against the model (:meth:`particles`); its
    subclasses (:class:`~pyro_iwae.infer.objectives.IWELBO` and kin) combine the
    log-weights into a bound. The arguments are ``IWELBO``'s.
    """

    def __init__(
        self,
        num_particles: int,
        estimator: str,
        vectorize_particles: bool,
        max_plate_nesting: int,
        global_latents: str,
        **kwargs: Any,
    ) -> None:
        if global_latents not in GLOBAL_LATENTS:
            raise ValueError(
                f"unknown global_latents {global_latents!r}; "
                f"choose one of {', '.join(GLOBAL_LATENTS)}"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {estimator!r}; "
                f"choose one of {', '.join(ESTIMATORS)}"
            )
        num_particles = check_count("num_particles", num_particles)
        if kwargs.get("jit_options") is not None or kwargs.get("ignore_jit_warnings"):
            raise ValueError(
                "IWELBO is not traced with torch.jit, so jit_options and "
                "ignore_jit_warnings would be ignored; use compile=True for a "
                "compiled loss"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        self.estimator = estimator
        self.global_latents = global_latents
        # The global latent sites the last call tied across particles.
        self._tied: tuple[str, ...] = ()
        # Whether a call has found sites marked for enumeration: then model and
        # guide run under poutine.enum; and the guide sites marked for it that are
        # sampled instead (see sampled_instead).
        self._enumerates: bool | None = None  # None: no run has shown it yet
        self._sampled: frozenset[str] = frozenset()
        self._guide_module: torch.nn.Module | None = None
        self._particle_plate: tuple[tuple[int, int], pyro.plate] | None = None
        self._sequential_tie: TieSequentialGlobals | None = None
        # None: not checked, as by an evaluator's later chunks (see ParticleDims).
        self._dims_check: ParticleDims | None = ParticleDims()

    @property
    def _has_particle_plate(self) -> bool:
        return self.vectorize_particles and self.num_particles > 1

    def _vectorized_num_particles(self, fn: Callable) -> Callable:
        """Wraps ``fn`` in the particle plate, as :class:`~pyro.infer.ELBO` does, but
        builds the plate once: a new ``pyro.plate`` costs a Pyro message and two
        tensors at every step."""
        if self.num_particles == 1:
            return fn
        key = (self.num_particles, self.max_plate_nesting)
        if get_proxy_mode() is not None:
            # A plate first entered while a graph is traced keeps a fake tensor
            # (its indices), which no later call, copy or pickle can use.
            return pyro.plate(PARTICLE_PLATE, key[0], dim=-key[1])(fn)
        if self._particle_plate is None or self._particle_plate[0] != key:
            plate = pyro.plate(PARTICLE_PLATE, key[0], dim=-key[1])
            self._particle_plate = (key, plate)
        return self._particle_plate[1](fn)

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Trace, Trace]:
        if self._sequential_tie is not None:
            with self._sequential_tie:
                pair = self._get_untied_trace(model, guide, args, kwargs)
            self._sequential_tie.index += 1
            return pair
        if not (self._tied and self._has_particle_plate):
            return self._get_untied_trace(model, guide, args, kwargs)
        # Outside the tracers, so that they record the tied values.
        with TieGlobals(
            self._tied,
            self.num_particles,
            self._global_group_size,
            -self.max_plate_nesting,
        ):
            return self._get_untied_trace(model, guide, args, kwargs)

    def _get_untied_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Trace, Trace]:
        # Under enum from the first run on (while it is not known whether any
        # site is marked): a program may check the shapes its values take.
        if self._enumerates is not False:
            if self._sampled:
                guide = Unenumerated(self._sampled)(guide)
            # The model's enumerated dims are allocated left of the guide's.
            guide = poutine.enum(guide, first_available_dim=-1 - self.max_plate_nesting)
            model = poutine.enum(model)
        # Outside the tracer, so that it records their own log q.
        stopped = self.estimator in STOPPED_ESTIMATORS
        with OwnLogProb() if stopped else contextlib.nullcontext():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if torch.is_grad_enabled():
            self._check_guide_trace(guide_trace)
        if self.estimator in STOPPED_ESTIMATORS:
            guide_trace = self._stopped_guide_trace(guide, guide_trace, args, kwargs)
            replay_trace = guide_trace
        elif self._reweights_paths:
            replay_trace = aliased(guide_trace)
        else:
            replay_trace = guide_trace
        model_trace = poutine.trace(
            poutine.replay(model, trace=replay_trace)
        ).get_trace(*args, **kwargs)
        if is_validation_enabled():
            with warnings.catch_warnings():
                # Such sites are proposed from the prior, and cancel from the
                # weights (see log_p_and_q): nothing to warn about.
                warnings.filterwarnings("ignore", "Found vars in model but not guide")
                check_model_guide_match(
                    model_trace, guide_trace, self.max_plate_nesting
                )
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

    def check_guide(self, guide: Callable, *args: Any, **kwargs: Any) -> None:
        """Runs ``guide`` once to refuse up front what the first gradient step
        would: a latent site without ``rsample`` (or an inverse, under stl/dreg).

        The run draws from a forked random stream, so it shifts no later draw.

        :raises NotImplementedError: naming the site and what to use instead.
        """
        if self.estimator in SCORE_ESTIMATORS:
            return
        with torch.random.fork_rng(devices=cuda_devices(args, kwargs)), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        self._check_guide_trace(guide_trace)

    def _check_guide_trace(self, guide_trace: Trace) -> None:
        if self.estimator in SCORE_ESTIMATORS:
            return
        for name, site in latent_sites(guide_trace):
            if self.estimator in STOPPED_ESTIMATORS:
                check_invertible(name, site["fn"], self.estimator)
            if not site["fn"].has_rsample and not marked_parallel(site):
                raise NotImplementedError(
                    f"IWELBO's {self.estimator!r} gradient needs "
                    f"reparameterizable guide sites, but {name!r} "
                    f"({type(site['fn']).__name__}) has no rsample; use "
                    "estimator='vimco' (a score-function gradient for such "
                    "sites) or a reparameterizable distribution"
                )

    def _stopped_guide_trace(
        self, guide: Callable, guide_trace: Trace, args: tuple, kwargs: dict
    ) -> Trace:
        """Re-runs the guide at the sampled values with its parameters stopped.

        ``stl`` and ``dreg`` need log q(z|x) with phi held constant while z keeps
        its dependence on phi. Each latent value is replaced by a fresh autograd
        node; for ``dreg``, :meth:`_weighted_loss` rescales the gradient reaching
        it by the normalized weight, while the guide's own use of z (z1 feeding
        q(z2|z1), say) keeps the raw, unscaled path.
        """
        # A new tensor object also misses the identity-keyed caches of transforms,
        # which would hand back an inverse that depends on the live parameters.
        replay_trace = aliased(guide_trace)
        latent = list(latent_sites(guide_trace))
        if len(latent) == 1:
            # With one latent site, q's parameters depend on phi and the inputs
            # only: detaching them gives what a re-run with phi stopped computes,
            # without running the guide's networks again.
            name, site = latent[0]
            stopped_fn = detached_distribution(site["fn"])
            if stopped_fn is not None:
                replay_trace.nodes[name] = {
                    **replay_trace.nodes[name],
                    "fn": stopped_fn,
                }
                return replay_trace
        # The global latents are parameters of the local sites' q: held constant
        # there too (their own log q keeps its path).
        with stopped_parameters(self._guide_module, self._tied) as call:
            if call is not None:
                guide = (
                    self._vectorized_num_particles(call)
                    if self._has_particle_plate
                    else call
                )
            stopped_trace = poutine.trace(
                poutine.replay(guide, trace=replay_trace)
            ).get_trace(*args, **kwargs)
        # Keep the first run's param sites: they carry the trainable tensors; and
        # the global latents' live values, for the model.
        for name, site in guide_trace.nodes.items():
            if site["type"] == "param":
                stopped_trace.nodes[name] = site
            elif name in self._tied and name in stopped_trace.nodes:
                stopped_trace.nodes[name]["value"] = replay_trace.nodes[name]["value"]
        keep_own_log_q(guide_trace, stopped_trace, self.estimator)
        return stopped_trace

    def particles(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Particles:
        """Draws k particles from the guide and weighs them against the model.

        :raises ParticleBroadcastError: if the model or guide fails under the
            particle plate but weighs one particle without it.
        """
        check_not_empty(args, kwargs, type(self).__name__)
        if self.max_plate_nesting == float("inf"):
            # The guess runs model and guide once; its draws must not shift the
            # random stream, or a seed would give another first value.
            with torch.random.fork_rng(devices=cuda_devices(args, kwargs)):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
        try:
            return self._particles(model, guide, args, kwargs)
        except PlateNestingError:
            if not self._has_particle_plate:
                raise
            # Pyro placed the program's plates left of the particle plate's dim:
            # said of the dims the program gives them, and so the nesting to pass.
            single = self._single(checks_plate_dims=True)
            try:
                single._particles(model, guide, args, kwargs)
            except PlateNestingError as own:
                raise own from None
            raise
        except BROADCAST_FAILURES as error:
            if not self._has_particle_plate:
                raise
            # Said by broadcast_error; deeper: for plates past max_plate_nesting.
            single, deeper = self._single(False), self._single(False, float("inf"))
            broadcast = broadcast_error(
                error,
                lambda: single._particles(model, guide, args, kwargs).traces,
                args,
                kwargs,
                self.num_particles,
                self.max_plate_nesting - 1,
                lambda: deeper.particles(model, guide, *args, **kwargs).traces,
            )
            if broadcast is None:
                raise
            raise broadcast from None

    def _single(self, checks_plate_dims: bool, nesting: float = -1) -> ParticleELBO:
        """This objective's program weighed on one particle, without the
        particle plate, at ``max_plate_nesting=nesting`` (-1: this one's)."""
        nesting = self.max_plate_nesting - 1 if nesting < 0 else nesting
        single = ParticleELBO(
            1,
            "iwae",
            vectorize_particles=False,
            max_plate_nesting=nesting,
            global_latents=self.global_latents,
        )
        single._checks_plate_dims = checks_plate_dims
        return single

    def _particles(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Particles:
        # One call weighs one sub-sample: the run that finds the sites to tie
        # and its rerun, and every particle (see SharedSubsamples).
        subsample = SharedSubsamples()
        traces = self._traces(model, guide, args, kwargs, subsample)
        sites = sample_sites(traces[0])
        local_dims, global_names = self._split_sites(sites)
        enumerates = bool(self._enumerates) or any(map(enumerates_sites, traces[0]))
        sampled = self._sampled | sampled_instead(
            traces[0][1], local_dims, global_names
        )
        retie = tuple(global_names) != self._tied and self.num_particles > 1
        # The sites to tie, or to sample instead of enumerating, are known once
        # the program has run (under enum until no site was marked): run again.
        ran_under_enum = self._enumerates is not False
        rerun = retie or sampled != self._sampled or (enumerates and not ran_under_enum)
        self._enumerates, self._sampled = enumerates, sampled
        if rerun:
            if retie:
                self._tied = tuple(global_names)
            traces = self._traces(model, guide, args, kwargs, subsample)
            sites = sample_sites(traces[0])
        if self._checks_plate_dims:
            nesting = self.max_plate_nesting - int(self._has_particle_plate)
            check_plate_dims(*traces[0], "the bound", nesting)
        if self._enumerates:
            check_enumeration(*traces[0], global_names)
            self._check_strata(traces[0][1])
        score_draw = self.estimator in SCORE_ESTIMATORS and self._global_score_draws
        check_global_sites(traces[0][1], global_names, score_draw)
        if not self._has_particle_plate:  # else they fail under the particle plate
            check_batch_dims(*traces[0], "the bound", self.max_plate_nesting)
        particles = self._weigh(traces, sites, local_dims, global_names)
        if self._has_particle_plate and self._dims_check is not None:
            # After the log-densities: the run replaces the values cached by the
            # guide's transforms, which a flow without an inverse needs.
            dim = -self.max_plate_nesting

            def redraw(count: int) -> tuple[Trace, Trace]:
                on = pyro.plate(PARTICLE_PLATE, count, dim=dim)
                with subsample:
                    return self._get_untied_trace(on(model), on(guide), args, kwargs)

            checked = (model, guide, traces[0], self.num_particles, dim)
            self._dims_check(*checked, redraw, args, kwargs)
        return particles

    @property
    def _global_score_draws(self) -> bool:
        """Whether a score-function estimator trains global guide sites without
        ``rsample``: drawn once for all particles, or once per group by a bound
        that knows each group's own term (MIWELBO)."""
        return self._global_group_size == self.num_particles

    #: Whether a call refuses plates left of the max_plate_nesting dims.
    _checks_plate_dims = True

    #: Whether the bound takes values enumerated in the guide, each with its own
    #: particles, merged into the particle dim (a grouped bound would mix them),
    #: and a score-function signal from each particle's sum over those values.
    _takes_strata = True
    _takes_strata_scores = True

    def _check_strata(self, guide_trace: Trace) -> None:
        score = self.estimator in SCORE_ESTIMATORS
        takes = (self._takes_strata, self._takes_strata_scores or not score)
        check_strata(guide_trace, type(self).__name__, self.estimator, *takes)

    def _traces(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        subsample: SharedSubsamples,
    ) -> list[tuple[Trace, Trace]]:
        # _get_trace sees the guide wrapped in the particle plate; stl and dreg need
        # the module itself to re-run it with its parameters stopped.
        self._guide_module = guide if isinstance(guide, torch.nn.Module) else None
        if self._tied and not self._has_particle_plate and self.num_particles > 1:
            self._sequential_tie = TieSequentialGlobals(
                self._tied, self._global_group_size
            )
        try:
            with subsample:
                return list(self._get_traces(model, guide, args, kwargs))
        finally:
            self._guide_module = self._sequential_tie = None

    def _split_sites(self, sites: list[dict]) -> tuple[tuple[int, ...], list[str]]:
        """The data plate dims and the global latent sites (none for the joint
        bound): under ``"factor"``, or ``"auto"`` with a sub-sampled data plate,
        the data plate is the one that encloses every observed site."""
        if self.global_latents != "joint":
            # With no plate around every observed site, all latents are global:
            # the bound is then the ELBO, the only one sub-sampling leaves unbiased.
            local_dims, global_names = factor_plates(sites)
            if global_names and (
                self.global_latents == "factor"
                or is_subsampled(sites, local_dims if local_dims else None)
            ):
                return local_dims, global_names
        return data_plate_dims(sites), []

    def _weigh(
        self,
        traces: list[tuple[Trace, Trace]],
        sites: list[dict],
        local_dims: tuple[int, ...],
        global_names: list[str],
    ) -> Particles:
        plate_nesting = self.max_plate_nesting - int(self._has_particle_plate)
        if global_names and not local_dims:
            # Every latent is global, shared by the particles: each site's scale
            # can enter the log-weight, whose logsumexp runs over equal terms.
            scale = 1.0
        else:
            scale = common_scale(
                [s for s in sites if s["name"] not in global_names], local_dims
            )
        parts = [
            log_p_and_q(
                *pair,
                plate_nesting,
                local_dims,
                scale,
                global_names,
                prior_scores=self.estimator in SCORE_ESTIMATORS,
            )
            for pair in traces
        ]
        particles = self.num_particles if self._has_particle_plate else None
        merged = [
            merge_strata(part.log_p, part.log_q, plate_nesting, particles)
            for part in parts
        ]
        strata = None
        if guide_enumerated(traces[0][1]):
            strata = strata_shape(
                parts[0].log_p, parts[0].log_q, plate_nesting, particles
            )
        log_p, log_q = (cat_particles([part[i] for part in merged]) for i in (0, 1))
        if self._has_particle_plate and log_p.shape[0] == 1:
            # No site depends on the particle: all k weights are the same.
            log_p = log_p.expand((self.num_particles,) + log_p.shape[1:])
        log_global = None
        if global_names:
            log_global = cat_particles([part.log_global for part in parts])
        score = global_score = None
        if self.estimator in SCORE_ESTIMATORS and torch.is_grad_enabled():
            # Computed apart from log_q (the sites' log-probs run twice), so that
            # log w sums its terms in the same order for every estimator.
            # The values enumerated in the guide fill the leading dims, the
            # particle dim's place too in a Python loop.
            values = None
            if strata is not None:
                values = (len(strata), len(strata) - plate_nesting - 1)
                if not self._has_particle_plate:
                    values = (len(strata), len(strata) - plate_nesting)
            score_parts = [
                score_log_prob(
                    guide_trace,
                    plate_nesting,
                    local_dims,
                    scale,
                    values,
                    model_trace=model_trace,
                    skip=global_names,
                )
                for model_trace, guide_trace in traces
            ]
            if score_parts[0] is not None:
                score = cat_particles(score_parts)
            if global_names:
                global_score = global_score_log_prob(
                    traces, global_names, plate_nesting
                )
        return Particles(
            log_p - log_q,
            log_q,
            scale,
            local_dims,
            traces,
            score,
            log_global,
            strata,
            global_score,
        )

    @property
    def _global_group_size(self) -> int:
        """The number of consecutive particles that share one draw of the global
        latent sites."""
        return self.num_particles

    #: Whether the guide's gradient is reweighted per particle even with the plain
    #: estimator (then the model sees its own copies of the latent values).
    _reweights_paths = False
