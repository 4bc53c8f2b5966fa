"""The matrix's gradient cells: every guide row x estimator x objective (float64,
seeded), eager. Rows and columns are in ``matrix.py``.

- at the exact posterior log w = log p(x) for every z, so the STL and DReG guide
  gradients are exactly zero (the plain one is not: its score term is zero only
  in mean);
- off it, DReG's guide gradient (STL's at k = 1, where STL is unbiased) has the
  plain IWAE gradient's mean, by :func:`~pyro_iwae.check_guide_gradients` (paired
  draws, max |t| per parameter), and DReG a lower variance;
- with guides whose sites all have rsample, ``vimco`` and ``reinforce`` are the
  plain gradient;
- with one particle every objective is ``Trace_ELBO``, in value and gradient.
"""

import pytest
import torch
from matrix import (
    GUIDES,
    OBJECTIVES,
    SCORE_ESTIMATORS,
    Setup,
    build,
    exact_total,
    slow,
)
from pyro.infer import Trace_ELBO

from pyro_iwae import IWELBO, check_guide_gradients
from pyro_iwae.infer.gradient_check import guide_parameters

pytestmark = pytest.mark.usefixtures("float64_default")

#: Copies of the data point in a batch; each call's gradient sums their draws.
POINTS = 8
#: Paired gradient draws per cell of the mean test.
DRAWS = 30
EXACT = [name for name, row in GUIDES.items() if row.exact]


def guide_gradients(setup: Setup, objective, seed: int = 0, model: bool = False):
    """The loss and the flattened guide gradient of one seeded call (with
    ``model``, the model's too, where it is an ``nn.Module``)."""
    params = list(guide_parameters(setup.guide, (setup.x,), {}).values())
    if model and isinstance(setup.model, torch.nn.Module):
        params += list(setup.model.parameters())
    torch.manual_seed(seed)
    loss = objective.differentiable_loss(setup.model, setup.guide, setup.x)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]
    )


@pytest.mark.parametrize("name", EXACT)
def test_the_exact_rows_are_at_the_posterior(name):
    setup = build(name, POINTS)
    loss = IWELBO(7).loss(setup.model, setup.guide, setup.x)
    assert loss == pytest.approx(-exact_total(setup), rel=1e-10, abs=1e-10)


def drawn(objective: str, estimator: str, vectorize: bool):
    """``OBJECTIVES[objective](6, estimator)``, its particles in the particle
    plate or (``vectorize=False``) drawn one run at a time."""
    elbo = OBJECTIVES[objective](6, estimator)
    elbo.vectorize_particles = vectorize
    return elbo


@pytest.mark.parametrize(
    "vectorize", [True, pytest.param(False, marks=slow, id="sequential")]
)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("name", EXACT)
def test_stl_and_dreg_guide_gradients_vanish_at_the_exact_posterior(
    name, objective, vectorize
):
    setup = build(name, POINTS)
    _, plain = guide_gradients(setup, drawn(objective, "iwae", vectorize))
    assert plain.abs().max() > 1e-3  # the check below can fail
    for estimator in ("stl", "dreg"):
        loss, grads = guide_gradients(setup, drawn(objective, estimator, vectorize))
        assert grads.abs().max() < 1e-8, (estimator, grads.abs().max())
        assert loss.item() == pytest.approx(-exact_total(setup), rel=1e-10, abs=1e-10)


def assert_plain_mean(name: str, objective, lower_variance: str = "") -> None:
    """DReG (or STL) has the plain estimator's mean; with ``lower_variance``
    ``"each"``, a lower variance for every parameter, with ``"total"`` for the
    guide's gradient as a whole (summed over every entry)."""
    setup = build(name, POINTS, perturb=True)
    result = check_guide_gradients(
        setup.model, setup.guide, setup.x, objective=objective, num_draws=DRAWS
    )
    assert result.passed, result.table()
    if lower_variance == "each":
        ratios = [p.variance_ratio for p in result.parameters]
        assert max(ratios) < 1, result.table()
    elif lower_variance == "total":
        assert result.variance_ratio < 1, result.table()


@pytest.mark.parametrize("name", list(GUIDES))
def test_dreg_has_the_plain_mean_with_lower_variance(name):
    assert_plain_mean(name, IWELBO(5, "dreg"), lower_variance="each")


@slow
@pytest.mark.parametrize("name", list(GUIDES))
def test_stl_has_the_plain_mean_with_one_particle(name):
    assert_plain_mean(name, IWELBO(1, "stl"))


RAINFORTH_CELLS = [
    (name, objective)
    for objective in ("MIWELBO", "CIWELBO", "PIWELBO")
    for name in GUIDES
]


@slow
@pytest.mark.parametrize("name, objective", RAINFORTH_CELLS)
def test_rainforth_dreg_has_the_plain_mean_with_lower_variance(name, objective):
    # Not for each parameter: with k = 6 split into groups, a coupling layer that
    # acts only through another layer's small weights gets no less variance from
    # DReG (ratio 0.996 over 300 draws for the zoo's coupling guide, MIWELBO).
    assert_plain_mean(name, OBJECTIVES[objective](6, "dreg"), lower_variance="total")


@pytest.mark.parametrize("name", list(GUIDES))
def test_score_estimators_give_reparameterized_guides_the_plain_gradient(name):
    setup = build(name, POINTS, perturb=True)
    loss, plain = guide_gradients(setup, IWELBO(4, "iwae"))
    for estimator in SCORE_ESTIMATORS:
        ours, grads = guide_gradients(setup, IWELBO(4, estimator))
        assert torch.equal(ours, loss)
        torch.testing.assert_close(grads, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("name", list(GUIDES))
def test_one_particle_is_trace_elbo_in_value_and_gradient(name, objective):
    setup = build(name, POINTS, perturb=True)
    loss, grads = guide_gradients(setup, OBJECTIVES[objective](1, "iwae"), model=True)
    reference, expected = guide_gradients(setup, Trace_ELBO(), model=True)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 1e-3
