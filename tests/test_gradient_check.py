"""check_guide_gradients: flags a biased estimator, passes an unbiased one.

That it passes every zoo guide, autoguide and user guide with DReG (and STL at
k = 1) is the matrix's mean cells (``test_matrix_estimators.py``); here, that it
fails where it must: issue 22's flow bug, restored.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from matrix import build
from pyro.infer.autoguide import AutoNormal
from scipy import stats
from test_vimco import guide as discrete_guide
from test_vimco import model as discrete_model

from pyro_iwae import IWELBO, MIWELBO, check_guide_gradients
from pyro_iwae.errors import ConfigError
from pyro_iwae.infer import gradient_check, traces
from pyro_iwae.infer.gradient_check import t_threshold

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize("name", ["zoo-iaf", "zoo-coupling", "user-flow-coupling"])
def test_flags_dreg_on_flow_guides_when_the_flows_are_not_stopped(name, monkeypatch):
    """Issue 22's defect 1: without log q computed while the parameters are
    stopped, the flows get a biased DReG gradient."""
    setup = build(name, 8, perturb=True)
    check = check_guide_gradients(
        setup.model, setup.guide, setup.x, objective=IWELBO(5, "dreg"), num_draws=20
    )
    assert check.passed, check.table()
    monkeypatch.delattr(traces._DetachParams, "_pyro_post_sample")
    check = check_guide_gradients(
        setup.model, setup.guide, setup.x, objective=IWELBO(5, "dreg"), num_draws=20
    )
    assert not check.passed
    assert any(p.name.startswith("flow") for p in check.flagged), check.table()
    assert "FAILED" in check.table() and "MEANS DIFFER" in check.table()


def test_flags_stl_with_many_particles():
    """STL is biased for k > 1 (Tucker et al. 2019): a known bias to detect."""
    setup = build("pyro.param-one-site", 200, perturb=True)
    check = check_guide_gradients(
        setup.model, setup.guide, setup.x, objective=IWELBO(20, "stl"), num_draws=20
    )
    assert not check.passed
    # The bias is STL's own: the verdict says so, and does not blame the guide.
    assert "more than one particle per bound (here 20)" in check.known_bias
    verdict = check.table().splitlines()[-1]
    assert verdict == check.verdict and "as expected: STL is biased" in verdict
    assert "fix the guide" not in verdict
    assert "num_particles=1 or estimator='dreg'" in verdict


@pytest.mark.parametrize(
    "objective, biased",
    [
        (IWELBO(1, "stl"), False),
        (IWELBO(2, "stl"), True),
        (MIWELBO(1, 4, "stl"), False),
        (MIWELBO(2, 2, "stl"), True),
        (IWELBO(5, "dreg"), False),
    ],
)
def test_stls_known_bias_is_named_for_more_than_one_particle_per_bound(
    objective, biased
):
    setup = build("pyro.param-one-site", 4)
    check = check_guide_gradients(
        setup.model, setup.guide, setup.x, objective=objective, num_draws=20
    )
    assert bool(check.known_bias) == biased


def test_checks_that_could_not_fail_are_refused_in_one_line():
    """VIMCO rewrites the gradient of sites without rsample only: on a guide
    without them it is the reference's draw for draw (|t| = 0 everywhere), and
    reinforce is the reference itself."""
    setup = build("zoo-paper", 4)
    for estimator in ("vimco", "reinforce"):
        with pytest.raises(ConfigError, match="the check could not fail") as error:
            check_guide_gradients(
                setup.model,
                setup.guide,
                setup.x,
                objective=IWELBO(4, estimator),
                num_draws=20,
            )
        assert "\n" not in str(error.value)
        assert "check estimator=" in str(error.value)


def test_vimco_has_the_reinforce_mean_on_a_discrete_guide():
    pyro.clear_param_store()
    x = torch.full((200,), 0.8, dtype=torch.float64)
    for objective in (IWELBO(4, "vimco"), MIWELBO(2, 2, "vimco")):
        check = check_guide_gradients(
            discrete_model, discrete_guide, x, objective=objective, num_draws=30
        )
        assert check.reference == "reinforce"
        assert check.passed, check.table()
        assert check.parameters[0].variance_ratio < 0.5  # the baseline helps


def test_the_table_names_every_parameter_and_the_verdict():
    setup = build("zoo-paper", 4, perturb=True)
    check = check_guide_gradients(
        setup.model, setup.guide, setup.x, num_draws=20, seed=3
    )
    lines = check.table().splitlines()
    assert lines[0].startswith("IWELBO(num_particles=5): guide gradient of")
    names = [p.name for p in check.parameters]
    assert names == [n for n, _ in setup.guide.named_parameters()]
    for line, p in zip(lines[2:], check.parameters, strict=False):
        assert line.split()[:2] == [p.name, str(p.size)]
    assert lines[-1].startswith("passed")


def test_the_whole_guide_variance_ratio_is_that_of_the_summed_variances():
    setup = build("zoo-paper", 4, perturb=True)
    check = check_guide_gradients(
        setup.model, setup.guide, setup.x, num_draws=20, seed=3
    )
    params = list(setup.guide.parameters())
    draws = {"dreg": [], "iwae": []}
    for i in range(20):
        for estimator, grads in draws.items():
            torch.manual_seed(3 + i)
            loss = IWELBO(5, estimator).differentiable_loss(
                setup.model, setup.guide, setup.x
            )
            flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
            grads.append(flat)
    dreg, iwae = (torch.stack(d).var(0).sum() for d in draws.values())
    assert check.variance_ratio == pytest.approx((dreg / iwae).item(), rel=1e-8)
    assert check.table().splitlines()[-2].split()[0] == "(all)"


@pytest.mark.parametrize(
    "entries, draws, rel",
    [(1, 20, 0.001), (20, 30, 0.001), (10**5, 100, 0.001), (10**6, 20, 0.015)],
)
def test_the_threshold_is_the_t_quantile(entries, draws, rel):
    exact = stats.t.ppf(1 - 1e-3 / (2 * entries), draws - 1)
    assert t_threshold(entries, draws, 1e-3) == pytest.approx(exact, rel=rel)


def test_bad_arguments_are_refused():
    setup = build("zoo-paper", 4)
    with pytest.raises(ValueError, match="num_draws must be an integer >= 20"):
        check_guide_gradients(setup.model, setup.guide, setup.x, num_draws=19)
    with pytest.raises(ValueError, match="alpha"):
        check_guide_gradients(setup.model, setup.guide, setup.x, alpha=2.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        check_guide_gradients(setup.model, lambda x: None, setup.x)


def test_a_chance_flag_of_heavy_tailed_gradients_is_not_confirmed():
    """AutoNormal at its initial values: DReG's and IWAE's gradients of the scale
    are heavy-tailed, and 30 draws exceed the threshold by chance far more often
    than alpha; the fresh draws that then test again clear those flags."""
    pyro.clear_param_store()
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(10, 3, generator=generator)
    weights = torch.randn(2, 3, generator=generator)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weights, 0.5).to_event(1), obs=x)

    guide = AutoNormal(model)
    guide(data)
    checks = [
        check_guide_gradients(
            model, guide, data, objective=IWELBO(5, "dreg"), num_draws=30, seed=seed
        )
        for seed in (0, 1000, 10_000)  # the last was confirmed by 120 draws
    ]
    confirmed = [c for c in checks if c.confirmation_draws]
    assert confirmed and all(c.confirmation_draws == 400 for c in confirmed)
    assert all(c.passed for c in checks), [c.table() for c in checks if not c.passed]
    assert "retested on 400 fresh draws (shown)" in confirmed[0].table()


def test_a_bias_only_the_fresh_draws_detect_is_flagged(monkeypatch):
    """Before, a parameter was flagged only if the first draws flagged it too: a
    small bias that only the 400 fresh draws detect read "ok" beside a |t| above
    the threshold shown, and the check passed."""
    biases = {"large": 2.0, "small": 0.3}

    def gradient(objective, model, guide, params, args, kwargs):
        # Paired draws: both estimators see the same noise (the same seed); ours
        # adds its bias and a noise of its own, so d = bias + N(0, 1).
        shared, own = torch.randn(2, len(params), dtype=torch.float64)
        if objective.estimator == "iwae":
            return list(shared.unsqueeze(-1))
        return [
            (s + biases[name] + o).unsqueeze(-1)
            for name, s, o in zip(params, shared, own, strict=True)
        ]

    monkeypatch.setattr(gradient_check, "_guide_gradient", gradient)
    monkeypatch.setattr(
        gradient_check,
        "_trainable",
        lambda guide, trace: {n: torch.zeros(1) for n in biases},
    )
    setup = build("zoo-paper", 4)
    check = check_guide_gradients(
        setup.model, setup.guide, setup.x, num_draws=30, alpha=1e-3
    )
    # The first 30 draws (seeds 0 to 29) flag the large bias but miss the small:
    first = []
    for i in range(30):
        torch.manual_seed(i)
        first.append(biases["small"] + torch.randn(2, 2, dtype=torch.float64)[1, 1])
    first = torch.stack(first)
    assert first.mean() / (first.std() / 30**0.5) < t_threshold(2, 30)
    # ... the 400 fresh draws detect it, and the verdict is theirs.
    assert check.confirmation_draws == 400
    small = check.parameters[1]
    assert small.name == "small"
    assert small.max_abs_t > check.threshold == pytest.approx(t_threshold(2, 400))
    assert small.flagged and not check.passed
    assert [p.name for p in check.flagged] == ["large", "small"]
    row = next(r for r in check.table().splitlines() if r.startswith("small"))
    assert row.endswith("MEANS DIFFER")


def test_dreg_at_the_exact_posterior_passes():
    """DReG's guide gradient is unbiased; at the exact posterior it is zero, and the
    plain estimator's is the score alone (mean zero)."""
    pyro.clear_param_store()
    lg = LinearGaussian(diagonal_posterior=True)
    x = lg.sample_data(50)

    def guide(data):
        shift = pyro.param("shift", data.new_zeros(2))
        scale = pyro.param(
            "scale",
            lg.post_cov.diagonal().sqrt(),
            constraint=dist.constraints.positive,
        )
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(lg.post_loc(data) + shift, scale).to_event(1))

    for seed in (0, 1):
        check = check_guide_gradients(
            lg.model, guide, x, objective=IWELBO(5, "dreg"), num_draws=30, seed=seed
        )
        assert check.passed, check.table()
