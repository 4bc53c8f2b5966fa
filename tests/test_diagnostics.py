"""ESS, Pareto k-hat and importance resampling against closed forms (seeded)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LATENT_DIM
from pyro.infer import Predictive
from pyro.ops.stats import fit_generalized_pareto

from pyro_iwae import (
    IWELBO,
    effective_sample_size,
    importance_resample,
    log_likelihood,
    log_likelihood_with_diagnostics,
    pareto_khat,
)
from pyro_iwae.infer.diagnostics import relative_stderr, tail_length

pytestmark = pytest.mark.usefixtures("one_thread")


def test_effective_sample_size_of_known_weights():
    log_w = torch.tensor(
        [[0.0, 0.0, -math.inf, -math.inf], [0.0, math.log(3), -math.inf, -math.inf]],
        dtype=torch.float64,
    )
    expected = torch.tensor([2, 1.6], dtype=torch.float64)
    assert torch.allclose(effective_sample_size(log_w, dim=1), expected)
    # Stable far from 0, in either direction, and along any dim.
    for offset in (-1e4, 1e4):
        assert torch.allclose(effective_sample_size((log_w + offset).T), expected)


def test_relative_stderr_is_the_delta_method():
    log_w = torch.randn(5, 300, dtype=torch.float64)
    w = log_w.exp()
    expected = w.std(1) / (math.sqrt(300) * w.mean(1))
    assert torch.allclose(relative_stderr(log_w, dim=1), expected)
    assert relative_stderr(log_w[:, :1], dim=1).isnan().all()


def test_pareto_khat_is_pyros_fit_on_the_tail():
    log_w = torch.randn(6, 400, dtype=torch.float64) * 2
    m = tail_length(400)
    assert m == 60  # 3 sqrt(400) < 400 / 5
    expected = []
    for row in log_w:
        top = row.sort(descending=True).values[: m + 1].exp()
        expected.append(fit_generalized_pareto(top[:m] - top[m])[0])
    khat = pareto_khat(log_w.T, dim=0)
    assert torch.allclose(khat, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("shape", [0.3, 1.0])
def test_pareto_khat_recovers_the_tail_index(shape):
    g = torch.Generator().manual_seed(0)
    u = torch.rand(16, 4000, generator=g, dtype=torch.float64)
    weights = (u.pow(-shape) - 1) / shape  # generalized Pareto, shape k, scale 1
    khat = pareto_khat(weights.log(), dim=1)
    assert khat.mean() == pytest.approx(shape, abs=0.1)
    assert (khat - shape).abs().max() < 0.4


def _reference_khat(log_w: torch.Tensor) -> float:
    """Pyro's fit_generalized_pareto on the tail of the log weights ``log_w``
    (one row), in mpmath, whose numbers have exponents of any size."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    top = sorted((mp.mpf(v) for v in log_w.tolist()), reverse=True)
    m = tail_length(len(top))
    x = sorted(mp.exp(v) - mp.exp(top[m]) for v in top[:m])
    grid = 30 + int(math.sqrt(m))
    quartile = x[int(m / 4 + 0.5) - 1]
    bs = [
        (1 - mp.sqrt(grid / (j - mp.mpf(0.5)))) / (3 * quartile) + 1 / x[-1]
        for j in range(1, grid + 1)
    ]
    ks = [sum(mp.log1p(-b * xi) for xi in x) / m for b in bs]
    profile = [m * (mp.log(-b / k) - k - 1) for b, k in zip(bs, ks, strict=True)]
    weights = [mp.exp(p - max(profile)) for p in profile]
    weights = [w / sum(weights) for w in weights]
    kept = [(w, b) for w, b in zip(weights, bs, strict=True) if w > 1e-30]
    b = sum(w * b for w, b in kept) / sum(w for w, _ in kept)
    k = sum(mp.log1p(-b * xi) for xi in x) / m
    return float((k * m + 5) / (m + 10))


@pytest.mark.parametrize("shape", [0.5, 1.5])
def test_pareto_khat_fits_weights_spanning_more_than_float64_holds(shape):
    # Where the tail's log weights spanned over ~745 nats, exp underflowed to 0
    # below the largest and k-hat was NaN (randn(200, 4) * 1000: all four).
    g = torch.Generator().manual_seed(0)
    u = torch.rand(16, 20000, generator=g, dtype=torch.float64)
    log_w = ((u.pow(-shape) - 1) / shape).log()  # generalized Pareto, shape k
    khat = pareto_khat(log_w + 1e4, dim=1)
    # Invariant to a constant in log space, and the true k recovered.
    assert torch.allclose(khat, pareto_khat(log_w, dim=1), rtol=0, atol=1e-9)
    assert khat.mean() == pytest.approx(shape, abs=0.05)
    assert (khat - shape).abs().max() < 0.3
    # Weights to the power 1000 (log weights spread 1000 times wider, their
    # tails over thousands of nats): Pyro's estimator, evaluated exactly.
    wide = 1000 * log_w[:4, :400]
    khat = pareto_khat(wide - 1e5, dim=1)
    expected = torch.tensor([_reference_khat(row) for row in wide], dtype=khat.dtype)
    # (Shifted by 1e5, the log weights keep 1e5 * 2e-16 nats of precision.)
    assert torch.allclose(khat, expected, rtol=1e-9, atol=0)
    assert torch.allclose(pareto_khat(wide + 1e5, dim=1), khat, rtol=1e-9, atol=0)
    torch.manual_seed(0)
    assert pareto_khat(torch.randn(200, 4) * 1000).isfinite().all()


