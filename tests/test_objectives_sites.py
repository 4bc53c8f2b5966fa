"""IWELBO on kinds of sites beyond local latents (float64, seeded): global latents
outside the data plate (the factored bound, exact against a Gaussian model with a
global latent) and latent sites with their own scale (a temperature)."""

import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from global_gaussian import GlobalGaussian
from linear_gaussian import LATENT_DIM, SIGMA
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_iwae import (
    CIWELBO,
    IWELBO,
    MIWELBO,
    PIWELBO,
    SupportError,
    ais_log_likelihood,
    log_likelihood,
)

OBJECTIVES = {
    "iwae": lambda estimator, **kw: IWELBO(6, estimator, **kw),
    "miwae": lambda estimator, **kw: MIWELBO(3, 2, estimator, **kw),
    "ciwae": lambda estimator, **kw: CIWELBO(6, 0.3, estimator, **kw),
    "piwae": lambda estimator, **kw: PIWELBO(3, 2, estimator, **kw),
}


@pytest.fixture
def gg():
    return GlobalGaussian()


def guide_params():
    store = pyro.get_param_store()
    return [store.get_param(n).unconstrained() for n in sorted(store.keys())]


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_factored_bound_is_log_p_x_at_the_exact_posterior(
    gg, objective, estimator, vectorize
):
    """With q(theta) = p(theta | x) and q(z_i | x_i, theta) exact, every term is
    constant: the factored bound is log p(x_1..N) on every draw, and the STL and
    DReG gradients of the local guide parameters are zero (the plain one is not).
    The global latents are parameters of the local q, so DReG's gradient for
    theta's guide is unbiased but not zero here."""
    x = gg.sample_data(5)
    guide = gg.guide()
    elbo = OBJECTIVES[objective](
        estimator, global_latents="factor", vectorize_particles=vectorize
    )
    for _ in range(3):
        loss = elbo.differentiable_loss(gg.model, guide, x)
        assert torch.allclose(-loss, gg.log_marginal(x)), (loss, gg.log_marginal(x))
    (local,) = torch.autograd.grad(loss, [pyro.param("z_shift").unconstrained()])
    if estimator == "iwae":
        assert local.abs() > 1e-3
    else:
        assert local.abs() < 1e-9


def test_factored_bound_is_below_log_p_x_and_rises_with_k(gg):
    x = gg.sample_data(5)
    guide = gg.guide(shift=0.4, inflate=1.5, local_shift=0.5)
    exact = gg.log_marginal(x).item()
    means = []
    for k in (1, 5, 50):
        elbo = IWELBO(k, global_latents="factor")
        with torch.no_grad():
            draws = torch.tensor(
                [-elbo.differentiable_loss(gg.model, guide, x) for _ in range(400)]
            )
        mean, se = draws.mean().item(), draws.std().item() / math.sqrt(400)
        assert mean + 4 * se < exact, (k, mean, se, exact)
        means.append((mean, se))
    for (low, se_low), (high, se_high) in zip(means, means[1:], strict=False):
        assert high - low > 4 * math.hypot(se_low, se_high), means


def test_mini_batch_estimates_average_to_the_full_batch_bound(gg):
    """(N / M) times a batch's local bounds, plus the global term, is unbiased for
    the full-batch factored bound; ``auto`` factors the bound under sub-sampling."""
    x = gg.sample_data(6)
    guide = gg.guide(shift=0.3, inflate=1.3, local_shift=0.4)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        full = torch.tensor(
            [
                -IWELBO(4, global_latents="factor").differentiable_loss(
                    gg.model, guide, x
                )
                for _ in range(700)
            ]
        )
        batches = torch.tensor(
            [
                -IWELBO(4).differentiable_loss(
                    gg.model, guide, x, torch.randperm(6, generator=generator)[:2]
                )
                for _ in range(700)
            ]
        )
    se = math.hypot(full.std(), batches.std()) / math.sqrt(700)
    assert abs(full.mean() - batches.mean()) < 4 * se, (full.mean(), batches.mean())
    # the check can fail: the joint bound of the full batch is another number
    with torch.no_grad():
        joint = torch.tensor(
            [
                -IWELBO(4, global_latents="joint").differentiable_loss(
                    gg.model, guide, x
                )
                for _ in range(300)
            ]
        )
    assert abs(joint.mean() - full.mean()) > 4 * se


