"""The errors pyro-iwae raises for bad input, under one base class.

Every one of them carries a one-line message that says what is wrong and what
to do. A message may name a setting as ``{field}`` (a field of
:class:`~pyro_iwae.RunConfig`, or a setting of an evaluation): ``str(error)``
writes the field's own name, :meth:`PyroIwaeError.render` the name a caller
uses for it, such as a command-line option.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BuilderError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ParticleBroadcastError",
    "PlateNestingError",
    "ProgramError",
    "PyroIwaeError",
    "RunBusy",
    "RunError",
    "TrainingDiverged",
    "check_count",
    "one_line",
]


def one_line(e: BaseException | str) -> str:
    """The message of ``e`` on one line: user-facing errors here are one line."""
    text = " ".join(str(e).split()).rstrip(":")
    return text or (type(e).__name__ if isinstance(e, BaseException) else "")


class PyroIwaeError(Exception):
    """Base of pyro-iwae's errors for bad input; its message says what to do.

    ``PyroIwaeError(message)`` keeps ``message`` as it is; with
    ``template=True``, ``{field}`` in it names a setting (see the module).
    """

    def __init__(self, message: str, *, template: bool = False) -> None:
        self.template = message if template else None
        super().__init__(self.render({}))

    def render(self, names: Mapping[str, str]) -> str:
        """The message on one line, each setting ``{field}`` written as
        ``names[field]`` (as ``field`` where ``names`` lacks it)."""
        if self.template is None:
            return one_line(self.args[0] if self.args else "")
        return one_line(self.template.format_map(_Names(names)))


def literal(text: object) -> str:
    """``text`` with its braces doubled, to stand as itself in a template."""
    return str(text).replace("{", "{{").replace("}", "}}")


class _Names(dict):
    def __missing__(self, field: str) -> str:
        return field


class ConfigError(PyroIwaeError, ValueError):
    """Settings that do not fit each other.

    :attr:`template` names each setting as ``{field}``; ``str(error)`` writes the
    field names and :meth:`render` the names a caller uses, such as the CLI's
    options. ``literal=True`` takes the message as it is, braces and all.
    """

    def __init__(self, template: str, *, literal: bool = False) -> None:
        super().__init__(template, template=not literal)


class RunError(PyroIwaeError):
    """A run directory or its files cannot be used; the message says what to do."""


class RunBusy(RunError):
    """Another process (group) is writing the run; nothing of it was changed."""


class CheckpointError(RunError):
    """A checkpoint is missing, unreadable or does not fit the model and guide."""


class DataError(PyroIwaeError):
    """A data set cannot be found, fetched or read; the message says what to do."""


class BuilderError(PyroIwaeError, ValueError):
    """A model or guide name that does not resolve to a builder, or a builder
    that cannot take the settings; the message says what to do."""


class TrainingDiverged(PyroIwaeError):
    """The loss or the parameters became NaN or infinite during training."""


class AISError(PyroIwaeError, ValueError):
    """A model or guide that AIS cannot anneal; the message says what to use."""


class ProgramError(PyroIwaeError, ValueError):
    """A model and guide that an estimate or objective cannot use as they are
    (a guide latent the model lacks, a latent scaled apart, ...); the message
    names the site and what to change."""


class PlateNestingError(ProgramError):
    """A plate left of the ``max_plate_nesting`` dims, drawn without the particle
    plate: the weights would take its dim as the particles'. The message says
    so and offers the ``max_plate_nesting`` that fits, ``depth``."""

    problem: str = ""
    depth: int = 0

    @classmethod
    def of_plate(
        cls, problem: str, depth: int, remedy: str | None = None
    ) -> PlateNestingError:
        """The error for ``problem``, offering ``max_plate_nesting=depth``, or
        ``remedy`` where given."""
        error = cls(f"{problem}; {remedy or f'pass max_plate_nesting={depth}'}")
        error.problem, error.depth = problem, depth
        return error

    def with_remedy(self, remedy: str) -> PlateNestingError:
        """This error with ``remedy`` in place of ``max_plate_nesting=``, for a
        caller without that argument, such as a command line."""
        return type(self).of_plate(self.problem, self.depth, remedy)


class SupportError(PyroIwaeError, ValueError):
    """A sample site's value (observed data, as a rule) outside the support of
    its distribution; the message names the site and the values' range."""


