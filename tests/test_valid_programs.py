"""Valid Pyro programs of the kinds users bring, each trained a few steps under
IWELBO (finite losses, parameters that move) and its value checked against an
exact or a Trace_ELBO value: with one particle IWELBO is Trace_ELBO, with no
latent sites it is log p(x), with the exact posterior as guide it is log p(x) on
every draw, and otherwise its mean lies below log p(x).

Covered: nested plates, a sub-sampled plate, global and local latents under
mini-batches, scaled sites (a latent's temperature, a whole model's weight),
sampled discrete sites under VIMCO, no latent sites, sequential sites in a
``pyro.markov`` loop, ``pyro.param`` with constraints and ``PyroModule``
parameters. Enumerated discrete sites are not among them yet."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from global_gaussian import GlobalGaussian
from linear_gaussian import LATENT_DIM, OBS_DIM, SIGMA, LinearGaussian, PriorSiteModel
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule, PyroParam
from pyro.optim import Adam
from torch import nn

from pyro_iwae import IWELBO


def param_values() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


def train(model, guide, elbo, *args, steps: int = 5, lr: float = 0.05) -> list:
    """Runs ``steps`` SVI steps; checks that every loss is finite and that every
    parameter moved. Returns the losses."""
    svi = SVI(model, guide, Adam({"lr": lr}), loss=elbo)
    losses = [svi.step(*args)]
    before = param_values()
    losses += [svi.step(*args) for _ in range(steps - 1)]
    after = param_values()
    assert all(map(math.isfinite, losses)), losses
    assert before and before.keys() == after.keys()
    still = [n for n in before if torch.equal(before[n], after[n])]
    assert not still, f"parameters that did not move: {still}"
    return losses


def same_draws_loss(elbo, model, guide, *args, seed: int = 3) -> torch.Tensor:
    pyro.set_rng_seed(seed)
    return elbo.differentiable_loss(model, guide, *args)


def assert_is_trace_elbo_at_k1(model, guide, *args, **kwargs) -> None:
    """One particle: the same value as Trace_ELBO on the same draws, and the same
    gradient for every parameter."""
    results = []
    for elbo in (IWELBO(1, **kwargs), Trace_ELBO(**kwargs)):
        loss = same_draws_loss(elbo, model, guide, *args)
        params = [pyro.param(n).unconstrained() for n in sorted(param_values())]
        results.append((loss, torch.autograd.grad(loss, params)))
    (ours, our_grads), (theirs, their_grads) = results
    assert torch.allclose(ours, theirs), (ours, theirs)
    for mine, other in zip(our_grads, their_grads, strict=True):
        assert torch.allclose(mine, other)


def mean_and_se(elbo, model, guide, *args, draws: int = 200) -> tuple[float, float]:
    """Mean and standard error of the bound (the negative loss) over draws."""
    with torch.no_grad():
        values = torch.tensor(
            [-elbo.differentiable_loss(model, guide, *args) for _ in range(draws)]
        )
    return values.mean().item(), values.std().item() / math.sqrt(draws)


def assert_bound_below(elbo, model, guide, *args, exact, gap: float) -> None:
    """The bound's mean is not above the exact ``log p(x)`` (by 4 standard
    errors), nor more than ``gap`` nats below it (training got somewhere)."""
    mean, se = mean_and_se(elbo, model, guide, *args)
    assert exact - gap < mean < exact + 4 * se, (mean, se, float(exact))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread."""


@pytest.fixture
def x(lg):
    return lg.sample_data(6)


# Nested plates: a point's features in an inner plate, the points sub-sampled.