SLOW = pytest.mark.skipif(
    not os.environ.get("PYRO_IWAE_SLOW_TESTS"),
    reason="a thousand gradient draws (a minute); set PYRO_IWAE_SLOW_TESTS=1",
)


@pytest.mark.parametrize(
    "objective, vectorize",
    [
        (name, True) if name == "iwae" else pytest.param(name, True, marks=SLOW)
        for name in OBJECTIVES
    ]
    + [pytest.param(name, False, marks=SLOW) for name in ("iwae", "miwae")],
)
def test_dreg_keeps_the_factored_gradient_mean(gg, objective, vectorize):
    """Away from the posterior, DReG's guide gradient (global and local sites) has
    the plain estimator's mean within 4 standard errors, with the particles in
    the particle plate or drawn one run at a time."""
    x = gg.sample_data(3)
    draws = {}
    for estimator in ("iwae", "dreg"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = gg.guide(shift=0.3, inflate=1.3, local_shift=0.4)
        elbo = OBJECTIVES[objective](
            estimator, global_latents="factor", vectorize_particles=vectorize
        )
        rows = []
        for _ in range(400):
            loss = elbo.differentiable_loss(gg.model, guide, x)
            rows.append(
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(loss, guide_params())]
                )
            )
        draws[estimator] = torch.stack(rows)
    plain, dreg = draws["iwae"], draws["dreg"]
    se = (plain.var(0) / len(plain) + dreg.var(0) / len(dreg)).sqrt()
    assert ((plain.mean(0) - dreg.mean(0)).abs() < 4 * se).all()
    assert (dreg.var(0) <= plain.var(0) * 1.05).all()


ONE_PARTICLE = {
    "iwae": lambda estimator: IWELBO(1, estimator),
    "miwae": lambda estimator: MIWELBO(1, 1, estimator),
    "ciwae": lambda estimator: CIWELBO(1, 0.3, estimator),
    "piwae": lambda estimator: PIWELBO(1, 1, estimator),
}


@pytest.mark.parametrize("objective", ONE_PARTICLE)
def test_dreg_with_one_particle_and_global_latents_is_stl(gg, objective):
    """One particle (globals untied) on the factored bound, full batch and
    sub-sampled: DReG's factor is 1, so its gradient is STL's, and the value at
    the exact posterior is log p(x)."""
    x = gg.sample_data(6)
    guide = gg.guide(shift=0.3, inflate=1.3, local_shift=0.4)
    guide(x)
    for idx in (None, torch.tensor([0, 3])):
        grads = []
        for estimator in ("stl", "dreg"):
            pyro.set_rng_seed(2)
            elbo = ONE_PARTICLE[objective](estimator)
            loss = elbo.differentiable_loss(gg.model, guide, x, idx)
            grads.append(torch.autograd.grad(loss, guide_params()))
        for stl, dreg in zip(*grads, strict=True):
            assert torch.allclose(stl, dreg)
        assert max(g.abs().max() for g in grads[0]) > 1e-3
    pyro.clear_param_store()
    elbo = ONE_PARTICLE[objective]("dreg")
    loss = elbo.differentiable_loss(gg.model, gg.guide(), x)
    assert torch.allclose(-loss, gg.log_marginal(x))


