"""IWELBO on sequential models (float64, seeded): ``pyro.markov`` loops with
continuous states (a linear-Gaussian state-space model whose log p(x) is exact, a
small deep Markov model with KL annealing) and with discrete states enumerated in
the model (a hidden Markov model, exact by the forward algorithm)."""

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch import nn

from pyro_iwae import IWELBO

# z_1 ~ N(0, 1), z_t | z_{t-1} ~ N(A z_{t-1}, Q), x_t | z_t ~ N(z_t, R), in 1-D.
A, Q, R, STEPS = 0.8, 0.6, 0.5, 3


def state_space_model(x):
    """x: (sequences, STEPS)."""
    with pyro.plate("sequences", x.shape[0]):
        z = x.new_zeros(x.shape[0])
        for t in pyro.markov(range(STEPS)):
            loc, scale = (z * A, Q) if t else (z, 1.0)
            z = pyro.sample(f"z_{t}", dist.Normal(loc, scale))
            pyro.sample(f"x_{t}", dist.Normal(z, R), obs=x[:, t])


def joint_covariance():
    """Covariance of (z_1..z_T) and of (x_1..x_T)."""
    cov = torch.zeros(STEPS, STEPS, dtype=torch.float64)
    for t in range(STEPS):
        for s in range(STEPS):
            # Var z_min(s,t) times A^|t-s|
            m = min(s, t)
            var = sum(A ** (2 * i) * (Q**2 if i < m else 1.0) for i in range(m + 1))
            cov[t, s] = var * A ** abs(t - s)
    return cov, cov + R**2 * torch.eye(STEPS, dtype=torch.float64)


def kalman_log_marginal(x):
    """log p(x) of each sequence by the Kalman filter's prediction errors."""
    total = x.new_zeros(x.shape[0])
    mean, var = x.new_zeros(x.shape[0]), 1.0
    for t in range(STEPS):
        if t:
            mean, var = A * mean, A**2 * var + Q**2
        total = total + dist.Normal(mean, (var + R**2) ** 0.5).log_prob(x[:, t])
        gain = var / (var + R**2)
        mean, var = mean + gain * (x[:, t] - mean), (1 - gain) * var
    return total


def posterior(x):
    """Mean (sequences, T) and covariance (T, T) of p(z | x)."""
    cov_z, cov_x = joint_covariance()
    gain = cov_z @ torch.linalg.inv(cov_x)
    return x @ gain.T, cov_z - gain @ cov_z


def state_space_guide(x, shift=0.0, inflate=1.0):
    """q(z_t | z_{<t}, x): the exact posterior's conditionals for shift 0 and
    inflate 1."""
    mean, cov = posterior(x)
    with pyro.plate("sequences", x.shape[0]):
        zs = []
        for t in pyro.markov(range(STEPS)):
            loc, var = mean[:, t] + shift, cov[t, t]
            if t:
                past = torch.stack(zs, -1) - mean[:, :t]
                weights = torch.linalg.solve(cov[:t, :t], cov[:t, t])
                loc, var = loc + past @ weights, var - cov[t, :t] @ weights
            zs.append(pyro.sample(f"z_{t}", dist.Normal(loc, inflate * var**0.5)))


def sequences(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, STEPS, generator=g, dtype=torch.float64) * 1.5


def test_the_kalman_filter_is_the_gaussian_marginal():
    """The reference itself: the filter agrees with the joint Gaussian."""
    x = sequences(4)
    exact = dist.MultivariateNormal(x.new_zeros(STEPS), joint_covariance()[1])
    assert torch.allclose(kalman_log_marginal(x), exact.log_prob(x))


@pytest.mark.parametrize("vectorize", [True, False])
def test_markov_bound_with_the_exact_guide_is_log_p_x(vectorize):
    x = sequences(4)
    exact = kalman_log_marginal(x).sum()
    for k in (1, 4):
        loss = IWELBO(k, vectorize_particles=vectorize).differentiable_loss(
            state_space_model, state_space_guide, x
        )
        assert torch.allclose(-loss, exact), (k, -loss, exact)


