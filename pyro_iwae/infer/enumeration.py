"""Discrete sites enumerated in parallel, for :class:`~pyro_iwae.IWELBO`.

A latent site that the model samples and the guide does not, marked
``infer={"enumerate": "parallel"}`` (or by :func:`~pyro.infer.config_enumerate`),
is summed out of log p exactly, for each particle of the other latents: the
model's log-factors that depend on enumerated values are contracted by variable
elimination over their plates (Pyro's :func:`~pyro.ops.contract.contract_to_tensor`
in the log semiring), down to the particle and data plate dims.

A guide site so marked, in the data plate, gives each of its values its own
particles of the sites below it: the values' dims, left of the particle dim, are
merged into it (:func:`merge_strata`), and the site's own log q is replaced by
that of the uniform distribution on its values, so that q(y) cancels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace

from .traces import PARTICLE_PLATE, _same_scale, latent_sites, relative_scale

__all__ = [
    "GlobalEnumerationError",
    "Unenumerated",
    "check_enumeration",
    "check_strata",
    "enumerates",
    "guide_enumerated",
    "is_model_enumerated",
    "marked_parallel",
    "merge_strata",
    "sampled_instead",
    "shared_by_strata",
    "strata_shape",
    "sum_out_enumerated",
]


def enumerates(trace: Trace) -> bool:
    """Whether a latent site of ``trace`` is marked for enumeration."""
    return any(site["infer"].get("enumerate") for _, site in latent_sites(trace))


def shared_by_strata(guide_trace: Trace) -> tuple[str, str] | None:
    """A guide latent site whose value some value enumerated in the guide does
    not index (sampled above it, or beside it), with that enumerated site; None
    if every sampled site has its own value for each enumerated value."""
    enumerated = guide_enumerated(guide_trace)
    for name, site in latent_sites(guide_trace):
        if name in enumerated:
            continue
        batch_shape = site["fn"].batch_shape
        for other in enumerated:
            dim = guide_trace.nodes[other]["infer"]["_enumerate_dim"]
            value = guide_trace.nodes[other]["value"]
            size = value.shape[dim - guide_trace.nodes[other]["fn"].event_dim]
            if len(batch_shape) < -dim or batch_shape[dim] != size:
                return name, other
    return None


def sampled_instead(
    guide_trace: Trace,
    local_dims: tuple[int, ...],
    global_names: Collection[str] = (),
) -> frozenset[str]:
    """The guide sites marked for enumeration that are sampled instead: those in
    plates other than the data plate dims ``local_dims`` (their values in the n
    elements of such a plate would need K^n strata), the global latents
    ``global_names`` of a factored bound (drawn once for a group of particles,
    as the ELBO over them does), those marked ``"sequential"``, and those that
    ask for ``num_samples`` values."""
    return frozenset(
        name
        for name, site in latent_sites(guide_trace)
        if site["infer"].get("enumerate")
        and (
            name in global_names
            or site["infer"]["enumerate"] != "parallel"
            or site["infer"].get("num_samples") is not None
            or sorted(
                f.dim
                for f in site["cond_indep_stack"]
                if f.vectorized and f.name != PARTICLE_PLATE
            )
            != sorted(local_dims)
        )
    )


class Unenumerated(Messenger):
    """Removes the enumeration mark of the sample sites in ``names`` (of every
    site for None), so that they are sampled."""

    def __init__(self, names: Collection[str] | None = None) -> None:
        super().__init__()
        self.names = None if names is None else frozenset(names)

    def _pyro_sample(self, msg: dict) -> None:
        if (self.names is None or msg["name"] in self.names) and msg["infer"].get(
            "enumerate"
        ):
            msg["infer"] = {**msg["infer"], "enumerate": None}


def guide_enumerated(guide_trace: Trace) -> list[str]:
    """Names of the guide's latent sites whose values are enumerated."""
    return [
        name
        for name, site in latent_sites(guide_trace)
        if site["infer"].get("_enumerate_dim") is not None
    ]