def test_global_latents_are_shared_within_a_group_of_particles(gg):
    x = gg.sample_data(4)
    particles = MIWELBO(3, 2, global_latents="factor").particles(
        gg.model, gg.guide(shift=0.2), x
    )
    model_trace, guide_trace = particles.traces[0]
    theta = guide_trace.nodes["theta"]["value"].reshape(2, 3)
    assert (theta == theta[:, :1]).all() and theta[0, 0] != theta[1, 0]
    assert torch.equal(model_trace.nodes["theta"]["value"].reshape(2, 3), theta)
    assert particles.global_log_weight.shape == (6, 1)
    # the local weights are per point; the sites outside the data plate are not
    assert particles.log_weights.shape == (6, 4)


def test_sequential_particles_share_global_latents_within_a_group(gg):
    x = gg.sample_data(4)
    particles = MIWELBO(
        3, 2, global_latents="factor", vectorize_particles=False
    ).particles(gg.model, gg.guide(shift=0.2), x)
    assert len(particles.traces) == 6
    theta = torch.stack(
        [guide_trace.nodes["theta"]["value"] for _, guide_trace in particles.traces]
    ).reshape(2, 3)
    assert (theta == theta[:, :1]).all() and theta[0, 0] != theta[1, 0]
    for model_trace, guide_trace in particles.traces:
        assert (
            model_trace.nodes["theta"]["value"] is guide_trace.nodes["theta"]["value"]
        )
    assert particles.global_log_weight.shape == (6, 1)
    assert particles.log_weights.shape == (6, 4)


def test_sequential_particles_give_the_vectorized_factored_bound(gg):
    """Drawn one run at a time, the particles give the same bound in mean (the
    local sites differ per particle, so a bound that shared them would be the
    ELBO's, lower: the check can fail)."""
    x = gg.sample_data(4)
    guide = gg.guide(shift=0.4, inflate=1.5, local_shift=0.5)
    draws = {}
    with torch.no_grad():
        for vectorize in (True, False):
            elbo = IWELBO(5, global_latents="factor", vectorize_particles=vectorize)
            draws[vectorize] = torch.tensor(
                [-elbo.differentiable_loss(gg.model, guide, x) for _ in range(400)]
            )
        elbo = IWELBO(1, global_latents="factor")
        draws["elbo"] = torch.tensor(
            [-elbo.differentiable_loss(gg.model, guide, x) for _ in range(400)]
        )
    se = math.hypot(draws[True].std(), draws[False].std()) / math.sqrt(400)
    assert abs(draws[True].mean() - draws[False].mean()) < 4 * se, draws
    assert draws[False].mean() - draws["elbo"].mean() > 4 * se


def annealed(beta, subsample=None):
    """A linear-Gaussian model and guide whose latent site has scale ``beta``."""

    def model(data):
        with pyro.plate("data", 8, subsample=subsample) as i:
            with poutine.scale(scale=beta):
                z = pyro.sample(
                    "z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
                )
            loc = z @ torch.ones(LATENT_DIM, 3, dtype=data.dtype)
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=data[i])

    def guide(data):
        loc = pyro.param("loc", data.new_zeros(8, LATENT_DIM))
        with pyro.plate("data", 8, subsample=subsample) as i:
            with poutine.scale(scale=beta):
                pyro.sample("z", dist.Normal(loc[i], 0.8).to_event(1))

    return model, guide


