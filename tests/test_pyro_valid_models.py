"""scripts/pyro_valid_models.py on a small stand-in for Pyro's test module: one
test per program (the first of the ELBO classes it is parametrized over), IWELBO
swapped into ``assert_ok`` only, tests of invalid programs not counted, and the
failures grouped by reason in the report, each test under vectorized and
sequential particles, the failures again with Python's -O. Slow: it runs pytest
four times in subprocesses (half a minute)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

STAND_IN = """
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.optim import Adam

SEEN = []


def assert_ok(model, guide, elbo, **kwargs):
    pyro.clear_param_store()
    SVI(model, guide, Adam({"lr": 1e-3}), elbo).step(**kwargs)


def assert_error(model, guide, elbo):
    with pytest.raises(ValueError):
        SVI(model, guide, Adam({"lr": 1e-3}), elbo).step()


def model(check_shape=False):
    with pyro.plate("data", 3):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if check_shape:
            assert z.shape == (3,)
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.zeros(3))


def guide(check_shape=False):
    loc = pyro.param("loc", torch.zeros(3))
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.parametrize("Elbo", [TraceGraph_ELBO, Trace_ELBO])
def test_ok(Elbo):
    SEEN.append(Elbo.__name__)
    assert SEEN == ["Trace_ELBO"]
    assert_ok(model, guide, Elbo())


@pytest.mark.parametrize("Elbo", [Trace_ELBO])
def test_shape_ok(Elbo):
    assert_ok(model, guide, Elbo(), check_shape=True)


def test_vectorized_shape_ok():
    def model():
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            assert z.shape == (4, 3)
            pyro.sample("x", dist.Normal(z, 1.0), obs=torch.zeros(3))

    # a program for a vectorized ELBO of 4 particles (which the swap keeps)
    elbo = Trace_ELBO(4, max_plate_nesting=1, vectorize_particles=True)
    assert_ok(model, guide, elbo)


def test_global_enumeration_ok():
    def model():
        pyro.sample("w", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        local()

    def local():
        with pyro.plate("data", 10, 5):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    assert_ok(model, local, TraceEnum_ELBO(max_plate_nesting=1))


def test_invalid_error():
    def bad_model():
        wrong = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        pyro.sample("x", wrong, obs=torch.zeros(3))

    assert_error(bad_model, lambda: None, Trace_ELBO())
"""


@pytest.mark.skipif(
    not os.environ.get("PYRO_IWAE_SLOW_TESTS"),
    reason="runs pytest four times in subprocesses; set PYRO_IWAE_SLOW_TESTS=1",
)
def test_measures_a_stand_in_module(tmp_path, monkeypatch):
    source = tmp_path / "pyro"
    (source / "tests" / "infer").mkdir(parents=True)
    (source / "setup.cfg").write_text(
        "[tool:pytest]\nfilterwarnings = error\n    ignore::DeprecationWarning\n"
    )
    for name in ("__init__.py", "common.py", "conftest.py"):
        (source / "tests" / name).write_text("")
    for name in ("__init__.py", "conftest.py"):
        (source / "tests" / "infer" / name).write_text("")
    (source / "tests" / "infer" / "test_valid_models.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import pyro_valid_models

    out = tmp_path / "valid_programs.md"
    monkeypatch.setattr(sys, "argv", ["pyro_valid_models.py"])
    pyro_valid_models.main(["--pyro-source", str(source), "--out", str(out)])
    report = out.read_text()
    # the shape checks see IWELBO's particle dim only when vectorized (the test
    # ELBO's 4 particles are kept); a global site the model enumerates is refused
    assert "**3 of 4 pass** under IWELBO with one of the two settings" in report, report
    assert "(2 vectorized, 2 sequential)" in report, report
    assert "4 of the same 4 pass" in report, report
    assert (
        "### 1 x: pyro_iwae.infer.enumeration.GlobalEnumerationError: IWELBO cannot sum"
        in report
    ), report
    refused = "pyro_iwae.infer.enumeration.GlobalEnumerationError"
    assert f"- `test_global_enumeration_ok`: {refused}" in report
    assert (
        "(sequential: pyro_iwae.infer.enumeration.GlobalEnumerationError: IWELBO"
        in report
    )
    # run again with asserts stripped (python -O): still refused
    assert "0 of 1 then pass" in report, report
    assert (
        "with -O: failed: pyro_iwae.infer.enumeration.GlobalEnumerationError: IWELBO"
        in report
    )
    assert "## Pass only sequential: 1\n\n- `test_shape_ok[Trace_ELBO]`" in report
    assert "vectorized: assert torch.Size([2, 3]) == (3,)" in report, report
    assert "## Pass only vectorized: 1\n\n- `test_vectorized_shape_ok`" in report
    assert "test_invalid_error" not in report
    assert "- `test_ok[Trace_ELBO]`" in report and "TraceGraph" not in report
