"""Log importance weights from Pyro traces.

What :class:`~pyro_iwae.infer.objectives.IWELBO` needs from a model trace and a guide
trace, apart from the bound itself: the latent sites, the data plate, the common
scale, the log p and log q parts of the weights, guides re-run with their
parameters held constant, and the per-particle reweighting of the path gradient.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .support import STOPPED_LOG_PROB, site_log_prob

PARTICLE_PLATE = "num_particles_vectorized"  # the plate Pyro's ELBO adds


class _DetachParams(Messenger):
    """Returns ``pyro.param`` values detached, so log q is evaluated at stopped phi,
    and the values of the sample sites in ``detached_values`` (after their own
    log-prob) to the rest of the program.

    :param modules_parameters: ids of the parameters of the module that is re-run
        with detached parameters; None when every ``nn.Parameter`` the program
        touches is stopped where it is used (a function guide).
    """

    def __init__(
        self, module_parameters: set[int] | None, detached_values: Collection[str] = ()
    ) -> None:
        super().__init__()
        self.module_parameters = module_parameters
        self.detached_values = frozenset(detached_values)

    def _pyro_post_param(self, msg: dict) -> None:
        value = msg["value"]
        if (
            self.module_parameters is not None
            and isinstance(value, torch.nn.Parameter)
            and id(value) not in self.module_parameters
        ):
            raise NotImplementedError(
                f"stl and dreg cannot hold parameter {msg['name']!r} constant: it "
                "belongs to a module registered with pyro.module inside the "
                "guide module's forward; register it as a submodule instead"
            )
        msg["value"] = value.detach()

    def _pyro_post_sample(self, msg: dict) -> None:
        # A distribution may evaluate modules lazily in log_prob (a flow's
        # inverse and log-determinant): evaluated later, it would see the live
        # parameters again. So log q is computed here, while they are stopped.
        if not msg["is_observed"] and not site_is_subsample(msg):
            msg[STOPPED_LOG_PROB] = msg["fn"].log_prob(
                msg["value"], *msg["args"], **msg["kwargs"]
            )
            if msg["name"] in self.detached_values:
                # The program below sees a constant: a parameter of q, stopped.
                msg["value"] = msg["value"].detach()


class _StopParameters(TorchFunctionMode):
    """Every torch function called in this mode sees each ``nn.Parameter``
    argument detached: the parameters of modules a function guide registers with
    ``pyro.module`` and calls, which no module of ours can swap out."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: dict[int, torch.Tensor] = {}

    def _stop(self, value: Any) -> Any:
        if not isinstance(value, torch.nn.Parameter):
            return value
        if id(value) not in self.stopped:
            self.stopped[id(value)] = value.detach()
        return self.stopped[id(value)]

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        # Attribute reads (p.requires_grad, p.shape) answer for the parameter.
        if getattr(func, "__name__", None) not in ("__get__", "__set__"):
            args, kwargs = tree_map(self._stop, (args, kwargs))
        return func(*args, **kwargs)


#: Key of a trace site's unscaled log-prob computed with its parameters stopped.


@contextmanager
def stopped_parameters(
    module: torch.nn.Module | None, detached_values: Collection[str] = ()
) -> Iterator[Callable | None]:
    """Context for re-running a guide with its parameters held constant.

    Yields a callable that runs ``module`` with detached parameters (``None`` for
    a function guide, whose torch functions see every ``nn.Parameter`` detached:
    the modules it registers with ``pyro.module``); ``pyro.param`` values, and
    the values of the sample sites in ``detached_values`` seen by the rest of the
    guide, are detached inside the context.
    """
    call, ids = None, None
    mode: contextlib.AbstractContextManager = contextlib.nullcontext()
    if module is None:
        mode = _StopParameters()
    else:
        params = dict(module.named_parameters())
        ids = {id(p) for p in params.values()}
        detached = {name: p.detach() for name, p in params.items()}

        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(module, detached, args, kwargs)

    with _DetachParams(ids, detached_values), warnings.catch_warnings(), mode:
        # pyro.module warns of parameters that do not require grad: here that is
        # the point.
        warnings.filterwarnings("ignore", "(?s).*not registered in the param store")
        yield call


