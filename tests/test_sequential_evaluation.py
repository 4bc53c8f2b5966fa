"""Evaluators with vectorize_particles=False: particles drawn one at a time, for
models whose networks do not broadcast over a leading particle dimension."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LATENT_DIM, SIGMA, LinearGaussian
from pyro.nn import PyroModule, PyroSample

from pyro_iwae import (
    ParticleBroadcastError,
    active_units,
    ais_log_likelihood,
    dataset_log_likelihood,
    importance_resample,
    joint_log_likelihood,
    latent_activity,
    log_likelihood,
    log_likelihood_with_diagnostics,
)

LG = LinearGaussian(0)
GUIDE = LG.diagonal_guide()


def flat_model(data: torch.Tensor) -> None:
    """The linear-Gaussian model, written for one particle: ``view(batch, d)``
    fails on the particles' ``[k, batch, d]``."""
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1))
        loc = z.view(data.shape[0], LATENT_DIM) @ LG.W.T + LG.b
        pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=data)


MIX = torch.tensor([[1.0, 0.5], [0.0, 2.0]], dtype=torch.float64)


def chain_guide(data: torch.Tensor, flat: bool = True) -> None:
    """z ~ N(E[z|x], 0.3), then u | z ~ N(z MIX, 0.3), written for one draw
    (``view(batch, d)``, which fails on the draws' ``[k, batch, d]``) unless
    not ``flat``."""
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Normal(LG.post_loc(data), 0.3).to_event(1))
        if flat:
            z = z.view(data.shape[0], LATENT_DIM)
        pyro.sample("u", dist.Normal(z @ MIX, 0.3).to_event(1))


def test_sequential_estimate_converges_to_the_exact_log_marginal():
    x = LG.sample_data(4)
    pyro.set_rng_seed(0)
    result = log_likelihood_with_diagnostics(
        flat_model, GUIDE, x, num_samples=400, vectorize_particles=False
    )
    exact = LG.log_marginal(x)
    # The shifted, inflated guide leaves real noise: the test has something to fail.
    assert (result.stderr > 1e-3).all()
    # 4 standard errors, plus the estimator's O(1/K) downward bias.
    assert ((result.log_likelihood - exact).abs() < 4 * result.stderr + 0.01).all()
    pyro.set_rng_seed(0)
    plain = log_likelihood(
        flat_model, GUIDE, x, num_samples=400, vectorize_particles=False
    )
    assert torch.equal(plain, result.log_likelihood)


def test_sequential_and_vectorized_estimates_agree_within_noise():
    """Not bit for bit: one draw of [k, batch, d] and k draws of [batch, d] take
    the random stream differently; the estimates agree within their noise."""
    x = LG.sample_data(4, seed=3)
    options = dict(num_samples=400, chunk_size=100)
    pyro.set_rng_seed(1)
    vec = log_likelihood_with_diagnostics(LG.model, GUIDE, x, **options)
    pyro.set_rng_seed(1)
    seq = log_likelihood_with_diagnostics(
        LG.model, GUIDE, x, vectorize_particles=False, **options
    )
    noise = (vec.stderr**2 + seq.stderr**2).sqrt()
    assert ((vec.log_likelihood - seq.log_likelihood).abs() < 4 * noise).all()
    assert not torch.equal(vec.log_likelihood, seq.log_likelihood)


