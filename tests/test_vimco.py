"""VIMCO and REINFORCE against exact gradients of a tiny discrete model (float64).

One Bernoulli latent h, q(h) = Bernoulli(logits=phi) and p(x|h) Gaussian: with k
particles there are 2^k k-tuples, so E[L_k] is an exact, differentiable function of
phi. Each of ``REPLICAS`` copies of the data point has its own phi, so one backward
pass gives that many independent gradient estimates.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate

from pyro_iwae import CIWELBO, IWELBO, MIWELBO, PIWELBO, ConfigError, log_likelihood
from pyro_iwae.infer.objectives import leave_one_out_signal

REPLICAS = 20000
X, PRIOR, LOCS, PHI = 0.8, 0.4, (-1.0, 1.5), 0.3


def model(x):
    mu = pyro.param("mu", lambda: torch.tensor(LOCS, dtype=torch.float64))
    with pyro.plate("data", x.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(x.new_tensor(PRIOR)))
        pyro.sample("x", dist.Normal(mu[h.long()], 1.0), obs=x)


def guide(x):
    phi = pyro.param("phi", lambda: x.new_full(x.shape, PHI))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("h", dist.Bernoulli(logits=phi))


def log_joint(h):
    mu = torch.tensor(LOCS, dtype=torch.float64)
    x = torch.tensor(X, dtype=torch.float64)
    prior = dist.Bernoulli(torch.tensor(PRIOR, dtype=torch.float64)).log_prob(h)
    return prior + dist.Normal(mu[h.long()], 1.0).log_prob(x)


def exact_gradient(bound, k):
    """d E[bound(log w)] / d phi, by enumerating every k-tuple of particles."""
    phi = torch.tensor(PHI, dtype=torch.float64, requires_grad=True)
    tuples = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)))
    h = tuples.T.double()  # [k, 2^k]: each column a tuple, as a batch of points
    log_q = dist.Bernoulli(logits=phi).log_prob(h)
    expected = (log_q.sum(0).exp() * bound(log_joint(h) - log_q)).sum()
    return torch.autograd.grad(expected, phi)[0]


def gradients(elbo, replicas=REPLICAS, seed=0):
    """Per-replica estimates of d bound / d phi, and the gradient in mu."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.full((replicas,), X, dtype=torch.float64)
    loss = elbo.differentiable_loss(model, guide, x)
    store = pyro.get_param_store()
    d_phi, d_mu = torch.autograd.grad(loss, [store["phi"], store["mu"]])
    return -d_phi, d_mu


def mean_and_se(t):
    return t.mean(0), t.std(0) / math.sqrt(t.shape[0])


@pytest.mark.parametrize(
    "k, vectorize", [(2, True), (2, False), (5, True)], ids=["k2", "k2-loop", "k5"]
)
def test_vimco_is_unbiased_for_the_gradient_of_the_expected_bound(k, vectorize):
    elbo = IWELBO(k, "vimco", vectorize_particles=vectorize)
    exact = exact_gradient(elbo.bound, k)
    mean, se = mean_and_se(gradients(elbo)[0])
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert abs(exact) > 10 * se  # the check has power


@pytest.mark.parametrize("k", [2, 5])
def test_reinforce_is_unbiased_and_vimco_has_far_lower_variance(k):
    exact = exact_gradient(IWELBO(k).bound, k)
    reinforce = gradients(IWELBO(k, "reinforce"))[0]
    vimco = gradients(IWELBO(k, "vimco"))[0]
    mean, se = mean_and_se(reinforce)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert vimco.var() < reinforce.var() / 10, (vimco.var(), reinforce.var())


@pytest.mark.parametrize(
    "elbo",
    [MIWELBO(2, 2, "vimco"), CIWELBO(3, 0.3, "vimco"), CIWELBO(3, 0.3, "reinforce")],
    ids=repr,
)
def test_vimco_is_unbiased_for_miwae_and_ciwae(elbo):
    exact = exact_gradient(elbo.bound, elbo.num_particles)
    mean, se = mean_and_se(gradients(elbo)[0])
    assert abs(mean - exact) < 4 * se, (mean, se, exact)


