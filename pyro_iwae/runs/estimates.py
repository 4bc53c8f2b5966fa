"""The per-point estimates of an evaluation (:meth:`~pyro_iwae.Run.evaluate`):
each method's estimator over batches of the points, dealt to the ranks under
torchrun."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ..infer.ais import ais_log_likelihood
from ..infer.diagnostics import log_likelihood_with_diagnostics
from ..infer.estimable import plate_nesting
from ..infer.evaluation import compile_seconds, evaluating
from ..infer.hooks import backend_of, compiler, compiles
from . import distributed
from .eval_results import EvalSettings

__all__ = ["estimate_points", "per_point_estimator", "run_nesting"]


def run_nesting(
    model: torch.nn.Module, guide: torch.nn.Module, points: torch.Tensor
) -> int:
    """The ``max_plate_nesting`` a run's ``model`` and ``guide`` are trained and
    evaluated with: how deep their plates nest (at least 1, see
    :func:`~pyro_iwae.infer.estimable.plate_nesting`) on the first of ``points``,
    in eval mode. Found, not set: a user's model may nest plates in the data
    plate, and a resumed run or an evaluation finds the same nesting again."""
    with evaluating(model, guide):
        return plate_nesting(model, guide, points[:1])


def per_point_estimator(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    settings: EvalSettings,
    max_plate_nesting: int = 1,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per batch ``[n, x_dim]``: ``[n, 1 + columns]``, each point's estimate and
    its diagnostics (see :func:`~pyro_iwae.runs.eval_results.columns`), for a
    model and guide whose plates nest ``max_plate_nesting`` deep."""
    if settings.method == "iwae":
        estimate = log_likelihood_with_diagnostics
        options = {"num_samples": settings.num_samples, "compile": settings.compile}
        options["vectorize_particles"] = not settings.sequential_particles
        values = ("ess", "khat")
    else:
        estimate = ais_log_likelihood
        options = {"num_steps": settings.ais_steps, "num_chains": settings.num_chains}
        values = ("stderr", "ess", "khat", "acceptance_rate")
    options["max_plate_nesting"] = max_plate_nesting

    def per_point(batch: torch.Tensor) -> torch.Tensor:
        result = estimate(
            model, guide, batch, chunk_size=settings.chunk_size, **options
        )
        columns = [getattr(result, name) for name in values]
        return torch.stack([result.log_likelihood, *columns], -1)

    return per_point


def estimate_points(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    points: torch.Tensor,
    settings: EvalSettings,
    callback: Callable[[torch.Tensor, int], None] | None,
) -> tuple[torch.Tensor, float, float, str | None]:
    """The estimates and diagnostics of ``points`` (float64 ``[n, 1 +
    columns]``), the seconds they took, the seconds of those tracing and
    compiling, and why compiled graphs asked for gave way to the eager path
    (None: they did not, or none were asked for); with the plate nesting of
    ``model`` and ``guide`` (see :func:`run_nesting`)."""
    ranks = distributed.current()
    world = 1 if ranks is None else ranks.world
    batches = math.ceil(points.shape[0] / settings.batch_size)
    mine = min(math.ceil(batches / world) * settings.batch_size, points.shape[0])
    start = time.perf_counter()
    compiled_before = compile_seconds(settings.compile)
    nesting = run_nesting(model, guide, points)
    results = distributed.sharded_map(
        per_point_estimator(model, guide, settings, nesting),
        points,
        seed=settings.seed,
        batch_size=settings.batch_size,
        callback=None if callback is None else lambda r: callback(r[:, 0], mine),
    ).double()
    seconds = time.perf_counter() - start
    fallback = None
    if settings.method == "iwae" and compiles(settings.compile):
        # The estimator the evaluation used, cached on the guide: given up for
        # good where a graph fell back (which a warning told of).
        backend = backend_of(settings.compile)
        fallback = compiler().log_likelihood(model, guide, backend, nesting).fallback
    compiling = compile_seconds(settings.compile) - compiled_before
    return results, seconds, compiling, fallback
