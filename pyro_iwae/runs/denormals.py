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

__all__ = ["flush_denormals", "flushing_denormals"]


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
    own mode: on x86 a thread inherits the mode at its creation.
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
