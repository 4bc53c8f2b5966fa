"""A run's guide checked by :func:`~pyro_iwae.check_guide_gradients`: its model
and guide (trained, or as initialised), on its own test points."""

from __future__ import annotations

import os

from ..infer.gradient_check import GradientCheck, check_guide_gradients
from ..infer.objectives import IWELBO
from .config import RunConfig
from .estimates import run_nesting
from .run import Run, build_run

__all__ = ["check_run_guide"]


def check_run_guide(
    run: RunConfig | str | os.PathLike,
    *,
    objective: IWELBO | None = None,
    settings: RunConfig | None = None,
    batch_size: int = 8,
    num_draws: int = 100,
    alpha: float = 1e-3,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    dataset: str | os.PathLike | None = None,
) -> GradientCheck:
    """:func:`check_guide_gradients` on a run's model and guide, with the first
    ``batch_size`` test points of its data set.

    :param run: a run directory (its checkpoint's parameters), or a
        :class:`~pyro_iwae.RunConfig` (model and guide as initialised from its
        seed, before any training).
    :param objective: the objective and estimator to check, as it is; default
        that of ``settings`` (default the run's config), as deep as the model's
        and guide's plates nest (see ``pyro_iwae.runs.estimates.run_nesting``).
    :param dataset: with a run directory, where its data are now (a data file
        since moved), as for :meth:`~pyro_iwae.Run.data`.
    :raises RunError, CheckpointError, pyro_iwae.data.DataError: see
        :func:`~pyro_iwae.load_run` and :meth:`~pyro_iwae.Run.data`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(run, RunConfig):
        if dataset is not None:
            raise ValueError(
                "dataset applies to a run directory; set the RunConfig's dataset"
            )
        config = run
        model, guide = build_run(config, device="cpu")
        data = config.load_data(data_dir)
    else:
        found = Run(run)
        config, model, guide = found.load()
        data = found.data(data_dir, dataset, config)
    x = data.test[:batch_size]
    if objective is None:
        nesting = run_nesting(model, guide, x)
        objective = (config if settings is None else settings).make_objective(nesting)
    return check_guide_gradients(
        model,
        guide,
        x,
        objective=objective,
        num_draws=num_draws,
        alpha=alpha,
        seed=seed,
    )
