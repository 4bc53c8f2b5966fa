"""log p(x) of a whole data set for models with global latents: importance
sampling nested as the factored bound is (global latents outside the data plate,
local ones inside), where :func:`~pyro_iwae.log_likelihood`
needs every latent inside the data plate."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.poutine.trace_struct import Trace

from ..errors import ParticleBroadcastError
from .arguments import check_batch
from .enumeration import GlobalEnumerationError, guide_enumerated
from .estimable import check_density, check_weights
from .evaluation import (
    check_count,
    chunk_sizes,
    evaluating,
    resolve_chunk_size,
)
from .grouped import MIWELBO

__all__ = ["joint_log_likelihood"]


class _JointDraws(MIWELBO):
    """:class:`MIWELBO`'s draws, whose refusal of values enumerated in the guide
    names :func:`joint_log_likelihood` (it named MIWELBO, which the caller never
    used, and offered IWELBO)."""

    def _check_strata(self, guide_trace: Trace) -> None:
        enumerated = guide_enumerated(guide_trace)
        if enumerated:
            raise NotImplementedError(
                "joint_log_likelihood does not take sites enumerated in the guide "
                f"(here {enumerated[0]!r}); enumerate the site in the model (leave "
                "it out of the guide)"
            )


def joint_log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    num_local_samples: int = 10,
    chunk_size: int | None = None,
    max_plate_nesting: int = 1,
    vectorize_particles: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    r"""Importance-sampled :math:`\log p(x_1, \dots, x_N)` of the whole batch, for
    a model whose latents :math:`\theta` outside the data plate are shared by all
    points (global latents) and whose latents :math:`z_i` inside it are each
    point's own.

    With :math:`\theta_j \sim q(\theta)`, :math:`j = 1..K` (``num_samples``), and
    for each point :math:`z_{il} \sim q(z | x_i, \theta_j)`, :math:`l = 1..k`
    (``num_local_samples``):

    .. math:: \log \frac{1}{K} \sum_j \frac{p(\theta_j)}{q(\theta_j)} \prod_i
        \frac{1}{k} \sum_l \frac{p(x_i, z_{il} | \theta_j)}{q(z_{il} | x_i, \theta_j)}.

    The sum's mean is p(x_1..N), so the estimate is below log p(x_1..N) in
    expectation and converges to it as K grows, for any k >= 1 (a larger k
    lowers the variance of each point's factor). With K = 1 it is a draw of the
    factored bound of ``IWELBO(k, global_latents="factor")``. The whole data set
    must be in the batch (a sub-sampled data plate is refused). Global draws are
    made ``chunk_size // k`` at a time, by default as many as
    :func:`~pyro_iwae.log_likelihood` would take particles; runs
    without gradients, with modules in eval mode. ``vectorize_particles=False``
    draws the particles one at a time, for programs that do not broadcast over
    them (see :func:`~pyro_iwae.log_likelihood`).

    :returns: a 0-dim tensor, in nats.
    :raises ProgramError: as :func:`~pyro_iwae.log_likelihood` does, for a guide
        of point masses, a latent scaled apart from the observed sites or
        masked otherwise in the model than in the guide.
    """
    check_count("num_samples", num_samples)
    check_count("num_local_samples", num_local_samples)
    check_batch(args, kwargs, "joint_log_likelihood")
    chunk_size = resolve_chunk_size(
        model, guide, args, kwargs, chunk_size, max_plate_nesting
    )
    groups_per_chunk = max(1, chunk_size // num_local_samples)
    total = None
    with evaluating(model, guide), torch.no_grad():
        for index, groups in enumerate(chunk_sizes(num_samples, groups_per_chunk)):
            try:
                part = _chunk(
                    model,
                    guide,
                    args,
                    kwargs,
                    num_local_samples,
                    groups,
                    max_plate_nesting,
                    vectorize_particles,
                    checked=index > 0,
                )
            except ParticleBroadcastError as e:
                raise e.for_evaluator("joint_log_likelihood") from None
            except GlobalEnumerationError as e:
                # It offered IWELBO's global_latents='joint', which this lacks.
                raise NotImplementedError(
                    "joint_log_likelihood draws the global latents from the "
                    f"guide, but the model enumerates its global site {e.site!r}; "
                    "sample it in the guide"
                ) from None
            total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(num_samples)


def _chunk(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_local_samples: int,
    groups: int,
    max_plate_nesting: int,
    vectorize_particles: bool,
    checked: bool = False,
) -> torch.Tensor:
    """logsumexp over ``groups`` global draws of each draw's log-weight (0-dim);
    ``checked``: an earlier chunk's checks covered the program."""
    elbo = _JointDraws(
        num_local_samples,
        groups,
        max_plate_nesting=max_plate_nesting,
        global_latents="factor",
        vectorize_particles=vectorize_particles,
    )
    if checked:
        elbo._dims_check = None
    particles = elbo.particles(model, guide, *args, **kwargs)
    if not particles.unscaled:
        raise ValueError(
            "joint_log_likelihood estimates log p(x) of the whole data set, but "
            "the data plate is sub-sampled (or scaled); pass every point, without "
            "subsample_size"
        )
    if not particles.local_dims:
        raise ValueError(
            "joint_log_likelihood needs a data plate that encloses every observed "
            "site (the points' own latents go inside it, the global ones outside)"
        )
    # Refused as by log_likelihood: weights of no p(x, z) / q(z) overshoot.
    check_density(particles.traces[0][1], "joint_log_likelihood")
    check_weights(*particles.traces[0], "joint_log_likelihood")
    by_group = particles.log_weights.reshape(
        (groups, num_local_samples) + particles.log_weights.shape[1:]
    )
    local = by_group.logsumexp(1) - math.log(num_local_samples)
    log_weight = local.reshape(groups, -1).sum(-1)
    if particles.global_log_weight is not None:
        # Equal within a group: its first particle's.
        log_weight = log_weight + particles.global_log_weight.reshape(groups, -1)[:, 0]
    return log_weight.logsumexp(0)