@pytest.mark.parametrize("estimator", ["vimco", "reinforce"])
def test_piwae_trains_the_model_on_iwae_and_the_guide_on_miwae(estimator):
    """Same draws for all three (2 x 3 particles)."""
    replicas = 50
    phi_pi, mu_pi = gradients(PIWELBO(3, 2, estimator), replicas)
    phi_mi, _ = gradients(MIWELBO(3, 2, estimator), replicas)
    _, mu_iw = gradients(IWELBO(6, estimator), replicas)
    assert torch.allclose(phi_pi, phi_mi)
    assert torch.allclose(mu_pi, mu_iw)


class RsampleBernoulli(dist.Bernoulli):
    """A Bernoulli that claims an rsample: IWELBO's path gradient then treats the
    sampled value as a constant, which is what VIMCO's path part must do."""

    has_rsample = True

    def rsample(self, sample_shape=()):
        return self.sample(sample_shape)


def mixed_model(x):
    a = pyro.param("a", torch.tensor([-0.5, 1.0], dtype=torch.float64))
    with pyro.plate("data", x.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(x.new_tensor(PRIOR)))
        z = pyro.sample("z", dist.Normal(a[h.long()], 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def mixed_guide(bernoulli):
    def guide(x):
        phi = pyro.param("phi", lambda: x.new_full(x.shape, PHI))
        loc = pyro.param("loc", lambda: x.new_zeros(x.shape + (2,)))
        log_scale = pyro.param("log_scale", lambda: x.new_full(x.shape, -0.3))
        with pyro.plate("data", x.shape[0]):
            h = pyro.sample("h", bernoulli(logits=phi))
            z_loc = torch.where(h.bool(), loc[..., 1], loc[..., 0])
            pyro.sample("z", dist.Normal(z_loc, log_scale.exp()))

    return guide


@pytest.mark.parametrize("estimator", ["vimco", "reinforce"])
def test_continuous_sites_of_a_mixed_guide_keep_iwelbos_path_gradient(estimator):
    """Same draws: the gradients in the continuous site's parameters and the
    model's are IWELBO's path gradient; phi's is not."""
    x = torch.linspace(-1, 2, 6, dtype=torch.float64)
    grads = {}
    for name, bernoulli, elbo in (
        ("score", dist.Bernoulli, IWELBO(5, estimator)),
        ("path", RsampleBernoulli, IWELBO(5)),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(4)
        loss = elbo.differentiable_loss(mixed_model, mixed_guide(bernoulli), x)
        store = pyro.get_param_store()
        params = [store[n].unconstrained() for n in ("a", "loc", "log_scale", "phi")]
        grads[name] = torch.autograd.grad(loss, params)
    for score, path in zip(grads["score"][:3], grads["path"][:3], strict=True):
        assert torch.allclose(score, path)
        assert score.abs().max() > 1e-3
    assert not torch.allclose(grads["score"][3], grads["path"][3])


def test_log_likelihood_and_loss_work_for_discrete_guides():
    """No gradient, no estimator needed: at the exact posterior every weight is
    p(x); from the prior the estimate converges to it."""
    x = torch.tensor([X, -0.5, 2.0], dtype=torch.float64)
    h = torch.tensor([0.0, 1.0], dtype=torch.float64)
    mu = torch.tensor(LOCS, dtype=torch.float64)
    joint = dist.Bernoulli(torch.tensor(PRIOR)).log_prob(h).unsqueeze(-1) + dist.Normal(
        mu.unsqueeze(-1), 1.0
    ).log_prob(x)
    exact = joint.logsumexp(0)  # [3]
    posterior_logit = joint[1] - joint[0]

    def exact_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("h", dist.Bernoulli(logits=posterior_logit))

    def prior_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("h", dist.Bernoulli(x.new_tensor(PRIOR)))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    assert torch.allclose(log_likelihood(model, exact_guide, x, num_samples=20), exact)
    estimate = log_likelihood(model, prior_guide, x, num_samples=20000)
    assert torch.allclose(estimate, exact, atol=0.05)
    assert IWELBO(5).loss(model, exact_guide, x) == pytest.approx(-exact.sum().item())


def test_a_zero_weight_leaves_vimcos_signals_finite():
    """A particle of zero weight (log -inf: the model gives its data no
    probability) enters the others' baselines as a zero geometric mean; the
    signals are the definition's, L - L_-i, not NaN for the whole point."""
    log_weights = torch.tensor([0.0, -math.inf, -1.0, -2.0], dtype=torch.float64)
    weights = log_weights.exp()
    expected = []
    for i in range(4):
        others = torch.cat([log_weights[:i], log_weights[i + 1 :]])
        replaced = weights.clone()
        replaced[i] = others.mean().exp()
        expected.append(weights.sum().log() - replaced.sum().log())
    signal = leave_one_out_signal(log_weights.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(signal, torch.stack(expected))


def test_errors_name_vimco():
    x = torch.full((3,), X, dtype=torch.float64)
    pyro.clear_param_store()
    for estimator in ("iwae", "stl", "dreg"):
        with pytest.raises(NotImplementedError, match="'h'.*estimator='vimco'"):
            IWELBO(5, estimator).differentiable_loss(model, guide, x)
    # A plain ValueError, where settings that do not fit each other are a
    # ConfigError (a PyroIwaeError and a ValueError) throughout the library.
    for make in (lambda: IWELBO(1, "vimco"), lambda: MIWELBO(1, 4, "vimco")):
        with pytest.raises(ConfigError) as refused:
            make()
        assert str(refused.value) == (
            "estimator='vimco' needs at least 2 particles per bound for its "
            "leave-one-out baseline, got 1; pass num_particles=2 or more, or "
            "another estimator"
        )
    # A guide without discrete sites gets the plain path gradient.
    assert IWELBO(1, "reinforce").num_particles == 1


def prior_model(x):
    """h left to a prior with trainable logits theta: the proposal is p(h)."""
    theta = pyro.param("theta", lambda: x.new_full(x.shape, PHI))
    with pyro.plate("data", x.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(logits=theta))
        pyro.sample("x", dist.Normal(x.new_tensor(LOCS)[h.long()], 1.0), obs=x)


def no_guide(x):
    pass


def exact_prior_gradient(bound, k):
    """d E[bound(log w)] / d theta with h ~ p(h; theta), log w = log p(x | h)."""
    theta = torch.tensor(PHI, dtype=torch.float64, requires_grad=True)
    h = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k))).T.double()
    log_prior = dist.Bernoulli(logits=theta).log_prob(h)
    mu = torch.tensor(LOCS, dtype=torch.float64)
    log_w = dist.Normal(mu[h.long()], 1.0).log_prob(torch.tensor(X).double())
    expected = (log_prior.sum(0).exp() * bound(log_w)).sum()
    return torch.autograd.grad(expected, theta)[0]


@pytest.mark.parametrize("estimator", ["vimco", "reinforce"])
def test_a_discrete_site_left_to_a_trainable_prior_gets_the_score_gradient(estimator):
    """With the score-function estimators, the prior of a site the guide does not
    sample is part of the proposal: its parameters get the exact gradient of the
    expected bound in mean (enumerated over the 2^k tuples)."""
    k = 3
    elbo = IWELBO(k, estimator)
    exact = exact_prior_gradient(elbo.bound, k)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.full((REPLICAS,), X, dtype=torch.float64)
    loss = elbo.differentiable_loss(prior_model, no_guide, x)
    (d_theta,) = torch.autograd.grad(-loss, [pyro.param("theta").unconstrained()])
    mean, se = mean_and_se(d_theta)
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert abs(exact) > 10 * se  # the check has power
    # The other estimators refuse it, naming the way out.
    pyro.clear_param_store()
    with pytest.raises(NotImplementedError, match="'h'.*estimator='vimco'"):
        IWELBO(k, "dreg").differentiable_loss(prior_model, no_guide, x[:3])


GLOBAL_X = (0.8, -0.3, 1.9)


def global_model(x):
    b = pyro.sample("b", dist.Bernoulli(x.new_tensor(PRIOR)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(x.new_tensor(LOCS)[b.long()], 1.0), obs=x)


def global_guide(x):
    pyro.sample("b", dist.Bernoulli(logits=pyro.param("phi", x.new_tensor(PHI))))


def exact_global_gradient():
    """d/d phi of the ELBO in the global b: sum over b of q(b) (log p(b, x) -
    log q(b))."""
    phi = torch.tensor(PHI, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x = torch.tensor(GLOBAL_X, dtype=torch.float64)
    q = dist.Bernoulli(logits=phi)
    log_joint = dist.Bernoulli(torch.tensor(PRIOR, dtype=torch.float64)).log_prob(
        b
    ) + dist.Normal(torch.tensor(LOCS).double()[b.long()].unsqueeze(-1), 1.0).log_prob(
        x
    ).sum(-1)
    elbo = (q.log_prob(b).exp() * (log_joint - q.log_prob(b))).sum()
    return torch.autograd.grad(elbo, phi)[0]


def assert_global_gradient(elbo, num_draws):
    """Checks that ``elbo``'s gradient in phi has the exact mean over
    ``num_draws`` draws; returns its variance."""
    x = torch.tensor(GLOBAL_X, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    draws = []
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(global_model, global_guide, x)
        (d_phi,) = torch.autograd.grad(-loss, [pyro.param("phi").unconstrained()])
        draws.append(d_phi)
    mean, se = mean_and_se(torch.stack(draws))
    exact = exact_global_gradient()
    assert abs(mean - exact) < 4 * se, (mean, se, exact)
    assert abs(exact) > 6 * se  # the check has power
    return torch.stack(draws).var()


def test_a_global_guide_site_marked_for_enumeration_is_sampled():
    """Marked for parallel enumeration, the global guide site of a factored bound
    is drawn as if unmarked (one draw for the particles): each loss is the one
    of the value drawn, -(log p(b, x) - log q(b)), not the ELBO's sum over b."""
    x = torch.tensor(GLOBAL_X, dtype=torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    marked = config_enumerate(global_guide, "parallel")
    elbo = IWELBO(3, "vimco", global_latents="factor")
    with torch.no_grad():
        losses = {round(elbo.loss(global_model, marked, x), 9) for _ in range(30)}
    q = dist.Bernoulli(logits=torch.tensor(PHI, dtype=torch.float64))
    prior = dist.Bernoulli(torch.tensor(PRIOR, dtype=torch.float64))
    per_value = set()
    for b in (0.0, 1.0):
        b = torch.tensor(b, dtype=torch.float64)
        log_x = dist.Normal(torch.tensor(LOCS).double()[b.long()], 1.0).log_prob(x)
        log_w = prior.log_prob(b) + log_x.sum() - q.log_prob(b)
        per_value.add(round(-log_w.item(), 9))
    assert losses == per_value


def test_a_discrete_global_site_gets_the_score_gradient_of_its_elbo():
    """A global Bernoulli in the guide under global_latents='factor': one draw for
    all particles, whose score-function gradient has the ELBO's exact mean (with
    one draw, vimco's and reinforce's global terms are the same)."""
    x = torch.tensor(GLOBAL_X, dtype=torch.float64)
    assert_global_gradient(IWELBO(3, "vimco", global_latents="factor"), 1500)
    # A plain estimator is refused.
    with pytest.raises(NotImplementedError, match="'b'.*vimco"):
        IWELBO(3, global_latents="factor").differentiable_loss(
            global_model, global_guide, x
        )


def test_miwelbo_groups_draw_a_discrete_global_site_each_with_its_own_signal():
    """MIWELBO(3, 4) draws the global Bernoulli once per group: each draw's score
    gradient has its own group's term as signal (vimco: less the mean of the other
    groups' terms), whose mean is the ELBO's exact gradient; the baseline lowers
    its variance (by 14x here)."""
    variances = {
        estimator: assert_global_gradient(
            MIWELBO(3, 4, estimator, global_latents="factor"), 300
        )
        for estimator in ("vimco", "reinforce")
    }
    assert variances["vimco"] < variances["reinforce"] / 4, variances


def test_miwelbo_global_score_gradient_is_the_same_with_sequential_particles():
    """Particles drawn one run at a time give the vectorized draws' gradient."""
    x = torch.tensor(GLOBAL_X, dtype=torch.float64)
    grads = []
    for vectorize in (True, False):
        elbo = MIWELBO(
            3, 4, "vimco", global_latents="factor", vectorize_particles=vectorize
        )
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        draws = []
        for _ in range(10):
            loss = elbo.differentiable_loss(global_model, global_guide, x)
            phi = pyro.param("phi").unconstrained()
            draws.append(torch.autograd.grad(-loss, [phi])[0])
        grads.append(torch.stack(draws))
    assert grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0])