def test_sequential_importance_resampling_recovers_the_exact_posterior_mean():
    """The draws of sequential particles, as the vectorized ones', have the
    closed-form posterior mean within their Monte Carlo error, which the
    guide's own mean (0.5 off) is far outside."""
    x = LG.sample_data(6, seed=5)
    num_samples, num_draws = 1000, 1000
    var = LG.post_cov.diagonal()
    for model, vectorize in ((flat_model, False), (LG.model, True)):
        pyro.set_rng_seed(3)
        draws = importance_resample(
            model,
            GUIDE,
            x,
            num_samples=num_samples,
            num_draws=num_draws,
            chunk_size=300,
            vectorize_particles=vectorize,
        )
        assert draws.keys() == {"z"}
        z = draws["z"]
        assert z.shape == (num_draws, 6, LATENT_DIM)
        ess = log_likelihood_with_diagnostics(
            model, GUIDE, x, num_samples=num_samples, vectorize_particles=vectorize
        ).ess
        se = (var * (1 / num_draws + 1 / ess.unsqueeze(-1))).sqrt()
        z_scores = (z.mean(0) - LG.post_loc(x)) / se
        assert z_scores.abs().max() < 4.5
        assert (0.5 / se).min() > 8


def test_sequential_latent_activity_is_the_vectorized_one():
    """The first layer's mean depends on x alone: its activity is Var_x of the
    posterior mean whichever way the draws come; the second's averages the
    first's draws, and both ways agree with the closed form within its noise."""
    x = LG.sample_data(300, seed=6)
    pyro.set_rng_seed(4)
    seq = latent_activity(chain_guide, x, num_samples=200, vectorize_particles=False)
    pyro.set_rng_seed(4)
    vec = latent_activity(
        lambda data: chain_guide(data, flat=False), x, num_samples=200
    )
    exact_z = LG.post_loc(x).var(0, unbiased=False)
    torch.testing.assert_close(seq["z"], exact_z)
    torch.testing.assert_close(vec["z"], exact_z)
    exact_u = (LG.post_loc(x) @ MIX).var(0, unbiased=False)
    for activity in (seq, vec):
        torch.testing.assert_close(activity["u"], exact_u, rtol=0.02, atol=0)
    assert not torch.equal(seq["u"], vec["u"])
    counts = active_units(chain_guide, x, num_samples=20, vectorize_particles=False)
    assert counts == {"z": int((exact_z > 0.01).sum()), "u": 2}


def test_dataset_and_joint_estimates_take_sequential_particles():
    x = LG.sample_data(6, seed=4)
    pyro.set_rng_seed(2)
    per_point = dataset_log_likelihood(
        flat_model, GUIDE, x, num_samples=200, batch_size=4, vectorize_particles=False
    )
    assert per_point.shape == (6,)
    assert ((per_point - LG.log_marginal(x)).abs() < 0.3).all()
    # Without global latents, the joint estimate factors into the points'.
    joint = joint_log_likelihood(
        flat_model,
        GUIDE,
        x,
        num_samples=2,
        num_local_samples=100,
        vectorize_particles=False,
    )
    assert abs(joint - LG.log_marginal(x).sum()) < 0.5


@pytest.mark.parametrize(
    "evaluator, name",
    [
        (lambda x, **o: log_likelihood(flat_model, GUIDE, x, **o), "log_likelihood"),
        (
            lambda x, **o: dataset_log_likelihood(flat_model, GUIDE, x, **o),
            "dataset_log_likelihood",
        ),
        (
            lambda x, **o: log_likelihood_with_diagnostics(flat_model, GUIDE, x, **o),
            "log_likelihood_with_diagnostics",
        ),
        (
            lambda x, **o: joint_log_likelihood(flat_model, GUIDE, x, **o),
            "joint_log_likelihood",
        ),
        (
            lambda x, **o: importance_resample(flat_model, GUIDE, x, num_draws=3, **o)[
                "z"
            ],
            "importance_resample",
        ),
        (
            lambda x, **o: latent_activity(chain_guide, x, **o)["u"],
            "latent_activity",
        ),
        (
            lambda x, **o: torch.tensor(
                list(active_units(chain_guide, x, **o).values()), dtype=torch.float
            ),
            "active_units",
        ),
    ],
)
def test_a_non_broadcasting_model_is_told_to_pass_vectorize_particles_false(
    evaluator, name
):
    x = LG.sample_data(3)
    with pytest.raises(ParticleBroadcastError) as error:
        evaluator(x, num_samples=4)
    message = str(error.value)
    assert "\n" not in message
    assert f"pass vectorize_particles=False to {name} " in message
    estimate = evaluator(x, num_samples=4, vectorize_particles=False)
    if isinstance(estimate, tuple):  # Diagnostics: the estimate comes first
        estimate = estimate[0]
    assert torch.isfinite(estimate).all()


