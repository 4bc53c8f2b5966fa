"""IWELBO against the exact answers of a linear-Gaussian model (float64, seeded)."""

import math

import numpy
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LATENT_DIM, SIGMA, LinearGaussian, PriorSiteModel
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.nn import PyroModule, PyroParam

from pyro_iwae import (
    CIWELBO,
    IWELBO,
    MIWELBO,
    PIWELBO,
    make_objective,
    paper_architecture,
)
from pyro_iwae.errors import ParticleBroadcastError, PlateNestingError, ProgramError
from pyro_iwae.infer import particles as particle_draws
from pyro_iwae.infer import traces
from pyro_iwae.infer.traces import PARTICLE_PLATE as PLATE


def bound(elbo, model, guide, *args):
    """Per-point L_k, shape [batch]."""
    particles = elbo.particles(model, guide, *args)
    return (particles.log_weights.logsumexp(0) - math.log(elbo.num_particles)).reshape(
        -1
    )


def mean_and_se(t):
    return t.mean(0), t.std(0) / math.sqrt(t.shape[0])


@pytest.mark.parametrize("k", [1, 10, 1000])
@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_exact_posterior_bound_is_log_marginal(lg, k, estimator):
    x = lg.sample_data(5)
    elbo = IWELBO(k, estimator)
    assert torch.allclose(bound(elbo, lg.model, lg.exact_guide, x), lg.log_marginal(x))
    loss = elbo.loss(lg.model, lg.exact_guide, x)
    assert loss == pytest.approx(-lg.log_marginal(x).sum().item(), rel=1e-10)


def test_bound_rises_with_k_and_stays_below_log_marginal(lg):
    replicas = 2000
    x = lg.sample_data(1).expand(replicas, -1)
    guide = lg.diagonal_guide(shift=1.0, inflate=1.5)
    gaps = {}
    for k in (1, 10, 1000):
        gap = lg.log_marginal(x) - bound(IWELBO(k), lg.model, guide, x)
        gaps[k] = mean_and_se(gap)
    for small, large in ((1, 10), (10, 1000)):
        (m1, s1), (m2, s2) = gaps[small], gaps[large]
        assert m1 - m2 > 5 * math.hypot(s1, s2), (small, large, gaps)
    mean, se = gaps[1000]
    assert mean > -3 * se  # E[L_k] <= log p(x)
    assert mean > 0  # and a gap remains at this guide


def test_vectorized_and_sequential_particles_agree(lg):
    x = lg.sample_data(3)
    k = 4
    values = torch.randn(k, 3, LATENT_DIM, dtype=torch.float64)
    calls = iter(range(k))

    def vectorized_guide(data):
        # As many of the values as the particle plate around it has particles
        # (the check that only the particles' dim follows their number runs it
        # with another number).
        (plate,) = [f for f in poutine.runtime.get_plates() if f.name == PLATE]
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Delta(values[: plate.size], event_dim=1))

    def sequential_guide(data):
        i = next(calls)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Delta(values[i], event_dim=1))

    W = lg.W.clone().requires_grad_()

    def model(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Normal(data.new_zeros(LATENT_DIM), 1).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, 0.7).to_event(1), obs=data)

    loss_vec = IWELBO(k, vectorize_particles=True).differentiable_loss(
        model, vectorized_guide, x
    )
    (grad_vec,) = torch.autograd.grad(loss_vec, W)
    loss_seq = IWELBO(k, vectorize_particles=False).differentiable_loss(
        model, sequential_guide, x
    )
    (grad_seq,) = torch.autograd.grad(loss_seq, W)
    assert torch.allclose(loss_vec, loss_seq)
    assert torch.allclose(grad_vec, grad_seq)


def per_point_guide(lg, replicas, shift=0.3, inflate=1.2):
    """A guide with its own parameters for each data point, so that one backward
    pass gives `replicas` independent gradient estimates."""

    def guide(data):
        loc = pyro.param("loc", lambda: lg.post_loc(data) + shift)
        log_scale = pyro.param(
            "log_scale",
            lambda: (
                (inflate * lg.post_cov.diagonal().sqrt())
                .log()
                .expand(replicas, LATENT_DIM)
                .clone()
            ),
        )
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return guide


