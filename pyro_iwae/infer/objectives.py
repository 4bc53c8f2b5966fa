"""Importance-weighted variational objectives as Pyro :class:`~pyro.infer.ELBO` s."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, warn_if_nan

from ..errors import ParticleBroadcastError, PyroIwaeError, one_line
from .enumeration import (
    Unenumerated,
    check_enumeration,
    guide_enumerated,
    merge_strata,
    sampled_instead,
    shared_by_strata,
    strata_shape,
)
from .enumeration import enumerates as enumerates_sites
from .hooks import backend_of, compiler
from .log_weights import log_p_and_q
from .traces import (
    PARTICLE_PLATE,
    SharedSubsamples,
    TieGlobals,
    TieSequentialGlobals,
    _log_prob,
    aliased,
    check_not_empty,
    common_scale,
    cuda_devices,
    data_plate_dims,
    detached_distribution,
    global_latent_names,
    is_subsampled,
    latent_sites,
    reweight_paths,
    score_log_prob,
    stopped_parameters,
)

__all__ = [
    "CIWELBO",
    "ESTIMATORS",
    "IWELBO",
    "MIWELBO",
    "PARTICLE_PLATE",
    "PIWELBO",
    "Particles",
    "SCORE_ESTIMATORS",
    "leave_one_out_signal",
]

ESTIMATORS = ("iwae", "stl", "dreg", "vimco", "reinforce")
#: Estimators that give guide sites without ``rsample`` a score-function gradient.
SCORE_ESTIMATORS = ("vimco", "reinforce")
#: Estimators that evaluate log q at stopped guide parameters.
_STOPPED_ESTIMATORS = ("stl", "dreg")
#: How latent sites outside the data plate enter the bound.
GLOBAL_LATENTS = ("auto", "joint", "factor")


class Particles(NamedTuple):
    """Log importance weights of k particles, with what is needed to combine them.

    ``log_weights`` has shape ``(k,) + plate_shape``, ``len(plate_shape)`` equal to
    ``max_plate_nesting``, and size 1 at every dim but the data plate dims
    ``local_dims`` (``(strata * k,) + plate_shape`` when the guide enumerates sites:
    k particles for each of their ``strata`` joint values, the log q of an
    enumerated site of K values replaced by ``log(1/K)``); ``guide_log_prob``, of
    the same shape, is its log q part; ``scale`` is the common scale of the sample
    sites (a number or tensor); ``traces`` the ``(model_trace, guide_trace)`` pairs,
    one per Python-level particle. ``score_log_prob``, of the same shape, is the log
    q of the guide sites without ``rsample``, made only for a score-function
    estimator when gradients are recorded (else None). ``global_log_weight``, of
    shape ``(k,) + (1,) * len(plate_shape)``, is ``log p - log q`` of the global
    latent sites under ``global_latents="factor"`` (each at its own scale; equal
    within a group of particles that shares them), else None. ``strata_shape`` is
    the shape of one pair's log-weights before the values enumerated in the guide
    were merged into the particle dim (None without such values).
    ``global_score_log_prob``, shaped as ``global_log_weight``, is the log q of
    the global guide sites without ``rsample``, made as ``score_log_prob`` is.
    """

    log_weights: torch.Tensor
    guide_log_prob: torch.Tensor
    scale: Any
    local_dims: tuple[int, ...]
    traces: list[tuple[Trace, Trace]]
    score_log_prob: torch.Tensor | None = None
    global_log_weight: torch.Tensor | None = None
    strata_shape: tuple[int, ...] | None = None
    global_score_log_prob: torch.Tensor | None = None


class IWELBO(ELBO):
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
        ``None`` as a backend runs the traced graph uncompiled.
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
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(
                f"num_particles must be an integer >= 1, got {num_particles}"
            )
        _check_vimco(estimator, num_particles)
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
        self.compile = compile
        self.global_latents = global_latents
        # The global latent sites the last call tied across particles.
        self._tied: tuple[str, ...] = ()
        # Whether a call has found sites marked for enumeration: then model and
        # guide run under poutine.enum; and the guide sites marked for it that are
        # sampled instead (see sampled_instead).
        self._enumerates = False
        #: Whether a first run has shown which sites are marked for enumeration.
        self._discovered = False
        self._sampled: frozenset[str] = frozenset()
        self._guide_module: torch.nn.Module | None = None
        self._particle_plate: tuple[tuple[int, int], pyro.plate] | None = None
        self._sequential_tie: TieSequentialGlobals | None = None
        self._shared_subsamples: contextlib.AbstractContextManager = (
            contextlib.nullcontext()
        )

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
        if self._enumerates or not self._discovered:
            if self._sampled:
                guide = Unenumerated(self._sampled)(guide)
            # The model's enumerated dims are allocated left of the guide's.
            guide = poutine.enum(guide, first_available_dim=-1 - self.max_plate_nesting)
            model = poutine.enum(model)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if torch.is_grad_enabled():
            self._check_guide_trace(guide_trace)
        if self.estimator in _STOPPED_ESTIMATORS:
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
        would: a latent site without ``rsample`` under a path-gradient estimator.

        The run draws from a forked random stream, so it shifts no later draw.

        :raises NotImplementedError: naming the site and what to use instead.
        """
        if self.estimator in SCORE_ESTIMATORS:
            return
        with torch.random.fork_rng(devices=cuda_devices(args, kwargs)):
            with torch.no_grad():
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        self._check_guide_trace(guide_trace)

    def _check_guide_trace(self, guide_trace: Trace) -> None:
        if self.estimator in SCORE_ESTIMATORS:
            return
        for name, site in latent_sites(guide_trace):
            if not site["fn"].has_rsample and not _enumerated(site):
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
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            if not self._has_particle_plate or isinstance(
                error, PyroIwaeError | NotImplementedError
            ):
                raise
            if not self._runs_without_particles(model, guide, args, kwargs):
                raise
            # The first line: Pyro appends the trace's shapes to the message.
            cause = one_line(str(error).strip().split("\n")[0] or error).rstrip(".")
            raise ParticleBroadcastError(
                "the model or guide fails under vectorize_particles=True but runs "
                f"without it ({cause}): it must broadcast over a leading "
                f"particle dimension of size {self.num_particles} (use "
                "x.shape[-1] and x.reshape(*x.shape[:-1], ...), not "
                "x.view(batch, -1)), or pass vectorize_particles=False"
            ) from None

    def _runs_without_particles(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> bool:
        """Whether one particle without the particle plate weighs without error
        (on a forked random stream, without warnings)."""
        single = IWELBO(
            1,
            vectorize_particles=False,
            max_plate_nesting=self.max_plate_nesting - 1,
            global_latents=self.global_latents,
        )
        try:
            with (
                torch.random.fork_rng(devices=cuda_devices(args, kwargs)),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                single._particles(model, guide, args, kwargs)
        except Exception:
            # A failure here is the program's own, not the particle plate's.
            return False
        return True

    def _particles(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Particles:
        # One call weighs one sub-sample: the run that finds the sites to tie
        # and its rerun, and every particle (see SharedSubsamples).
        self._shared_subsamples = SharedSubsamples()
        try:
            return self._shared_particles(model, guide, args, kwargs)
        finally:
            self._shared_subsamples = contextlib.nullcontext()

    def _shared_particles(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Particles:
        traces = self._traces(model, guide, args, kwargs)
        sites = _sample_sites(traces[0])
        local_dims, global_names = self._split_sites(sites)
        enumerates = self._enumerates or any(map(enumerates_sites, traces[0]))
        sampled = self._sampled | sampled_instead(
            traces[0][1], local_dims, global_names
        )
        retie = tuple(global_names) != self._tied and self.num_particles > 1
        # The sites to tie, or to sample instead of enumerating, are known once
        # the program has run (under enum from the first run on): run it again.
        rerun = retie or sampled != self._sampled
        self._discovered = True
        self._enumerates, self._sampled = enumerates, sampled
        if rerun:
            if retie:
                self._tied = tuple(global_names)
            traces = self._traces(model, guide, args, kwargs)
            sites = _sample_sites(traces[0])
        if self._enumerates:
            check_enumeration(*traces[0], global_names)
            self._check_strata(traces[0][1])
        score_draw = (
            self.estimator in SCORE_ESTIMATORS
            and self._global_group_size == self.num_particles
        )
        _check_global_sites(traces[0][1], global_names, score_draw)
        return self._weigh(traces, sites, local_dims, global_names)

    #: Whether the bound takes values enumerated in the guide, each with its own
    #: particles, merged into the particle dim (a grouped bound would mix them),
    #: and a score-function signal from each particle's sum over those values.
    _takes_strata = True
    _takes_strata_scores = True

    def _check_strata(self, guide_trace: Trace) -> None:
        enumerated = guide_enumerated(guide_trace)
        if not enumerated:
            return
        if not self._takes_strata:
            raise NotImplementedError(
                f"{type(self).__name__} does not take sites enumerated in the "
                f"guide (here {enumerated[0]!r}); use IWELBO or CIWELBO, or "
                "enumerate the site in the model (leave it out of the guide)"
            )
        shared = shared_by_strata(guide_trace)
        if self.estimator == "dreg" and shared is not None:
            raise NotImplementedError(
                f"estimator='dreg' reweights each particle's path, but guide site "
                f"{shared[0]!r} has one value for all values of {shared[1]!r}, "
                "which is enumerated in the guide; sample it below (depending on) "
                f"{shared[1]!r}, use estimator='stl', or enumerate {shared[1]!r} "
                "in the model (leave it out of the guide)"
            )
        sampled = [
            name
            for name, site in latent_sites(guide_trace)
            if not site["fn"].has_rsample and name not in enumerated
        ]
        if (
            sampled
            and self.estimator in SCORE_ESTIMATORS
            and not self._takes_strata_scores
        ):
            raise NotImplementedError(
                f"{type(self).__name__}'s score-function gradient for {sampled[0]!r} "
                f"does not take sites enumerated in the guide (here "
                f"{enumerated[0]!r}); use IWELBO, or enumerate {enumerated[0]!r} in "
                "the model (leave it out of the guide)"
            )

    def _traces(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> list[tuple[Trace, Trace]]:
        # _get_trace sees the guide wrapped in the particle plate; stl and dreg need
        # the module itself to re-run it with its parameters stopped.
        self._guide_module = guide if isinstance(guide, torch.nn.Module) else None
        if self._tied and not self._has_particle_plate and self.num_particles > 1:
            self._sequential_tie = TieSequentialGlobals(
                self._tied, self._global_group_size
            )
        try:
            with self._shared_subsamples:
                return list(self._get_traces(model, guide, args, kwargs))
        finally:
            self._guide_module = self._sequential_tie = None

    def _split_sites(self, sites: list[dict]) -> tuple[tuple[int, ...], list[str]]:
        """The data plate dims and the global latent sites (none for the joint
        bound): under ``"factor"``, or ``"auto"`` with a sub-sampled data plate,
        the data plate is the one that encloses every observed site."""
        if self.global_latents != "joint":
            local_dims = data_plate_dims([s for s in sites if s["is_observed"]])
            # With no plate around every observed site, all latents are global:
            # the bound is then the ELBO, the only one sub-sampling leaves unbiased.
            global_names = global_latent_names(sites, local_dims)
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
        log_p, log_q = (_cat([part[i] for part in merged]) for i in (0, 1))
        if self._has_particle_plate and log_p.shape[0] == 1:
            # No site depends on the particle: all k weights are the same.
            log_p = log_p.expand((self.num_particles,) + log_p.shape[1:])
        log_global = None
        if global_names:
            log_global = _cat([part.log_global for part in parts])
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
                score = _cat(score_parts)
            if global_names:
                global_score = _global_score(traces, global_names, plate_nesting)
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
        if not (isinstance(particles.scale, float | int) and particles.scale == 1):
            bound = bound * particles.scale
        loss = -bound.sum()
        if particles.global_log_weight is not None:
            # An ELBO term in the global latents: one value per group of particles,
            # so the mean over particles is the mean over groups.
            loss = loss - particles.global_log_weight.mean(0).sum()
        global_score = particles.global_score_log_prob
        if global_score is not None and global_score.requires_grad:
            # One draw of the global sites for all particles (_check_global_sites):
            # its score-function term has the whole objective as its signal.
            surrogate = -loss.detach() * global_score.mean(0).sum()
            loss = loss - (surrogate - surrogate.detach())
        # No NaN check here: it would read the value back from the device at every
        # step; loss() and loss_and_grads() check the float they return.
        if loss.requires_grad:
            factor = self._path_factor(log_weights.detach())
            if factor is not None and particles.strata_shape is not None:
                # Per pair of traces, as the values enumerated in the guide index
                # the sites below them.
                shape = particles.strata_shape
                if not self._has_particle_plate:
                    shape = (len(traces),) + shape
                factor = factor.reshape(shape)
            if factor is not None:
                stopped = self.estimator in _STOPPED_ESTIMATORS
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
        if self.compile is not False:
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
        if self.compile is not False:
            loss = self.differentiable_loss(model, guide, *args, **kwargs)
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
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups}")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(
                f"num_particles must be an integer >= 1, got {num_particles}"
            )
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
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
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
        return (elbo_part + (1 - self.beta) * w**2) / (elbo_part + (1 - self.beta) * w)

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
        return ratio.expand_as(grouped).reshape(log_weights.shape)


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
    # Centred first: sum - x_i would lose digits to large log weights.
    centre = log_weights.mean(dim, keepdim=True)
    deviation = log_weights - centre
    return centre + (deviation.sum(dim, keepdim=True) - deviation) / (k - 1)


def _check_vimco(estimator: str, particles_per_bound: int) -> None:
    if estimator == "vimco" and particles_per_bound < 2:
        raise ValueError(
            "estimator='vimco' needs at least 2 particles per bound for its "
            f"leave-one-out baseline, got {particles_per_bound}"
        )


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _checked_item(loss: torch.Tensor) -> float:
    value = torch_item(loss)
    warn_if_nan(value, "loss")
    return value


def _enumerated(site: dict) -> bool:
    """Whether a guide site is, or may be, enumerated in parallel (one sampled
    instead is checked when it is sampled)."""
    return site["infer"].get("enumerate") == "parallel"


def _sample_sites(pair: tuple[Trace, Trace]) -> list[dict]:
    return [
        site
        for trace in pair
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]


def _check_global_sites(
    guide_trace: Trace, global_names: list[str], score_draw: bool
) -> None:
    """Refuses global guide sites without ``rsample`` unless ``score_draw`` (a
    score-function estimator and one draw of the global sites)."""
    if not torch.is_grad_enabled() or score_draw:
        return
    for name, site in _unreparameterized(guide_trace, global_names):
        raise NotImplementedError(
            f"IWELBO cannot train the global latent site {name!r} "
            f"({type(site['fn']).__name__} has no rsample) with "
            "global_latents='factor' and this estimator; use "
            "IWELBO(estimator='vimco'), a reparameterizable distribution for "
            "it, or global_latents='joint' on full batches"
        )


def _unreparameterized(
    guide_trace: Trace, global_names: list[str]
) -> list[tuple[str, dict]]:
    """The global guide sites without ``rsample``."""
    return [
        (name, site)
        for name, site in latent_sites(guide_trace)
        if name in global_names and not site["fn"].has_rsample
    ]


def _global_score(
    traces: list[tuple[Trace, Trace]], global_names: list[str], plate_nesting: int
) -> torch.Tensor | None:
    """log q of the global guide sites without ``rsample``, per particle (None
    if they all have one)."""
    names = [name for name, _ in _unreparameterized(traces[0][1], global_names)]
    if not names:
        return None
    return _cat(
        [_log_prob(guide_trace, names, plate_nesting, ()) for _, guide_trace in traces]
    )