def test_pareto_khat_is_inf_where_one_weight_holds_the_tail():
    # All weight on one particle, the rest equal far below: no finite fit (it
    # was NaN, which eval-nll read as reliable).
    log_w = torch.full((100, 3), -1000.0)
    log_w[0] = 0.0
    log_w[1, 2] = -900.0  # two distinct weights above the threshold
    assert (pareto_khat(log_w) == math.inf).all()
    assert (pareto_khat(log_w.double()) == math.inf).all()


def test_pareto_khat_of_flat_and_short_tails():
    assert (pareto_khat(torch.zeros(100, 3)) == -math.inf).all()
    assert pareto_khat(torch.randn(20, 3)).isnan().all()  # M = 4 < 5
    assert pareto_khat(torch.randn(21, 3)).isfinite().all()


def test_diagnostics_share_log_likelihoods_draws_and_any_chunking(lg):
    # Chunks of 16 particles x 3 points x 2 dims: a multiple of 16 normals each,
    # the same stream in one draw or several (as in test_evaluation).
    x = lg.sample_data(3)
    guide = lg.diagonal_guide()
    results = []
    for chunk_size in (64, 16):
        pyro.set_rng_seed(7)
        results.append(
            log_likelihood_with_diagnostics(
                lg.model, guide, x, num_samples=64, chunk_size=chunk_size
            )
        )
    pyro.set_rng_seed(7)
    plain = log_likelihood(lg.model, guide, x, num_samples=64, chunk_size=32)
    assert torch.allclose(results[0].log_likelihood, plain, rtol=0, atol=1e-12)
    for a, b in zip(*results, strict=True):
        assert a.shape == (3,)
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_ess_is_k_for_the_exact_posterior(lg):
    x = lg.sample_data(10)
    d = log_likelihood_with_diagnostics(
        lg.model, lg.exact_guide, x, num_samples=500, chunk_size=70
    )
    assert torch.allclose(d.ess, torch.full_like(d.ess, 500.0), rtol=1e-9)
    assert torch.allclose(d.log_likelihood, lg.log_marginal(x))
    assert (d.stderr < 1e-6).all()
    assert (d.khat == -math.inf).all()  # equal weights: no tail


def test_khat_flags_a_guide_narrower_than_the_posterior(correlated):
    """Weights q/p are bounded when q is wider than p in every direction (k <= 0)
    and heavy-tailed when narrower: with q's variance at most 1/19 of p's in some
    direction, the tail index is 1 - 1/19 = 0.95."""
    lg = correlated
    x = lg.sample_data(30)
    wide, narrow = (
        log_likelihood_with_diagnostics(lg.model, guide, x, num_samples=5000)
        for guide in (lg.diagonal_guide(0.5, 1.5), lg.diagonal_guide(0.0, 0.3))
    )
    assert (wide.khat < 0.5).all()
    # k-hat runs low for k near 1 (0.49 to 1.1 here, over seeds).
    assert narrow.khat.median() > 0.75 and narrow.khat.min() > 0.4
    assert (narrow.ess < wide.ess).all()


def test_importance_resampling_recovers_a_correlated_posterior(correlated):
    lg = correlated
    x = lg.sample_data(20)
    guide = lg.diagonal_guide(0.5, 1.5)  # mean-field, shifted, too wide
    num_samples, num_draws = 5000, 2000
    draws = importance_resample(
        lg.model,
        guide,
        x,
        num_samples=num_samples,
        num_draws=num_draws,
        chunk_size=1200,
    )
    assert draws.keys() == {"z"}
    z = draws["z"]
    assert z.shape == (num_draws, 20, LATENT_DIM)
    ess = log_likelihood_with_diagnostics(
        lg.model, guide, x, num_samples=num_samples
    ).ess
    # Monte Carlo error of a draw mean: the resampling's, and the particles'.
    var = lg.post_cov.diagonal()
    se = (var * (1 / num_draws + 1 / ess.unsqueeze(-1))).sqrt()
    z_scores = (z.mean(0) - lg.post_loc(x)) / se
    assert z_scores.abs().max() < 4.5
    assert z_scores.square().mean() < 2
    # What resampling corrects: the guide's own mean is 0.5 off, dozens of SEs.
    assert (0.5 / se).min() > 10
    centred = (z - lg.post_loc(x)).reshape(-1, LATENT_DIM)
    cov = centred.T @ centred / centred.shape[0]
    # Effective draws: each point's at most min(draws, ESS), halved for ties.
    n_eff = float(torch.minimum(ess, torch.tensor(num_draws)).sum()) / 2
    sd = var.sqrt()
    cov_se = ((torch.outer(var, var) + lg.post_cov.square()) / n_eff).sqrt()
    assert ((cov - lg.post_cov).abs() < 4 * cov_se).all()
    corr = cov[0, 1] / (sd[0] * sd[1])
    assert corr < -0.7  # the guide's is 0