def guide_gradients(lg, k, estimator, replicas=2000, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = lg.sample_data(1).expand(replicas, -1)
    guide = per_point_guide(lg, replicas, **kwargs)
    loss = IWELBO(k, estimator).differentiable_loss(lg.model, guide, x)
    store = pyro.get_param_store()
    grads = torch.autograd.grad(loss, [store["loc"], store["log_scale"]])
    return torch.cat(grads, -1)  # [replicas, 2 * LATENT_DIM]


def test_dreg_is_unbiased_for_the_iwae_gradient_with_lower_variance(lg):
    k = 50
    iwae, dreg = guide_gradients(lg, k, "iwae"), guide_gradients(lg, k, "dreg")
    (m_i, s_i), (m_d, s_d) = mean_and_se(iwae), mean_and_se(dreg)
    assert ((m_i - m_d).abs() < 4 * (s_i**2 + s_d**2).sqrt()).all(), (m_i, m_d)
    assert (dreg.var(0) < iwae.var(0) / 100).all()


def test_stl_is_unbiased_at_k1_and_biased_at_k50(lg):
    iwae, stl = guide_gradients(lg, 1, "iwae"), guide_gradients(lg, 1, "stl")
    (m_i, s_i), (m_s, s_s) = mean_and_se(iwae), mean_and_se(stl)
    assert ((m_i - m_s).abs() < 4 * (s_i**2 + s_s**2).sqrt()).all()
    assert (stl.var(0) < iwae.var(0)).all()
    iwae, stl = guide_gradients(lg, 50, "iwae"), guide_gradients(lg, 50, "stl")
    (m_i, s_i), (m_s, s_s) = mean_and_se(iwae), mean_and_se(stl)
    assert ((m_i - m_s).abs() > 10 * (s_i**2 + s_s**2).sqrt()).any()


def loss_and_gradients(lg, elbo, model, guide, x):
    """Seeded loss and its gradient in (W, the guide's loc and log_scale)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    W = lg.W
    lg.W = W.clone().requires_grad_()
    try:
        loss = elbo.differentiable_loss(model, guide, x)
        store = pyro.get_param_store()
        return loss, torch.autograd.grad(loss, [lg.W, store["loc"], store["log_scale"]])
    finally:
        lg.W = W


def test_k1_equals_trace_elbo_in_value_and_gradient(lg):
    x = lg.sample_data(4)
    guide = per_point_guide(lg, 4)
    loss_iw, grads_iw = loss_and_gradients(lg, IWELBO(1), lg.model, guide, x)
    loss_tr, grads_tr = loss_and_gradients(lg, Trace_ELBO(), lg.model, guide, x)
    assert torch.allclose(loss_iw, loss_tr)
    for a, b in zip(grads_iw, grads_tr, strict=True):
        assert torch.allclose(a, b)


def test_subsampled_bound_is_scaled_batch_bound(lg):
    data = lg.sample_data(100)
    idx = torch.tensor([3, 17, 42, 99])
    guide = lg.diagonal_guide()
    pyro.set_rng_seed(5)
    sub = IWELBO(10).loss(lg.model, guide, data, idx)
    pyro.set_rng_seed(5)
    batch = IWELBO(10).loss(lg.model, guide, data[idx])
    assert sub == pytest.approx(100 / 4 * batch, rel=1e-10)


@pytest.mark.parametrize("vectorize", [True, False])
def test_particles_weigh_the_same_random_sub_sample(lg, vectorize):
    """A plate that draws its own sub-sample draws it once for all k particles,
    also when they are drawn one run at a time: at the exact posterior the bound
    is then (N / M) times the sub-sample's log p(x) on every draw (with a
    sub-sample per particle, the logsumexp would mix points)."""
    data = lg.sample_data(40)
    tril = torch.linalg.cholesky(lg.post_cov)

    def model(data):
        with pyro.plate("data", len(data), subsample_size=3) as i:
            z = pyro.sample(
                "z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            )
            pyro.sample(
                "x", dist.Normal(z @ lg.W.T + lg.b, SIGMA).to_event(1), obs=data[i]
            )

    def guide(data):
        with pyro.plate("data", len(data), subsample_size=3) as i:
            pyro.sample(
                "z", dist.MultivariateNormal(lg.post_loc(data[i]), scale_tril=tril)
            )

    elbo = IWELBO(4, vectorize_particles=vectorize)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        particles = elbo.particles(model, guide, data)
        # the points each particle weighed, from its observed site's value
        (idx,) = {
            tuple(
                torch.cdist(model_trace.nodes["x"]["value"], data).argmin(-1).tolist()
            )
            for model_trace, _ in particles.traces
        }
        pyro.set_rng_seed(seed)
        loss = elbo.loss(model, guide, data)
        exact = 40 / 3 * lg.log_marginal(data[list(idx)]).sum()
        assert loss == pytest.approx(-exact.item(), rel=1e-10)


def test_poutine_scale_multiplies_the_bound(lg):
    x = lg.sample_data(4)
    guide = lg.diagonal_guide()
    pyro.set_rng_seed(5)
    plain = IWELBO(10).loss(lg.model, guide, x)
    pyro.set_rng_seed(5)
    scaled = IWELBO(10).loss(
        poutine.scale(lg.model, scale=3.0), poutine.scale(guide, scale=3.0), x
    )
    assert scaled == pytest.approx(3 * plain, rel=1e-10)


def test_pyro_renyi_elbo_is_wrong_under_subsampling_where_iwelbo_is_right(lg):
    """Pyro's RenyiELBO(alpha=0) puts the sub-sample scale inside the logsumexp and
    joins the batch: its "bound" lies far above log p(x). This is why we exist."""
    data, idx = lg.sample_data(100, seed=3), torch.tensor([0, 1])
    exact = (100 / 2 * lg.log_marginal(data[idx]).sum()).item()
    renyi, iwelbo = [], []
    for seed in range(50):
        pyro.set_rng_seed(seed)
        renyi_elbo = RenyiELBO(
            alpha=0, num_particles=50, vectorize_particles=True, max_plate_nesting=1
        )
        renyi.append(-renyi_elbo.loss(lg.model, lg.diagonal_guide(), data, idx))
        pyro.set_rng_seed(seed)
        iwelbo.append(-IWELBO(50).loss(lg.model, lg.diagonal_guide(), data, idx))
    m_r, s_r = mean_and_se(torch.tensor(renyi))
    m_i, s_i = mean_and_se(torch.tensor(iwelbo))
    assert m_r > exact + 5 * s_r  # not a lower bound
    assert m_i < exact + 3 * s_i  # a lower bound


class LocNet(torch.nn.Module):
    """q(z|x) = N(A x + c, s): an nn.Module guide, no Pyro parameters."""

    def __init__(self, lg, shift=0.0):
        super().__init__()
        self.linear = torch.nn.Linear(3, LATENT_DIM).double()
        with torch.no_grad():
            self.linear.weight.copy_(lg.A)
            self.linear.bias.copy_(-lg.A @ lg.b + shift)
        tril = torch.linalg.cholesky(lg.post_cov)
        self.off_diagonal = torch.nn.Parameter(tril.tril(-1))
        self.log_diagonal = torch.nn.Parameter(tril.diagonal().log())

    def forward(self, data):
        tril = self.off_diagonal.tril(-1) + self.log_diagonal.exp().diag_embed()
        with pyro.plate("data", data.shape[0]):
            pyro.sample(
                "z", dist.MultivariateNormal(self.linear(data), scale_tril=tril)
            )


class PyroLocNet(PyroModule):
    def __init__(self, lg):
        super().__init__()
        self.A = PyroParam(lg.A.clone())
        self.c = PyroParam(-lg.A @ lg.b)
        self.tril = PyroParam(
            torch.linalg.cholesky(lg.post_cov), dist.constraints.lower_cholesky
        )

    def forward(self, data):
        with pyro.plate("data", data.shape[0]):
            loc = data @ self.A.T + self.c
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=self.tril))


def param_guide(lg):
    def guide(data):
        A = pyro.param("A", lg.A.clone())
        c = pyro.param("c", -lg.A @ lg.b)
        tril = pyro.param(
            "tril", torch.linalg.cholesky(lg.post_cov), dist.constraints.lower_cholesky
        )
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(data @ A.T + c, scale_tril=tril))

    return guide


@pytest.mark.parametrize("kind", ["nn.Module", "PyroModule", "pyro.param"])
def test_stl_and_dreg_guide_gradients_vanish_at_the_exact_posterior(lg, kind):
    """At q = p(z|x) every log-weight equals log p(x): the STL and DReG guide gradients
    are exactly zero, the plain one is not (its score term is only zero in mean).
    A guide whose parameters were not stopped would give the plain gradient."""
    x = lg.sample_data(8)
    grads = {}
    for estimator in ("iwae", "stl", "dreg"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = {"nn.Module": LocNet, "PyroModule": PyroLocNet}.get(kind, param_guide)(
            lg
        )
        loss = IWELBO(10, estimator).differentiable_loss(lg.model, guide, x)
        if isinstance(guide, torch.nn.Module):
            params = list(guide.parameters())
        else:
            params = [p.unconstrained() for p in pyro.get_param_store().values()]
        grads[estimator] = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss, params)]
        )
    assert grads["iwae"].abs().max() > 1e-2
    assert grads["stl"].abs().max() < 1e-8
    assert grads["dreg"].abs().max() < 1e-8


def test_dreg_matches_hand_derived_gradient_for_a_two_layer_guide():
    """Hierarchical guide q(z1|x) q(z2|z1): DReG's guide gradient is
    sum_i w_i^2 d log w_i / d phi along the reparameterized path, with log q at
    stopped phi; checked against a hand-written implementation."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, dtype=torch.float64)
    a = pyro.param("a", torch.tensor(0.7, dtype=torch.float64)).unconstrained()
    c = pyro.param("c", torch.tensor(-0.4, dtype=torch.float64)).unconstrained()

    def model(data):
        with pyro.plate("data", 3):
            z2 = pyro.sample(
                "z2", dist.Normal(torch.zeros(2, dtype=torch.float64), 1).to_event(1)
            )
            z1 = pyro.sample("z1", dist.Normal(z2, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z1, 0.5).to_event(1), obs=data)

    def q(a, c, data, eps1, eps2):
        """Returns z1, z2 and log q at the given parameters."""
        z1 = a * data + 0.8 * eps1
        z2 = c * z1 + 0.6 * eps2
        return z1, z2

    def guide(data):
        a, c = pyro.param("a"), pyro.param("c")
        with pyro.plate("data", 3):
            z1 = pyro.sample("z1", dist.Normal(a * data, 0.8).to_event(1))
            pyro.sample("z2", dist.Normal(c * z1, 0.6).to_event(1))

    k = 7
    pyro.set_rng_seed(1)
    loss = IWELBO(k, "dreg").differentiable_loss(model, guide, x)
    got = torch.autograd.grad(loss, [a, c])

    pyro.set_rng_seed(1)
    trace = poutine.trace(
        pyro.plate("num_particles_vectorized", k, dim=-2)(guide)
    ).get_trace(x)
    z1 = trace.nodes["z1"]["value"]
    z2 = trace.nodes["z2"]["value"]
    eps1 = ((z1 - a * x) / 0.8).detach()
    eps2 = ((z2 - c * z1) / 0.6).detach()
    z1, z2 = q(a, c, x, eps1, eps2)
    a0, c0 = a.detach(), c.detach()
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z2).sum(-1)
        + dist.Normal(z2, 1.0).log_prob(z1).sum(-1)
        + dist.Normal(z1, 0.5).log_prob(x).sum(-1)
        - dist.Normal(a0 * x, 0.8).log_prob(z1).sum(-1)
        - dist.Normal(c0 * z1, 0.6).log_prob(z2).sum(-1)
    )
    w = log_w.detach().softmax(0)
    expected = torch.autograd.grad(-(w**2 * log_w).sum(), [a, c])
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e)


