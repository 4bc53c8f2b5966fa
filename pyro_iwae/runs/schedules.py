"""Training objectives and learning-rate schedules, by name.

:class:`ConfigError`, the error for settings that do not fit each other, lives
in :mod:`pyro_iwae.errors` and is importable from here as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pyro.infer import ELBO, RenyiELBO, Trace_ELBO

from ..errors import ConfigError, check_count
from ..infer.grouped import CIWELBO, MIWELBO, PIWELBO
from ..infer.objectives import IWELBO

__all__ = [
    "IW_OBJECTIVES",
    "OBJECTIVES",
    "SCHEDULES",
    "ConfigError",
    "Schedule",
    "as_schedule",
    "constant_schedule",
    "continues",
    "locate",
    "make_objective",
    "make_schedule",
    "paper_schedule",
]

OBJECTIVES = ("iwae", "vae", "renyi", "miwae", "piwae", "ciwae")
#: Objectives whose guide gradient takes an ``estimator``.
IW_OBJECTIVES = ("iwae", "miwae", "piwae", "ciwae")
SCHEDULES = ("constant", "paper")

Schedule = list[tuple[int, float]]


def make_objective(
    name: str,
    num_particles: int,
    estimator: str = "iwae",
    alpha: float = 0.0,
    num_groups: int = 1,
    beta: float = 0.5,
    compile: bool | str | None = False,
    max_plate_nesting: int = 1,
) -> ELBO:
    """The training objective ``name`` with ``num_particles`` (k) vectorized particles;
    ``compile`` compiles the importance-weighted ones (see :class:`~pyro_iwae.IWELBO`).

    - ``"iwae"``: :class:`~pyro_iwae.IWELBO` with gradient ``estimator``
      (``iwae``, ``stl`` or ``dreg``);
    - ``"vae"``: :class:`pyro.infer.Trace_ELBO`, the ELBO averaged over k
      samples (the paper's "VAE, k");
    - ``"renyi"``: :class:`pyro.infer.RenyiELBO` of order ``alpha`` (not 1);
    - ``"miwae"``, ``"piwae"``: :class:`~pyro_iwae.MIWELBO`,
      :class:`~pyro_iwae.PIWELBO` with ``num_groups`` (M) groups of k particles;
    - ``"ciwae"``: :class:`~pyro_iwae.CIWELBO` with weight ``beta`` on the ELBO.

    All use ``max_plate_nesting`` (1: one data plate; 2 for a plate nested in
    it, ...), not counting the particle plate.

    :raises ConfigError: for ``renyi`` with ``alpha`` = 1.
    """
    if name not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}"
        )
    num_particles = check_count("num_particles", num_particles)
    common = {
        "num_particles": num_particles,
        "vectorize_particles": True,
        "max_plate_nesting": max_plate_nesting,
    }
    weighted = {**common, "estimator": estimator, "compile": compile}
    if name == "iwae":
        return IWELBO(**weighted)
    if name in ("miwae", "piwae"):
        cls = MIWELBO if name == "miwae" else PIWELBO
        return cls(num_groups=num_groups, **weighted)
    if name == "ciwae":
        return CIWELBO(beta=beta, **weighted)
    if name == "vae":
        return Trace_ELBO(**common)
    if alpha == 1:
        raise ConfigError(
            "{alpha} 1 is the ordinary ELBO: use {objective} vae, or another {alpha}"
        )
    return RenyiELBO(alpha=alpha, **common)


def paper_schedule(stages: int = 8, lr: float = 1e-3) -> Schedule:
    """The paper's schedule: stage i = 0..stages-1 runs 3**i epochs at
    ``lr * 10**(-i/7)``; the full schedule (8 stages) is 3,280 epochs."""
    if not 1 <= stages <= 8:
        raise ValueError(f"stages must be in 1..8, got {stages}")
    return [(3**i, lr * 10 ** (-i / 7)) for i in range(stages)]


def constant_schedule(epochs: int, lr: float = 1e-3) -> Schedule:
    """One stage of ``epochs`` epochs at learning rate ``lr``."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return [(epochs, lr)]


def make_schedule(
    name: str, *, epochs: int = 1, stages: int | None = None, lr: float = 1e-3
) -> Schedule:
    """Schedule ``name`` (``"constant"`` or ``"paper"``) as a list of (epochs, lr)."""
    if name == "paper":
        return paper_schedule(8 if stages is None else stages, lr)
    if name == "constant":
        return constant_schedule(epochs, lr)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def continues(schedule: Schedule, earlier: Schedule, epochs: int) -> bool:
    """Whether ``schedule`` runs the first ``epochs`` epochs of ``earlier`` at
    the same learning rates, as a run that trained them with ``earlier`` and
    goes on (for more epochs or stages, or fewer not yet trained) needs."""
    return _per_epoch(schedule)[:epochs] == _per_epoch(earlier)[:epochs] and (
        epochs <= min(len(_per_epoch(schedule)), len(_per_epoch(earlier)))
    )


def locate(schedule: Schedule, epochs_done: int) -> tuple[int, int]:
    """(stage, epochs finished in it) of ``schedule`` after ``epochs_done``
    epochs; (number of stages, 0) once it is finished."""
    for stage, (epochs, _) in enumerate(schedule):
        if epochs_done < epochs:
            return stage, epochs_done
        epochs_done -= epochs
    return len(schedule), 0


def _per_epoch(schedule: Schedule) -> list[float]:
    return [lr for epochs, lr in schedule for _ in range(epochs)]


def as_schedule(schedule: Iterable[Sequence[Any]]) -> Schedule:
    """``schedule``'s stages as (epochs, lr) pairs of int and float.

    :raises ValueError: if it has no stages, or a stage of no epochs.
    """
    try:
        given = [(epochs, float(lr)) for epochs, lr in schedule]
        stages = [(int(epochs), lr) for epochs, lr in given]
        # int() cut 1.5 epochs to 1, and the run trained one.
        fractional = [e for e, _ in given if float(e) != int(e)]
    except (TypeError, ValueError):
        raise ValueError(
            f"a schedule is a list of (epochs, lr) stages, got {schedule!r}"
        ) from None
    if fractional:
        raise ValueError(
            f"a schedule's stages last whole epochs, got {fractional[0]!r}; give "
            "each stage an integer number of epochs"
        )
    if not stages or any(epochs < 1 for epochs, _ in stages):
        raise ValueError(f"a schedule needs stages of >= 1 epoch, got {stages}")
    return stages
