"""The log-weights' parts of a pair of model and guide traces: log p and log q of
each particle and point, and the global latents' part (see :class:`IWELBO`'s
``global_latents``), with enumerated model sites summed out."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, NamedTuple

import torch
from pyro.poutine.trace_struct import Trace

from .enumeration import sum_out_enumerated
from .traces import _log_prob, latent_sites

__all__ = ["LogWeightParts", "log_p_and_q"]


class LogWeightParts(NamedTuple):
    """The parts of the log-weights of one pair of traces, each of shape
    ``(particles,) + plate_shape`` (see :func:`_log_prob`).

    ``log_p`` and ``log_q`` hold the sites local to the data plate, relative to
    the bound's scale; ``log_global`` is ``log p - log q`` of the global latent
    sites, each times its own scale and summed over every plate (None if there
    are none).
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    log_global: torch.Tensor | None


def log_p_and_q(
    model_trace: Trace,
    guide_trace: Trace,
    plate_nesting: int,
    local_dims: tuple[int, ...],
    scale: Any = 1.0,
    global_names: Collection[str] = (),
    prior_scores: bool = False,
) -> LogWeightParts:
    """The log p and log q parts of the log weights of one pair of traces.

    A latent site of the model that the guide does not sample is drawn from its
    prior during replay, so the prior is part of the proposal and cancels from
    the weight: it enters neither part; unless the model enumerated it, then it
    is summed out of log p (:func:`~pyro_iwae.infer.enumeration.sum_out_enumerated`).
    Sites among ``global_names`` go to the global part. Such a site without
    ``rsample`` whose prior depends on trainable values is refused unless
    ``prior_scores`` (the score-function estimators: its log p is then part of
    :func:`~pyro_iwae.infer.traces.score_log_prob`).
    """
    # Lists, not sets: the order of summation must not vary between processes.
    guide_latent = [name for name, _ in latent_sites(guide_trace)]
    # Values enumerated in the guide: each gets its own particles, in dims left of
    # the particle dim; their own log q is replaced by the uniform log(1 / K).
    strata = {
        name: site["infer"]["_enumerate_dim"]
        for name, site in latent_sites(guide_trace)
        if site["infer"].get("_enumerate_dim") is not None
    }
    width = max([plate_nesting + 1] + [-dim for dim in strata.values()])
    enumerated = [
        name
        for name, site in latent_sites(model_trace)
        if name not in guide_trace.nodes
        and site["infer"].get("_enumerate_dim") is not None
    ]
    prior_proposed = [
        (name, site)
        for name, site in latent_sites(model_trace)
        if name not in guide_trace.nodes and name not in enumerated
    ]
    for name, site in prior_proposed:
        if not (site["fn"].has_rsample or prior_scores) and torch.is_grad_enabled():
            log_prob = site["fn"].log_prob(site["value"])
            if log_prob.requires_grad:
                raise NotImplementedError(
                    f"IWELBO draws {name!r} from the model's prior (the guide does "
                    f"not sample it), but its {type(site['fn']).__name__} depends "
                    "on trainable values and has no rsample, so its gradient "
                    f"would need a score-function term; use estimator='vimco', "
                    f"sample {name!r} in the guide or give it a fixed prior"
                )
    skip = {name for name, _ in prior_proposed}
    model_sites = [name for name in model_trace.nodes if name not in skip]
    local_p = [name for name in model_sites if name not in global_names]
    local_q = [
        name for name in guide_latent if name not in global_names and name not in strata
    ]
    summed_out = None
    if enumerated:
        summed_out, local_p = sum_out_enumerated(
            model_trace, guide_trace, local_p, plate_nesting, local_dims, scale, width
        )
    log_p = _log_prob(model_trace, local_p, plate_nesting, local_dims, scale, width)
    if summed_out is not None:
        log_p = summed_out if log_p is None else log_p + summed_out
    log_q = _log_prob(guide_trace, local_q, plate_nesting, local_dims, scale, width)
    for name, dim in strata.items():
        site = guide_trace.nodes[name]
        log_uniform = -math.log(site["value"].shape[dim - site["fn"].event_dim])
        log_q = log_uniform if log_q is None else log_q + log_uniform
    log_global = None
    if global_names:
        global_p = [name for name in model_sites if name in global_names]
        global_q = [name for name in guide_latent if name in global_names]
        parts = [
            _log_prob(trace, names, plate_nesting, ())
            for trace, names in ((model_trace, global_p), (guide_trace, global_q))
        ]
        if parts[0] is not None and parts[1] is not None:
            log_global = parts[0] - parts[1]
        else:
            log_global = parts[0] if parts[0] is not None else -parts[1]
    # A program without sample sites contributes log 1 = 0 to each part.
    like = next(
        (part for part in (log_p, log_q) if isinstance(part, torch.Tensor)), None
    )
    zero = torch.zeros(()) if like is None else like.new_zeros(())
    log_p, log_q = (
        part
        if isinstance(part, torch.Tensor)
        else zero.reshape((1,) * width) + (part or 0.0)
        for part in (log_p, log_q)
    )
    return LogWeightParts(log_p, log_q, log_global)