def test_svi_and_elbo_module_train(lg):
    x = lg.sample_data(50)
    target = -lg.log_marginal(x).sum().item()
    guide = param_guide(lg)
    pyro.param("c", -lg.A @ lg.b + 1.0)  # start away from the posterior
    svi = SVI(lg.model, guide, pyro.optim.Adam({"lr": 0.05}), IWELBO(5, "dreg"))
    first = svi.evaluate_loss(x)
    for _ in range(200):
        svi.step(x)
    last = IWELBO(100).loss(lg.model, guide, x)
    assert first - target > 10
    assert last - target < 1.0

    module = IWELBO(5)(LinearGaussianModule(lg), LocNet(lg, shift=1.0))
    optim = torch.optim.Adam(module.parameters(), lr=0.05)
    start = module(x).item()
    for _ in range(200):
        optim.zero_grad()
        module(x).backward()
        optim.step()
    assert module(x).item() < start - 10


class LinearGaussianModule(torch.nn.Module):
    def __init__(self, lg):
        super().__init__()
        self.lg = lg

    def forward(self, data):
        self.lg.model(data)


def test_errors_are_clear(lg):
    x = lg.sample_data(4)
    with pytest.raises(ValueError, match="unknown estimator"):
        IWELBO(5, "nvil")
    with pytest.raises(ValueError, match="num_particles"):
        IWELBO(0)

    def discrete_guide(data):
        with pyro.plate("data", 4):
            pyro.sample(
                "z", dist.Bernoulli(0.5 * data.new_ones(LATENT_DIM)).to_event(1)
            )

    with pytest.raises(NotImplementedError, match="rsample; use estimator='vimco'"):
        IWELBO(5).differentiable_loss(lg.model, discrete_guide, x)

    def global_model(data, idx=None):
        w = pyro.sample("w", dist.Normal(data.new_zeros(()), 1.0))
        with pyro.plate("data", 100, subsample=idx) as i:
            loc = w.unsqueeze(-1).expand(w.shape + (3,))
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=data[i])

    def global_guide(data, idx=None):
        pyro.sample("w", dist.Normal(data.new_zeros(()), 1.0))
        with pyro.plate("data", 100, subsample=idx):
            pass

    data = lg.sample_data(100)
    joint = IWELBO(5, global_latents="joint")
    with pytest.raises(ValueError, match="cannot sub-sample plate 'data'.*factor"):
        joint.loss(global_model, global_guide, data, torch.arange(10))
    # without sub-sampling, a global latent gives the joint bound
    assert math.isfinite(joint.loss(global_model, global_guide, data))
    with pytest.raises(ValueError, match="unknown global_latents"):
        IWELBO(5, global_latents="shared")

    def scaled_observation(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            )
            with poutine.scale(scale=2.0):
                pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data[:, :2])
            pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=data[:, 2])

    with pytest.raises(ValueError, match="one scale for the observed sites.*'x'"):
        IWELBO(5).loss(scaled_observation, lg.diagonal_guide(), x)


