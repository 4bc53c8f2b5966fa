"""``compile="auto"``: whether an evaluation compiles its log-weights, chosen from
how much work it has to do, and why.

Compiling costs a fixed time (11 s cold for the paper model on a 2-core AVX-512
Xeon), then each particle-point runs about three times faster than eagerly
(``eval-nll --k 5000`` on 1,000 MNIST test points: 33.3 s eagerly, 24.4 s compiled
of which 11.1 s compiling; results/benchmarks.md, "End to end"). It pays from
about 3 million particle-points (points times ``num_samples``) on; below that the
evaluation runs eagerly. Inductor compiles C++ on the CPU: without a C++
compiler on the path the choice is eager too; so it is on other devices, where the
compiled path has not been verified.
"""

from __future__ import annotations

import os
import shutil

import torch

__all__ = ["AUTO_COMPILE_WORK", "choose_compile"]

#: Particle-points (points x num_samples) from which ``"auto"`` compiles.
AUTO_COMPILE_WORK = 3_000_000


def choose_compile(
    setting: bool | str | None, points: int, num_samples: int, device: torch.device
) -> tuple[bool | str | None, str]:
    """The ``compile`` an evaluation of ``points`` points with ``num_samples``
    particles each runs with, and a few words on why: ``setting`` itself unless
    it is ``"auto"``."""
    if setting != "auto":
        return setting, "as asked"
    work = points * num_samples
    if work < AUTO_COMPILE_WORK:
        return False, (
            f"auto: {work:,} particle-points, under the {AUTO_COMPILE_WORK:,} "
            "from which compiling pays"
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
        f"auto: {work:,} particle-points, at least the {AUTO_COMPILE_WORK:,} from "
        "which compiling pays"
    )


def _cpp_compiler() -> str | None:
    names = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    return next((path for name in names if name and (path := shutil.which(name))), None)
