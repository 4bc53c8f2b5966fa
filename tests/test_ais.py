"""AIS and bidirectional Monte Carlo against the closed-form log p(x) (seeded).

The guide is mean-field, shifted and too wide, on a posterior with correlation
-0.76 (``LinearGaussian(seed=11)``): plain importance sampling is off by tenths
of a nat, so what AIS gains shows.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LATENT_DIM, OBS_DIM, SIGMA, PriorSiteModel

from pyro_iwae import (
    ais_log_likelihood,
    ais_schedule,
    ais_upper_bound,
    bidirectional_log_likelihood,
    importance_resample,
    log_likelihood,
    log_likelihood_with_diagnostics,
    sample_joint,
)
from pyro_iwae.infer import ais

pytestmark = pytest.mark.usefixtures("one_thread")


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean over points and its standard error."""
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def test_schedules_run_from_guide_to_posterior():
    for kind in ("sigmoid", "linear"):
        betas = ais_schedule(10, kind)
        assert betas.shape == (11,) and betas.dtype == torch.float64
        assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
        assert torch.allclose(betas + betas.flip(0), torch.ones(11, dtype=betas.dtype))
    # The sigmoid schedule's steps are finer at the ends than the linear one's.
    sigmoid = ais_schedule(100).diff()
    assert sigmoid[0] < 0.01 < sigmoid[50]
    with pytest.raises(ValueError, match="unknown schedule"):
        ais_schedule(10, "cosine")
    with pytest.raises(ValueError, match="num_steps"):
        ais_schedule(0)


def test_one_step_is_importance_sampling(correlated):
    lg = correlated
    x = lg.sample_data(5)
    guide = lg.diagonal_guide(0.5, 1.5)
    pyro.set_rng_seed(3)
    ais = ais_log_likelihood(
        lg.model, guide, x, num_steps=1, num_chains=32, chunk_size=16
    )
    pyro.set_rng_seed(3)
    iwae = log_likelihood(lg.model, guide, x, num_samples=32, chunk_size=16)
    assert torch.allclose(ais.log_likelihood, iwae, rtol=0, atol=1e-12)
    assert ais.log_weights.shape == (32, 5)
    assert ais.acceptance_rate.isnan().all() and ais.step_size.isnan().all()


def test_exact_guide_gives_log_marginal_from_both_sides(lg):
    """With q = p(z|x), log w = log p(x) everywhere: every chain's weight is exact."""
    pyro.set_rng_seed(0)
    sim = sample_joint(lg.model, torch.zeros(6, OBS_DIM, dtype=torch.float64))
    bounds = bidirectional_log_likelihood(
        lg.model,
        lg.exact_guide,
        sim["x"],
        latents={"z": sim["z"]},
        num_steps=5,
        num_chains=8,
    )
    exact = lg.log_marginal(sim["x"])
    for result in bounds:
        assert torch.allclose(result.log_likelihood, exact, rtol=0, atol=1e-10)
        assert torch.allclose(result.ess, torch.full_like(exact, 8.0))
        assert (result.stderr < 1e-6).all()
    assert (bounds.lower.acceptance_rate > 0.3).all()


def test_ais_converges_to_log_marginal_as_steps_grow(correlated):
    lg = correlated
    x = lg.sample_data(50)
    exact = lg.log_marginal(x)
    guide = lg.diagonal_guide(0.5, 1.5)
    rmse = {}
    for num_steps in (1, 10, 100):
        result = ais_log_likelihood(
            lg.model,
            guide,
            x,
            num_steps=num_steps,
            num_chains=8,
            num_leapfrog_steps=3,
        )
        error = result.log_likelihood - exact
        rmse[num_steps] = float(error.square().mean().sqrt())
    assert rmse[100] < rmse[10] < rmse[1] and rmse[100] < rmse[1] / 3
    # At 100 steps the error is what the standard errors say it is.
    z = error / result.stderr
    assert z.square().mean() < 2 and (z.abs() < 2).float().mean() >= 0.8
    assert result.acceptance_rate.mean() == pytest.approx(0.65, abs=0.05)


def test_ais_is_unbiased_in_p_and_a_lower_bound_in_log_p(correlated):
    """Each chain's weight estimates p(x) without bias; the log of their mean
    falls short of log p(x) in expectation (Jensen), most at few chains."""
    lg = correlated
    x = lg.sample_data(300, seed=2)
    exact = lg.log_marginal(x)
    result = ais_log_likelihood(
        lg.model,
        lg.diagonal_guide(0.5, 1.5),
        x,
        num_steps=5,
        num_chains=4,
        num_leapfrog_steps=3,
        chunk_size=3,
    )
    assert result.log_weights.shape == (4, 300)
    ratio, ratio_se = mean_and_se((result.log_weights - exact).exp().mean(0))
    assert abs(ratio - 1) < 3 * ratio_se
    error, error_se = mean_and_se(result.log_likelihood - exact)
    assert error < -3 * error_se


