"""Latent activity and the paper's count of active units (Burda et al. 2016,
section 5.2): how much each latent unit's posterior mean varies over the data."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch

from ..errors import ParticleBroadcastError
from .arguments import check_tensor
from .estimable import trace_shapes_dropped
from .evaluation import evaluating
from .particles import BROADCAST_FAILURES, trial_run
from .traces import PARTICLE_PLATE, latent_sites, plate_depth

#: The paper's threshold on a latent unit's activity for it to count as active.
ACTIVE_THRESHOLD = 0.01


def latent_activity(
    guide: Callable,
    data: torch.Tensor,
    *,
    num_samples: int = 100,
    batch_size: int = 500,
    vectorize_particles: bool = True,
) -> dict[str, torch.Tensor]:
    r"""Activity :math:`\mathrm{Cov}_x(\mathbb{E}_{q(z|x)}[z_u])` of each latent unit.

    The inner expectation averages the mean of each guide site's distribution
    over ``num_samples`` draws of its parents (exact for a site whose parameters
    depend on ``x`` only); where the distribution has no closed-form mean (a flow,
    any ``TransformedDistribution``), the sampled values are averaged. The noise
    of that average would add about :math:`\mathbb{E}_x[\mathrm{Var}_q(z_u|x)]`
    ``/ num_samples`` to the variance over ``x`` (0.01 for a unit variance at
    100 draws, the paper's threshold), so each point's sample variance of its
    draws, divided by ``num_samples``, is averaged over the points (times
    ``(N - 1) / N``) and subtracted: the estimate is unbiased, then clamped at 0
    (which moves only units inactive either way). With ``num_samples=1`` there
    is no sample variance, and nothing is subtracted. ``guide`` is called as
    ``guide(batch)``, with its data plate the outermost of its plates (dim -1
    where it has no other).
    ``vectorize_particles=False`` runs the guide once per draw, for a guide that
    does not broadcast over a leading particle dimension (slower; the same
    estimate), as the evaluators' (see :func:`~pyro_iwae.log_likelihood`).

    :returns: site name -> per-unit variance over the rows of ``data``
        (shape: the site's event shape, after the dims of plates in the data
        plate).
    :raises ParticleBroadcastError: if the guide does not broadcast over the
        draws (pass ``vectorize_particles=False``).
    """
    return _activity(
        guide, data, num_samples, batch_size, vectorize_particles, "latent_activity"
    )


def active_units(
    guide: Callable,
    data: torch.Tensor,
    *,
    threshold: float = ACTIVE_THRESHOLD,
    num_samples: int = 100,
    batch_size: int = 500,
    vectorize_particles: bool = True,
) -> dict[str, int]:
    """The paper's count of active units: those with activity above ``threshold``.

    See :func:`latent_activity` (``vectorize_particles`` too); returns site
    name -> number of active units.
    """
    activity = _activity(
        guide, data, num_samples, batch_size, vectorize_particles, "active_units"
    )
    return count_active(activity, threshold)


@trace_shapes_dropped()
def _activity(
    guide: Callable,
    data: torch.Tensor,
    num_samples: int,
    batch_size: int,
    vectorize_particles: bool,
    caller: str,
) -> dict[str, torch.Tensor]:
    """:func:`latent_activity`, its errors naming ``caller``."""
    check_tensor("data", data)
    means: dict[str, list[torch.Tensor]] = {}
    noises: dict[str, list[torch.Tensor]] = {}
    with evaluating(guide), pyro.poutine.block():
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size]
            if vectorize_particles:
                draws = _vectorized_draws(guide, batch, num_samples, caller)
            else:
                draws = _sequential_draws(guide, batch, num_samples)
            for name, values in draws.items():
                means.setdefault(name, []).append(values.mean(0))
                noises.setdefault(name, []).append(_noise(values))
    activity = {}
    for name, chunks in means.items():
        point_means = torch.cat(chunks)
        n = point_means.shape[0]
        # E[Var_x of the averages] = Var_x of the means + (n - 1) / n times the
        # points' mean noise variance; each point's noise variance is estimated
        # without bias by its draws' sample variance / num_samples.
        noise = torch.cat(noises[name]).mean(0) * ((n - 1) / n)
        activity[name] = (point_means.var(0, unbiased=False) - noise).clamp(min=0)
    return activity


def _noise(values: torch.Tensor) -> torch.Tensor:
    """Each point's estimated variance of the mean of ``values`` (draws along
    dim 0): their sample variance / the number of draws (0 for one draw)."""
    if values.shape[0] < 2:
        return torch.zeros_like(values[0])
    return values.var(0, unbiased=True) / values.shape[0]


def _site_means(trace: pyro.poutine.Trace) -> dict[str, torch.Tensor]:
    """Each latent site's distribution mean (its value where it has none),
    broadcast to the value's shape."""
    means = {}
    for name, site in latent_sites(trace):
        try:
            mean = site["fn"].mean
        except NotImplementedError:
            mean = site["value"]
        means[name] = mean.expand(site["value"].shape)
    return means


def _vectorized_draws(
    guide: Callable, batch: torch.Tensor, num_samples: int, caller: str
) -> dict[str, torch.Tensor]:
    """The sites' means for ``num_samples`` draws in one particle plate (dim 0),
    left of the guide's own plates (at dim -2 was among those of a guide that
    nests a plate in the data plate)."""
    depth = _depth_without_plate(guide, batch)
    nesting = max(1, depth or 0)
    sample_plate = pyro.plate(PARTICLE_PLATE, num_samples, dim=-1 - nesting)
    try:
        trace = pyro.poutine.trace(sample_plate(guide)).get_trace(batch)
    except BROADCAST_FAILURES as error:
        if depth is None or num_samples == 1:
            raise
        raise ParticleBroadcastError.of_failure(
            error, num_samples, nesting, depth, caller
        ) from None
    return _site_means(trace)


def _sequential_draws(
    guide: Callable, batch: torch.Tensor, num_samples: int
) -> dict[str, torch.Tensor]:
    """The sites' means for ``num_samples`` runs of the guide (stacked, dim 0)."""
    draws: dict[str, list[torch.Tensor]] = {}
    for _ in range(num_samples):
        trace = pyro.poutine.trace(guide).get_trace(batch)
        for name, mean in _site_means(trace).items():
            draws.setdefault(name, []).append(mean)
    return {name: torch.stack(values) for name, values in draws.items()}


def _depth_without_plate(guide: Callable, batch: torch.Tensor) -> int | None:
    """How deep the guide's plates nest in one run without the particle plate
    (on a forked random stream, without warnings); None where that fails too."""
    try:
        with trial_run((batch,), {}):
            trace = pyro.poutine.trace(guide).get_trace(batch)
    except Exception:  # noqa: BLE001
        # A failure here is the guide's own, not the particle plate's.
        return None
    return plate_depth([s for s in trace.nodes.values() if s["type"] == "sample"])


def count_active(
    activity: dict[str, torch.Tensor], threshold: float = ACTIVE_THRESHOLD
) -> dict[str, int]:
    """Site name -> number of units of ``activity`` (see :func:`latent_activity`)
    above ``threshold``."""
    return {name: int((a > threshold).sum()) for name, a in activity.items()}