@pytest.mark.parametrize(
    "elbo", [MIWELBO(4, 3), CIWELBO(10, beta=0.3), PIWELBO(4, 3)], ids=repr
)
def test_rainforth_bounds_at_the_exact_posterior_are_log_marginal(lg, elbo):
    x = lg.sample_data(5)
    assert elbo.loss(lg.model, lg.exact_guide, x) == pytest.approx(
        -lg.log_marginal(x).sum().item(), rel=1e-10
    )


def test_miwae_and_ciwae_combine_the_same_log_weights(lg):
    x = lg.sample_data(3)
    guide = lg.diagonal_guide()
    pyro.set_rng_seed(2)
    log_w = IWELBO(12).particles(lg.model, guide, x).log_weights
    grouped = log_w.reshape(4, 3, 1, 3)
    miwae = (grouped.logsumexp(1) - math.log(3)).mean(0).sum()
    iwae = (log_w.logsumexp(0) - math.log(12)).sum()
    ciwae = 0.3 * log_w.mean(0).sum() + 0.7 * iwae
    for elbo, expected in ((MIWELBO(3, 4), miwae), (CIWELBO(12, 0.3), ciwae)):
        pyro.set_rng_seed(2)
        assert elbo.loss(lg.model, guide, x) == pytest.approx(-expected.item())
    pyro.set_rng_seed(2)
    assert PIWELBO(3, 4).loss(lg.model, guide, x) == pytest.approx(-iwae.item())


def test_miwae_has_the_expectation_of_iwae_with_k_particles(lg):
    replicas = 2000
    x = lg.sample_data(1).expand(replicas, -1)
    guide = lg.diagonal_guide(shift=1.0)
    gaps = {}
    for name, elbo in (("iwae5", IWELBO(5)), ("miwae", MIWELBO(5, 4))):
        particles = elbo.particles(lg.model, guide, x)
        gaps[name] = mean_and_se(elbo.bound(particles.log_weights).reshape(-1))
    (m1, s1), (m2, s2) = gaps["iwae5"], gaps["miwae"]
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2)


def model_and_guide_gradients(lg, elbo, replicas=1000):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = lg.sample_data(1).expand(replicas, -1)
    guide = per_point_guide(lg, replicas)
    W = lg.W
    lg.W = W.clone().requires_grad_()
    try:
        loss = elbo.differentiable_loss(lg.model, guide, x)
        store = pyro.get_param_store()
        grads = torch.autograd.grad(loss, [lg.W, store["loc"], store["log_scale"]])
    finally:
        lg.W = W
    return grads[0], torch.cat(grads[1:], -1)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_piwae_trains_the_model_on_iwae_and_the_guide_on_miwae(lg, estimator):
    """Same draws for all three (4 x 5 particles): PIWAE's model gradient is
    IWAE(20)'s, its guide gradient MIWAE(4, 5)'s."""
    model_pi, guide_pi = model_and_guide_gradients(lg, PIWELBO(5, 4, estimator))
    model_iw, _ = model_and_guide_gradients(lg, IWELBO(20, estimator))
    _, guide_mi = model_and_guide_gradients(lg, MIWELBO(5, 4, estimator))
    assert torch.allclose(model_pi, model_iw)
    assert torch.allclose(guide_pi, guide_mi)


@pytest.mark.parametrize("elbo", ["miwae", "ciwae"])
def test_dreg_is_unbiased_with_lower_variance_for_miwae_and_ciwae(lg, elbo):
    def make(estimator):
        if elbo == "miwae":
            return MIWELBO(10, 3, estimator)
        return CIWELBO(30, 0.2, estimator)

    _, plain = model_and_guide_gradients(lg, make("iwae"), replicas=2000)
    _, dreg = model_and_guide_gradients(lg, make("dreg"), replicas=2000)
    (m_p, s_p), (m_d, s_d) = mean_and_se(plain), mean_and_se(dreg)
    assert ((m_p - m_d).abs() < 4 * (s_p**2 + s_d**2).sqrt()).all(), (m_p, m_d)
    assert (dreg.var(0) < plain.var(0) / 10).all()