def test_markov_bound_is_below_log_p_x_and_rises_with_k():
    x = sequences(4)
    exact = kalman_log_marginal(x).sum().item()
    draws = 300
    means = []
    for k in (1, 3, 9):
        elbo = IWELBO(k)
        with torch.no_grad():
            particles = elbo.particles(
                state_space_model,
                lambda x: state_space_guide(x, shift=0.5, inflate=1.5),
                x.repeat(draws, 1),
            )
        values = elbo.bound(particles.log_weights).reshape(draws, -1).sum(-1)
        mean, se = values.mean().item(), values.std().item() / draws**0.5
        assert mean + 4 * se < exact, (k, mean, se, exact)
        means.append((mean, se))
    for (low, se_low), (high, se_high) in zip(means, means[1:], strict=False):
        assert high - low > 4 * (se_low**2 + se_high**2) ** 0.5, means


class DMMGuide(nn.Module):
    """q(z_t | z_{t-1}, x_t), a module so that DReG can hold it constant."""

    def __init__(self, dmm):
        super().__init__()
        self.combiner = nn.Linear(2 + 3, 4).double()
        self.dmm = [dmm]  # a list: not a submodule, its parameters are the model's

    def forward(self, x):
        dmm = self.dmm[0]
        with pyro.plate("sequences", x.shape[0]):
            z = x.new_zeros(x.shape[0], 2)
            for t in pyro.markov(range(dmm.steps)):
                # broadcasts over leading particle dims
                inputs = torch.cat([z, x[:, t].expand(z.shape[:-1] + (3,))], -1)
                loc, log_scale = self.combiner(inputs).chunk(2, -1)
                with poutine.scale(scale=dmm.annealing):
                    z = pyro.sample(
                        f"z_{t}", dist.Normal(loc, log_scale.exp()).to_event(1)
                    )


class TinyDMM(nn.Module):
    """A deep Markov model of 2-D states and 3-D observations: a transition
    network, a linear emission, and KL annealing by ``poutine.scale`` on the
    latent sites (``annealing`` times their log p - log q)."""

    def __init__(self, steps=3, annealing=1.0):
        super().__init__()
        self.steps, self.annealing = steps, annealing
        self.transition = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
        self.emission = nn.Linear(2, 3)
        self.double()
        self.guide = DMMGuide(self)

    def model(self, x):
        pyro.module("transition", self.transition)
        pyro.module("emission", self.emission)
        with pyro.plate("sequences", x.shape[0]):
            z = x.new_zeros(x.shape[0], 2)
            for t in pyro.markov(range(self.steps)):
                with poutine.scale(scale=self.annealing):
                    z = pyro.sample(
                        f"z_{t}", dist.Normal(self.transition(z), 0.5).to_event(1)
                    )
                pyro.sample(
                    f"x_{t}",
                    dist.Normal(self.emission(z), 0.3).to_event(1),
                    obs=x[:, t],
                )


