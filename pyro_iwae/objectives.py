"""Importance-weighted variational objectives as Pyro :class:`~pyro.infer.ELBO` s."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, warn_if_nan
from torch.distributions import constraints

ESTIMATORS = ("iwae", "stl", "dreg")
PARTICLE_PLATE = "num_particles_vectorized"  # the plate Pyro's ELBO adds


class _DetachParams(Messenger):
    """Returns ``pyro.param`` values detached, so log q is evaluated at stopped phi.

    :param modules_parameters: ids of the parameters of the modules that are
        re-run with detached parameters; any other ``nn.Parameter`` seen at a param
        site belongs to a module the guide calls but that cannot be stopped.
    """

    def __init__(self, module_parameters: set[int]) -> None:
        super().__init__()
        self.module_parameters = module_parameters

    def _pyro_post_param(self, msg: dict) -> None:
        value = msg["value"]
        if (
            isinstance(value, torch.nn.Parameter)
            and id(value) not in self.module_parameters
        ):
            raise NotImplementedError(
                f"stl and dreg cannot hold parameter {msg['name']!r} constant: it "
                "belongs to a module registered with pyro.module inside a function; "
                "make the guide itself an nn.Module (or PyroModule)"
            )
        msg["value"] = value.detach()


@contextmanager
def _stopped(module: torch.nn.Module | None) -> Iterator[Callable | None]:
    """Context for re-running a guide with its parameters held constant.

    Yields a callable that runs ``module`` with detached parameters (``None`` for
    a function guide); ``pyro.param`` values are detached inside the context.
    """
    call, ids = None, set()
    if module is not None:
        params = dict(module.named_parameters())
        ids = {id(p) for p in params.values()}
        detached = {name: p.detach() for name, p in params.items()}

        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(module, detached, args, kwargs)

    with _DetachParams(ids), warnings.catch_warnings():
        # pyro.module warns of parameters that do not require grad: here that is
        # the point.
        warnings.filterwarnings("ignore", "(?s).*not registered in the param store")
        yield call


def _latent_sites(trace: Trace) -> Iterator[tuple[str, dict]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            if not site_is_subsample(site):
                yield name, site


class Particles(NamedTuple):
    """Log importance weights of k particles, with what is needed to combine them.

    ``log_weights`` has shape ``(k,) + plate_shape``, ``len(plate_shape)`` equal to
    ``max_plate_nesting``, and size 1 at every dim but the data plate dims
    ``local_dims``; ``guide_log_prob``, of the same shape, is its log q part;
    ``scale`` is the common scale of the sample sites (a number or
    tensor); ``traces`` the ``(model_trace, guide_trace)`` pairs, one per
    Python-level particle.
    """

    log_weights: torch.Tensor
    guide_log_prob: torch.Tensor
    scale: Any
    local_dims: tuple[int, ...]
    traces: list[tuple[Trace, Trace]]


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

    :param int num_particles: k, the number of importance samples per point.
    :param str estimator: guide gradient: ``"iwae"`` (reparameterised gradient of
        the bound), ``"stl"`` (sticking the landing, Roeder et al. 2017) or
        ``"dreg"`` (doubly reparameterised, Tucker et al. 2019). The model gradient
        and the loss value are the same for all three.
    :param bool vectorize_particles: draw the k particles in one vectorized plate
        (requires static model structure) rather than in a Python loop.
    :param int max_plate_nesting: the number of plates the model and guide nest,
        not counting the particle plate.
    """

    def __init__(
        self,
        num_particles: int = 5,
        estimator: str = "iwae",
        vectorize_particles: bool = True,
        max_plate_nesting: int = 1,
        **kwargs: Any,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {estimator!r}; "
                f"choose one of {', '.join(ESTIMATORS)}"
            )
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(
                f"num_particles must be an integer >= 1, got {num_particles}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )
        self.estimator = estimator
        self._guide_module: torch.nn.Module | None = None
        self._particle_plate: tuple[tuple[int, int], pyro.plate] | None = None

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
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        for name, site in _latent_sites(guide_trace):
            if not site["fn"].has_rsample:
                raise NotImplementedError(
                    f"IWELBO needs reparameterizable guide sites, but {name!r} "
                    f"({type(site['fn']).__name__}) has no rsample; use a "
                    "reparameterizable or relaxed distribution"
                )
        if self.estimator != "iwae":
            guide_trace = self._stopped_guide_trace(guide, guide_trace, args, kwargs)
            replay_trace = guide_trace
        elif self._reweights_paths:
            replay_trace = _aliased(guide_trace)
        else:
            replay_trace = guide_trace
        model_trace = poutine.trace(
            poutine.replay(model, trace=replay_trace)
        ).get_trace(*args, **kwargs)
        if is_validation_enabled():
            with warnings.catch_warnings():
                # Such sites are proposed from the prior, and cancel from the
                # weights (see _log_p_and_q): nothing to warn about.
                warnings.filterwarnings("ignore", "Found vars in model but not guide")
                check_model_guide_match(
                    model_trace, guide_trace, self.max_plate_nesting
                )
        return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

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
        replay_trace = _aliased(guide_trace)
        latent = list(_latent_sites(guide_trace))
        if len(latent) == 1:
            # With one latent site, q's parameters depend on phi and the inputs
            # only: detaching them gives what a re-run with phi stopped computes,
            # without running the guide's networks again.
            name, site = latent[0]
            stopped_fn = _detached(site["fn"])
            if stopped_fn is not None:
                replay_trace.nodes[name] = {
                    **replay_trace.nodes[name],
                    "fn": stopped_fn,
                }
                return replay_trace
        with _stopped(self._guide_module) as call:
            if call is not None:
                guide = (
                    self._vectorized_num_particles(call)
                    if self._has_particle_plate
                    else call
                )
            stopped_trace = poutine.trace(
                poutine.replay(guide, trace=replay_trace)
            ).get_trace(*args, **kwargs)
        # Keep the first run's param sites: they carry the trainable tensors.
        for name, site in guide_trace.nodes.items():
            if site["type"] == "param":
                stopped_trace.nodes[name] = site
        return stopped_trace

    def particles(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Particles:
        """Draws k particles from the guide and weighs them against the model."""
        if self.max_plate_nesting == float("inf"):
            # The guess runs model and guide once; its draws must not shift the
            # random stream, or a seed would give another first value.
            with torch.random.fork_rng(devices=_cuda_devices(args, kwargs)):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
        # _get_trace sees the guide wrapped in the particle plate; stl and dreg need
        # the module itself to re-run it with its parameters stopped.
        self._guide_module = guide if isinstance(guide, torch.nn.Module) else None
        try:
            traces = list(self._get_traces(model, guide, args, kwargs))
        finally:
            self._guide_module = None
        plate_nesting = self.max_plate_nesting - int(self._has_particle_plate)
        sites = [
            site
            for pair in traces[:1]
            for trace in pair
            for site in trace.nodes.values()
            if site["type"] == "sample"
        ]
        local_dims = _local_plate_dims(sites)
        scale = _common_scale(sites, local_dims)
        log_p, log_q = (
            (torch.cat(parts) if len(parts) > 1 else parts[0])
            for parts in zip(
                *(
                    _log_p_and_q(model_trace, guide_trace, plate_nesting, local_dims)
                    for model_trace, guide_trace in traces
                ),
                strict=True,
            )
        )
        return Particles(log_p - log_q, log_q, scale, local_dims, traces)

    #: Whether the guide's gradient is reweighted per particle even with the plain
    #: estimator (then the model sees its own copies of the latent values).
    _reweights_paths = False

    def bound(self, log_weights: torch.Tensor) -> torch.Tensor:
        """The per-point bound from ``log_weights`` of shape ``(k,) + plate_shape``."""
        return log_weights.logsumexp(0) - math.log(self.num_particles)

    def _path_factor(self, log_weights: torch.Tensor) -> torch.Tensor | None:
        """Per-particle factor on the gradient that reaches the latent values.

        DReG replaces each normalized weight in the path gradient by its square,
        so the factor is the normalized weight; ``None`` leaves it alone.
        """
        return log_weights.softmax(0) if self.estimator == "dreg" else None

    def _weighted_loss(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, list[tuple[Trace, Trace]]]:
        particles = self.particles(model, guide, *args, **kwargs)
        log_weights, traces = particles.log_weights, particles.traces
        bound = self.bound(log_weights)
        if not (isinstance(particles.scale, float | int) and particles.scale == 1):
            bound = bound * particles.scale
        loss = -bound.sum()
        # No NaN check here: it would read the value back from the device at every
        # step; loss() and loss_and_grads() check the float they return.
        if loss.requires_grad:
            factor = self._path_factor(log_weights.detach())
            if factor is not None:
                _reweight_paths(
                    factor,
                    traces,
                    self._has_particle_plate,
                    stopped=self.estimator != "iwae",
                )
                if self.estimator == "iwae" and particles.guide_log_prob.requires_grad:
                    particles.guide_log_prob.register_hook(lambda g: g * factor)
        return loss, traces

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Returns the negative bound, differentiable with the chosen estimator."""
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
        super().__init__(
            num_particles=num_groups * num_particles, estimator=estimator, **kwargs
        )
        self.num_groups = num_groups
        self.group_size = num_particles

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


class CIWELBO(IWELBO):
    r"""The combination bound CIWAE(beta) of Rainforth et al. (2018):
    ``beta`` times the ELBO plus ``1 - beta`` times the IWAE bound, on the same
    ``num_particles`` particles,

    .. math:: \beta \frac{1}{K} \sum_k \log w_k
        + (1 - \beta) \log \frac{1}{K} \sum_k w_k.

    With ``estimator="dreg"`` the ELBO part takes the path gradient alone (as
    ``stl``, unbiased for the ELBO) and the IWAE part the DReG gradient.
    """

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


#: Attribute types of a distribution that cannot hold parameters.
_PLAIN_ATTRIBUTES = (bool, int, float, str, type(None), torch.Size, torch.dtype)


def _detached(fn: Any) -> Any:
    """A shallow copy of distribution ``fn`` with its tensors (and those of the
    distributions it wraps) detached; None if it holds anything else that might
    carry parameters (transforms, modules, callables)."""
    copied = copy.copy(fn)
    for key, value in vars(fn).items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
        elif isinstance(value, torch.distributions.Distribution):
            value = _detached(value)
            if value is None:
                return None
        elif not isinstance(value, _PLAIN_ATTRIBUTES + (constraints.Constraint,)):
            return None
        # Through __dict__: lazily computed properties live there too.
        vars(copied)[key] = value
    return copied


def _checked_item(loss: torch.Tensor) -> float:
    value = torch_item(loss)
    warn_if_nan(value, "loss")
    return value


def _aliased(trace: Trace) -> Trace:
    """A copy of ``trace`` whose latent values are new autograd nodes (views)."""
    aliased = trace.copy()
    for name, site in _latent_sites(trace):
        if site["value"].requires_grad:
            aliased.nodes[name] = {
                **site,
                "value": site["value"].view_as(site["value"]),
            }
    return aliased


def _reweight_paths(
    factor: torch.Tensor,
    traces: list[tuple[Trace, Trace]],
    vectorized: bool,
    stopped: bool,
) -> None:
    """Multiplies the gradient reaching each aliased guide value by its particle's
    ``factor`` (shape ``(k,) + plate_shape``).

    Every path from phi to log w passes through exactly one alias: with log q at
    stopped phi (``stopped``), the guide's latent values are aliases that the
    model shares, and an auxiliary site (one the model never sees, as in Pyro's
    autoguides) reaches log w through log q alone. Otherwise log q's gradient is
    reweighted as a whole, and only the model's aliased copies are hooked.
    """
    for i, (model_trace, guide_trace) in enumerate(traces):
        particle_factor = factor if vectorized else factor[i]
        if stopped:
            sites = _latent_sites(guide_trace)
        else:
            sites = (
                (name, site)
                for name, site in _latent_sites(model_trace)
                if name in guide_trace.nodes
            )
        for _, site in sites:
            if site["value"].requires_grad:
                aligned = _align(particle_factor, site)
                site["value"].register_hook(lambda g, f=aligned: g * f)


def _local_plate_dims(sites: list[dict]) -> tuple[int, ...]:
    """Dims of the plates that enclose every sample site: the data plate(s)."""
    common = None
    for site in sites:
        frames = {
            (f.name, f.dim)
            for f in site["cond_indep_stack"]
            if f.vectorized and f.name != PARTICLE_PLATE
        }
        common = frames if common is None else common & frames
    return tuple(sorted(dim for _, dim in common or ()))


def _common_scale(sites: list[dict], local_dims: tuple[int, ...]) -> Any:
    """The scale shared by all sites; sub-sampling outside the data plate fails."""
    subsampled = sorted(
        {
            f.name
            for site in sites
            for f in site["cond_indep_stack"]
            if f.full_size is not None
            and f.full_size != f.size
            and f.dim not in local_dims
        }
    )
    if subsampled:
        raise ValueError(
            f"IWELBO cannot sub-sample plate {subsampled[0]!r}: it does not enclose "
            "every sample site, so the bound does not factor over its points; put "
            "all sample sites inside the sub-sampled plate or use full batches"
        )
    scale = sites[0]["scale"]
    for site in sites[1:]:
        if not _same_scale(site["scale"], scale):
            raise ValueError(
                f"IWELBO needs one scale for every sample site, but {site['name']!r} "
                f"has {site['scale']} and {sites[0]['name']!r} has {scale}; "
                "sub-sample or scale the whole model and guide, not single sites"
            )
    return scale


def _same_scale(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if not (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        return a == b
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and bool((a == b).all())


def _log_p_and_q(
    model_trace: Trace,
    guide_trace: Trace,
    plate_nesting: int,
    local_dims: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The log p and log q parts of the log weights of one pair of traces.

    A latent site of the model that the guide does not sample is drawn from its
    prior during replay, so the prior is part of the proposal and cancels from
    the weight: it enters neither part.
    """
    # Lists, not sets: the order of summation must not vary between processes.
    guide_latent = [name for name, _ in _latent_sites(guide_trace)]
    prior_proposed = [
        (name, site)
        for name, site in _latent_sites(model_trace)
        if name not in guide_trace.nodes
    ]
    for name, site in prior_proposed:
        if not site["fn"].has_rsample and torch.is_grad_enabled():
            log_prob = site["fn"].log_prob(site["value"])
            if log_prob.requires_grad:
                raise NotImplementedError(
                    f"IWELBO draws {name!r} from the model's prior (the guide does "
                    f"not sample it), but its {type(site['fn']).__name__} depends "
                    "on trainable values and has no rsample, so its gradient "
                    f"would need a score-function term; sample {name!r} in the "
                    "guide or give it a fixed prior"
                )
    skip = {name for name, _ in prior_proposed}
    model_sites = [name for name in model_trace.nodes if name not in skip]
    return (
        _log_prob(model_trace, model_sites, plate_nesting, local_dims),
        _log_prob(guide_trace, guide_latent, plate_nesting, local_dims),
    )


def _log_prob(
    trace: Trace,
    names: Collection[str],
    plate_nesting: int,
    local_dims: tuple[int, ...],
) -> torch.Tensor:
    """Unscaled log-prob of the trace's sample sites among ``names``, summed over
    all but the particle and data plate dims.

    :returns: a tensor of shape ``(particles,) + plate_shape``, one of length
        ``plate_nesting + 1``, with particles 1 when particles are not vectorized.
    """
    total = None
    for name in names:
        site = trace.nodes[name]
        if site["type"] != "sample":
            continue
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        log_prob = scale_and_mask(log_prob, mask=site["mask"])
        if log_prob.dim() > plate_nesting + 1:
            raise ValueError(
                f"site {name!r} has batch shape {tuple(log_prob.shape)}, more dims "
                f"than max_plate_nesting={plate_nesting} allows; raise "
                "max_plate_nesting or declare the dims with pyro.plate"
            )
        if log_prob.dim() < plate_nesting + 1:
            log_prob = log_prob.reshape(
                (1,) * (plate_nesting + 1 - log_prob.dim()) + log_prob.shape
            )
        sum_dims = [
            d
            for d in range(-plate_nesting, 0)
            if d not in local_dims and log_prob.shape[d] > 1
        ]
        if sum_dims:
            log_prob = log_prob.sum(sum_dims, keepdim=True)
        total = log_prob if total is None else total + log_prob
    if total is None:
        raise ValueError("IWELBO found no sample sites in the model or the guide")
    return total


def _align(weights: torch.Tensor, site: dict) -> torch.Tensor:
    """Reshapes per-particle weights to broadcast against ``site['value']``."""
    event_dim = site["fn"].event_dim
    factor = weights.reshape(weights.shape + (1,) * event_dim)
    extra = factor.dim() - site["value"].dim()
    if extra > 0:
        factor = factor.reshape(factor.shape[extra:])
    return factor


def _cuda_devices(args: tuple, kwargs: dict) -> list[int]:
    """Indices of the CUDA devices of the tensors among ``args`` and ``kwargs``."""
    tensors = [
        t
        for t in (*args, *kwargs.values())
        if isinstance(t, torch.Tensor) and t.is_cuda
    ]
    return sorted({t.device.index for t in tensors})