def test_rainforth_bounds_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_groups"):
        MIWELBO(8, 0)
    with pytest.raises(ValueError, match="beta"):
        CIWELBO(8, beta=1.5)


def test_numpy_integers_count_particles_as_ints_do(lg):
    """A count from numpy (a grid of k, say) is an integer like any other: the
    same seeded loss as the int; a bool or a float is refused in one line."""
    x = lg.sample_data(4)
    guide = lg.diagonal_guide()
    for make in (
        lambda k: IWELBO(k, "dreg"),
        lambda k: MIWELBO(k, num_groups=numpy.int64(2)),
        lambda k: make_objective("piwae", k, estimator="dreg", num_groups=2),
    ):
        losses = []
        for k in (3, numpy.int64(3)):
            pyro.set_rng_seed(0)
            losses.append(make(k).loss(lg.model, guide, x))
        assert losses[0] == losses[1]
    with pytest.raises(ValueError, match=r"got 5.0 \(float\); pass num_particles=5"):
        IWELBO(5.0)
    with pytest.raises(ValueError, match=r"num_groups must be .* got True \(bool\)"):
        MIWELBO(4, num_groups=True)


def test_an_estimator_in_the_second_argument_of_a_grouped_bound_is_named():
    # CIWELBO(4, "dreg"), as IWELBO(5, "dreg") is written, raised a raw TypeError
    # ("'<=' not supported between ... 'float' and 'str'"); MIWELBO gave no hint.
    for cls, name, kind in (
        (CIWELBO, "beta", "a number in [0, 1]"),
        (MIWELBO, "num_groups", "an integer >= 1"),
        (PIWELBO, "num_groups", "an integer >= 1"),
    ):
        with pytest.raises(ValueError) as refused:
            cls(4, "dreg")
        assert str(refused.value) == (
            f"{name} must be {kind}, got 'dreg' (str); the second argument of "
            f"{cls.__name__} is {name}: pass estimator='dreg' by name"
        )
    for beta in (None, [0.5], True):
        with pytest.raises(ValueError) as refused:
            CIWELBO(4, beta)
        kind = type(beta).__name__
        assert str(refused.value) == (
            f"beta must be a number in [0, 1], got {beta!r} ({kind})"
        )
    assert CIWELBO(4, torch.tensor(0.25)).beta == 0.25


def test_particles_whose_iwae_weights_underflow_pass_no_gradient():
    """Log-weights thousands of nats apart underflow most particles' IWAE weights
    in float32: those pass no guide gradient under PIWAE (it was inf * 0 = NaN
    for all), whose model gradient is still IWELBO's, nor under CIWAE's DReG at
    beta = 0 (0/0)."""

    def model(x):
        shift = pyro.param("shift", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + shift, 0.01), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0))

    x = torch.tensor([2.5, -1.0, 0.5])
    for estimator in ("iwae", "dreg"):
        grads = []
        for elbo in (PIWELBO(4, 2, estimator), IWELBO(8, estimator)):
            pyro.set_rng_seed(0)
            loss = elbo.differentiable_loss(model, guide, x)
            params = [pyro.param("shift"), pyro.param("loc")]
            grads.append(torch.autograd.grad(loss, params))
        (shift, loc), (iwae_shift, _) = grads
        assert torch.isfinite(loc) and loc != 0
        assert torch.allclose(shift, iwae_shift)
    # CIWAE at beta = 0 is IWAE: DReG's factor there was 0/0 for those particles
    grads = []
    for elbo in (CIWELBO(8, 0.0, "dreg"), IWELBO(8, "dreg")):
        pyro.set_rng_seed(0)
        loss = elbo.differentiable_loss(model, guide, x)
        grads.append(torch.autograd.grad(loss, [pyro.param("loc")])[0])
    assert torch.isfinite(grads[0]) and torch.allclose(*grads)


def test_nan_loss_warns_where_the_value_is_read():
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.full_like(x, float("nan")), 1.0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.zeros(3)
    with pyro.validation_enabled(False):
        with pytest.warns(UserWarning, match="NaN"):
            IWELBO(4).loss(model, guide, x)
        # The differentiable loss does not read its value back (no device sync).
        assert torch.isnan(IWELBO(4).differentiable_loss(model, guide, x))


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
@pytest.mark.parametrize("kind", ["paper", "PyroModule", "pyro.param"])
def test_one_latent_site_detaches_instead_of_rerunning_the_guide(
    lg, monkeypatch, estimator, kind
):
    """With one latent site, stl and dreg detach the site's distribution instead of
    re-running the guide with stopped parameters: same loss, same gradients."""
    if kind == "paper":
        model, guide = paper_architecture(1)
        x = torch.rand(6, 784, generator=torch.Generator().manual_seed(0)) < 0.3
        x = x.float()
    else:
        model, x = lg.model, lg.sample_data(6)

    def loss_and_grads():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        made = {"PyroModule": PyroLocNet, "pyro.param": param_guide}
        this_guide = guide if kind == "paper" else made[kind](lg)
        loss = IWELBO(7, estimator).differentiable_loss(model, this_guide, x)
        if isinstance(this_guide, torch.nn.Module):
            params = list(this_guide.parameters())
        else:
            params = [p.unconstrained() for p in pyro.get_param_store().values()]
        return loss, torch.autograd.grad(loss, params)

    fast_loss, fast_grads = loss_and_grads()
    monkeypatch.setattr(
        particle_draws, "detached_distribution", lambda fn: None
    )  # force re-runs
    rerun_loss, rerun_grads = loss_and_grads()
    assert torch.equal(fast_loss, rerun_loss)
    for fast, rerun in zip(fast_grads, rerun_grads, strict=True):
        assert torch.allclose(fast, rerun, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 0 for g in fast_grads)