def test_resampled_draws_feed_predictive(lg):
    x = lg.sample_data(4)
    draws = importance_resample(
        lg.model, lg.exact_guide, x, num_samples=50, num_draws=7
    )
    predicted = Predictive(lg.model, posterior_samples=draws, return_sites=["z"])(x)
    assert torch.equal(predicted["z"], draws["z"])
    with pytest.raises(ValueError, match="num_draws"):
        importance_resample(lg.model, lg.exact_guide, x, num_samples=5, num_draws=0)


# A two-component mixture per point, y ~ Cat(W), z ~ N(0, 1), x ~ N(MU[y] + z,
# 1/2), whose guide enumerates y (uniformly) and draws z from its exact posterior
# given y: each particle's weight per value is 2 p(x, y), their mean p(x).
W, MU = torch.tensor([0.3, 0.7]), torch.tensor([-2.0, 2.0])


def _mixture(x):
    with pyro.plate("data", len(x)):
        y = pyro.sample("y", dist.Categorical(W))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(MU[y] + z, 0.5), obs=x)


def _enumerating_guide(x):
    with pyro.plate("data", len(x)):
        y = pyro.sample(
            "y",
            dist.Categorical(torch.tensor([0.5, 0.5])),
            infer={"enumerate": "parallel"},
        )
        pyro.sample("z", dist.Normal(0.8 * (x - MU[y]), 0.2**0.5))


@pytest.mark.parametrize("vectorize", [True, False])
def test_diagnostics_take_each_particles_mean_over_the_values_a_guide_enumerates(
    vectorize,
):
    # K = 30 failed with an IndexError (the tail of 2 K weights sought among the
    # K kept); at K <= 20, ESS counted 2 K weights, and the stderr of this exact
    # estimate was 0.2 nats.
    x = torch.tensor([-1.8, 0.3, 2.4, 0.9])
    exact = (W.log() + dist.Normal(MU, 1.25**0.5).log_prob(x[:, None])).logsumexp(-1)
    pyro.set_rng_seed(0)
    d = log_likelihood_with_diagnostics(
        _mixture,
        _enumerating_guide,
        x,
        num_samples=30,
        chunk_size=7,
        vectorize_particles=vectorize,
    )
    # Every particle's weight is p(x): all 30 equal, a flat tail.
    assert torch.allclose(d.log_likelihood, exact, atol=1e-5)
    assert torch.allclose(d.ess, torch.full((4,), 30.0))
    assert torch.allclose(d.stderr, torch.zeros(4), atol=1e-3)
    assert (d.khat == -math.inf).all()


def _shared_model(x):
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Categorical(W))
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(u, 1.0), obs=x)


def _shared_guide(x):
    with pyro.plate("data", len(x)):
        pyro.sample("u", dist.Normal(0.5 * x, 1.0))
        pyro.sample(
            "y",
            dist.Categorical(torch.tensor([0.5, 0.5])),
            infer={"enumerate": "parallel"},
        )


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_particles_weight_is_the_mean_of_its_own_weights_per_value(vectorize):
    # The weights per value of one particle, u drawn before the enumerated y:
    # 2 W[y] r(u), r = p(u) p(x|u) / q(u), whose mean is r(u) of that particle.
    x = torch.tensor([-1.0, 0.5, 2.0])
    pyro.set_rng_seed(0)
    elbo = IWELBO(5, vectorize_particles=vectorize)
    particles = elbo.particles(_shared_model, _shared_guide, x)
    u = torch.stack(
        [guide_trace.nodes["u"]["value"] for _, guide_trace in particles.traces]
    ).reshape(5, 3)
    log_r = (
        dist.Normal(0.0, 1.0).log_prob(u)
        + dist.Normal(u, 1.0).log_prob(x)
        - dist.Normal(0.5 * x, 1.0).log_prob(u)
    )
    assert particles.log_weights.shape[0] == 10
    assert torch.allclose(particles.particle_log_weights, log_r, atol=1e-5)
