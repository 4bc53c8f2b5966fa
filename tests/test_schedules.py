"""Objectives and schedules by name."""

import pyro
import pytest

from pyro_iwae import CIWELBO, MIWELBO, PIWELBO
from pyro_iwae.runs.schedules import (
    constant_schedule,
    make_objective,
    make_schedule,
    paper_schedule,
)


def test_paper_schedule_values_and_truncation():
    schedule = paper_schedule()
    assert [epochs for epochs, _ in schedule] == [1, 3, 9, 27, 81, 243, 729, 2187]
    assert sum(epochs for epochs, _ in schedule) == 3280
    for i, (_, lr) in enumerate(schedule):
        assert lr == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
    assert schedule[-1][1] == pytest.approx(1e-4, rel=1e-12)
    assert paper_schedule(3) == schedule[:3]
    assert make_schedule("paper", stages=2) == schedule[:2]
    assert make_schedule("paper") == schedule
    assert make_schedule("constant", epochs=4, lr=3e-4) == [(4, 3e-4)]
    assert constant_schedule(2) == [(2, 1e-3)]
    for bad in (lambda: paper_schedule(0), lambda: paper_schedule(9)):
        with pytest.raises(ValueError, match="stages"):
            bad()
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("cosine")


def test_make_objective():
    iwelbo = make_objective("iwae", 7, "dreg")
    assert (iwelbo.num_particles, iwelbo.estimator) == (7, "dreg")
    # Pyro counts the particle plate in max_plate_nesting: 1 data plate + 1.
    assert iwelbo.vectorize_particles and iwelbo.max_plate_nesting == 2
    vae = make_objective("vae", 3)
    assert isinstance(vae, pyro.infer.Trace_ELBO) and vae.num_particles == 3
    renyi = make_objective("renyi", 4, alpha=0.5)
    assert isinstance(renyi, pyro.infer.RenyiELBO) and renyi.alpha == 0.5
    miwae = make_objective("miwae", 4, "dreg", num_groups=3)
    assert isinstance(miwae, MIWELBO) and miwae.num_particles == 12
    assert (miwae.num_groups, miwae.group_size, miwae.estimator) == (3, 4, "dreg")
    assert isinstance(make_objective("piwae", 4, num_groups=2), PIWELBO)
    ciwae = make_objective("ciwae", 6, beta=0.05)
    assert isinstance(ciwae, CIWELBO) and ciwae.beta == 0.05
    for args in (("nope", 2), ("iwae", 0), ("renyi", 2, "iwae", 1.0)):
        with pytest.raises(ValueError):
            make_objective(*args)