def test_ais_refuses_sequential_particles_and_names_what_to_use():
    x = LG.sample_data(3)
    with pytest.raises(ParticleBroadcastError, match="log_likelihood\\(\\.\\.\\., "):
        ais_log_likelihood(flat_model, GUIDE, x, num_steps=3, num_chains=2)
    with pytest.raises(ValueError, match="has no vectorize_particles=False"):
        ais_log_likelihood(
            LG.model, GUIDE, x, num_steps=3, num_chains=2, vectorize_particles=False
        )


def test_compiled_sequential_particles_are_refused_in_one_line():
    x = LG.sample_data(3)
    with pytest.raises(ValueError, match="pass compile=False"):
        log_likelihood(
            LG.model, GUIDE, x, num_samples=4, compile=True, vectorize_particles=False
        )


def test_dataset_log_likelihood_refuses_a_list():
    rows = LG.sample_data(3).tolist()
    with pytest.raises(TypeError, match="pass a tensor"):
        dataset_log_likelihood(LG.model, GUIDE, rows, num_samples=4)


class Regression(PyroModule):
    """Pyro's Bayesian-regression pattern: ``PyroSample`` weights of a
    ``PyroModule[nn.Linear]``, global latents that do not broadcast over
    particles; y ~ N(X beta, NOISE^2), beta = (weight, bias) ~ N(0, I)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](3, 1).double()
        self.linear.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2)
        )
        self.linear.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, NOISE), obs=y)


NOISE = 0.5


def regression_posterior_guide(x: torch.Tensor, y: torch.Tensor):
    """The exact posterior of (weight, bias): bias from its marginal, weight from
    its conditional given bias."""
    design = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    cov = torch.linalg.inv(torch.eye(4, dtype=x.dtype) + design.T @ design / NOISE**2)
    mean = cov @ design.T @ y / NOISE**2
    gain = cov[:3, 3] / cov[3, 3]
    cond_cov = cov[:3, :3] - torch.outer(gain, cov[3, :3])

    def guide(x: torch.Tensor, y: torch.Tensor) -> None:
        bias = pyro.sample(
            "linear.bias", dist.Normal(mean[3:], cov[3, 3].sqrt()).to_event(1)
        )
        loc = mean[:3] + gain * (bias - mean[3])
        pyro.sample(
            "linear.weight",
            dist.MultivariateNormal(loc, cond_cov).expand([1]).to_event(1),
        )

    exact = dist.MultivariateNormal(
        x.new_zeros(x.shape[0]),
        design @ design.T + NOISE**2 * torch.eye(x.shape[0], dtype=x.dtype),
    ).log_prob(y)
    return guide, exact


def test_bayesian_regression_pattern_is_evaluated_with_sequential_particles():
    """Every draw of the exact posterior weighs exactly p(y): the estimate is the
    exact log p(y) on every run, which only sequential particles can give here."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = x @ x.new_tensor([1.0, -1.0, 0.5]) + 0.3
    y = y + NOISE * torch.randn(12, generator=g, dtype=torch.float64)
    model = Regression()
    guide, exact = regression_posterior_guide(x, y)
    with pytest.raises(ParticleBroadcastError, match="to joint_log_likelihood "):
        joint_log_likelihood(model, guide, x, y, num_samples=3, num_local_samples=1)
    pyro.set_rng_seed(0)
    estimate = joint_log_likelihood(
        model,
        guide,
        x,
        y,
        num_samples=5,
        num_local_samples=1,
        vectorize_particles=False,
    )
    assert estimate.item() == pytest.approx(exact.item(), rel=1e-9)