def test_the_step_size_is_tuned_on_tune_chains_chains_whatever_the_chunk_size(
    lg, monkeypatch
):
    # A chunk_size below tune_chains tuned on chunk_size chains only: [2, 2] made.
    made = []

    class Recorded(ais.Chains):
        def __init__(self, model, guide, args, kwargs, num_chains, settings):
            super().__init__(model, guide, args, kwargs, num_chains, settings)
            self.index = len(made)
            made.append(num_chains)

        def transition(self, z, point, beta, step_size):
            # The first group accepts every move, the others none.
            return z, torch.full_like(point.log_w, 1.0 if self.index == 0 else 0.0)

    monkeypatch.setattr(ais, "Chains", Recorded)
    x = lg.sample_data(3)
    options = dict(num_steps=5, num_chains=2, step_size=0.1, tune_chains=5)
    result = ais_log_likelihood(
        lg.model, lg.diagonal_guide(), x, chunk_size=2, **options
    )
    assert made == [2, 2, 1, 2]  # the tuning run's 5 chains, then the estimate's
    # The last of 4 transitions follows 3 moves by the mean rate over 5 chains, 2/5.
    expected = 0.1 * math.exp(3 * (2 / 5 - 0.65))
    torch.testing.assert_close(result.step_size, torch.full((3,), expected).double())


def test_bidirectional_bounds_sandwich_log_marginal(correlated):
    lg = correlated
    pyro.set_rng_seed(1)
    sim = sample_joint(lg.model, torch.zeros(200, OBS_DIM, dtype=torch.float64))
    exact = lg.log_marginal(sim["x"])
    gaps = {}
    for num_steps in (5, 50):
        bounds = bidirectional_log_likelihood(
            lg.model,
            lg.diagonal_guide(0.5, 1.5),
            sim["x"],
            latents={"z": sim["z"]},
            num_steps=num_steps,
            num_chains=4,
            num_leapfrog_steps=3,
        )
        lower, lower_se = mean_and_se(bounds.lower.log_likelihood - exact)
        upper, upper_se = mean_and_se(bounds.upper.log_likelihood - exact)
        gaps[num_steps] = float(bounds.gap.mean())
        if num_steps == 5:
            assert lower < -3 * lower_se and upper > 3 * upper_se
        else:
            assert lower < 3 * lower_se and upper > -3 * upper_se
    assert gaps[50] < gaps[5] / 4


def test_latents_in_a_second_plate(correlated):
    """Latent units in their own plate: a point's energy sums over that plate."""
    lg = correlated

    def model(data):
        with pyro.plate("data", data.shape[0], dim=-1):
            with pyro.plate("units", LATENT_DIM, dim=-2):
                z = pyro.sample("z", dist.Normal(data.new_zeros(()), 1.0))
            # Sum over units, keeping that dim: batch shape [..., 1, points].
            loc = (z.unsqueeze(-1) * lg.W.T.unsqueeze(-2)).sum(-3, keepdim=True) + lg.b
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=data)

    def guide(data):
        scale = 1.5 * lg.post_cov.diagonal().sqrt().unsqueeze(-1)
        with pyro.plate("data", data.shape[0], dim=-1):
            with pyro.plate("units", LATENT_DIM, dim=-2):
                pyro.sample("z", dist.Normal(lg.post_loc(data).T + 0.5, scale))

    x = lg.sample_data(50)
    errors = []
    for num_steps in (1, 30):
        result = ais_log_likelihood(
            model,
            guide,
            x,
            num_steps=num_steps,
            num_chains=8,
            num_leapfrog_steps=3,
            max_plate_nesting=2,
        )
        assert result.log_likelihood.shape == (50,)
        errors.append(result.log_likelihood - lg.log_marginal(x))
    assert errors[1].abs().mean() < 0.6 * errors[0].abs().mean()
    assert (errors[1] / result.stderr).square().mean() < 2.5


