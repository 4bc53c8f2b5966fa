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
from .traces import PARTICLE_PLATE, _log_prob, latent_sites

__all__ = [
    "LogWeightParts",
    "Particles",
    "cat_particles",
    "check_global_sites",
    "global_score_log_prob",
    "log_p_and_q",
]


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

    @property
    def particle_log_weights(self) -> torch.Tensor:
        """``log_weights`` with one weight per particle, ``(k,) + plate_shape``:
        with values enumerated in the guide, the mean of the particle's weights
        per value (a stratified draw; their mean over the particles is that of
        all the weights), else ``log_weights``."""
        if self.strata_shape is None:
            return self.log_weights
        # Vectorized, the values' dims lead the particle plate's (see
        # merge_strata); in a Python loop, each particle's pair holds them.
        vectorized = next(
            (
                frame.size
                for _, site in latent_sites(self.traces[0][1])
                for frame in site["cond_indep_stack"]
                if frame.name == PARTICLE_PLATE
            ),
            None,
        )
        particles = len(self.traces) if vectorized is None else vectorized
        values = self.log_weights.shape[0] // particles
        grouped = (values, particles) if vectorized else (particles, values)
        log_w = self.log_weights.reshape(grouped + self.log_weights.shape[1:])
        return log_w.logsumexp(0 if vectorized else 1) - math.log(values)

    @property
    def unscaled(self) -> bool:
        """Whether ``scale`` is the number 1 (no sub-sampling, no
        ``poutine.scale``): a tensor scale counts as scaled."""
        return isinstance(self.scale, float | int) and self.scale == 1


def cat_particles(parts: list[torch.Tensor]) -> torch.Tensor:
    """The log-weights of several runs of one particle each, along dim 0."""
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def check_global_sites(
    guide_trace: Trace, global_names: list[str], score_draw: bool
) -> None:
    """Refuses global guide sites without ``rsample`` unless ``score_draw`` (a
    score-function estimator and one draw of the global sites)."""
    if not torch.is_grad_enabled() or score_draw:
        return
    for name, site in unreparameterized_globals(guide_trace, global_names):
        raise NotImplementedError(
            f"IWELBO cannot train the global latent site {name!r} "
            f"({type(site['fn']).__name__} has no rsample) with "
            "global_latents='factor' and this estimator; use "
            "IWELBO(estimator='vimco'), a reparameterizable distribution for "
            "it, or global_latents='joint' on full batches"
        )


def unreparameterized_globals(
    guide_trace: Trace, global_names: list[str]
) -> list[tuple[str, dict]]:
    """The global guide sites without ``rsample``."""
    return [
        (name, site)
        for name, site in latent_sites(guide_trace)
        if name in global_names and not site["fn"].has_rsample
    ]


def global_score_log_prob(
    traces: list[tuple[Trace, Trace]], global_names: list[str], plate_nesting: int
) -> torch.Tensor | None:
    """log q of the global guide sites without ``rsample``, per particle (None
    if they all have one)."""
    names = [name for name, _ in unreparameterized_globals(traces[0][1], global_names)]
    if not names:
        return None
    return cat_particles(
        [_log_prob(guide_trace, names, plate_nesting, ()) for _, guide_trace in traces]
    )
