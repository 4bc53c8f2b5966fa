"""The matrix's compiled cells: ``compile=None`` (the traced graph, uncompiled)
and ``compile=True`` (inductor; slow) give the eager loss and the eager
gradients of model and guide, for every guide row of ``nn.Module`` s x estimator
x objective, and the compiled path ran (no fallback), but for the cells of
:data:`FALLBACK`, which must fall back with one warning."""

import warnings

import pytest
import torch
from matrix import ESTIMATORS, GUIDES, OBJECTIVES, build, slow

from pyro_iwae.compiled import CompileFallbackWarning, compiled_loss

pytestmark = pytest.mark.usefixtures("float64_default")

MODULES = [name for name, row in GUIDES.items() if row.module]


def loss_and_gradients(elbo, setup, params, seed):
    torch.manual_seed(seed)
    loss = elbo.differentiable_loss(setup.model, setup.guide, setup.x)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


#: Cells that fall back to the eager path (data-dependent control flow, which
#: the README says falls back): Pyro's autoregressive inverse, which STL and DReG
#: evaluate in log q at stopped parameters, indexes with the entries of a
#: permutation tensor; Pyro's AffineAutoregressive with stable=False cannot be
#: traced with any estimator.
FALLBACK = {
    ("zoo-iaf", "stl"),
    ("zoo-iaf", "dreg"),
    *(("user-flow-autoregressive", estimator) for estimator in ESTIMATORS),
}


def assert_compiled_is_eager(name, estimator, objective, backend):
    setup = build(name, 4, perturb=True)
    eager = OBJECTIVES[objective](4, estimator)
    compiled = OBJECTIVES[objective](4, estimator)
    compiled.compile = backend
    params = [*setup.model.parameters(), *setup.guide.parameters()]
    falls_back = (name, estimator) in FALLBACK
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileFallbackWarning)
        # The first call traces and checks against eager; the second runs the
        # graph alone.
        for seed in (3, 4):
            ours = loss_and_gradients(compiled, setup, params, seed)
            theirs = loss_and_gradients(eager, setup, params, seed)
            torch.testing.assert_close(ours[0], theirs[0], rtol=1e-9, atol=1e-9)
            for a, b in zip(ours[1], theirs[1], strict=True):
                if b is None:
                    assert a is None or not a.any()
                else:
                    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    ran = compiled_loss(compiled, setup.model, setup.guide)
    if falls_back:
        assert len(fallbacks) == 1 and "cannot trace" in str(fallbacks[0].message)
        assert not ran.compiled
    else:
        assert not fallbacks, fallbacks[0].message
        assert ran.compiled and len(ran._graphs) == 1


def cells():
    """Every row x estimator x objective; by default IWELBO for every row and
    every objective for one flow guide, the rest slow."""
    for name in MODULES:
        for estimator in ESTIMATORS:
            for objective in OBJECTIVES:
                default = objective == "IWELBO" or name == "zoo-coupling"
                yield pytest.param(
                    name,
                    estimator,
                    objective,
                    id=f"{name}-{estimator}-{objective}",
                    marks=() if default else slow,
                )


@pytest.mark.parametrize("name, estimator, objective", list(cells()))
def test_traced_graph_gives_the_eager_loss_and_gradients(name, estimator, objective):
    assert_compiled_is_eager(name, estimator, objective, None)


@slow
@pytest.mark.parametrize("name", [n for n in MODULES if (n, "dreg") not in FALLBACK])
def test_inductor_gives_the_eager_dreg_loss_and_gradients(name):
    assert_compiled_is_eager(name, "dreg", "IWELBO", True)
