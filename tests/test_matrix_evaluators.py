"""The matrix's evaluator cells: every evaluator x latent kind against the exact
log p(x) (and posterior mean) of the linear-Gaussian model (float64, seeded).

Latent kinds (``matrix.evaluator_setup``): every latent in the guide; a discrete
or a continuous latent u that the guide leaves to the model's prior; u sampled
by the guide too (a discrete guide site beside a continuous one). Each estimate
must lie within 4 of its own standard errors (plus a small allowance for the
bias of a log of a mean) of the exact value. The sequential rows draw the
particles one run at a time (``vectorize_particles=False``), with fewer of them.
"""

import warnings

import pytest
import torch
from matrix import LATENT_KINDS, EvaluatorSetup, evaluator_setup, slow

from pyro_iwae import (
    ais_log_likelihood,
    bidirectional_log_likelihood,
    importance_resample,
    joint_log_likelihood,
    log_likelihood,
    log_likelihood_with_diagnostics,
    sample_joint,
)
from pyro_iwae.compiled import CompileFallbackWarning, cached_log_likelihood
from pyro_iwae.infer.hooks import backend_of

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_SAMPLES = 4000
#: Allowance for the bias of log(mean weight) and of AIS's finite schedule.
BIAS = 0.02
#: Particles of the sequential rows: one model and guide run each.
SEQUENTIAL_SAMPLES = 300
AIS = {"num_steps": 30, "num_chains": 32, "num_leapfrog_steps": 5}


def assert_near(estimate, stderr, exact, allowance=BIAS):
    error = (estimate - exact).abs()
    assert (error < 4 * stderr + allowance).all(), (estimate, exact, stderr)


def diagnostics(s: EvaluatorSetup, seed: int = 0):
    torch.manual_seed(seed)
    return log_likelihood_with_diagnostics(
        s.model, s.guide, s.x, num_samples=NUM_SAMPLES
    )


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_log_likelihood(kind):
    s = evaluator_setup(kind)
    torch.manual_seed(0)
    estimate = log_likelihood(s.model, s.guide, s.x, num_samples=NUM_SAMPLES)
    same = diagnostics(s)
    # The same draws, so the same estimate: its stderr is this estimate's.
    torch.testing.assert_close(same.log_likelihood, estimate, rtol=1e-12, atol=1e-12)
    assert_near(estimate, same.stderr, s.log_marginal)
    assert (same.stderr > 1e-4).all()  # the estimate is not exact by construction


def assert_joint_near(kind, **options):
    """Ten seeded draws of joint_log_likelihood with ``options``: their mean near
    the exact total, within the spread of the repeats."""
    s = evaluator_setup(kind)
    torch.manual_seed(0)
    draws = torch.stack(
        [joint_log_likelihood(s.model, s.guide, s.x, **options) for _ in range(10)]
    )
    stderr = draws.std() / len(draws) ** 0.5
    assert draws.shape == (10,) and stderr > 1e-4
    assert_near(draws.mean(), stderr, s.log_marginal.sum())


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_joint_log_likelihood(kind):
    """Without global latents it is the sum over points of per-point estimates
    (each of num_local_samples particles), averaged over num_samples draws: near
    the exact total, within the spread of independent repeats."""
    assert_joint_near(kind, num_samples=20, num_local_samples=200)


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_log_likelihood_with_diagnostics(kind):
    s = evaluator_setup(kind)
    result = diagnostics(s, seed=1)
    assert_near(result.log_likelihood, result.stderr, s.log_marginal)
    assert ((result.ess > 1) & (result.ess <= NUM_SAMPLES)).all()


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_sequential_log_likelihood(kind):
    """The same estimate as the diagnostics' from the same draws, near the exact
    value within its standard error."""
    s = evaluator_setup(kind)
    options = dict(num_samples=SEQUENTIAL_SAMPLES, vectorize_particles=False)
    torch.manual_seed(2)
    estimate = log_likelihood(s.model, s.guide, s.x, **options)
    torch.manual_seed(2)
    same = log_likelihood_with_diagnostics(s.model, s.guide, s.x, **options)
    torch.testing.assert_close(same.log_likelihood, estimate, rtol=1e-12, atol=1e-12)
    assert_near(estimate, same.stderr, s.log_marginal)
    assert (same.stderr > 1e-4).all()
    assert ((same.ess > 1) & (same.ess <= SEQUENTIAL_SAMPLES)).all()


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_sequential_joint_log_likelihood(kind):
    """As :func:`test_joint_log_likelihood`, particles drawn one run at a time."""
    assert_joint_near(
        kind, num_samples=4, num_local_samples=50, vectorize_particles=False
    )