def merge_strata(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    plate_nesting: int,
    particles: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_p`` and ``log_q`` with the dims of values enumerated in the guide
    merged into the particle dim.

    :param particles: the size of the particle dim, k; None for a particle of a
        Python loop (then the enumerated dims start at the particle dim's place).
    :returns: both parts, of shape ``(strata * particles,) + plate_shape``,
        ``strata`` the number of joint values enumerated in the guide (as they
        were when nothing is enumerated in the guide).
    """
    if log_p.dim() == log_q.dim() == plate_nesting + 1 and (
        particles is not None or log_p.shape[0] == log_q.shape[0]
    ):
        # Nothing enumerated in the guide (in a Python loop, values would fill
        # the particle dim's place).
        return log_p, log_q
    shape = strata_shape(log_p, log_q, plate_nesting, particles)
    flat = (-1,) + shape[len(shape) - plate_nesting :]
    return log_p.expand(shape).reshape(flat), log_q.expand(shape).reshape(flat)


def strata_shape(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    plate_nesting: int,
    particles: int | None,
) -> tuple[int, ...]:
    """The shape of the log-weights of one pair of traces before
    :func:`merge_strata`: ``enumerated_shape + (particles,) + plate_shape``
    (without the particles of a Python loop, None)."""
    shape = list(torch.broadcast_shapes(log_p.shape, log_q.shape))
    if particles is not None:
        shape[-1 - plate_nesting] = particles
    return tuple(shape)


def is_model_enumerated(site: dict, guide_trace: Trace) -> bool:
    """Whether the model site ``site`` was enumerated by the model itself."""
    return (
        site["type"] == "sample"
        and site["infer"].get("_enumerate_dim") is not None
        and site["name"] not in guide_trace.nodes
    )


class GlobalEnumerationError(NotImplementedError):
    """A global site enumerated in the model, which a bound that factors over
    the data plate cannot sum out."""

    def __init__(self, site: str) -> None:
        self.site = site
        super().__init__(
            f"IWELBO cannot sum the model's global site {site!r} (outside the data "
            "plate) out of a bound that factors over the data plate; use "
            "global_latents='joint' on full batches, or sample it in the guide"
        )


def check_enumeration(
    model_trace: Trace, guide_trace: Trace, global_names: Collection[str]
) -> None:
    """:raises NotImplementedError: for sequential enumeration in the model,
    enumeration of ``num_samples`` values (tensor Monte Carlo) in the model, or an
    enumerated site among the global latents ``global_names`` (guide sites that
    are not enumerated in parallel are sampled: see :func:`sampled_instead`)."""
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in latent_sites(trace):
            how = site["infer"].get("enumerate")
            if not how or (role == "model" and name in guide_trace.nodes):
                continue
            if how == "sequential":
                raise NotImplementedError(
                    f"IWELBO enumerates only in parallel, but model site {name!r} "
                    "is marked 'sequential'; mark it infer={'enumerate': "
                    "'parallel'} (config_enumerate's default)"
                )
            if site["infer"].get("num_samples") is not None:
                raise NotImplementedError(
                    f"IWELBO sums over the whole support of an enumerated site, but "
                    f"model site {name!r} asks for num_samples (tensor Monte "
                    "Carlo); drop num_samples, or sample the site in the guide"
                )
            if name in global_names:
                raise GlobalEnumerationError(name)


def sum_out_enumerated(
    model_trace: Trace,
    guide_trace: Trace,
    names: Collection[str],
    plate_nesting: int,
    local_dims: tuple[int, ...],
    scale: Any = 1.0,
    width: int | None = None,
) -> tuple[torch.Tensor | None, list[str]]:
    """Log-prob of the model sites among ``names`` that depend on a site enumerated
    in the model, with the enumerated values summed out.

    The factors are contracted in the log semiring: logsumexp over each enumerated
    site's values, a sum over every plate but the particle plate and the data
    plate dims ``local_dims``. They share one scale relative to the bound's
    ``scale`` (see :func:`~pyro_iwae.infer.traces.relative_scale`), which multiplies the
    result; the enumerated sites' own factors are not masked (a mask would drop
    their normalisation), the others are.

    :returns: the summed-out log-prob, of ``width`` dims shaped as
        :func:`~pyro_iwae.infer.log_weights.log_p_and_q`'s parts (None if no site among
        ``names`` depends on an enumerated site), and the names left to sum as
        usual.
    :raises ValueError: if the factors of enumerated sites have different scales.
    """
    enumerated = [
        name
        for name in names
        if is_model_enumerated(model_trace.nodes[name], guide_trace)
    ]
    if not enumerated:
        return None, list(names)
    model_trace.symbolize_dims()
    sum_dims = {
        model_trace.nodes[name]["infer"]["_enumerate_symbol"] for name in enumerated
    }
    tree: OrderedDict[frozenset, list[torch.Tensor]] = OrderedDict()
    target: set[str] = set()
    # Packing drops dims of size 1: a plate of one element is in no term.
    dim_to_size: dict[str, int] = {}
    rest, first, common = [], None, 1.0
    for name in names:
        site = model_trace.nodes[name]
        if site["type"] != "sample":
            continue
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        mask = None if name in enumerated else site["mask"]
        term = packed.pack(
            scale_and_mask(log_prob, mask=mask), site["infer"]["_dim_to_symbol"]
        )
        if sum_dims.isdisjoint(term._pyro_dims):
            rest.append(name)
            continue
        site_scale = relative_scale(site, scale)
        if first is None:
            first, common = name, site_scale
        elif not _same_scale(site_scale, common):
            raise ValueError(
                f"IWELBO sums out enumerated sites over factors of one scale, but "
                f"{name!r} and {first!r} have different scales; scale the whole "
                "model, or none of the sites that depend on an enumerated site"
            )
        ordinal = frozenset(
            model_trace.plate_to_symbol[f.name]
            for f in site["cond_indep_stack"]
            if f.vectorized
        )
        for f in site["cond_indep_stack"]:
            if f.vectorized and (f.name == PARTICLE_PLATE or f.dim in local_dims):
                target.add(model_trace.plate_to_symbol[f.name])
                dim_to_size[model_trace.plate_to_symbol[f.name]] = f.size
        dim_to_size.update(zip(term._pyro_dims, term.shape, strict=True))
        tree.setdefault(ordinal, []).append(term)
    result = contract_to_tensor(
        tree,
        sum_dims,
        target_ordinal=frozenset(target),
        ring=LogRing(dim_to_size=dim_to_size),
    )
    result = packed.unpack(result, model_trace.symbol_to_dim)
    if not _same_scale(common, 1.0):
        result = result * common
    width = plate_nesting + 1 if width is None else width
    if result.dim() < width:
        result = result.reshape((1,) * (width - result.dim()) + result.shape)
    return result, rest


def marked_parallel(site: dict) -> bool:
    """Whether a guide site is, or may be, enumerated in parallel (one sampled
    instead is checked when it is sampled)."""
    return site["infer"].get("enumerate") == "parallel"


def check_strata(
    guide_trace: Trace,
    objective: str,
    estimator: str,
    takes_strata: bool,
    takes_strata_scores: bool,
) -> None:
    """:raises NotImplementedError: where the bound ``objective`` cannot take the
    values ``guide_trace`` enumerates: it takes none (``takes_strata`` false),
    ``estimator`` is DReG and a guide site is shared by those values, or a
    score-function signal of a sampled site would have to sum over them
    (``takes_strata_scores`` false)."""
    enumerated = guide_enumerated(guide_trace)
    if not enumerated:
        return
    if not takes_strata:
        raise NotImplementedError(
            f"{objective} does not take sites enumerated in the "
            f"guide (here {enumerated[0]!r}); use IWELBO or CIWELBO, or "
            "enumerate the site in the model (leave it out of the guide)"
        )
    shared = shared_by_strata(guide_trace)
    if estimator == "dreg" and shared is not None:
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
    if sampled and not takes_strata_scores:
        raise NotImplementedError(
            f"{objective}'s score-function gradient for {sampled[0]!r} "
            f"does not take sites enumerated in the guide (here "
            f"{enumerated[0]!r}); use IWELBO, or enumerate {enumerated[0]!r} in "
            "the model (leave it out of the guide)"
        )