def test_distributions_holding_transforms_are_not_detached():
    base = dist.Normal(torch.zeros(3), torch.ones(3))
    flow = dist.TransformedDistribution(base, [dist.transforms.ExpTransform()])
    assert traces.detached_distribution(flow) is None
    detached = traces.detached_distribution(
        dist.Normal(torch.zeros(3, requires_grad=True), 1.0).to_event(1)
    )
    assert not detached.base_dist.loc.requires_grad


@pytest.mark.parametrize("kind", ["bernoulli", "normal"])
def test_latent_sites_left_to_the_prior_cancel_from_the_weights(lg, kind):
    """u is drawn from its prior during replay, so p(u) is part of the proposal:
    log w = log p(x | z, u) + log p(z) - log q(z), whatever u's value."""
    m = PriorSiteModel(lg, kind)
    x = lg.sample_data(4)
    particles = IWELBO(3).particles(m.model, lg.exact_guide, x)
    model_trace, guide_trace = particles.traces[0]
    z, u = model_trace.nodes["z"]["value"], model_trace.nodes["u"]["value"]
    loc = z @ lg.W.T + lg.b + u.unsqueeze(-1) * m.c
    expected = (
        dist.Normal(loc, SIGMA).to_event(1).log_prob(x)
        + dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1).log_prob(z)
        - guide_trace.nodes["z"]["fn"].log_prob(z)
    )
    assert torch.allclose(particles.log_weights.reshape(3, 4), expected)


@pytest.mark.filterwarnings("ignore:Found vars in model but not guide")
def test_k1_with_a_prior_site_has_trace_elbos_gradient_and_drops_log_p_u(lg):
    """Trace_ELBO counts log p(u) of a model-only site in its value; it has no
    gradient here (u's prior is fixed), so the gradients agree."""
    m = PriorSiteModel(lg, "normal")
    x = lg.sample_data(4)
    guide = per_point_guide(lg, 4)
    loss_iw, grads_iw = loss_and_gradients(lg, IWELBO(1), m.model, guide, x)
    loss_tr, grads_tr = loss_and_gradients(lg, Trace_ELBO(), m.model, guide, x)
    pyro.set_rng_seed(3)
    pyro.clear_param_store()
    model_trace = IWELBO(1).particles(m.model, guide, x).traces[0][0]
    u = model_trace.nodes["u"]["value"]
    log_p_u = dist.Normal(0.0, 1.0).log_prob(u).sum()
    assert torch.allclose(loss_iw - loss_tr, log_p_u.detach())
    for a, b in zip(grads_iw, grads_tr, strict=True):
        assert torch.allclose(a, b)


def test_a_trainable_prior_site_without_rsample_is_refused_for_gradients(lg):
    x = lg.sample_data(4)
    m = PriorSiteModel(lg, "bernoulli")
    model = m.model
    m.prior = lambda data: dist.Bernoulli(
        logits=pyro.param("logit", data.new_tensor(0.0))
    )
    with pytest.raises(NotImplementedError, match="'u'.*score-function"):
        IWELBO(5).differentiable_loss(model, lg.exact_guide, x)
    # Without gradients the value is well defined.
    assert math.isfinite(IWELBO(5).loss(model, lg.exact_guide, x))


def test_guessing_max_plate_nesting_does_not_shift_the_random_stream(lg):
    """With Pyro's default max_plate_nesting=inf the nesting is guessed by a first
    run; the same seed must still give the same first value."""
    x = lg.sample_data(1)
    guide = lg.diagonal_guide()

    def first_loss(elbo):
        pyro.set_rng_seed(5)
        return elbo.loss(lg.model, guide, x)

    guessed = first_loss(IWELBO(5, max_plate_nesting=float("inf")))
    assert guessed == first_loss(IWELBO(5, max_plate_nesting=1))
    renyi = RenyiELBO(0, num_particles=5, max_plate_nesting=1, vectorize_particles=True)
    assert guessed == pytest.approx(first_loss(renyi), rel=1e-12)


class FlowGuide(torch.nn.Module):
    """A user's flow guide: N(0, I) through a Pyro flow module whose output layer is
    zero (the identity for coupling), then affinely onto the exact posterior."""

    def __init__(self, lg, flow):
        super().__init__()
        self.lg = lg
        self.flow = flow
        with torch.no_grad():
            for name, p in flow.named_parameters():
                if name.startswith("nn.layers.1") or name.startswith("arn.layers.1"):
                    p.zero_()
        self.tril = torch.nn.Parameter(torch.linalg.cholesky(lg.post_cov))

    def forward(self, data):
        with pyro.plate("data", data.shape[0]):
            base = dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            # LowerCholeskyAffine maps with the whole matrix but takes its
            # log-determinant from the diagonal: only a lower-triangular scale
            # makes log q the density of what is sampled.
            onto = dist.transforms.LowerCholeskyAffine(
                self.lg.post_loc(data), self.tril.tril()
            )
            pyro.sample("z", dist.TransformedDistribution(base, [self.flow, onto]))