def dmm_data(n=5, steps=3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, steps, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("annealing", [0.2, 1.0])
def test_an_annealed_dmm_at_k1_is_trace_elbo(annealing):
    """One particle: IWELBO's loss and gradients are Trace_ELBO's on the same
    draw, with the latent sites scaled for KL annealing."""
    dmm, x = TinyDMM(annealing=annealing), dmm_data()
    results = []
    for elbo in (IWELBO(1), Trace_ELBO()):
        pyro.set_rng_seed(2)
        loss = elbo.differentiable_loss(dmm.model, dmm.guide, x)
        results.append((loss, torch.autograd.grad(loss, list(dmm.parameters()))))
    (ours, our_grads), (theirs, their_grads) = results
    assert torch.allclose(ours, theirs)
    for mine, reference in zip(our_grads, their_grads, strict=True):
        assert torch.allclose(mine, reference)


def test_an_annealed_dmm_trains_under_iwelbo():
    """SVI with k = 5 and DReG, annealing from 0.1 to 1: the bound (at k = 5,
    beta = 1, many draws) rises well beyond its noise."""
    dmm, x = TinyDMM(), dmm_data(n=20)
    optimizer = torch.optim.Adam(dmm.parameters(), lr=0.02)
    elbo = IWELBO(5, "dreg")

    def bound():
        dmm.annealing = 1.0
        with torch.no_grad():
            values = torch.tensor(
                [-elbo.loss(dmm.model, dmm.guide, x) for _ in range(10)]
            )
        return values.mean().item(), values.std().item() / 10**0.5

    before, before_se = bound()
    for step in range(30):
        dmm.annealing = min(1.0, 0.1 + step / 20)
        optimizer.zero_grad()
        elbo.differentiable_loss(dmm.model, dmm.guide, x).backward()
        optimizer.step()
    after, after_se = bound()
    assert after - before > 4 * (before_se**2 + after_se**2) ** 0.5, (before, after)


# A hidden Markov model of 3 states in a pyro.markov loop, its states enumerated
# in the model, beside a continuous z with observation a whose q(z | a) is exact.
INIT = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
TRANS = torch.tensor(
    [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=torch.float64
)
MU = torch.tensor([-2.0, 0.0, 2.5], dtype=torch.float64)
SD = torch.tensor([0.6, 1.0, 0.8], dtype=torch.float64)


def hmm_model(a, x):
    """a: (sequences,), x: (sequences, steps)."""
    with pyro.plate("sequences", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("a", dist.Normal(z, R), obs=a)
        y = None
        for t in pyro.markov(range(x.shape[1])):
            probs = INIT if y is None else TRANS[y]
            y = pyro.sample(
                f"y_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
            )
            pyro.sample(f"x_{t}", dist.Normal(MU[y], SD[y]), obs=x[:, t])


def hmm_guide(a, x, shift=0.0):
    with pyro.plate("sequences", x.shape[0]):
        loc = a / (1 + R**2) + pyro.param("shift", torch.tensor(shift))
        pyro.sample("z", dist.Normal(loc, R / (1 + R**2) ** 0.5))


def forward_log_marginal(a, x):
    """log p(a, x) of each sequence: Gaussian for a, the forward algorithm for x."""
    emission = dist.Normal(MU, SD).log_prob(x.unsqueeze(-1))  # (sequences, T, 3)
    alpha = INIT.log() + emission[:, 0]
    for t in range(1, x.shape[1]):
        alpha = (alpha.unsqueeze(-1) + TRANS.log()).logsumexp(-2) + emission[:, t]
    return alpha.logsumexp(-1) + dist.Normal(0.0, (1 + R**2) ** 0.5).log_prob(a)


def hmm_data(n=3, steps=4):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    return a, 2 * torch.randn(n, steps, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("vectorize", [True, False])
def test_an_enumerated_hmm_is_summed_out_exactly(vectorize):
    """The states of 4 steps (enum dims recycled by pyro.markov) are summed out
    per particle: with q(z | a) exact, the bound is log p(a, x) on every draw."""
    a, x = hmm_data()
    exact = forward_log_marginal(a, x).sum()
    for k in (1, 3):
        elbo = IWELBO(k, vectorize_particles=vectorize)
        for _ in range(2):
            loss = elbo.differentiable_loss(hmm_model, hmm_guide, a, x)
            assert torch.allclose(-loss, exact), (k, -loss, exact)


def test_an_enumerated_hmm_at_k1_is_traceenum_elbo():
    a, x = hmm_data()
    guide = functools.partial(hmm_guide, shift=0.4)
    elbo = IWELBO(1)
    elbo.loss(hmm_model, guide, a, x)  # finds the enumerated sites
    results = []
    for objective in (elbo, TraceEnum_ELBO(max_plate_nesting=1)):
        pyro.set_rng_seed(6)
        loss = objective.differentiable_loss(hmm_model, guide, a, x)
        (grad,) = torch.autograd.grad(loss, [pyro.param("shift").unconstrained()])
        results.append((loss, grad))
    (loss, grad), (their_loss, their_grad) = results
    assert torch.allclose(loss, their_loss) and torch.allclose(grad, their_grad)
    assert grad.abs() > 1e-3
