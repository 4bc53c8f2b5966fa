"""Runs: configuration, training, schedules, checkpoints, distributed training,
evaluation results, reproduction, reports and trackers, and :class:`Run`, a run
folder as a library object (:mod:`pyro_iwae.runs.run`).

The top layer, on :mod:`pyro_iwae.infer`, :mod:`pyro_iwae.nn` and
:mod:`pyro_iwae.data`; the command line (``pyro_iwae_cli``) calls it.
"""

from .run import (
    EVAL_METHODS,
    EvalSettings,
    Evaluation,
    Run,
    build_run,
    evaluate_run,
    find_latest_run,
    load_run,
    new_run_dir,
    plan_fit,
    read_estimates,
    train_run,
    versions,
)

__all__ = [
    "EVAL_METHODS",
    "EvalSettings",
    "Evaluation",
    "Run",
    "build_run",
    "evaluate_run",
    "find_latest_run",
    "load_run",
    "new_run_dir",
    "plan_fit",
    "read_estimates",
    "train_run",
    "versions",
]
