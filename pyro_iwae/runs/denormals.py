"""Flushing subnormal floats to zero on the CPU while training.

IWAE's gradients are full of subnormal numbers (magnitudes below about
1.2e-38 in float32): a particle whose normalised weight is ``exp(-100)`` passes
its gradient, scaled by that weight, through every layer of the decoder and
encoder. x86 CPUs handle each subnormal operand or result in microcode, about a
hundred times slower than a normal one; on the paper's model this made an eager
training step about 1.6 times as slow (and a compiled one too) after a few
dozen steps. XLA, and so JAX and NumPyro, flush them to zero by default.
Flushed, such a contribution becomes exactly 0 instead of a number 38 orders of
magnitude below the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = [
    "flush_denormals",
    "flush_denormals_from_start",
    "flushing_denormals",
    "flushing_denormals_everywhere",
]


def flushing_denormals() -> bool:
    """Whether this thread's CPU flushes subnormal float32 values to zero now."""
    # A subnormal operand is read as zero in flush mode (DAZ).
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    return bool((tiny * 2 == 0).item())


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Within the block, the calling thread flushes subnormal floats to zero
    (``torch.set_flush_denormal``; a no-op on CPUs without the mode); the mode
    it had before is restored on exit. ``enabled=False`` changes nothing.

    Threads that torch's CPU thread pool started before the block keep their
    own mode: on x86 a thread inherits the mode at its creation. With two
    threads, a worker that does not flush made the larger steps up to twice as
    slow (b100 k50: 50-74 ms against 26 ms; bench/fit_overhead.py
    ``--flush-at-start``): see :func:`flush_denormals_from_start`.
    """
    if not enabled:
        yield
        return
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def flushing_denormals_everywhere() -> bool:
    """Whether every thread that torch's matrix products run on flushes
    subnormal float32 values to zero now: a product large enough to be split
    among them, each of whose terms is subnormal (1e-40) and whose sums are not."""
    tiny = torch.full((256, 4096), 1e-20, dtype=torch.float32)
    return bool(((tiny @ tiny.T) == 0).all().item())


def flush_denormals_from_start() -> bool:
    """Makes the calling thread flush subnormal floats to zero for good, and so
    every thread torch's CPU pool starts after it (a thread inherits the mode at
    its creation): call it before torch's first parallel operation, as
    ``pyro-iwae fit`` does, for :func:`flush_denormals` (which ``fit`` enters)
    to reach torch's worker threads too. Returns whether every thread flushes:
    False where the pool was started already (then only this thread does)."""
    torch.set_flush_denormal(True)
    return flushing_denormals_everywhere()