def nested(lg: LinearGaussian, subsample_size: int | None = None):
    """The linear-Gaussian model with x's dims in an inner plate and z's in
    another; a mean-field guide with a learned shift."""

    def model(data):
        with pyro.plate("data", data.shape[0], subsample_size=subsample_size) as i:
            with pyro.plate("latent", LATENT_DIM, dim=-2):
                z = pyro.sample("z", dist.Normal(data.new_zeros(()), 1.0))
            # z is [LATENT_DIM, batch] (or [k, LATENT_DIM, batch])
            loc = torch.einsum("...lb,ol->...ob", z, lg.W) + lg.b.unsqueeze(-1)
            with pyro.plate("features", OBS_DIM, dim=-2):
                pyro.sample("x", dist.Normal(loc, SIGMA), obs=data[i].T)

    def guide(data):
        shift = pyro.param("shift", data.new_zeros(LATENT_DIM, 1))
        scale = pyro.param(
            "scale", data.new_ones(LATENT_DIM, 1), constraint=constraints.positive
        )
        with pyro.plate("data", data.shape[0], subsample_size=subsample_size) as i:
            with pyro.plate("latent", LATENT_DIM, dim=-2):
                loc = lg.post_loc(data[i]).T + shift
                pyro.sample("z", dist.Normal(loc, scale))

    return model, guide


def test_nested_plates(lg, x):
    model, guide = nested(lg)
    assert_is_trace_elbo_at_k1(model, guide, x, max_plate_nesting=2)
    train(model, guide, IWELBO(4, "dreg", max_plate_nesting=2), x)
    # below log p(x) (exact), as the same model without the inner plates
    elbo = IWELBO(4, max_plate_nesting=2)
    assert_bound_below(elbo, model, guide, x, exact=lg.log_marginal(x).sum(), gap=20)


def test_a_sub_sampled_plate(lg):
    """``subsample_size`` in model and guide: the guide draws the indices, the
    model replays them, and N / M scales the bound; its mean over draws is the
    full batch's."""
    data = lg.sample_data(8)
    model, guide = nested(lg, subsample_size=3)
    assert_is_trace_elbo_at_k1(model, guide, data, max_plate_nesting=2)
    train(model, guide, IWELBO(4, max_plate_nesting=2), data)
    full_model, full_guide = nested(lg)
    elbo = IWELBO(4, max_plate_nesting=2)
    sub, sub_se = mean_and_se(elbo, model, guide, data, draws=800)
    full, full_se = mean_and_se(elbo, full_model, full_guide, data, draws=800)
    assert abs(sub - full) < 4 * math.hypot(sub_se, full_se), (sub, full)


# Global and local latents, on mini-batches.


def test_global_and_local_latents_on_mini_batches():
    gg = GlobalGaussian()
    data = gg.sample_data(12)
    guide = gg.guide(shift=0.5, inflate=2.0, local_shift=0.5)
    batch = torch.tensor([0, 5, 7])
    # one particle: Trace_ELBO, global site at scale 1, local ones at N / M
    assert_is_trace_elbo_at_k1(gg.model, guide, data, batch)
    elbo = IWELBO(4, "dreg", global_latents="factor")
    generator = torch.Generator().manual_seed(0)
    svi = SVI(gg.model, guide, Adam({"lr": 0.05}), loss=elbo)
    before = param_values()
    for _ in range(30):
        svi.step(data, torch.randperm(12, generator=generator)[:3])
    moved = {n: (param_values()[n] - v).abs().max() for n, v in before.items()}
    assert all(m > 0 for m in moved.values()), moved
    elbo = IWELBO(4, global_latents="factor")
    assert_bound_below(elbo, gg.model, guide, data, exact=gg.log_marginal(data), gap=20)


# Scaled sites.


def test_a_whole_model_scaled_scales_the_bound(lg, x):
    """``poutine.scale`` around model and guide (a data set's weight) multiplies
    the loss and leaves the bound's log-sum-exp alone."""
    guide = lg.diagonal_guide()
    elbo = IWELBO(5)
    plain = same_draws_loss(elbo, lg.model, guide, x)
    scaled = same_draws_loss(
        elbo, poutine.scale(lg.model, 3.0), poutine.scale(guide, 3.0), x
    )
    assert torch.allclose(scaled, 3 * plain), (scaled, plain)