def _renamed(lg, site):
    """``lg``'s model with its latent site named ``site`` (the zoo's name)."""

    def model(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample(
                site, dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            )
            pyro.sample(
                "x", dist.Normal(z @ lg.W.T + lg.b, SIGMA).to_event(1), obs=data
            )

    return model


def zoo_flow_at_posterior(name, x):
    """The zoo's ``iaf`` or ``coupling`` guide set to the exact (diagonal) posterior
    of x's single point: the encoder outputs a constant, and the flows, with zero
    output layers, are a fixed scaled permutation M, undone in the base."""
    from pyro_iwae.nn.guides import ZOO

    lg = LinearGaussian(diagonal_posterior=True)
    guide = ZOO[name](1, x.shape[-1], hidden=[4], latent_dim=LATENT_DIM)
    with torch.no_grad():
        for flow in guide.flows:
            for layer_name, p in flow.named_parameters():
                if ".layers.1" in layer_name:
                    p.zero_()
        m = lg.post_loc(x[:1])[0]
        s = lg.post_cov.diagonal().sqrt()
        M = dist.TransformedDistribution(
            dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0), guide.transforms()
        ).transforms
        basis = torch.eye(LATENT_DIM, dtype=x.dtype)
        for t in M:
            basis = t(basis)
        inverse = torch.linalg.inv(basis)
        out = guide.layers[0].out
        out.weight.zero_()
        out.bias.copy_(torch.cat([m @ inverse, (s @ inverse).abs().log()]))
    return lg, guide


@pytest.mark.parametrize(
    "flow", ["coupling", "autoregressive", "zoo-iaf", "zoo-coupling"]
)
def test_stl_and_dreg_vanish_at_the_posterior_for_guides_with_flow_modules(
    lg, flow, float64_default
):
    """Flows evaluate their networks lazily in log_prob; with phi stopped only while
    the guide runs, STL and DReG gave the plain gradient to the flows' parameters
    (max |g| 1.7 to 15 in issue 22)."""
    import pyro.distributions.transforms as T

    pyro.set_rng_seed(0)
    if flow.startswith("zoo-"):
        x = LinearGaussian(diagonal_posterior=True).sample_data(1).expand(6, -1)
        lg, guide = zoo_flow_at_posterior(flow[4:], x)
        model = _renamed(lg, "z1")
    else:
        x = lg.sample_data(6)
        make = T.affine_coupling if flow == "coupling" else T.affine_autoregressive
        model, guide = lg.model, FlowGuide(lg, make(LATENT_DIM, hidden_dims=[4]))
    log_w = IWELBO(7).particles(model, guide, x).log_weights
    assert torch.allclose(log_w, lg.log_marginal(x).expand_as(log_w))
    params = list(guide.parameters())
    for estimator in ("iwae", "stl", "dreg"):
        loss = IWELBO(5, estimator).differentiable_loss(model, guide, x)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        largest = max(g.abs().max().item() for g in grads if g is not None)
        if estimator == "iwae":
            assert largest > 1e-2
        else:
            assert largest < 1e-9, (estimator, largest)


def _observed_only_model(data):
    loc = pyro.param("loc", data.new_tensor(0.3))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=data)


def _nothing(data):
    pass


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("k", [1, 4])
def test_a_model_without_latent_sites_has_log_p_x_as_its_bound(vectorize, k):
    """With no latent site every weight is p(x): L_k = log p(x) for any k, value and
    gradient equal to Trace_ELBO's; an empty model and guide give 0."""
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    elbo = IWELBO(k, vectorize_particles=vectorize)
    loss = elbo.differentiable_loss(_observed_only_model, _nothing, x)
    loc = pyro.param("loc")
    expected = -dist.Normal(loc, 1.0).log_prob(x).sum()
    assert torch.allclose(loss, expected)
    (grad,) = torch.autograd.grad(loss, [loc.unconstrained()])
    (reference,) = torch.autograd.grad(
        Trace_ELBO().differentiable_loss(_observed_only_model, _nothing, x),
        [loc.unconstrained()],
    )
    assert torch.allclose(grad, reference)
    assert elbo.loss(_nothing, _nothing, x) == 0.0
    assert elbo.loss_and_grads(_nothing, _nothing, x) == 0.0


def test_bad_calls_are_refused_in_one_line(lg):
    model, guide = paper_architecture()
    with pytest.raises(ValueError, match=r"IWELBO got an empty batch .*\[0, 784\]"):
        IWELBO(5).loss(model, guide, torch.zeros(0, 784))
    with pytest.raises(ValueError, match="jit_options"):
        IWELBO(5, jit_options={"check_trace": False})


@pytest.mark.parametrize(
    "options, words",
    [
        ({"max_plate_nesting": -1}, "max_plate_nesting must be an integer >= 0"),
        ({"max_plate_nesting": "1"}, "max_plate_nesting must be an integer >= 0"),
        ({"max_plate_nesting": None}, "max_plate_nesting must be an integer >= 0"),
        ({"vectorize_particles": "no"}, "vectorize_particles must be True or False"),
    ],
)
def test_bad_options_are_refused_up_front(options, words):
    # They failed only on the first call (-1: deep inside Pyro), or ("no") were
    # taken as True.
    with pytest.raises(ValueError, match=words):
        IWELBO(5, **options)
    assert IWELBO(5, max_plate_nesting=float("inf")).max_plate_nesting == float("inf")


# One latent per point in a data plate declared at dim=-2, with its exact
# posterior as the guide: every weight is log p(x), at any k.
_A, _B, _S = 1.5, 0.3, 0.7


def _data_at_dim_2():
    x = torch.randn(6, 1, generator=torch.Generator().manual_seed(0)).double() * 2
    exact = dist.Normal(x.new_tensor(_B), math.sqrt(_A**2 + _S**2)).log_prob(x).sum()

    def model(x):
        with pyro.plate("data", 6, dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(_A * z + _B, _S), obs=x)

    def guide(x):
        loc = _A * (x - _B) / (_A**2 + _S**2)
        with pyro.plate("data", 6, dim=-2):
            pyro.sample("z", dist.Normal(loc, _S / math.sqrt(_A**2 + _S**2)))

    return model, guide, x, exact


