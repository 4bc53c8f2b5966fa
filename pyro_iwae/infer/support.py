"""A sample site's log-density, with a value outside its distribution's support
named in one line."""

from __future__ import annotations

import torch

from ..errors import SupportError

__all__ = ["site_log_prob"]


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
    what = "observed values" if site.get("is_observed") else "values"
    low, high = float(value.min()), float(value.max())
    kind, events = fn, 0
    while isinstance(kind, torch.distributions.Independent):
        kind, events = kind.base_dist, events + kind.reinterpreted_batch_ndims
    kind = type(kind).__name__ + (f".to_event({events})" if events else "")
    raise SupportError(
        f"site {name!r}: {what} in [{low:g}, {high:g}] lie outside the support "
        f"of its {kind} ({fn.support}); pass values in its support, or change "
        "the distribution"
    ) from None