def test_kl_annealing_trains(lg, x):
    """A latent site's scale beta (in model and guide), changed between steps as
    KL annealing does; at k = 1 the loss is Trace_ELBO's annealed ELBO (the
    weight's form at k > 1 is checked in test_objectives_sites)."""

    def annealed(beta):
        def model(data):
            with pyro.plate("data", data.shape[0]):
                with poutine.scale(scale=beta):
                    z = pyro.sample(
                        "z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
                    )
                loc = z @ lg.W.T + lg.b
                pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=data)

        def guide(data):
            shift = pyro.param("shift", data.new_zeros(LATENT_DIM))
            with pyro.plate("data", data.shape[0]):
                with poutine.scale(scale=beta):
                    loc = lg.post_loc(data) + shift
                    pyro.sample("z", dist.Normal(loc, 2.0).to_event(1))

        return model, guide

    for beta in (0.1, 0.5, 1.0):
        train(*annealed(beta), IWELBO(4, "dreg"), x, steps=3)
    assert_is_trace_elbo_at_k1(*annealed(0.3), x)


# Sampled discrete sites.


def discrete(psm: PriorSiteModel, x: torch.Tensor, exact: bool):
    """A guide for the model with a Bernoulli latent u, for the data ``x``:
    u ~ Bernoulli(p_i), z ~ N(E[z | x, u], Cov[z | x, u]). ``exact``:
    p_i = P(u = 1 | x_i), the exact posterior; else p_i starts at 1/2 (a learned
    parameter)."""
    tril = torch.linalg.cholesky(psm.lg.post_cov)
    (log_joint0, mean0), (log_joint1, mean1) = psm._per_discrete_value(x)
    exact_posterior = (log_joint1 - torch.logaddexp(log_joint0, log_joint1)).exp()

    def guide(data):
        posterior = exact_posterior
        if not exact:
            posterior = pyro.param(
                "p",
                torch.full_like(posterior, 0.5),
                constraint=constraints.unit_interval,
            )
        with pyro.plate("data", data.shape[0]):
            u = pyro.sample("u", dist.Bernoulli(posterior))
            loc = torch.where(u.unsqueeze(-1) > 0, mean1, mean0)
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=tril))

    return guide


def test_a_sampled_discrete_site_under_vimco(lg, x):
    psm = PriorSiteModel(lg, "bernoulli")
    exact = psm.log_marginal(x)
    # the exact posterior as guide: every weight is p(x), on every draw
    elbo = IWELBO(3, "vimco")
    for _ in range(3):
        loss = elbo.differentiable_loss(psm.model, discrete(psm, x, exact=True), x)
        assert torch.allclose(-loss, exact.sum())
    guide = discrete(psm, x, exact=False)
    train(psm.model, guide, IWELBO(6, "vimco"), x, steps=40)
    # VIMCO moves q(u | x) towards P(u = 1 | x)
    target = psm.posterior_means(x)["u"]
    start = (0.5 - target).abs().mean()
    assert (pyro.param("p").detach() - target).abs().mean() < start - 0.05
    assert_bound_below(IWELBO(6), psm.model, guide, x, exact=exact.sum(), gap=2.0)


# No latent sites.


def test_no_latent_sites_is_log_p_x(lg, x):
    """Only observed sites: every weight is p(x), the bound log p(x) exactly for
    any k, and training is maximum likelihood."""

    def model(data):
        loc = pyro.param("loc", data.new_zeros(OBS_DIM))
        scale = pyro.param(
            "obs_scale", data.new_ones(()), constraint=constraints.positive
        )
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=data)

    def guide(data):
        pass

    model(x)
    exact = dist.Normal(torch.zeros(OBS_DIM, dtype=x.dtype), 1.0).to_event(1)
    for k, vectorize in ((1, True), (4, True), (4, False)):
        loss = IWELBO(k, vectorize_particles=vectorize).loss(model, guide, x)
        assert loss == pytest.approx(-exact.log_prob(x).sum().item(), rel=1e-9)
    losses = train(model, guide, IWELBO(4), x, steps=60, lr=0.1)
    assert losses[-1] < losses[0] - 1
    assert torch.allclose(pyro.param("loc").detach(), x.mean(0), atol=0.2)


# Sequential sites: a linear-Gaussian state-space model in a pyro.markov loop.


