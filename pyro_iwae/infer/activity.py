"""Latent activity and the paper's count of active units (Burda et al. 2016,
section 5.2): how much each latent unit's posterior mean varies over the data."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch

from .evaluation import evaluating
from .traces import PARTICLE_PLATE, latent_sites

#: The paper's threshold on a latent unit's activity for it to count as active.
ACTIVE_THRESHOLD = 0.01


def latent_activity(
    guide: Callable,
    data: torch.Tensor,
    *,
    num_samples: int = 100,
    batch_size: int = 500,
) -> dict[str, torch.Tensor]:
    r"""Activity :math:`\mathrm{Cov}_x(\mathbb{E}_{q(z|x)}[z_u])` of each latent unit.

    The inner expectation averages the mean of each guide site's distribution
    over ``num_samples`` draws of its parents (exact for a site whose parameters
    depend on ``x`` only); where the distribution has no closed-form mean, the
    sampled values are averaged. ``guide`` is called as ``guide(batch)``, with
    its data plate at dim -1.

    :returns: site name -> per-unit variance over the rows of ``data``
        (shape: the site's event shape).
    """
    means: dict[str, list[torch.Tensor]] = {}
    sample_plate = pyro.plate(PARTICLE_PLATE, num_samples, dim=-2)
    with evaluating(guide), pyro.poutine.block():
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size]
            trace = pyro.poutine.trace(sample_plate(guide)).get_trace(batch)
            for name, site in latent_sites(trace):
                try:
                    mean = site["fn"].mean
                except NotImplementedError:
                    mean = site["value"]
                mean = mean.expand(site["value"].shape)
                means.setdefault(name, []).append(mean.mean(0))
    return {
        name: torch.cat(chunks).var(0, unbiased=False) for name, chunks in means.items()
    }


def active_units(
    guide: Callable,
    data: torch.Tensor,
    *,
    threshold: float = ACTIVE_THRESHOLD,
    num_samples: int = 100,
    batch_size: int = 500,
) -> dict[str, int]:
    """The paper's count of active units: those with activity above ``threshold``.

    See :func:`latent_activity`; returns site name -> number of active units.
    """
    activity = latent_activity(
        guide, data, num_samples=num_samples, batch_size=batch_size
    )
    return count_active(activity, threshold)


def count_active(
    activity: dict[str, torch.Tensor], threshold: float = ACTIVE_THRESHOLD
) -> dict[str, int]:
    """Site name -> number of units of ``activity`` (see :func:`latent_activity`)
    above ``threshold``."""
    return {name: int((a > threshold).sum()) for name, a in activity.items()}