@pytest.mark.parametrize("subsample", [None, torch.tensor([1, 4, 6])])
@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_a_scaled_latent_site_is_trace_elbos_annealed_elbo_at_k1(beta, subsample):
    """KL annealing: at k = 1 the bound is Trace_ELBO's with the same scales, in
    value and gradient, also under sub-sampling."""
    x = torch.randn(
        8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    model, guide = annealed(beta, subsample)
    guide(x)
    loc = pyro.param("loc").unconstrained()
    results = []
    for elbo in (IWELBO(1), Trace_ELBO()):
        pyro.set_rng_seed(5)
        loss = elbo.differentiable_loss(model, guide, x)
        results.append((loss, torch.autograd.grad(loss, [loc])[0]))
    (ours, our_grad), (theirs, their_grad) = results
    assert torch.allclose(ours, theirs) and torch.allclose(our_grad, their_grad)


def test_a_scaled_latent_site_enters_the_log_weight_times_its_scale():
    """log w = log p(x | z) + beta (log p(z) - log q(z)), checked from the traces."""
    x = torch.randn(
        8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    model, guide = annealed(0.25)
    particles = IWELBO(4).particles(model, guide, x)
    model_trace, guide_trace = particles.traces[0]
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    expected = model_trace.nodes["x"]["unscaled_log_prob"] + 0.25 * (
        model_trace.nodes["z"]["unscaled_log_prob"]
        - guide_trace.nodes["z"]["unscaled_log_prob"]
    )
    assert torch.allclose(particles.log_weights, expected)


N_SEQ, M_SEQ = 6, 2


def sequential_model(x, size=N_SEQ):
    """theta ~ N(0, 1), x_i ~ N(theta, 1) observed in a sequential plate: no
    plate (with a dim) encloses the observed sites."""
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(()), 1.0))
    for i in pyro.plate("data", N_SEQ, subsample_size=size):
        pyro.sample(f"x_{i}", dist.Normal(theta, 1.0), obs=x[i])


def sequential_guide(x, size=N_SEQ):
    """q(theta) the exact posterior of all N points."""
    precision = 1.0 + N_SEQ
    pyro.sample("theta", dist.Normal(x.sum() / precision, precision**-0.5))
    for _ in pyro.plate("data", N_SEQ, subsample_size=size):
        pass


def sequential_log_marginal(x):
    n = x.shape[0]
    cov = torch.eye(n, dtype=x.dtype) + torch.ones(n, n, dtype=x.dtype)
    return dist.MultivariateNormal(x.new_zeros(n), cov).log_prob(x)


@pytest.mark.usefixtures("float64_default")
def test_sub_sampling_without_a_data_plate_gives_the_unbiased_elbo():
    """Observed sites in a sub-sampled sequential plate: every latent is global,
    and the bound is the ELBO, whose mini-batch estimates average to log p(x)
    at the exact posterior (the joint IW bound under sub-sampling would be
    biased); full batches keep the joint bound, exact at the exact posterior."""
    x = torch.randn(N_SEQ, generator=torch.Generator().manual_seed(0)) + 0.7
    exact = sequential_log_marginal(x).item()
    full = -IWELBO(4).loss(sequential_model, sequential_guide, x)
    assert full == pytest.approx(exact, abs=1e-10)
    pyro.set_rng_seed(0)
    draws = torch.tensor(
        [
            -IWELBO(4).loss(sequential_model, sequential_guide, x, M_SEQ)
            for _ in range(1000)
        ]
    )
    se = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 4 * se, (draws.mean(), exact, se)
    assert draws.std() > 0.1  # sub-sampling does move the estimate
    # k = 1 is Trace_ELBO on the same draw.
    pyro.set_rng_seed(3)
    ours = IWELBO(1).loss(sequential_model, sequential_guide, x, M_SEQ)
    pyro.set_rng_seed(3)
    theirs = Trace_ELBO().loss(sequential_model, sequential_guide, x, M_SEQ)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_latent_only_sub_sampled_plates_train():
    """Latent sites in two sub-sampled plates and no observed site (a guide equal
    to the model): every latent is global, log p - log q is 0 for every draw, and
    the gradient reaches the guide's parameter."""

    def model(p=None):
        p = torch.tensor(0.5) if p is None else p
        with pyro.plate("a", 10, 5):
            pyro.sample("u", dist.Normal(p, 1.0).expand([5]))
        with pyro.plate("b", 11, 6):
            pyro.sample("v", dist.Normal(p, 1.0).expand([6]))

    def guide():
        model(pyro.param("p", torch.tensor(0.5)))

    pyro.clear_param_store()
    elbo = IWELBO(3)
    assert elbo.loss(model, guide) == pytest.approx(0.0, abs=1e-5)
    loss = elbo.differentiable_loss(model, guide)
    (grad,) = torch.autograd.grad(loss, [pyro.param("p").unconstrained()])
    assert grad.isfinite() and grad != 0