#: Cells whose model draws discrete latents from probabilities it computes: a
#: graph would draw those otherwise than the eager path, so a compiled evaluation
#: falls back to it (uncompiled too: the traced graph drew other noise).
OWN_DRAWS = ("model-only-discrete", "mixed")


def assert_compiled_log_likelihood(kind, backend):
    s = evaluator_setup(kind)
    falls_back = kind in OWN_DRAWS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(
            "always" if falls_back else "error", CompileFallbackWarning
        )
        torch.manual_seed(0)
        estimate = log_likelihood(
            s.model, s.guide, s.x, num_samples=NUM_SAMPLES, compile=backend
        )
    # The cache is keyed by the backend's name (compile=True: inductor).
    ran = cached_log_likelihood(s.model, s.guide, backend_of(backend))
    if falls_back:
        assert not ran.compiled
        assert any("tensor arguments" in str(w.message) for w in caught)
    else:
        assert ran.compiled and ran._graphs
    assert_near(estimate, diagnostics(s).stderr, s.log_marginal)


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_traced_log_likelihood(kind):
    assert_compiled_log_likelihood(kind, None)


@slow
@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_inductor_log_likelihood(kind):
    assert_compiled_log_likelihood(kind, True)


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_ais(kind):
    s = evaluator_setup(kind)
    torch.manual_seed(0)
    if kind == "mixed":
        with pytest.raises(ValueError, match="'u'") as refusal:
            ais_log_likelihood(s.model, s.guide, s.x, **AIS)
        assert "\n" not in str(refusal.value)
        return
    result = ais_log_likelihood(s.model, s.guide, s.x, **AIS)
    assert_near(result.log_likelihood, result.stderr, s.log_marginal)


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_bdmc(kind):
    s = evaluator_setup(kind)
    torch.manual_seed(0)
    # BDMC needs data drawn from the model, with the latents that made it.
    sim = sample_joint(s.model, s.x)
    # Every latent site, the model-only ``u`` included (AIS's state holds it).
    latents = {name: sim[name] for name in ("u", "z") if name in sim}
    x = sim["x"]
    if kind == "mixed":
        with pytest.raises(ValueError, match="'u'") as refusal:
            bidirectional_log_likelihood(s.model, s.guide, x, latents=latents, **AIS)
        assert "\n" not in str(refusal.value)
        return
    bounds = bidirectional_log_likelihood(s.model, s.guide, x, latents=latents, **AIS)
    exact = s.log_marginal_of(x)
    for result in bounds:
        assert_near(result.log_likelihood, result.stderr, exact)


@pytest.mark.parametrize("kind", LATENT_KINDS)
def test_importance_resample(kind):
    s = evaluator_setup(kind)
    torch.manual_seed(0)
    draws = importance_resample(
        s.model, s.guide, s.x, num_samples=NUM_SAMPLES, num_draws=2000
    )["z"]
    ess = diagnostics(s).ess.unsqueeze(-1)
    # Draws with replacement from NUM_SAMPLES weighted particles: the error of
    # their mean comes from both the draws and the particles.
    se = draws.std(0) * (1 / draws.shape[0] + 1 / ess).sqrt()
    assert_near(draws.mean(0), se, s.post_mean, allowance=0.01)
