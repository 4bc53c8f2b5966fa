"""Runs: configuration, training, schedules, checkpoints, distributed training,
evaluation results, reproduction, reports and trackers, and :class:`Run`, a run
folder as a library object (:mod:`pyro_iwae.runs.run`).

The top layer, on :mod:`pyro_iwae.infer`, :mod:`pyro_iwae.nn` and
:mod:`pyro_iwae.data`; the command line (``pyro_iwae_cli``) calls it.
"""

# The names of pyro_iwae.runs.run, as they were importable from pyro_iwae.runs
# before it became this package.
from .run import *  # noqa: F403
from .run import __all__ as __all__
