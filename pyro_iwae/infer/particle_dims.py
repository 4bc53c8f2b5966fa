"""That only the particles' dim follows their number: the check of a program
drawn under the particle plate (``vectorize_particles=True``) that finds, by one
run with another number of particles, the dims the weights would take for the
particles' though they are not (data with a leading dim as long as the
particles), and the particles' dim moved elsewhere (a sum over it mixed them):
both gave wrong bounds silently."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import torch
from pyro.poutine.trace_struct import Trace
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ..errors import ProgramError, PyroIwaeError, one_line
from .arguments import trial_run
from .estimable import innermost, log_prob_batch
from .traces import sample_sites

__all__ = ["ParticleDims", "check_particle_dims"]


class ParticleDims:
    """:func:`check_particle_dims`, once per program (model and guide), number
    of particles and particle dim: an objective's first step, not every step."""

    def __init__(self) -> None:
        self._checked: set[tuple] = set()

    def __call__(
        self,
        model: Callable,
        guide: Callable,
        pair: tuple[Trace, Trace],
        num_particles: int,
        particle_dim: int,
        redraw: Callable[[int], tuple[Trace, Trace]],
        args: tuple,
        kwargs: dict,
    ) -> None:
        key = (*map(_program_key, (model, guide)), num_particles, particle_dim)
        if key in self._checked:
            return

        def run(count: int) -> tuple[Trace, Trace]:
            # In eval mode: the run must not move batch norm's running statistics.
            with _eval_mode(model, guide):
                return redraw(count)

        check_particle_dims(pair, run, num_particles, particle_dim, args, kwargs)
        if get_proxy_mode() is None:  # a graph being traced checked nothing
            self._checked.add(key)


@contextmanager
def _eval_mode(*programs: Callable) -> Iterator[None]:
    """The modules among ``programs`` in eval mode, then as they were."""
    modes = [
        (module, module.training)
        for program in programs
        if isinstance(program, torch.nn.Module)
        for module in program.modules()
    ]
    try:
        for module, _ in modes:
            module.training = False
        yield
    finally:
        for module, training in modes:
            module.training = training


def _program_key(program: Callable) -> tuple:
    """What stays the same of ``program`` from call to call: a bound method is a
    new object at each access, its object and function are not."""
    return id(getattr(program, "__self__", program)), getattr(program, "__func__", None)


def check_particle_dims(
    pair: tuple[Trace, Trace],
    redraw: Callable[[int], tuple[Trace, Trace]],
    num_particles: int,
    particle_dim: int,
    args: tuple,
    kwargs: dict,
) -> None:
    """Checks that in the log-prob of every sample site of ``pair`` (traced under
    a particle plate of ``num_particles`` at ``particle_dim``) only the particles'
    dim follows their number, by one run of ``redraw(count)`` (the pair traced
    with another count; on a forked random stream, seen by no handler around
    it). Skipped while a graph is traced: its eager run checks.

    :raises ProgramError: where a dim at the particles' place does not follow
        their number (data or a value with a leading dim as long as the
        particles, in no plate), where another dim follows it (a sum over the
        particles' dim mixed them), or where the programs fail with the other
        count.
    """
    if get_proxy_mode() is not None:
        return
    # Small, so that the run costs little: any count other than k tells.
    other = 3 if num_particles == 2 else 2
    try:
        # With gradients as the caller has them: a guide may differentiate
        # (torch.autograd.grad of a step of its own, as semi-amortised ones do).
        with trial_run(args, kwargs), pyro.poutine.block():
            other_pair = redraw(other)
    except PyroIwaeError:
        raise
    except AssertionError:
        # The program asserts its own number of particles (as Pyro's tests of
        # vectorized particles do): it runs with that number only; unchecked.
        return
    except (ValueError, RuntimeError, TypeError, IndexError) as e:
        raise ProgramError(
            f"model and guide run with {num_particles} particles but fail with "
            f"{other} ({type(e).__name__}: {one_line(innermost(e))}); where a dim "
            f"of size {num_particles} in no pyro.plate (data or a value with a "
            "leading dim as long as the particles) sits at the particles' dim "
            f"{particle_dim}, the weights would take it for the particles': declare "
            "that dim with pyro.plate, or make it the distribution's event "
            "(.to_event)"
        ) from e
    for trace, other_trace in zip(pair, other_pair, strict=True):
        others = {site["name"]: site for site in sample_sites((other_trace,))}
        for site in sample_sites((trace,)):
            batch = log_prob_batch(site)
            if batch is None or site["name"] not in others:
                continue  # the log-prob's own error says why; a dynamic site
            again = log_prob_batch(others[site["name"]])
            counts = (num_particles, other)
            _check_site(site["name"], batch, again, counts, particle_dim)


def _check_site(
    name: str,
    batch: torch.Size,
    again: torch.Size | None,
    counts: tuple[int, int],
    particle_dim: int,
) -> None:
    """Compares the log-prob batch shape of site ``name`` with ``counts[0]``
    particles, ``batch``, with the one with ``counts[1]``, ``again`` (None where
    the log-prob fails)."""
    where = f"site {name!r} has batch shape {list(batch)}, whose dim"
    for dim in range(-1, -max(len(batch), -particle_dim) - 1, -1):
        size = _size(batch, dim)
        follows = None if again is None else _size(again, dim)
        if dim == particle_dim:
            if (size, follows) in (counts, (1, 1)):
                continue
        elif follows is not None and size == follows:
            continue
        if dim == particle_dim or again is None:
            with_other = (
                f"its log-prob fails with {counts[1]}"
                if again is None
                else f"size {follows} with {counts[1]}"
            )
            raise ProgramError(
                f"{where} {particle_dim} (size {_size(batch, particle_dim)}) does "
                f"not follow the number of particles ({with_other}), so the "
                "weights would take it for the particles': declare that dim with "
                "pyro.plate, or make each point's values the distribution's event "
                "(.to_event(1) for a vector per point)"
            )
        raise ProgramError(
            f"{where} {dim} (size {size}) follows the number of particles (size "
            f"{follows} with {counts[1]}) though the particles' dim is "
            f"{particle_dim}: the program reduces over the particles' dim (as "
            "w.sum(-1) over a value whose own dims are not its event), so "
            "the weights would mix the particles; reduce over the value's own dims "
            "only: make them its event (.to_event(1)), or declare them with "
            "pyro.plate"
        )


def _size(batch: torch.Size, dim: int) -> int:
    """``batch``'s size at ``dim``, 1 left of its dims."""
    return batch[dim] if -dim <= len(batch) else 1
