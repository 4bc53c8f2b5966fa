"""The checks and trial runs of a program's arguments (pyro_iwae.infer.arguments)."""

import logging

import torch

from pyro_iwae.infer.arguments import trial_run


def test_a_trial_run_raises_the_pyro_loggers_level_to_warning_and_never_lowers_it():
    # It set the "pyro" logger to WARNING: a user's ERROR was lowered meanwhile.
    pyro_log, root = logging.getLogger("pyro"), logging.getLogger()
    saved = pyro_log.level, root.level
    try:
        for own, inherited, during in (
            (logging.ERROR, logging.WARNING, logging.ERROR),
            (logging.INFO, logging.WARNING, logging.WARNING),
            (logging.NOTSET, logging.CRITICAL, logging.CRITICAL),  # inherited
            (logging.NOTSET, logging.DEBUG, logging.WARNING),
        ):
            pyro_log.setLevel(own)
            root.setLevel(inherited)
            with trial_run((torch.zeros(2),), {}):
                assert pyro_log.getEffectiveLevel() == during
            assert pyro_log.level == own
    finally:
        pyro_log.setLevel(saved[0])
        root.setLevel(saved[1])
