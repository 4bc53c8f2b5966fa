"""``compile="auto"``: whether an evaluation compiles its log-weights, or a run its
training step, chosen from how much work there is to do, and why.

Compiling costs a fixed time, then each unit of work runs faster than eagerly;
``"auto"`` compiles where the work is large enough for the saving to repay the
cost. Measured on a 2-core AVX-512 Xeon (results/benchmarks.md):

- evaluation: 11 s to compile the paper model's log-weights cold, then each
  particle-point about three times faster (``eval-nll --k 5000`` on 1,000 MNIST
  test points: 33.3 s eagerly, 24.4 s compiled of which 11.1 s compiling); it
  pays from about 3 million particle-points (points times ``num_samples``).
- training: 15-17 s to compile the paper model's step cold, then 1.4-6 ms saved
  per step (batch 20 to 100, k 5 to 50: the compiled step against ``fit``'s eager
  one); it pays from about 10,000 steps.

Inductor compiles C++ on the CPU: without a C++ compiler on the path the choice is
eager; so it is on other devices, where the compiled path has not been verified.
"""

from __future__ import annotations

import os
import shutil

import torch

__all__ = [
    "AUTO_COMPILE_STEPS",
    "AUTO_COMPILE_WORK",
    "choose_compile",
    "choose_fit_compile",
]

#: Particle-points (points x num_samples) from which an evaluation compiles.
AUTO_COMPILE_WORK = 3_000_000
#: Training steps from which a run compiles its step.
AUTO_COMPILE_STEPS = 10_000


def choose_compile(
    setting: bool | str | None, points: int, num_samples: int, device: torch.device
) -> tuple[bool | str | None, str]:
    """The ``compile`` an evaluation of ``points`` points with ``num_samples``
    particles each runs with, and a few words on why: ``setting`` itself unless
    it is ``"auto"``."""
    return _choose(
        setting, points * num_samples, AUTO_COMPILE_WORK, "particle-points", device
    )


def choose_fit_compile(
    setting: bool | str | None,
    steps: int,
    device: torch.device,
    single_process: bool = True,
) -> tuple[bool | str | None, str]:
    """The ``compile`` a run of ``steps`` optimisation steps trains with, and a few
    words on why: ``setting`` itself unless it is ``"auto"``, which stays eager
    unless ``single_process`` (the one-graph step does not run under torchrun)."""
    if setting == "auto" and not single_process:
        return False, "auto: under torchrun the step runs eagerly"
    return _choose(setting, steps, AUTO_COMPILE_STEPS, "steps", device)


def _choose(
    setting: bool | str | None,
    work: int,
    threshold: int,
    unit: str,
    device: torch.device,
) -> tuple[bool | str | None, str]:
    if setting != "auto":
        return setting, "as asked"
    if work < threshold:
        return False, (
            f"auto: {work:,} {unit}, under the {threshold:,} from which compiling pays"
        )
    if device.type != "cpu":
        # The compiled path's CUDA graphs have not run on a GPU yet (see the
        # documentation's "What was verified where").
        return (
            False,
            f"auto: compiled graphs are verified on the CPU only, not {device.type}",
        )
    if _cpp_compiler() is None:
        return False, "auto: no C++ compiler found for inductor"
    return True, (
        f"auto: {work:,} {unit}, at least the {threshold:,} from which compiling pays"
    )


def _cpp_compiler() -> str | None:
    names = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    return next((path for name in names if name and (path := shutil.which(name))), None)