class ParticleBroadcastError(PyroIwaeError, ValueError):
    """A model or guide that fails under the particle plate of
    ``vectorize_particles=True`` but runs without it: its networks do not
    broadcast over a leading particle dimension, or its plates nest deeper than
    ``max_plate_nesting``."""

    #: Whether the program nests its plates too deep (no change to its networks
    #: would help), and what failed under the particle plate.
    nested: bool = False
    cause: str = ""
    num_particles: int = 0
    caller: str | None = None
    nesting: int = 0
    depth: int = 0

    @classmethod
    def of_program(
        cls,
        cause: str,
        num_particles: int,
        nesting: int,
        depth: int,
        caller: str | None = None,
        *,
        remedy: str | None = None,
        nested_remedy: str | None = None,
    ) -> ParticleBroadcastError:
        """The error for a program whose plates nest ``depth`` deep that failed
        with ``cause`` under ``num_particles`` particles and
        ``max_plate_nesting=nesting``; the message offers
        ``vectorize_particles=False`` of ``caller``, an evaluator's name (None: an
        objective; "AIS", which has none: the sequential log_likelihood), or
        ``remedy`` where given (empty: nothing); for plates nested too deep,
        ``max_plate_nesting=depth``, or ``nested_remedy`` where given."""
        if depth > nesting:
            # The particle plate sits among the program's own plates: no change
            # to its networks would help.
            error = cls(
                f"the model or guide has plates down to dim={-depth}, beyond "
                f"max_plate_nesting={nesting}, which puts the particle plate at "
                f"dim={-nesting - 1} among them ({cause}); "
                + (nested_remedy or f"pass max_plate_nesting={depth}")
            )
            error.nested = True
        else:
            if remedy is None and caller == "AIS":
                remedy = AIS_NOT_SEQUENTIAL
            elif remedy is None:
                where = "the objective" if caller is None else caller
                remedy = (
                    f"or pass vectorize_particles=False to {where} to draw the "
                    "particles one at a time"
                )
            # AIS's chains are its particles, tuned and run in batches of
            # other sizes than num_chains: a size would mislead.
            size = (
                ", one per chain," if caller == "AIS" else f" of size {num_particles}"
            )
            error = cls(
                "the model or guide fails under vectorize_particles=True but runs "
                f"without it ({cause}): it must broadcast over a leading particle "
                f"dimension{size} (use x.shape[-1] and "
                f"x.reshape(*x.shape[:-1], ...), not x.view(batch, -1))"
                + (f"; {remedy}" if remedy else "")
            )
        error.cause, error.num_particles, error.caller = cause, num_particles, caller
        error.nesting, error.depth = nesting, depth
        return error

    @classmethod
    def of_failure(
        cls,
        error: BaseException,
        num_particles: int,
        nesting: int,
        depth: int,
        caller: str | None = None,
    ) -> ParticleBroadcastError:
        """:meth:`of_program` with the first line of ``error`` as the cause (Pyro
        appends the trace's shapes to its messages)."""
        cause = one_line(str(error).strip().split("\n")[0] or error).rstrip(".")
        return cls.of_program(cause, num_particles, nesting, depth, caller)

    def for_evaluator(self, caller: str) -> ParticleBroadcastError:
        """This error as raised by evaluator ``caller``, with its remedy (see
        :meth:`of_program`)."""
        if self.nested:
            return self
        return type(self).of_program(self.cause, self.num_particles, 0, 0, caller)

    def with_remedy(
        self, remedy: str, nested_remedy: str | None = None
    ) -> ParticleBroadcastError:
        """This error with ``remedy`` (empty: none) in place of the
        ``vectorize_particles=False`` it offers, and for plates nested too deep
        ``nested_remedy`` (None: as it is) in place of ``max_plate_nesting=``,
        for a caller without those arguments, such as a command line."""
        if self.nested and nested_remedy is None:
            return self
        return type(self).of_program(
            self.cause,
            self.num_particles,
            self.nesting,
            self.depth,
            self.caller,
            remedy=remedy,
            nested_remedy=nested_remedy,
        )


#: AIS moves all chains in one batch: nothing sequential to offer.
AIS_NOT_SEQUENTIAL = (
    "AIS runs its chains in one batch and has no vectorize_particles=False; "
    "estimate with log_likelihood(..., vectorize_particles=False) instead"
)


def check_flag(name: str, value: Any) -> None:
    """:raises ValueError: naming ``name``, unless ``value`` is True or False (a
    string such as ``"no"`` would count as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_plate_nesting(value: Any) -> None:
    """:raises ValueError: unless ``value`` is an integer >= 0 or
    ``float("inf")`` (guessed from the program), as ``max_plate_nesting`` is."""
    if value == float("inf") and isinstance(value, float):
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value >= 0:
            return
    raise ValueError(
        "max_plate_nesting must be an integer >= 0 (the plates nested around a "
        f'site) or float("inf") to find it from the program, got {value!r}'
    )


def check_count(name: str, value: Any) -> int:
    """``value`` as an ``int`` (a numpy integer too).

    :raises ValueError: naming ``name``, unless ``value`` is an integer >= 1 (a
        float such as ``5e2`` is refused with the integer to pass instead).
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value >= 1:
            return int(value)
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    hint = ""
    if isinstance(value, float) and value.is_integer():
        hint = f"; pass {name}={int(value)}"
    raise ValueError(
        f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__}){hint}"
    )