class StateSpace:
    """z_1 ~ N(0, 1), z_t ~ N(a z_{t-1}, q^2), x_t ~ N(z_t, r^2) for t = 1..T, per
    sequence of a data plate; ``x`` is ``[N, T]``. Everything is jointly Gaussian:
    log p(x) and p(z | x) are exact."""

    a, q, r, length = 0.8, 0.6, 0.5, 4

    def __init__(self) -> None:
        t = self.length
        # z = M e with e ~ N(0, I): z_t = a z_{t-1} + q e_t, z_1 = e_1
        m = torch.zeros(t, t, dtype=torch.float64)
        for i in range(t):
            for j in range(i + 1):
                m[i, j] = self.a ** (i - j) * (1.0 if j == 0 else self.q)
        self.cov_z = m @ m.T
        self.cov_x = self.cov_z + self.r**2 * torch.eye(t, dtype=torch.float64)
        gain = self.cov_z @ torch.linalg.inv(self.cov_x)
        self.post_gain, self.post_cov = gain, self.cov_z - gain @ self.cov_z

    def sample(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(4)
        e = torch.randn(n, self.length, generator=g, dtype=torch.float64)
        return e @ torch.linalg.cholesky(self.cov_x).T

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros(self.length, dtype=torch.float64)
        return dist.MultivariateNormal(zero, self.cov_x).log_prob(x)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = x.new_zeros(())
            for t in pyro.markov(range(self.length)):
                scale = self.q if t else 1.0
                z = pyro.sample(f"z_{t}", dist.Normal(self.a * z, scale))
                pyro.sample(f"x_{t}", dist.Normal(z, self.r), obs=x[:, t])

    def guide(self, shift: float = 0.0):
        """q(z_t | z_<t, x): the exact conditionals of p(z | x) (mean moved by
        a learned ``shift``, starting at ``shift``)."""
        mean_of = self.post_gain

        def guide(x: torch.Tensor) -> None:
            offset = pyro.param("offset", x.new_tensor(shift))
            mean = x @ mean_of.T + offset
            zs = []
            with pyro.plate("data", x.shape[0]):
                for t in pyro.markov(range(self.length)):
                    cov = self.post_cov
                    if t:
                        # condition on z_<t: regression on the earlier deviations
                        weights = torch.linalg.solve(cov[:t, :t], cov[:t, t])
                        deviation = torch.stack(zs, -1) - mean[..., :t]
                        loc = mean[..., t] + deviation @ weights
                        var = cov[t, t] - cov[t, :t] @ weights
                    else:
                        loc, var = mean[..., 0], cov[0, 0]
                    zs.append(pyro.sample(f"z_{t}", dist.Normal(loc, var.sqrt())))

        return guide


def test_sequential_sites_in_a_markov_loop():
    ss = StateSpace()
    x = ss.sample(5)
    exact = ss.log_marginal(x).sum()
    # the exact posterior, site by site: log p(x) on every draw
    for k in (1, 3):
        loss = IWELBO(k, "dreg").differentiable_loss(ss.model, ss.guide(), x)
        assert torch.allclose(-loss, exact), (loss, exact)
    guide = ss.guide(shift=0.7)
    assert_is_trace_elbo_at_k1(ss.model, guide, x)
    train(ss.model, guide, IWELBO(5, "dreg"), x, steps=30)
    assert abs(pyro.param("offset").item()) < 0.7
    assert_bound_below(IWELBO(5), ss.model, guide, x, exact=exact, gap=1.0)


# Parameters: pyro.param with constraints, and PyroModule.


class AmortisedGuide(PyroModule):
    """q(z | x) = N(A x + c, diag(s)^2) with A, c from a PyroModule[nn.Linear] and
    s a constrained PyroParam."""

    def __init__(self) -> None:
        super().__init__()
        self.net = PyroModule[nn.Linear](OBS_DIM, LATENT_DIM).double()
        self.scale = PyroParam(
            torch.ones(LATENT_DIM, dtype=torch.float64), constraint=constraints.positive
        )

    def forward(self, data: torch.Tensor) -> None:
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(self.net(data), self.scale).to_event(1))


def test_pyro_module_parameters(lg, x):
    guide = AmortisedGuide()
    guide(x)
    assert_is_trace_elbo_at_k1(lg.model, guide, x)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    losses = train(lg.model, guide, IWELBO(5, "dreg"), x, steps=100, lr=0.05)
    assert losses[-1] < losses[0]
    moved = [n for n, p in guide.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(before), moved
    exact = lg.log_marginal(x).sum()
    assert_bound_below(IWELBO(5), lg.model, guide, x, exact=exact, gap=10.0)