def latent_sites(trace: Trace) -> Iterator[tuple[str, dict]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            if not site_is_subsample(site):
                yield name, site


#: Attribute types of a distribution that cannot hold parameters.
_PLAIN_ATTRIBUTES = (bool, int, float, str, type(None), torch.Size, torch.dtype)


def detached_distribution(fn: Any) -> Any:
    """A shallow copy of distribution ``fn`` with its tensors (and those of the
    distributions it wraps) detached; None if it holds anything else that might
    carry parameters (transforms, modules, callables)."""
    copied = copy.copy(fn)
    for key, value in vars(fn).items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
        elif isinstance(value, torch.distributions.Distribution):
            value = detached_distribution(value)
            if value is None:
                return None
        elif not isinstance(value, _PLAIN_ATTRIBUTES + (constraints.Constraint,)):
            return None
        # Through __dict__: lazily computed properties live there too.
        vars(copied)[key] = value
    return copied


def aliased(trace: Trace) -> Trace:
    """A copy of ``trace`` whose latent values are new autograd nodes (views)."""
    aliased = trace.copy()
    for name, site in latent_sites(trace):
        if site["value"].requires_grad:
            aliased.nodes[name] = {
                **site,
                "value": site["value"].view_as(site["value"]),
            }
    return aliased


def reweight_paths(
    factor: torch.Tensor,
    traces: list[tuple[Trace, Trace]],
    vectorized: bool,
    stopped: bool,
    skip: Collection[str] = (),
) -> None:
    """Multiplies the gradient reaching each aliased guide value by its particle's
    ``factor`` (shape ``(k,) + plate_shape``).

    Every path from phi to log w passes through exactly one alias: with log q at
    stopped phi (``stopped``), the guide's latent values are aliases that the
    model shares, and an auxiliary site (one the model never sees, as in Pyro's
    autoguides) reaches log w through log q alone. Otherwise log q's gradient is
    reweighted as a whole, and only the model's aliased copies are hooked.
    Sites in ``skip`` (global latents: their weight is not per particle) keep
    their gradient.
    """
    for i, (model_trace, guide_trace) in enumerate(traces):
        particle_factor = factor if vectorized else factor[i]
        if stopped:
            sites = latent_sites(guide_trace)
        else:
            sites = (
                (name, site)
                for name, site in latent_sites(model_trace)
                if name in guide_trace.nodes
            )
        for name, site in sites:
            if site["value"].requires_grad and name not in skip:
                aligned = _align(particle_factor, site)
                site["value"].register_hook(lambda g, f=aligned: g * f)


class TieGlobals(Messenger):
    """Gives each latent site in ``names`` one value per group of ``group_size``
    consecutive particles (the group's first), so that the particles of a group
    share their global latents.

    :param particle_dim: the particle plate's dim (negative, counted from the
        right of a site's batch shape).
    """

    def __init__(
        self,
        names: Collection[str],
        num_particles: int,
        group_size: int,
        particle_dim: int,
    ) -> None:
        super().__init__()
        self.names = frozenset(names)
        self.num_particles = num_particles
        self.group_size = group_size
        self.particle_dim = particle_dim

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"] not in self.names or msg["is_observed"]:
            return
        value = msg["value"]
        axis = value.dim() - msg["fn"].event_dim + self.particle_dim
        if axis < 0 or value.shape[axis] != self.num_particles:
            return  # not batched over particles: shared already
        groups = (self.num_particles // self.group_size, self.group_size)
        grouped = value.unflatten(axis, groups)
        first = grouped.narrow(axis + 1, 0, 1).expand_as(grouped)
        msg["value"] = first.flatten(axis, axis + 1)


class SharedSubsamples(Messenger):
    """Gives every run inside it the indices that each sub-sampled plate drew in
    the first: all particles, drawn one run at a time or not, and a second run
    of the same call weigh the same points."""

    def __init__(self) -> None:
        super().__init__()
        self._indices: dict[str, Any] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        # Not the particle plate's: a run with another number of particles (see
        # check_particle_dims) draws all of its own.
        if site_is_subsample(msg) and msg["name"] != PARTICLE_PLATE:
            msg["value"] = self._indices.setdefault(msg["name"], msg["value"])


class TieSequentialGlobals(Messenger):
    """:class:`TieGlobals` for particles drawn one run at a time: in the run of
    particle ``index``, each latent site in ``names`` takes the value the first
    particle of its group of ``group_size`` drew. Enter it once per run and
    advance ``index`` between runs."""

    def __init__(self, names: Collection[str], group_size: int) -> None:
        super().__init__()
        self.names = frozenset(names)
        self.group_size = group_size
        self.index = 0
        self._values: dict[tuple[int, str], torch.Tensor] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"] not in self.names or msg["is_observed"]:
            return
        key = (self.index // self.group_size, msg["name"])
        # The guide's run stores the value; the model's replays it already.
        msg["value"] = self._values.setdefault(key, msg["value"])


def factor_plates(sites: list[dict]) -> tuple[tuple[int, ...], list[str]]:
    """The dims of the plates a bound factors over, and the latent sites outside
    them (global). The data plate is the outermost plate around every observed
    site; a plate inside it around every observed site joins it unless a latent
    site in the data plate lies outside it (a per-point latent shared by the inner
    plate's cells, as in a mixture over rows). Latent sites outside the data plate
    are global; all are where no plate encloses every observed site."""
    dims = set(data_plate_dims([s for s in sites if s["is_observed"]]))
    outer = min(dims, default=None)
    names: list[str] = []
    for site in sites:
        if site["is_observed"] or site_is_subsample(site) or site["name"] in names:
            continue
        site_dims = {f.dim for f in site["cond_indep_stack"] if f.vectorized}
        if outer in site_dims:
            dims &= site_dims
        else:
            names.append(site["name"])
    return tuple(sorted(dims)), names


def is_subsampled(sites: list[dict], dims: tuple[int, ...] | None) -> bool:
    """Whether a plate at one of ``dims`` (None: any plate, sequential ones too)
    is sub-sampled at some site."""
    return any(
        (dims is None or f.dim in dims)
        and f.full_size is not None
        and f.full_size != f.size
        for site in sites
        for f in site["cond_indep_stack"]
    )


def data_plate_dims(sites: list[dict]) -> tuple[int, ...]:
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


def plate_depth(sites: list[dict]) -> int:
    """How many batch dims the vectorized plates of ``sites`` take: minus the
    deepest one's dim (0 for none), the particle plate left out."""
    return max(
        (
            -f.dim
            for site in sites
            for f in site["cond_indep_stack"]
            if f.vectorized and f.name != PARTICLE_PLATE
        ),
        default=0,
    )


def common_scale(sites: list[dict], local_dims: tuple[int, ...]) -> Any:
    """The scale that multiplies the bound: the one shared by the observed sites
    (by all sites where none is observed, else 1). Another scale on a latent
    site enters its log-weight relative to it (:func:`relative_scale`).

    :raises ValueError: if a plate outside ``local_dims`` is sub-sampled, or the
        observed sites have different scales.
    """
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
            "every sample site, so the bound does not factor over its points; use "
            "global_latents='factor' (the sites outside it are then global "
            "latents) or full batches"
        )
    observed = [site for site in sites if site["is_observed"]]
    if not sites:
        return 1.0
    first = (observed or sites)[0]
    for site in observed or sites:
        if not _same_scale(site["scale"], first["scale"]):
            if not observed:
                return 1.0
            raise ValueError(
                f"importance weights need one scale for the observed sites, but "
                f"{site['name']!r} has {site['scale']} and {first['name']!r} has "
                f"{first['scale']}; scale latent sites or the whole model, not "
                "single observed sites"
            )
    return first["scale"]


def relative_scale(site: dict, scale: Any) -> Any:
    """The factor on ``site``'s log-prob inside the log-weight: its own scale over
    the ``scale`` of the bound (1 where they agree)."""
    return 1.0 if _same_scale(site["scale"], scale) else site["scale"] / scale


def _same_scale(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if not (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        return a == b
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and bool((a == b).all())


def score_log_prob(
    guide_trace: Trace,
    plate_nesting: int,
    local_dims: tuple[int, ...],
    scale: Any = 1.0,
    strata: tuple[int, int] | None = None,
    model_trace: Trace | None = None,
    skip: Collection[str] = (),
) -> torch.Tensor | None:
    """The log-density of the proposal's sites without ``rsample`` (shaped as the
    parts of :func:`~pyro_iwae.infer.log_weights.log_p_and_q`), or None if every
    site has one: the guide's latent sites and, given ``model_trace``, the
    model's latent sites that the guide leaves to the prior (their prior is part
    of the proposal), but those enumerated and those in ``skip``.

    :param strata: when the guide enumerates values left of the particles, the
        number of dims of the pair's log-weights and how many of them, leading,
        hold the values: each site's log q is summed over those, as its own (a
        site shared by the values counts once).
    """
    sites = [
        (guide_trace, name)
        for name, site in latent_sites(guide_trace)
        if not site["fn"].has_rsample
        and site["infer"].get("_enumerate_dim") is None
        and name not in skip
    ]
    if model_trace is not None:
        sites += [
            (model_trace, name)
            for name, site in latent_sites(model_trace)
            if name not in guide_trace.nodes
            and name not in skip
            and not site["fn"].has_rsample
            and site["infer"].get("_enumerate_dim") is None
        ]
    if not sites:
        return None
    total = None
    if strata is None:
        for trace in dict.fromkeys(trace for trace, _ in sites):
            names = [name for t, name in sites if t is trace]
            log_prob = _log_prob(trace, names, plate_nesting, local_dims, scale)
            total = log_prob if total is None else total + log_prob
        return total
    width, values = strata
    for trace, name in sites:
        log_prob = _log_prob(
            trace, [name], plate_nesting, local_dims, scale, width
        ).sum(list(range(values)))
        total = log_prob if total is None else total + log_prob
    return total.reshape((1,) * (plate_nesting + 1 - total.dim()) + total.shape)


def _log_prob(
    trace: Trace,
    names: Collection[str],
    plate_nesting: int,
    local_dims: tuple[int, ...],
    scale: Any = 1.0,
    width: int | None = None,
) -> torch.Tensor | None:
    """Log-prob of the trace's sample sites among ``names``, each relative to the
    bound's ``scale`` (see :func:`relative_scale`), summed over all but the
    particle and data plate dims.

    :param width: the number of dims of the result: ``plate_nesting + 1`` (the
        default), or more when the guide enumerates values left of the particles.
    :returns: a tensor of shape ``(particles,) + plate_shape``, one of length
        ``plate_nesting + 1``, with particles 1 when particles are not vectorized
        (``enumerated_shape + (particles,) + plate_shape`` for a larger
        ``width``); None if there is no sample site among ``names``.
    """
    width = plate_nesting + 1 if width is None else width
    total = None
    for name in names:
        site = trace.nodes[name]
        if site["type"] != "sample":
            continue
        log_prob = site.get(STOPPED_LOG_PROB)
        if log_prob is None:
            log_prob = site_log_prob(name, site)
        log_prob = scale_and_mask(
            log_prob, relative_scale(site, scale), mask=site["mask"]
        )
        if log_prob.dim() > width:
            raise ValueError(
                f"site {name!r} has batch shape {tuple(log_prob.shape)}, more dims "
                f"than max_plate_nesting={plate_nesting} allows; raise "
                "max_plate_nesting or declare the dims with pyro.plate"
            )
        if log_prob.dim() < width:
            log_prob = log_prob.reshape(
                (1,) * (width - log_prob.dim()) + log_prob.shape
            )
        sum_dims = [
            d
            for d in range(-plate_nesting, 0)
            if d not in local_dims and log_prob.shape[d] > 1
        ]
        if sum_dims:
            log_prob = log_prob.sum(sum_dims, keepdim=True)
        total = log_prob if total is None else total + log_prob
    return total


def _align(weights: torch.Tensor, site: dict) -> torch.Tensor:
    """Reshapes per-particle weights to broadcast against ``site['value']``."""
    event_dim = site["fn"].event_dim
    factor = weights.reshape(weights.shape + (1,) * event_dim)
    extra = factor.dim() - site["value"].dim()
    if extra > 0:
        factor = factor.reshape(factor.shape[extra:])
    return factor


def sample_sites(pair: tuple[Trace, Trace]) -> list[dict]:
    """The sample sites of a model trace and a guide trace, in that order, less
    ``pyro.deterministic``'s: a masked record of a value, in or out of any plate,
    no part of the density."""
    return [
        site
        for trace in pair
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["infer"].get("_deterministic")
    ]