@pytest.mark.parametrize(
    "elbo",
    [
        IWELBO(1),
        IWELBO(5, vectorize_particles=False),
        MIWELBO(6, num_groups=2, vectorize_particles=False),
        CIWELBO(5, vectorize_particles=False),
        PIWELBO(6, num_groups=2, vectorize_particles=False),
    ],
    ids=["k1", "IWELBO", "MIWELBO", "CIWELBO", "PIWELBO"],
)
def test_a_plate_left_of_max_plate_nesting_is_refused_without_the_particle_plate(
    elbo,
):
    # The bound came out 14.75 nats above log p(x), with no error.
    model, guide, x, exact = _data_at_dim_2()
    with pytest.raises(
        ProgramError,
        match=r"plate 'data' of the model or guide is at dim=-2, but "
        r"max_plate_nesting=1 keeps only dim -1 .*; pass max_plate_nesting=2$",
    ):
        elbo.loss(model, guide, x)
    elbo = type(elbo)(
        elbo.num_particles,
        **({"num_groups": 2} if isinstance(elbo, MIWELBO) else {}),
        vectorize_particles=False,
        max_plate_nesting=2,
    )
    assert -elbo.loss(model, guide, x) == pytest.approx(exact.item(), abs=1e-9)


def _values_in_the_data_plate():
    """Points x in [D, N] (a column each), x_j | z ~ N(A z + B, S^2) in a plate
    "values" nested in the data plate, both at dims Pyro chooses; their exact
    guide, and log p(x) summed over the points."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    cov = _A**2 + _S**2 * torch.eye(3, dtype=x.dtype)
    exact = dist.MultivariateNormal(x.new_full((3,), _B), cov).log_prob(x.T).sum()
    precision = 1 + 3 * _A**2 / _S**2

    def model(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            with pyro.plate("values", x.shape[0]):
                pyro.sample("x", dist.Normal(_A * z + _B, _S), obs=x)

    def guide(x):
        loc = _A / _S**2 * (x - _B).sum(0) / precision
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(loc, precision**-0.5))

    return model, guide, x, exact


def test_the_plate_nesting_advised_is_the_programs_not_the_particle_plates():
    # The particle plate pushed the plates Pyro places left by a dim, and the
    # advice counted it: max_plate_nesting=2 for one data plate, 3 for two.
    x = torch.tensor([0.5, -1.2, 2.0, 0.1], dtype=torch.float64)
    exact = dist.Normal(x.new_tensor(_B), math.sqrt(_A**2 + _S**2)).log_prob(x).sum()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(_A * z + _B, _S), obs=x)

    def guide(x):
        loc = _A * (x - _B) / (_A**2 + _S**2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, _S / math.sqrt(_A**2 + _S**2)))

    _refused_then_exact(
        (model, guide, x, exact),
        0,
        "plate 'data' of the model or guide is at dim=-1, but max_plate_nesting=0 "
        "keeps no batch dim for plates, so the bound would take dim -1 as the "
        "particles' dim; pass max_plate_nesting=1",
    )
    _refused_then_exact(
        _values_in_the_data_plate(),
        1,
        "plate 'values' of the model or guide is at dim=-2, but max_plate_nesting=1 "
        "keeps only dim -1 for plates, so the bound would take dim -2 as the "
        "particles' dim; pass max_plate_nesting=2",
    )


def _refused_then_exact(program, nesting, message):
    """``IWELBO`` at ``max_plate_nesting=nesting`` refuses ``program`` (model,
    guide, data, exact log p(x)) with ``message``; at the nesting advised, its
    bound at the exact posterior is log p(x)."""
    model, guide, x, exact = program
    with pytest.raises(PlateNestingError) as refused:
        IWELBO(4, max_plate_nesting=nesting).loss(model, guide, x)
    assert str(refused.value) == message
    bound = -IWELBO(4, max_plate_nesting=nesting + 1).loss(model, guide, x)
    assert bound == pytest.approx(exact.item(), abs=1e-9)


def test_one_plate_at_dim_2_is_named_as_such_under_the_particle_plate():
    # "the model or guide nests plates 2 deep", of one plate, placed at dim -2.
    model, guide, x, _ = _data_at_dim_2()
    with pytest.raises(
        ParticleBroadcastError,
        match=r"^the model or guide has plates down to dim=-2, beyond "
        r"max_plate_nesting=1, .*; pass max_plate_nesting=2$",
    ):
        IWELBO(5).loss(model, guide, x)


def test_explicit_plates_deeper_than_a_nesting_of_0_are_one_line(caplog):
    # Two plates at dims -2 and -1 under max_plate_nesting=0 gave Pyro's raw
    # "collide at dim=-1" ValueError with its table of trace shapes: the run
    # without the particle plate, which names the depth, failed Pyro's own
    # shape check at that nesting too.
    def model(x):
        with pyro.plate("a", 3, dim=-2), pyro.plate("b", 4, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):  # the exact posterior, N(x / 2, 1 / 2)
        with pyro.plate("a", 3, dim=-2), pyro.plate("b", 4, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    x = torch.linspace(-2.0, 2.0, 12).reshape(3, 4)
    with caplog.at_level("INFO", logger="pyro"):
        with pytest.raises(ParticleBroadcastError) as raised:
            IWELBO(4, max_plate_nesting=0).loss(model, guide, x)
    (line,) = str(raised.value).splitlines()
    assert line.startswith(
        "the model or guide has plates down to dim=-2, beyond max_plate_nesting=0"
    )
    assert line.endswith("; pass max_plate_nesting=2")
    assert not caplog.records  # no "Guessed max_plate_nesting" of the trial run
    # The nesting advised works: at the exact posterior, the bound is log p(x).
    bound = -IWELBO(4, max_plate_nesting=2).loss(model, guide, x)
    exact = dist.Normal(0.0, 2**0.5).log_prob(x).sum()
    assert bound == pytest.approx(exact.item(), abs=1e-4)
