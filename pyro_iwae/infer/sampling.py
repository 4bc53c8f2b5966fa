"""Samples and reconstructions from trained models, as pixel probabilities."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine

from ..errors import ProgramError
from ..nn.models import OBSERVED_SITE
from .estimable import trace_shapes_dropped
from .evaluation import check_count, evaluating

__all__ = ["reconstruct", "sample_images"]


def _parameter_of(module: Callable) -> torch.Tensor | None:
    """The first parameter of ``module`` (None for a function, or no parameters):
    the device and dtype a dummy input should have."""
    if isinstance(module, torch.nn.Module):
        return next(module.parameters(), None)
    return None


@trace_shapes_dropped()
def sample_images(
    model: Callable,
    num_samples: int,
    x_dim: int,
    device: torch.device | str | None = None,
    *,
    observed_site: str | None = None,
) -> torch.Tensor:
    """Pixel probabilities of ``num_samples`` images drawn from the model's prior.

    Draws z from p(z) by running ``model`` (called as ``model(x)``) on a dummy
    ``x`` of zeros with the observation removed, and returns the mean of
    p(x|z) at ``observed_site`` (None: the model's one observed site). Runs
    without gradients, in eval mode.

    :param device: default: the device of the model's parameters.
    :returns: a tensor ``[num_samples, x_dim]`` of probabilities in [0, 1], of
        the dtype of the model's parameters.
    """
    check_count("num_samples", num_samples)
    param = _parameter_of(model)
    if device is None:
        device = torch.device("cpu") if param is None else param.device
    dtype = None if param is None else param.dtype
    x = torch.zeros(num_samples, x_dim, device=device, dtype=dtype)
    with evaluating(model):
        trace = poutine.trace(poutine.uncondition(model)).get_trace(x)
    return _mean_of(trace, observed_site)


@trace_shapes_dropped()
def reconstruct(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    observed_site: str | None = None,
) -> torch.Tensor:
    """Pixel probabilities of p(x|z) with z ~ q(z|x), one draw per row of ``x``,
    at ``observed_site`` (None: the model's one observed site).

    Runs without gradients, in eval mode.

    :param x: a ``[batch, x_dim]`` tensor of 0/1 pixels.
    :returns: a tensor of ``x``'s shape of probabilities in [0, 1].
    """
    with evaluating(model, guide):
        guide_trace = poutine.trace(guide).get_trace(x)
        trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return _mean_of(trace, observed_site)


def _mean_of(trace: poutine.Trace, site: str | None) -> torch.Tensor:
    """The mean of p(x|z) at ``site``, or at the one site the model observes
    (unconditioned: one that was observed); the paper's models call it "x"."""
    if site is None:
        observed = [
            name
            for name, node in trace.nodes.items()
            if node["type"] == "sample"
            and (node["is_observed"] or node["infer"].get("was_observed"))
        ]
        if len(observed) != 1:
            raise ProgramError(
                f"the model observes {len(observed)} sites "
                f"({', '.join(map(repr, observed)) or 'none'}), not one: name the "
                f"one to draw with observed_site= (the paper's is {OBSERVED_SITE!r})"
            )
        site = observed[0]
    if site not in trace.nodes:
        raise ProgramError(f"the model has no sample site {site!r}")
    return trace.nodes[site]["fn"].mean
