"""A pytest plugin for scripts/pyro_valid_models.py: runs Pyro's
``tests/infer/test_valid_models.py`` with IWELBO in place of each test's ELBO.

- Every call of the module's ``assert_ok(model, guide, elbo, **kwargs)`` (the
  tests of valid programs) gets ``IWELBO(num_particles, estimator,
  max_plate_nesting=elbo.max_plate_nesting)`` instead of ``elbo``, with
  ``num_particles`` the test ELBO's own where it asks for more (as a user
  swapping IWELBO in would keep it: some programs check their shapes); the other
  tests (``assert_error``, ``assert_warning``: invalid programs) run as Pyro
  wrote them and are not counted.
- A test parametrized over several ELBO classes runs once, with the first of
  :data:`PREFERRED` it lists: the program is the same for all of them.
- The outcome of every test that called ``assert_ok`` is written as JSON to
  ``$IWELBO_SWAP_OUT``: ``{nodeid: {"outcome", "reason", "elbo"}}``.

Settings from the environment: ``IWELBO_SWAP_PARTICLES`` (default 2),
``IWELBO_SWAP_ESTIMATOR`` (default ``vimco``: the score-function gradient with
a leave-one-out baseline for guide sites without ``rsample``, the plain
reparameterised gradient for the others), ``IWELBO_SWAP_VECTORIZE`` (default
1: the particles in a vectorized plate, IWELBO's default; 0: in a Python loop);
``IWELBO_SWAP_OFF=1`` keeps each test's own ELBO (the same tests, for a
baseline).
"""

from __future__ import annotations

import json
import os

import pytest

from pyro_iwae import IWELBO

PREFERRED = (
    "Trace_ELBO",
    "TraceGraph_ELBO",
    "TraceMeanField_ELBO",
    "TraceEnum_ELBO",
    "TraceTMC_ELBO",
    "TraceTailAdaptive_ELBO",
)
_called: dict[str, str] = {}
_results: dict[str, dict] = {}
_current: list[str] = []


def _elbo_name(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    elbo = callspec.params.get("Elbo") if callspec else None
    return getattr(elbo, "__name__", None) if elbo is not None else None


def _program_key(item: pytest.Item) -> tuple:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    return (
        item.module.__name__,
        item.originalname,
        tuple(sorted((k, repr(v)) for k, v in params.items() if k != "Elbo")),
    )


def pytest_collection_modifyitems(config, items):
    chosen: dict[tuple, pytest.Item] = {}
    for item in items:
        name = _elbo_name(item)
        if name is not None and name not in PREFERRED:
            continue
        key = _program_key(item)
        best = chosen.get(key)
        if best is None or PREFERRED.index(name or PREFERRED[0]) < PREFERRED.index(
            _elbo_name(best) or PREFERRED[0]
        ):
            chosen[key] = item
    keep = set(map(id, chosen.values()))
    deselected = [item for item in items if id(item) not in keep]
    items[:] = [item for item in items if id(item) in keep]
    config.hook.pytest_deselected(items=deselected)
    for module in {item.module for item in items}:
        _patch(module)


def _patch(module) -> None:
    original = module.assert_ok
    particles = int(os.environ.get("IWELBO_SWAP_PARTICLES", "2"))
    estimator = os.environ.get("IWELBO_SWAP_ESTIMATOR", "vimco")
    vectorize = os.environ.get("IWELBO_SWAP_VECTORIZE", "1") == "1"

    def assert_ok(model, guide, elbo, **kwargs):
        _called[_current[0]] = type(elbo).__name__
        if os.environ.get("IWELBO_SWAP_OFF") == "1":
            return original(model, guide, elbo, **kwargs)
        nesting = getattr(elbo, "max_plate_nesting", float("inf"))
        if getattr(elbo, "vectorize_particles", False) and elbo.num_particles > 1:
            nesting -= 1  # the ELBO counted its particle plate in
        particles_asked = max(particles, getattr(elbo, "num_particles", 1))
        iwelbo = IWELBO(
            particles_asked,
            estimator,
            max_plate_nesting=nesting,
            vectorize_particles=vectorize,
        )
        return original(model, guide, iwelbo, **kwargs)

    module.assert_ok = assert_ok


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[:] = [item.nodeid]
    yield


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    if report.nodeid not in _called:
        return
    reason = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = crash.message if crash else str(report.longrepr).splitlines()[-1]
    _results[report.nodeid] = {
        "outcome": report.outcome,
        "reason": reason,
        "elbo": _called[report.nodeid],
    }


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("IWELBO_SWAP_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(_results, f, indent=1, sort_keys=True)
