"""scripts/pyro_valid_models.py on a small stand-in for Pyro's test module: one
test per program (the first of the ELBO classes it is parametrized over), IWELBO
swapped into ``assert_ok`` only, tests of invalid programs not counted, and the
failures grouped by reason in the report. Slow: it runs pytest twice in
subprocesses (half a minute)."""

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
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
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


def test_invalid_error():
    def bad_model():
        wrong = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        pyro.sample("x", wrong, obs=torch.zeros(3))

    assert_error(bad_model, lambda: None, Trace_ELBO())
"""


@pytest.mark.skipif(
    not os.environ.get("PYRO_IWAE_SLOW_TESTS"),
    reason="runs pytest twice in subprocesses; set PYRO_IWAE_SLOW_TESTS=1",
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
    # the shape check sees IWELBO's particle dim: only under the swap
    assert "**1 of 2 pass** under IWELBO" in report, report
    assert "2 of the same 2 pass" in report, report
    assert "### 1 x: assert <shape> == <shape>" in report, report
    assert "- `test_shape_ok[Trace_ELBO]`: assert torch.Size([2, 3])" in report
    assert "test_invalid_error" not in report
    assert "- `test_ok[Trace_ELBO]`" in report and "TraceGraph" not in report
