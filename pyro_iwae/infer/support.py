"""A sample site's log-density: a value outside its distribution's support named
in one line; and, for stl and dreg, which re-run the guide with its parameters
held constant, the draws' own log q kept."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributions.transforms as torch_transforms
from pyro.distributions import Delta
from pyro.distributions.transforms import BlockAutoregressive, Polynomial, Sylvester
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.distributions.transforms.radial import ConditionedRadial
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..errors import SupportError

__all__ = [
    "InaccurateInverseWarning",
    "OwnLogProb",
    "check_invertible",
    "is_point_mass",
    "keep_own_log_q",
    "site_log_prob",
]

#: The key of a latent site's log q with the guide's parameters held constant.
STOPPED_LOG_PROB = "stopped_log_prob"
#: The key of a latent site's log q at its draw, recorded as it was drawn.
OWN_LOG_PROB = "own_log_prob"


class OwnLogProb(Messenger):
    """Records each latent site's log-prob of its draw as it is drawn (without
    gradient), while the distribution's transforms still hold the draw in their
    caches: evaluated later, a flow would invert the draw instead."""

    def _pyro_post_sample(self, msg: dict) -> None:
        if not msg["is_observed"] and not site_is_subsample(msg):
            with torch.no_grad():
                msg[OWN_LOG_PROB] = site_log_prob(msg["name"], msg)


class InaccurateInverseWarning(UserWarning):
    """stl or dreg re-evaluated log q at a guide's own draws and got another
    value: the inverse of the guide's transforms is inaccurate there."""


_WARNED: set[tuple[str, str]] = set()


def keep_own_log_q(first: Trace, stopped: Trace, estimator: str) -> None:
    """Gives the latent sites of ``stopped`` (the guide re-run with its
    parameters held constant, for stl and dreg) the values of log q at the draws
    of ``first`` (recorded by :class:`OwnLogProb`), keeping the re-run's
    gradient path.

    The re-run evaluates log q at new tensor objects, which miss the caches of
    the guide's transforms: a flow inverts them, and where its inverse is
    inaccurate (an IAF's, at some draws) log q, and the bound with it, comes out
    another number, by up to thousands of nats. Warns (once per site and
    estimator in a process) where that happens, outside graph capture, which
    has no values to compare.
    """
    differences = []
    for name, site in stopped.nodes.items():
        log_q = site.get(STOPPED_LOG_PROB)  # latent sites only
        own = first.nodes[name].get(OWN_LOG_PROB) if name in first.nodes else None
        if log_q is None or own is None or own.shape != log_q.shape:
            continue
        site[STOPPED_LOG_PROB] = log_q + (own - log_q.detach())
        differences.append((name, (log_q.detach() - own).abs(), own.abs()))
    if get_proxy_mode() is not None:
        return
    for name, difference, size in differences:
        # Once: the stopped re-run resets warnings' own registry of those shown.
        if (estimator, name) in _WARNED:
            continue
        if bool((difference > 1e-2 + 1e-4 * size).any()):
            _WARNED.add((estimator, name))
            warnings.warn(
                f"IWELBO's {estimator!r} estimator re-evaluated log q of site "
                f"{name!r} at the guide's own draws and got other values (the "
                "inverse of its transforms is inaccurate there): the bound keeps "
                "the draws' own log q, but its gradient is unreliable; use "
                "estimator='iwae' with this guide",
                InaccurateInverseWarning,
                stacklevel=2,
            )


def site_log_prob(name: str, site: dict) -> torch.Tensor:
    """``log_prob`` of a sample site's value.

    :raises SupportError: naming the site, where the value lies outside the
        support of its distribution (in place of torch's message, which prints
        the whole tensor).
    """
    fn, value = site["fn"], site["value"]
    try:
        return fn.log_prob(value, *site["args"], **site["kwargs"])
    except ValueError:
        try:
            inside = bool(fn.support.check(value).all())
        except Exception:  # a support that cannot say: torch's error stands
            inside = True
        if inside:
            raise
    if site.get("is_observed"):
        what, advice = "observed values", "pass values in its support"
    else:  # a model's latent site, at the guide's draws
        what, advice = "values", "make the guide draw inside it (a transform)"
    if value.is_floating_point() and bool(value.isnan().any()):
        # Their range reads [nan, nan]: say what they are.
        fix = (
            "remove them from the data"
            if site.get("is_observed")
            else "the guide drew them: look for NaN in its parameters and inputs"
        )
        raise SupportError(f"site {name!r}: {what} include NaN; {fix}") from None
    low, high = float(value.min()), float(value.max())
    kind, events = fn, 0
    while isinstance(kind, torch.distributions.Independent):
        kind, events = kind.base_dist, events + kind.reinterpreted_batch_ndims
    kind = type(kind).__name__ + (f".to_event({events})" if events else "")
    raise SupportError(
        f"site {name!r}: {what} in [{low:g}, {high:g}] lie outside the support "
        f"of its {kind} ({fn.support}); {advice}, or change the distribution"
    ) from None


def is_point_mass(fn: Any) -> bool:
    """Whether distribution ``fn`` is a ``Delta``, or wraps one (``Independent``,
    masked): a value without a density to weigh."""
    while not isinstance(fn, Delta):
        fn = getattr(fn, "base_dist", None)
        if fn is None:
            return False
    return True


#: Pyro's transforms that invert only the outputs they computed themselves
#: (their ``_inverse`` raises a KeyError for any other value).
_CACHED_INVERSE = (
    ConditionedPlanar,
    ConditionedRadial,
    Sylvester,
    Polynomial,
    BlockAutoregressive,
)


def _transform_parts(transform: Any) -> Iterator[Any]:
    if isinstance(transform, torch.distributions.ComposeTransform):
        for part in transform.parts:
            yield from _transform_parts(part)
    elif isinstance(transform, torch.distributions.transforms.IndependentTransform):
        yield from _transform_parts(transform.base_transform)
    else:
        yield transform


def _without_inverse(fn: Any) -> str | None:
    """The class name of a transform of distribution ``fn`` (or of those it
    wraps) that cannot invert a value it did not compute itself; None if none."""
    while fn is not None:
        for transform in getattr(fn, "transforms", ()):
            for part in _transform_parts(transform):
                unimplemented = (
                    type(part)._inverse is torch_transforms.Transform._inverse
                )
                if isinstance(part, _CACHED_INVERSE) or (
                    unimplemented
                    and not isinstance(part, torch_transforms._InverseTransform)
                ):
                    return type(part).__name__
        fn = getattr(fn, "base_dist", None)
    return None


def check_invertible(name: str, fn: Any, estimator: str) -> None:
    """:raises NotImplementedError: where guide site ``name``'s distribution ``fn``
    has a transform without an inverse: ``estimator`` (stl, dreg) evaluates log q
    at the draws anew, with the guide's parameters held constant."""
    transform = _without_inverse(fn)
    if transform is not None:
        raise NotImplementedError(
            f"IWELBO's {estimator!r} gradient evaluates log q at the guide's draws "
            f"with its parameters held constant, which needs the inverse of site "
            f"{name!r}'s transforms, but {transform} has none (it inverts only "
            "its own outputs); use estimator='iwae', or an invertible flow "
            "(affine_autoregressive, spline, ...)"
        )
