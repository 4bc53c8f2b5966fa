"""Telling a program that does not broadcast over the particle plate from one
that fails for a reason of its own: what :meth:`ParticleELBO.particles
<pyro_iwae.infer.particles.ParticleELBO.particles>` turns into a
:class:`~pyro_iwae.errors.ParticleBroadcastError`, and what it raises as it is."""

from __future__ import annotations

from collections.abc import Callable

from pyro.poutine.trace_struct import Trace
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
)
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..errors import ParticleBroadcastError, ProgramError, PyroIwaeError
from .arguments import trial_run
from .traces import plate_depth, sample_sites

__all__ = ["BROADCAST_FAILURES", "DATA_DEPENDENT_FAILURES", "broadcast_error"]

#: The errors a program that does not broadcast over the particle plate raises
#: (torch's shape errors among them): those that may call for
#: ``vectorize_particles=False``.
BROADCAST_FAILURES = (RuntimeError, ValueError, IndexError, TypeError)

#: Torch's errors for an operation whose shapes or control flow depend on
#: tensor values (``x[mask] = ...``, ``nonzero``, a branch on ``.item()``): only
#: a graph traced with fake tensors raises them, never the eager program.
DATA_DEPENDENT_FAILURES = (
    GuardOnDataDependentSymNode,
    DataDependentOutputException,
    DynamicOutputShapeException,
)


def data_dependent(error: BaseException) -> bool:
    """Whether ``error`` or one it was raised from is a
    :data:`DATA_DEPENDENT_FAILURES` (torch raises one from another, the outer
    one without a message)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DATA_DEPENDENT_FAILURES):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def broadcast_error(
    error: BaseException,
    run_single: Callable[[], list[tuple[Trace, Trace]]],
    args: tuple,
    kwargs: dict,
    num_particles: int,
    nesting: int,
    run_deeper: Callable[[], list[tuple[Trace, Trace]]] | None = None,
) -> ParticleBroadcastError | None:
    """The error to raise for ``error``, raised under a particle plate of
    ``num_particles`` at ``max_plate_nesting=nesting + 1``: a
    ParticleBroadcastError where ``run_single`` (the program's traces for one
    particle without the plate, run on a forked random stream without warnings)
    or else ``run_deeper`` (the same at a nesting it guesses: plates deeper than
    ``nesting`` fail Pyro's shape check) succeeds; None where ``error`` is to be
    raised as it is: the library's own, a refusal (NotImplementedError), a
    failure of tracing (data-dependent: the eager check would run, it says
    nothing of broadcasting), or one that the runs without the plate raise too
    (the program's own).

    :raises ProgramError: where the run without the plate raises one (a batch
        dim in no plate, which fails under the plate).
    """
    if isinstance(error, PyroIwaeError | NotImplementedError) or data_dependent(error):
        return None
    for run in [run_single] if run_deeper is None else [run_single, run_deeper]:
        try:
            with trial_run(args, kwargs):
                traces = run()
            break
        except ProgramError:
            raise
        except Exception:  # noqa: BLE001
            continue
    else:
        # A failure here is the program's own, not the particle plate's.
        return None
    depth = max(plate_depth(sample_sites(pair)) for pair in traces)
    return ParticleBroadcastError.of_failure(error, num_particles, nesting, depth)