def test_ais_refuses_what_it_cannot_do(lg):
    x = lg.sample_data(3)

    def positive_model(data):
        with pyro.plate("data", data.shape[0]):
            s = pyro.sample("s", dist.Gamma(data.new_ones(()), 1.0))
            scale = s.unsqueeze(-1).expand(s.shape + (OBS_DIM,))
            pyro.sample("x", dist.Normal(0.0, scale).to_event(1), obs=data)

    def positive_guide(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("s", dist.Gamma(data.new_ones(()), 1.0))

    with pytest.raises(ValueError, match="real support"):
        ais_log_likelihood(positive_model, positive_guide, x, num_steps=2)
    with pytest.raises(ValueError, match="latent sites"):
        ais_upper_bound(lg.model, lg.exact_guide, x, latents={"w": x}, num_steps=2)
    with pytest.raises(ValueError, match="shape"):
        ais_upper_bound(lg.model, lg.exact_guide, x, latents={"z": x}, num_steps=2)
    with pytest.raises(ValueError, match="num_chains"):
        ais_log_likelihood(lg.model, lg.exact_guide, x, num_chains=0)
    with pytest.raises(ValueError, match="target_accept"):
        ais_log_likelihood(lg.model, lg.exact_guide, x, target_accept=1.0)

    def joint_model(data):  # no plate: one joint estimate, not one per point
        z = pyro.sample("z", dist.Normal(data.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=data.sum())

    def joint_guide(data):
        pyro.sample("z", dist.Normal(data.new_zeros(2), 1.0).to_event(1))

    # one line that names the site and what to do, as log_likelihood's does
    with pytest.raises(ValueError, match=r"^AIS needs a data plate .* site 'z' is ou"):
        ais_log_likelihood(joint_model, joint_guide, x, num_steps=2)
    with pytest.raises(ValueError, match="whole batch with joint_log_likelihood$"):
        ais_upper_bound(joint_model, joint_guide, x, latents={"z": x}, num_steps=2)


#: Latent kinds: every latent in the guide; a Bernoulli, a Normal, or both left
#: to the prior (the guide samples z only).
LATENT_KINDS = ["guide-only", "bernoulli", "normal", "mixed"]


def latent_kind(lg, kind):
    """Model, exact log p(x) and exact posterior means of a latent kind."""
    if kind == "guide-only":
        return lg.model, lg.log_marginal, lambda x: {"z": lg.post_loc(x)}
    m = PriorSiteModel(lg, kind)
    return m.model, m.log_marginal, m.posterior_means


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_ais_is_exact_for_latents_left_to_the_prior(lg, kind):
    """A latent the guide leaves out is part of each chain's state (HMC moves a
    Normal one, a Metropolis step redraws a Bernoulli one from the prior): each
    chain's weight estimates p(x) without bias, and with 40 steps the estimate
    is within hundredths of a nat (drawn afresh at every density evaluation,
    u made it 0.3 to 1 nat low)."""
    model, log_marginal, _ = latent_kind(lg, kind)
    x = lg.sample_data(60, seed=4)
    exact = log_marginal(x)
    result = ais_log_likelihood(
        model,
        lg.diagonal_guide(0.0, 1.5),
        x,
        num_steps=40,
        num_chains=8,
        num_leapfrog_steps=3,
    )
    ratio, ratio_se = mean_and_se((result.log_weights - exact).exp().mean(0))
    assert abs(ratio - 1) < 3 * ratio_se + 1e-3
    error, error_se = mean_and_se(result.log_likelihood - exact)
    assert -0.05 < error < 3 * error_se
    assert result.acceptance_rate.mean() > 0.4


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_bidirectional_bounds_with_latents_left_to_the_prior(lg, kind):
    """Reverse AIS starts from all the latents that made the data, those the
    guide leaves out included: the bounds sandwich log p(x) and close in."""
    model, log_marginal, _ = latent_kind(lg, kind)
    pyro.set_rng_seed(1)
    sim = sample_joint(model, torch.zeros(60, OBS_DIM, dtype=torch.float64))
    x = sim.pop("x")
    exact = log_marginal(x)
    bounds = bidirectional_log_likelihood(
        model,
        lg.diagonal_guide(0.0, 1.5),
        x,
        latents=sim,
        num_steps=40,
        num_chains=4,
        num_leapfrog_steps=3,
    )
    # Forward weights estimate p(x), reverse ones 1/p(x), each without bias.
    for weights in (bounds.lower.log_weights - exact, bounds.upper.log_weights + exact):
        ratio, ratio_se = mean_and_se(weights.exp().mean(0))
        assert abs(ratio - 1) < 3 * ratio_se
    lower, lower_se = mean_and_se(bounds.lower.log_likelihood - exact)
    upper, upper_se = mean_and_se(bounds.upper.log_likelihood - exact)
    assert -0.15 < lower < 3 * lower_se and -3 * upper_se < upper < 0.15


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_importance_resampling_draws_latents_left_to_the_prior(lg, kind):
    """The resampled particles carry the prior-drawn latents with them: their
    draws have the exact posterior means (P(u = 1 | x) for a Bernoulli u)."""
    model, _, posterior_means = latent_kind(lg, kind)
    x = lg.sample_data(20, seed=4)
    # Wide enough for light-tailed weights (k-hat < 0.5) in every kind.
    guide = lg.diagonal_guide(0.0, 2.5)
    num_draws = 2000
    draws = importance_resample(model, guide, x, num_samples=5000, num_draws=num_draws)
    exact = posterior_means(x)
    assert draws.keys() == exact.keys()
    ess = log_likelihood_with_diagnostics(model, guide, x, num_samples=5000).ess
    for name, mean in exact.items():
        value = draws[name]
        sd = value.std(0).clamp_min(0.01)
        se = sd * (1 / num_draws + 1 / ess.reshape(ess.shape + (1,) * (sd.dim() - 1)))
        z = (value.mean(0) - mean) / se.sqrt()
        assert z.abs().max() < 4.5 and z.square().mean() < 2, name


def test_ais_on_a_discrete_guide_points_to_log_likelihood(lg):
    model = PriorSiteModel(lg, "bernoulli").model

    def discrete_guide(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(lg.post_loc(data), 1.0).to_event(1))
            pyro.sample("u", dist.Bernoulli(data.new_tensor(0.5)))

    with pytest.raises(ValueError, match="discrete site 'u'.*log_likelihood"):
        ais_log_likelihood(model, discrete_guide, lg.sample_data(3), num_steps=2)


def test_an_auxiliary_guide_is_annealed_through_its_auxiliary_site(correlated):
    """A Delta site (Pyro's autoguides) is computed from the auxiliary site it
    follows, not held in the state: the same chains, to rounding, as a guide that
    samples z directly."""
    lg = correlated
    x = lg.sample_data(10)
    scale = 1.5 * lg.post_cov.diagonal().sqrt()

    def direct(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(lg.post_loc(data), scale).to_event(1))

    def auxiliary(data):
        with pyro.plate("data", data.shape[0]):
            a = pyro.sample(
                "a",
                dist.Normal(lg.post_loc(data), scale).to_event(1),
                infer={"is_auxiliary": True},
            )
            pyro.sample("z", dist.Delta(a, event_dim=1))

    results = []
    for guide in (direct, auxiliary):
        pyro.set_rng_seed(2)
        results.append(
            ais_log_likelihood(
                lg.model, guide, x, num_steps=10, num_chains=4, num_leapfrog_steps=2
            )
        )
    torch.testing.assert_close(
        results[0].log_weights, results[1].log_weights, rtol=1e-12, atol=1e-12
    )
    assert results[1].acceptance_rate.mean() > 0.4  # held, z never moved


def test_data_of_another_dtype_than_the_networks():
    # float64 data and float32 weights: log_likelihood ran; AIS's step size, of
    # the weights' dtype, moved the latents to float64, and the model's matmul
    # refused them.
    weight = torch.tensor([[1.0, 0.5]])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight, 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))

    torch.manual_seed(0)
    x = torch.randn(3, 2, dtype=torch.float64)
    w = weight.double()
    cov = w.T @ w + 0.25 * torch.eye(2, dtype=torch.float64)
    exact = dist.MultivariateNormal(x.new_zeros(2), cov).log_prob(x)
    found = ais_log_likelihood(model, guide, x, num_steps=200, num_chains=16)
    assert found.log_likelihood.dtype == torch.float64
    assert ((found.log_likelihood - exact).abs() < 4 * found.stderr + 0.01).all()


def test_ais_errors_on_the_data_name_it_and_keep_to_one_line(lg):
    # An empty batch was "IWELBO got an empty batch"; a network's own message
    # on the data's dtype came with Pyro's multi-line trace shapes appended.
    x = lg.sample_data(3)
    with pytest.raises(ValueError, match="^ais_log_likelihood got an empty batch"):
        ais_log_likelihood(lg.model, lg.exact_guide, x[:0], num_steps=2, num_chains=2)

    def picky_guide(data):
        if data.dtype != torch.float64:
            raise ValueError("the guide takes float64 x")
        lg.exact_guide(data)

    with pytest.raises(ValueError) as info:
        ais_log_likelihood(lg.model, picky_guide, x.float(), num_steps=2, num_chains=2)
    assert str(info.value) == "the guide takes float64 x"
    with pytest.raises(TypeError, match="^argument 1 is a ndarray, not a tensor"):
        ais_log_likelihood(lg.model, lg.exact_guide, x.numpy(), num_steps=2)