def recorded(lg):
    """``lg.model`` with ``pyro.deterministic`` sites in and out of the data plate."""

    def model(data, idx=None):
        with pyro.plate("data", data.shape[0], subsample=idx) as i:
            z = pyro.sample(
                "z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            )
            loc = pyro.deterministic("loc", z @ lg.W.T + lg.b, event_dim=1)
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=data[i])
        pyro.deterministic("z_total", z.sum((-2, -1)))

    return model


def test_deterministic_sites_leave_the_bound_and_estimates_alone(lg):
    """A value recorded outside the data plate does not make the bound joint (nor
    refuse sub-sampling); the estimates take it, in the plate or out of it."""
    x = lg.sample_data(6)
    model, guide = recorded(lg), lg.diagonal_guide()
    for idx in (None, torch.tensor([1, 4])):
        values = []
        for program in (lg.model, model):
            pyro.set_rng_seed(0)
            values.append(IWELBO(10).loss(program, guide, x, idx))
        assert values[0] == values[1]
    log_px = log_likelihood(model, lg.exact_guide, x, num_samples=5)
    assert torch.allclose(log_px, lg.log_marginal(x))
    ais = ais_log_likelihood(model, lg.exact_guide, x, num_steps=2, num_chains=2)
    assert torch.allclose(ais.log_likelihood, lg.log_marginal(x))


def _bernoulli_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
        logits = z.sum(-1, keepdim=True).expand(z.shape[:-1] + x.shape[-1:])
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def _normal_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))


def _gamma_model(x):
    with pyro.plate("data", x.shape[0]):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        pyro.sample("x", dist.Normal(rate, 1.0), obs=x)


def _gamma_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("rate", dist.Normal(torch.ones(x.shape[0]), 1.0))


# Data, program, the message's start, and its advice: for a latent site the
# advice of observed values ("pass values in its support") misled.
_OUTSIDE = {
    "observed": (
        [[0.0, 1.0, 0.25], [1.0, 1.0, 0.0]],
        (_bernoulli_model, _normal_guide),
        "site 'x': observed values in [0, 1] lie outside the support of its Bernoulli",
        "pass values in its support",
    ),
    "latent": (
        [0.0, 2.0, 5.0, 1.0],
        (_gamma_model, _gamma_guide),
        "site 'rate': values in [-",
        "make the guide draw inside it",
    ),
}


@pytest.mark.parametrize("estimate", ["loss", "log_likelihood"])
@pytest.mark.parametrize("case", sorted(_OUTSIDE))
def test_values_outside_the_support_are_named_in_one_line(case, estimate):
    data, program, start, advice = _OUTSIDE[case]
    torch.manual_seed(0)
    x = torch.tensor(data)
    with pytest.raises(SupportError) as error:
        if estimate == "loss":
            IWELBO(50).differentiable_loss(*program, x)
        else:
            log_likelihood(*program, x, num_samples=50)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert message.startswith(start) and advice in message
    assert message.count("pass values") == (case == "observed")


def test_observed_nan_is_named_as_such():
    # Its range read "observed values in [nan, nan] lie outside the support".
    # (The evaluators refuse NaN data before they run the program.)
    x = torch.tensor([[0.0, 1.0, float("nan")], [1.0, 1.0, 0.0]])
    with pytest.raises(SupportError) as error:
        IWELBO(4).differentiable_loss(_bernoulli_model, _normal_guide, x)
    assert str(error.value) == (
        "site 'x': observed values include NaN; remove them from the data"
    )


def test_observed_values_in_the_support_pass():
    x = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    fine = log_likelihood(_bernoulli_model, _normal_guide, x, num_samples=4)
    assert torch.isfinite(fine).all()
