"""IWELBO with Pyro's autoguides on a non-amortised model with local latents,
the linear-Gaussian model of tests/linear_gaussian.py, against its closed form.

AutoNormal puts each point's latent in the data plate: the bound is per point
and ``log_likelihood`` gives one estimate per point. AutoDiagonalNormal,
AutoMultivariateNormal, AutoLowRankMultivariateNormal and AutoIAFNormal draw
one latent vector for the whole data set, outside every plate: IWELBO then
gives the joint bound on log p(x_1, ..., x_N), which is still a bound and
still trains, but does not split into points, so ``log_likelihood`` refuses
them with a clear reason.
"""

import pyro
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import autoguide

from pyro_iwae import IWELBO, ais_log_likelihood, log_likelihood
from pyro_iwae.nn.networks import local_params

N = 10
JOINT = {
    "AutoDiagonalNormal": autoguide.AutoDiagonalNormal,
    "AutoMultivariateNormal": autoguide.AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": autoguide.AutoLowRankMultivariateNormal,
    "AutoIAFNormal": autoguide.AutoIAFNormal,
}


def problem():
    """The model in float32 (autoguides' networks are), its data, and the exact
    log p(x) of each point (float64)."""
    lg = LinearGaussian()
    data = lg.sample_data(N)
    exact = lg.log_marginal(data)
    lg.W, lg.b = lg.W.float(), lg.b.float()
    return lg, data.float(), exact


def train(lg, guide, data, estimator, steps=250, lr=0.02):
    """Adam on the guide's parameters, as fit trains (module-local parameters)."""
    objective = IWELBO(num_particles=5, estimator=estimator)
    with local_params(guide):
        guide(data)  # autoguides make their parameters on the first call
        optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            objective.differentiable_loss(lg.model, guide, data).backward()
            optimizer.step()


def joint_bound(lg, guide, data, k=100, repeats=10):
    """Mean and standard error of ``repeats`` draws of the joint bound L_k on
    log p(x_1, ..., x_N)."""
    objective = IWELBO(num_particles=k)
    with torch.no_grad(), local_params(guide):
        draws = torch.tensor(
            [-objective.loss(lg.model, guide, data) for _ in range(repeats)]
        )
    return float(draws.mean()), float(draws.std()) / repeats**0.5


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("name", list(JOINT))
def test_joint_autoguides_give_a_bound_on_the_whole_data_set(name, estimator):
    lg, data, exact = problem()
    exact = float(exact.sum())
    pyro.set_rng_seed(0)
    guide = JOINT[name](lg.model)
    with local_params(guide):
        guide(data)
    before, _ = joint_bound(lg, guide, data, k=5, repeats=2)
    # AutoIAFNormal's stl and dreg invert its flow at every step: fewer steps.
    train(lg, guide, data, estimator, steps=120 if name == "AutoIAFNormal" else 250)
    after, stderr = joint_bound(lg, guide, data)
    assert after > before + 10
    # A bound on the exact joint log-likelihood (up to Monte Carlo noise), and
    # within 2 nats of it for the 10 points.
    assert after < exact + 3 * stderr + 0.01, (after, exact, stderr)
    assert after > exact - 2, (after, exact)


@pytest.mark.parametrize("name", list(JOINT))
def test_log_likelihood_refuses_a_latent_outside_the_data_plate(name):
    lg, data, _ = problem()
    guide = JOINT[name](lg.model)
    with pytest.raises(ValueError, match="outside every plate") as e:
        log_likelihood(lg.model, guide, data, num_samples=3)
    assert "_latent" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_auto_normal_gives_a_bound_per_point(estimator):
    lg, data, exact = problem()
    pyro.set_rng_seed(0)
    guide = autoguide.AutoNormal(lg.model)
    train(lg, guide, data, estimator)
    with local_params(guide):
        estimate = log_likelihood(lg.model, guide, data, num_samples=500)
    gap = exact - estimate.double()
    assert gap.shape == (N,)
    assert -0.02 < float(gap.mean()) < 0.3, gap


def test_a_guide_of_point_masses_is_refused_by_the_estimators_of_log_p():
    """AutoDelta's draws have no density: log p(x, z) at one z is no bound on
    log p(x) (it lay above the exact value), so the evaluators refuse it; the
    objective still trains it (MAP, as Trace_ELBO does)."""
    lg, data, exact = problem()
    guide = autoguide.AutoDelta(lg.model)
    train(lg, guide, data, "iwae", steps=20)
    with local_params(guide), pytest.raises(ValueError) as refused:
        log_likelihood(lg.model, guide, data, num_samples=10)
    assert "every latent site of the guide is a point mass (Delta: 'z')" in str(
        refused.value
    )
    with local_params(guide), pytest.raises(ValueError, match="^AIS weighs"):
        ais_log_likelihood(lg.model, guide, data, num_steps=2, num_chains=2)
    # A guide with a density passes.
    joint = autoguide.AutoNormal(lg.model)
    train(lg, joint, data, "iwae", steps=1)
    with local_params(joint):
        estimate = log_likelihood(lg.model, joint, data, num_samples=500)
    assert (estimate.double() <= exact + 0.5).all()
