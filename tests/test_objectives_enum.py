"""IWELBO on programs beyond sampled continuous latents (float64, seeded): networks
that do not broadcast over the particle dimension and plates nested deeper than
max_plate_nesting (one-line errors), discrete sites
enumerated in the model (summed out of log p exactly) and in the guide (each value
with its own particles), each checked against exact values on small models."""

import contextlib
import functools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from torch import nn

from pyro_iwae import (
    CIWELBO,
    IWELBO,
    MIWELBO,
    PIWELBO,
    ParticleBroadcastError,
    PyroIwaeError,
    ais_log_likelihood,
    dataset_log_likelihood,
    importance_resample,
    log_likelihood,
    log_likelihood_with_diagnostics,
)


class FlatModel(nn.Module):
    """z -> x through a network that flattens with ``view(batch, -1)``: right for
    one particle, wrong under a particle plate."""

    def __init__(self, flatten: int | None) -> None:
        super().__init__()
        self.net = nn.Linear(2, 6).double()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1)
            )
            loc = self.net(z)
            if self.flatten is not None:
                loc = loc.view(x.shape[0], self.flatten)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


class FlatGuide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 2).double()

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.net(x), 1.0).to_event(1))


@pytest.mark.parametrize("flatten", [-1, 6])
def test_a_network_that_does_not_broadcast_over_particles_gets_one_line(flatten):
    """view(batch, -1) fails at the likelihood's log-prob, view(batch, 6) inside
    the network: both are named as a broadcasting failure."""
    x = torch.randn(4, 6, dtype=torch.float64)
    model, guide = FlatModel(flatten), FlatGuide()
    with pytest.raises(ParticleBroadcastError) as error:
        IWELBO(3).loss(model, guide, x)
    message = str(error.value)
    assert "\n" not in message
    assert "leading particle dimension of size 3" in message
    assert "vectorize_particles=False" in message
    assert isinstance(error.value, ValueError)
    assert isinstance(error.value, PyroIwaeError)
    # the cause is quoted by its first line, without Pyro's table of shapes
    assert "Trace Shapes" not in message
    # what the message offers works, and so does a network that broadcasts
    assert IWELBO(3, vectorize_particles=False).loss(model, guide, x) > 0
    # the estimates offer their own option, which works too
    with pytest.raises(
        ParticleBroadcastError, match="vectorize_particles=False to log_likelihood "
    ):
        log_likelihood(model, guide, x, num_samples=3)
    seq = log_likelihood(model, guide, x, num_samples=3, vectorize_particles=False)
    assert seq.isfinite().all()
    assert IWELBO(3).loss(FlatModel(None), guide, x) > 0


def test_a_program_that_fails_without_particles_keeps_its_own_error():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1)
            )
            pyro.sample("x", dist.Normal(z @ x.new_ones(3, 6), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))

    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as error:
        IWELBO(3).loss(model, guide, x)
    assert not isinstance(error.value, PyroIwaeError)


def _row_model(x: torch.Tensor) -> None:
    """One z per row of ``x`` [N, D], x_ij | z_i ~ N(z_i, 1) in an inner plate."""
    with pyro.plate("rows", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("cols", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _row_guide(x: torch.Tensor) -> None:
    """The exact posterior of each row's z: N(sum_j x_ij / (D + 1), 1 / (D + 1))."""
    d = x.shape[1]
    with pyro.plate("rows", x.shape[0], dim=-2):
        loc = x.sum(-1, keepdim=True) / (d + 1)
        pyro.sample("z", dist.Normal(loc, (d + 1) ** -0.5))


def test_plates_nested_deeper_than_max_plate_nesting_name_the_setting():
    """Two nested plates under the default max_plate_nesting=1: the one-line
    error names the nesting to pass (not the networks' broadcasting), and with
    it the bound is log p(x) exactly (the guide is the exact posterior)."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).double()
    exact = dist.MultivariateNormal(
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3, 3, dtype=torch.float64) + torch.eye(3, dtype=torch.float64),
    ).log_prob(x)
    for call in (
        lambda: IWELBO(5).loss(_row_model, _row_guide, x),
        lambda: log_likelihood(_row_model, _row_guide, x, num_samples=10),
    ):
        with pytest.raises(ParticleBroadcastError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message
        assert "pass max_plate_nesting=2" in message
        assert "leading particle dimension" not in message
    pyro.set_rng_seed(0)
    loss = IWELBO(5, max_plate_nesting=2).loss(_row_model, _row_guide, x)
    assert loss == pytest.approx(-exact.sum().item(), abs=1e-9)
    log_px = log_likelihood(
        _row_model, _row_guide, x, num_samples=10, max_plate_nesting=2
    )
    assert torch.allclose(log_px, exact, atol=1e-9)
    # every estimate the message can come from takes the setting it names
    every = dataset_log_likelihood(
        _row_model, _row_guide, x, num_samples=10, batch_size=3, max_plate_nesting=2
    )
    assert torch.allclose(every, exact, atol=1e-9)


# A mixture with a continuous latent beside it: in each of N points, y ~ Cat(PI),
# z ~ N(0, 1), a | z ~ N(z, S), and b_j | y ~ N(MU[y], SD[y]) for j in an inner
# plate (one y per point, or one per b_j). log p(x) is closed form, and
# q(z | a) = N(a / (1 + S^2), S / sqrt(1 + S^2)) is the exact posterior of z.
PI = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
MU = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
SD = torch.tensor([0.5, 1.0, 0.8], dtype=torch.float64)
S = 0.6


def mixture_model(a, b, per_element=False, subsample=None):
    with pyro.plate("data", a.shape[0], dim=-2, subsample=subsample) as i:
        if not per_element:
            y = pyro.sample("y", dist.Categorical(PI), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1, 1]))
        pyro.sample("a", dist.Normal(z, S), obs=a[i])
        with pyro.plate("inner", b.shape[1], dim=-1):
            if per_element:
                y = pyro.sample(
                    "y", dist.Categorical(PI), infer={"enumerate": "parallel"}
                )
            pyro.sample("b", dist.Normal(MU[y], SD[y]), obs=b[i])


def mixture_guide(a, b, per_element=False, subsample=None, shift=0.0, inflate=1.0):
    with pyro.plate("data", a.shape[0], dim=-2, subsample=subsample) as i:
        loc = pyro.param("loc", a / (1 + S**2) + shift)[i]
        pyro.sample("z", dist.Normal(loc, inflate * S / (1 + S**2) ** 0.5))


def mixture_log_marginal(a, b, per_element=False):
    log_a = dist.Normal(0.0, (1 + S**2) ** 0.5).log_prob(a).sum()
    log_b = dist.Normal(MU, SD).log_prob(b.unsqueeze(-1))  # (n, m, values of y)
    if per_element:
        return log_a + (log_b + PI.log()).logsumexp(-1).sum()
    return log_a + (log_b.sum(-2) + PI.log()).logsumexp(-1).sum()


def mixture_data(n=4, m=3):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(n, 1, generator=g, dtype=torch.float64) * 1.5
    b = torch.randn(n, m, generator=g, dtype=torch.float64) * 2.0
    return a, b


def replicated_bounds(elbo, draws, model, guide, x):
    """``draws`` independent estimates of the bound of the points ``x`` (along
    dim 0), in one call: the points are repeated ``draws`` times in the data plate
    and each copy's per-point bounds are summed."""
    with torch.no_grad():
        particles = elbo.particles(model, guide, x.repeat(draws))
    values = elbo.bound(particles.log_weights).reshape(draws, -1).sum(-1)
    return values.mean().item(), values.std().item() / draws**0.5


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("per_element", [False, True])
def test_model_enumeration_with_the_exact_guide_is_log_p_x(per_element, vectorize):
    """With y summed out and q(z | a) exact, every weight is p(x): the bound is
    log p(x) on every draw, for any k and each of the bounds; y per point or per
    element of an inner plate."""
    a, b = mixture_data()
    exact = mixture_log_marginal(a, b, per_element)
    options = {"max_plate_nesting": 2, "vectorize_particles": vectorize}
    objectives = [IWELBO(1, **options), IWELBO(4, **options)]
    if vectorize:
        objectives += [
            MIWELBO(2, 2, **options),
            CIWELBO(4, 0.5, **options),
            PIWELBO(2, 2, "dreg", **options),
        ]
    for elbo in objectives:
        for _ in range(2):
            loss = elbo.differentiable_loss(
                mixture_model, mixture_guide, a, b, per_element
            )
            assert torch.allclose(-loss, exact), (elbo, -loss, exact)


def shifted_mixture(x):
    """x | y, z ~ N(MU[y] + z, S) with z ~ N(0, 1): the posterior of z is a
    mixture, which a Gaussian guide cannot match."""
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PI), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)


def shifted_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * x, 1.0))


def test_model_enumeration_is_below_log_p_x_and_rises_with_k():
    x = torch.tensor([-1.5, 0.2, 2.7, 4.0], dtype=torch.float64)
    exact = (
        (PI.log() + dist.Normal(MU, (1 + S**2) ** 0.5).log_prob(x.unsqueeze(-1)))
        .logsumexp(-1)
        .sum()
        .item()
    )
    means = []
    for k in (1, 3, 9):
        mean, se = replicated_bounds(IWELBO(k), 400, shifted_mixture, shifted_guide, x)
        assert mean + 4 * se < exact, (k, mean, se, exact)
        means.append((mean, se))
    for (low, se_low), (high, se_high) in zip(means, means[1:], strict=False):
        assert high - low > 4 * (se_low**2 + se_high**2) ** 0.5, means


@pytest.mark.parametrize("subsample", [None, torch.tensor([0, 3])])
@pytest.mark.parametrize("per_element", [False, True])
def test_model_enumeration_at_k1_is_traceenum_elbo(per_element, subsample):
    """One particle: the negative loss is TraceEnum_ELBO's ELBO on the same draw,
    in value and gradient, also under a sub-sampled data plate."""
    a, b = mixture_data()
    guide = functools.partial(mixture_guide, shift=0.4, inflate=1.3)
    args = (a, b, per_element, subsample)
    ours = IWELBO(1, max_plate_nesting=2)
    ours.loss(mixture_model, guide, *args)  # finds the enumerated site
    loc = pyro.param("loc").unconstrained()
    results = []
    for elbo in (ours, TraceEnum_ELBO(max_plate_nesting=2)):
        pyro.set_rng_seed(4)
        loss = elbo.differentiable_loss(mixture_model, guide, *args)
        results.append((loss, torch.autograd.grad(loss, [loc])[0]))
    (loss, grad), (their_loss, their_grad) = results
    assert torch.allclose(loss, their_loss), (loss, their_loss)
    assert torch.allclose(grad, their_grad)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_model_enumeration_keeps_zero_variance_path_gradients(estimator):
    """At the exact posterior of z, STL's and DReG's guide gradients vanish with
    y summed out, as without enumerated sites; the plain gradient does not."""
    a, b = mixture_data()
    elbo = IWELBO(4, estimator, max_plate_nesting=2)
    plain = IWELBO(4, max_plate_nesting=2)
    for objective, vanishes in ((elbo, True), (plain, False)):
        loss = objective.differentiable_loss(mixture_model, mixture_guide, a, b)
        (grad,) = torch.autograd.grad(loss, [pyro.param("loc").unconstrained()])
        assert (grad.abs().max() < 1e-9) == vanishes, (objective.estimator, grad)


def test_model_enumeration_warns_of_nothing():
    a, b = mixture_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IWELBO(3, max_plate_nesting=2).loss(
            config_enumerate(mixture_model), mixture_guide, a, b
        )


def test_sequential_enumeration_is_refused_in_one_line():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample(
                "y", dist.Categorical(PI), infer={"enumerate": "sequential"}
            )
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)

    x = torch.tensor([0.3, 1.2], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="'y'.*parallel"):
        IWELBO(2).loss(model, shifted_guide, x)


def test_tensor_monte_carlo_is_refused_in_one_line():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            infer = {"enumerate": "parallel", "num_samples": 2}
            y = pyro.sample("y", dist.Categorical(PI), infer=infer)
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)

    x = torch.tensor([0.3, 1.2], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="'y'.*num_samples"):
        IWELBO(2).loss(model, shifted_guide, x)


def test_an_enumerated_global_site_is_refused_in_a_factored_bound():
    def model(x):
        y = pyro.sample("y", dist.Categorical(PI), infer={"enumerate": "parallel"})
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)

    x = torch.tensor([0.3, 1.2], dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="global site 'y'.*joint"):
        IWELBO(2, global_latents="factor").loss(model, shifted_guide, x)
    # the joint bound sums it out over all points at once
    assert IWELBO(2, global_latents="joint").loss(model, shifted_guide, x) > 0


def labelled_model(x, b):
    """The shifted mixture with its label y enumerated in the guide, beside a
    second label c, enumerated in the model, that only b depends on."""
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PI))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)
        c = pyro.sample("c", dist.Categorical(PI), infer={"enumerate": "parallel"})
        pyro.sample("b", dist.Normal(MU[c], SD[c]), obs=b)


def labelled_guide(x, b, shift=0.0, inflate=1.0):
    """q(y) with trainable logits, enumerated; q(z | x, y) is exact for shift 0
    and inflate 1."""
    logits = pyro.param("logits", torch.zeros(3, dtype=torch.float64))
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample(
            "y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"}
        )
        loc = (x - MU[y]) / (1 + S**2) + pyro.param("shift", torch.tensor(shift))
        pyro.sample("z", dist.Normal(loc, inflate * S / (1 + S**2) ** 0.5))


def labelled_log_marginal(x, b):
    marginal = dist.Normal(MU, (1 + S**2) ** 0.5).log_prob(x.unsqueeze(-1))
    mixture = dist.Normal(MU, SD).log_prob(b.unsqueeze(-1))
    return sum((part + PI.log()).logsumexp(-1).sum() for part in (marginal, mixture))


LABELLED = (
    torch.tensor([-1.5, 0.2, 2.7, 4.0], dtype=torch.float64),
    torch.tensor([0.1, -2.2, 3.1, 1.0], dtype=torch.float64),
)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_guide_enumeration_with_the_exact_guide_is_log_p_x(vectorize, estimator):
    """Each value of y with its own k particles from the exact q(z | x, y): every
    weight p(x, y, z) / q(z | x, y) is p(x, y), the bound log sum_y p(x, y) =
    log p(x) on every draw, and q(y) gets no gradient (it cancels)."""
    exact = labelled_log_marginal(*LABELLED)
    for k in (1, 3):
        elbo = IWELBO(k, estimator, vectorize_particles=vectorize)
        for _ in range(2):
            loss = elbo.differentiable_loss(labelled_model, labelled_guide, *LABELLED)
            assert torch.allclose(-loss, exact), (k, -loss, exact)
    logits, shift = (pyro.param(name).unconstrained() for name in ("logits", "shift"))
    grads = torch.autograd.grad(loss, [logits, shift], allow_unused=True)
    assert grads[0] is None or grads[0].abs().max() < 1e-12
    # the bound does depend on the guide of z
    assert grads[1] is not None and (grads[1].abs() > 1e-6) == (estimator == "iwae")


def test_the_evaluators_with_guide_enumeration_are_log_p_x():
    """With the exact guide, every weight is p(x, y) per value of y: each
    evaluator's estimate is log p(x) per point. The diagnostics' mean ran over
    the K particles, not the K times 3 weights: log 3 above log p(x)."""
    x, b = LABELLED
    exact = sum(
        (dist.Normal(MU, scale).log_prob(v.unsqueeze(-1)) + PI.log()).logsumexp(-1)
        for v, scale in ((x, (1 + S**2) ** 0.5), (b, SD))
    )
    estimate = log_likelihood(labelled_model, labelled_guide, *LABELLED, num_samples=4)
    found = log_likelihood_with_diagnostics(
        labelled_model, labelled_guide, *LABELLED, num_samples=4, chunk_size=3
    )
    assert torch.allclose(estimate, exact)
    assert torch.allclose(found.log_likelihood, exact)
    # A weight per particle and value of y, 3 p(x, y), whose mean over the
    # values, each particle's weight, is p(x): the estimate is exact, its ESS K.
    assert torch.allclose(found.ess, torch.full_like(found.ess, 4.0))
    assert (found.stderr < 1e-6).all()
    with pytest.raises(ValueError, match="the guide enumerates sites"):
        importance_resample(
            labelled_model, labelled_guide, *LABELLED, num_samples=4, num_draws=2
        )


def test_guide_enumeration_is_below_log_p_x_and_rises_with_k():
    x, b = LABELLED
    guide = functools.partial(labelled_guide, shift=0.8, inflate=1.7)
    exact = labelled_log_marginal(x, b).item()
    draws = 300
    means = []
    for k in (1, 2, 5):
        with torch.no_grad():
            particles = IWELBO(k).particles(
                labelled_model, guide, x.repeat(draws), b.repeat(draws)
            )
        # three values of y, each with k particles, per point
        assert particles.log_weights.shape == (3 * k, 4 * draws)
        values = IWELBO(k).bound(particles.log_weights).reshape(draws, -1).sum(-1)
        mean, se = values.mean().item(), values.std().item() / draws**0.5
        assert mean + 4 * se < exact, (k, mean, se, exact)
        means.append((mean, se))
    for (low, se_low), (high, se_high) in zip(means, means[1:], strict=False):
        assert high - low > 4 * (se_low**2 + se_high**2) ** 0.5, means


def test_guide_enumeration_refuses_what_would_mix_its_strata():
    with pytest.raises(NotImplementedError, match="MIWELBO.*'y'.*IWELBO"):
        MIWELBO(2, 2).loss(labelled_model, labelled_guide, *LABELLED)

    @config_enumerate
    def guide_z_first(x, b):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))

    # DReG reweights each particle's path: z would need one factor per value of y
    with pytest.raises(NotImplementedError, match="'dreg'.*'z'.*'y'.*'stl'"):
        IWELBO(3, "dreg").loss(labelled_model, guide_z_first, *LABELLED)
    assert IWELBO(3, "stl").loss(labelled_model, guide_z_first, *LABELLED) > 0


def test_dreg_with_guide_enumeration_keeps_the_plain_gradient_mean():
    """Off the posterior, each point's DReG gradient of its own q(z | x, y) shift
    has the plain estimator's mean (within 4 standard errors, 300 independent
    replicas of 4 points in one call), with a smaller variance."""
    x, b = LABELLED
    draws = 300
    xs, bs = x.repeat(draws), b.repeat(draws)

    def guide(x, b):
        shift = pyro.param("shifts", torch.full_like(x, 0.6))
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample(
                "y",
                dist.Categorical(logits=torch.zeros(3)),
                infer={"enumerate": "parallel"},
            )
            loc = (x - MU[y]) / (1 + S**2) + shift
            pyro.sample("z", dist.Normal(loc, 1.5 * S / (1 + S**2) ** 0.5))

    grads = {}
    for estimator in ("iwae", "dreg"):
        loss = IWELBO(4, estimator).differentiable_loss(labelled_model, guide, xs, bs)
        (grad,) = torch.autograd.grad(loss, [pyro.param("shifts").unconstrained()])
        grads[estimator] = grad.reshape(draws, -1)
    plain, dreg = grads["iwae"], grads["dreg"]
    se = ((plain.var(0) + dreg.var(0)) / draws).sqrt()
    assert ((plain.mean(0) - dreg.mean(0)).abs() < 4 * se).all(), (
        plain.mean(0),
        dreg.mean(0),
        se,
    )
    assert (dreg.var(0) < plain.var(0)).all()
    assert (plain.mean(0).abs() > 4 * se).any()  # the test can tell a wrong mean


@pytest.mark.parametrize(
    "inner, mark",
    [
        (True, {"enumerate": "parallel"}),
        (False, {"enumerate": "sequential"}),
        (False, {"enumerate": "parallel", "num_samples": 2}),
    ],
)
def test_guide_sites_that_cannot_be_strata_are_sampled(inner, mark):
    """Values of y for the n elements of an inner plate would need K^n strata;
    sequential enumeration and num_samples ask for something else: y is sampled,
    as without the mark (so with a score-function estimator), and the bound is
    that of a sampled y."""

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            inner_plate = pyro.plate("inner", 2, dim=-1)
            with inner_plate if inner else contextlib.nullcontext():
                y = pyro.sample("y", dist.Categorical(PI))
            with inner_plate:
                pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)

    def guide(x, mark=mark):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(0.0, 1.0))
            inner_plate = pyro.plate("inner", 2, dim=-1)
            with inner_plate if inner else contextlib.nullcontext():
                q = dist.Categorical(pyro.param("q", PI.clone()))
                y = pyro.sample("y", q, infer=mark)
            return y

    x = torch.zeros(3, 2, dtype=torch.float64)
    elbo = IWELBO(4, "vimco", max_plate_nesting=2)
    particles = elbo.particles(model, guide, x)
    assert particles.traces[0][1].nodes["y"]["value"].shape == (4, 3, 2 if inner else 1)
    assert particles.log_weights.shape == (4, 3, 1)
    pyro.set_rng_seed(1)
    marked = elbo.differentiable_loss(model, guide, x)
    pyro.set_rng_seed(1)
    unmarked = elbo.differentiable_loss(model, functools.partial(guide, mark={}), x)
    assert torch.equal(marked, unmarked)
    with pytest.raises(NotImplementedError, match="'y'.*vimco"):
        IWELBO(4, max_plate_nesting=2).differentiable_loss(model, guide, x)


class SemiSupervised(nn.Module):
    """The M2 pattern of Kingma et al. (2014): a label y observed where given,
    else enumerated in the guide, which proposes z from x and y."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(2 + 3, 6).double()
        self.classifier = nn.Linear(6, 3).double()
        self.encoder = nn.Linear(6 + 3, 4).double()

    def model(self, xs, ys=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", xs.shape[0]):
            prior = dist.Normal(xs.new_zeros(xs.shape[0], 2), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            uniform = dist.OneHotCategorical(logits=xs.new_zeros(3))
            y = pyro.sample("y", uniform, obs=ys)
            shape = torch.broadcast_shapes(z.shape[:-1], y.shape[:-1])
            inputs = torch.cat([z.expand(shape + (2,)), y.expand(shape + (3,))], -1)
            logits = self.decoder(inputs)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    @config_enumerate
    def guide(self, xs, ys=None):
        pyro.module("classifier", self.classifier)
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                label = dist.OneHotCategorical(logits=self.classifier(xs))
                ys = pyro.sample("y", label)
            shape = torch.broadcast_shapes(ys.shape[:-1], xs.shape[:-1])
            inputs = torch.cat([xs.expand(shape + (6,)), ys.expand(shape + (3,))], -1)
            loc, log_scale = self.encoder(inputs).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_a_semi_supervised_label_is_enumerated_without_warnings():
    """Unlabelled points: three values of y, each with k particles of z, and no
    Pyro warning about ignored enumeration; labelled points: y is observed. Both
    train the classifier only through the labelled bound (q(y) cancels)."""
    ss = SemiSupervised()
    g = torch.Generator().manual_seed(0)
    xs = torch.bernoulli(torch.full((8, 6), 0.4, dtype=torch.float64), generator=g)
    ys = torch.eye(3, dtype=torch.float64)[torch.randint(0, 3, (8,), generator=g)]
    elbo = IWELBO(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unlabelled = elbo.particles(ss.model, ss.guide, xs)
        labelled = elbo.particles(ss.model, ss.guide, xs, ys)
    assert unlabelled.log_weights.shape == (3 * 4, 8)
    assert labelled.log_weights.shape == (4, 8)
    loss = elbo.differentiable_loss(ss.model, ss.guide, xs)
    grads = torch.autograd.grad(
        loss,
        list(ss.classifier.parameters()) + list(ss.encoder.parameters()),
        allow_unused=True,
    )
    assert all(g is None or not g.any() for g in grads[:2])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[2:])


OFFSETS = torch.tensor([0.0, 1.5], dtype=torch.float64)
HALVES = torch.tensor([0.4, 0.6], dtype=torch.float64)


def two_label_model(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(PI))
        u = pyro.sample("u", dist.Categorical(HALVES))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(MU[y] + OFFSETS[u] + z, S), obs=x)


@config_enumerate
def two_label_guide(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        u = pyro.sample("u", dist.Categorical(logits=torch.zeros(2)))
        loc = (x - MU[y] - OFFSETS[u]) / (1 + S**2)
        pyro.sample("z", dist.Normal(loc, S / (1 + S**2) ** 0.5))


@pytest.mark.parametrize("vectorize", [True, False])
def test_two_sites_enumerated_in_the_guide_give_each_joint_value_particles(vectorize):
    x = LABELLED[0]
    means = MU.unsqueeze(-1) + OFFSETS  # (y, u)
    log_prior = PI.log().unsqueeze(-1) + HALVES.log()
    marginal = dist.Normal(means, (1 + S**2) ** 0.5).log_prob(x[:, None, None])
    exact = (marginal + log_prior).logsumexp((-2, -1)).sum()
    elbo = IWELBO(3, vectorize_particles=vectorize)
    particles = elbo.particles(two_label_model, two_label_guide, x)
    assert particles.log_weights.shape == (3 * 2 * 3, 4)
    loss = elbo.differentiable_loss(two_label_model, two_label_guide, x)
    assert torch.allclose(-loss, exact), (-loss, exact)


def test_log_likelihood_takes_enumerated_sites():
    """log_likelihood in chunks: exact per point with the exact guides, with the
    label enumerated in the guide (each chunk holds every value's particles) or
    in the model."""
    x, b = LABELLED
    estimate = log_likelihood(
        labelled_model, labelled_guide, x, b, num_samples=10, chunk_size=4
    )
    marginal = dist.Normal(MU, (1 + S**2) ** 0.5).log_prob(x.unsqueeze(-1))
    mixture = dist.Normal(MU, SD).log_prob(b.unsqueeze(-1))
    exact = sum((part + PI.log()).logsumexp(-1) for part in (marginal, mixture))
    assert torch.allclose(estimate, exact)
    a, b = mixture_data()
    estimate = log_likelihood(
        mixture_model, mixture_guide, a, b, num_samples=6, max_plate_nesting=2
    )
    assert torch.allclose(estimate.sum(), mixture_log_marginal(a, b))


def test_ciwelbo_takes_guide_enumeration_with_a_uniform_proposal_for_y():
    """CIWELBO's ELBO part, with y enumerated in the guide, is the ELBO under a
    uniform q(y): with q(z | x, y) exact, each log-weight is log p(x, y) + log 3."""
    x, b = LABELLED
    beta = 0.3
    loss = CIWELBO(2, beta).differentiable_loss(labelled_model, labelled_guide, x, b)
    joint = dist.Normal(MU, (1 + S**2) ** 0.5).log_prob(x.unsqueeze(-1)) + PI.log()
    log_b = (dist.Normal(MU, SD).log_prob(b.unsqueeze(-1)) + PI.log()).logsumexp(-1)
    elbo_part = (joint.mean(-1) + math.log(3) + log_b).sum()
    iwae_part = labelled_log_marginal(x, b)
    assert torch.allclose(-loss, beta * elbo_part + (1 - beta) * iwae_part)


def switched_model(x):
    """A binary h, sampled in the guide, beside the label y enumerated there."""
    with pyro.plate("data", x.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(torch.tensor(0.4, dtype=x.dtype)))
        y = pyro.sample("y", dist.Categorical(PI))
        pyro.sample("x", dist.Normal(MU[y] + 1.5 * h, S), obs=x)


def switched_guide(x):
    logits = pyro.param("h_logits", torch.full_like(x, 0.3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("h", dist.Bernoulli(logits=logits))
        pyro.sample(
            "y",
            dist.Categorical(logits=torch.zeros(3)),
            infer={"enumerate": "parallel"},
        )


def exact_switched_gradient(x, logit):
    """d/dlogit of E[log (1/2) sum_j p(x, h_j) / q(h_j)], h_1, h_2 ~ q, by
    summing over the four pairs (h_1, h_2)."""
    logit = logit.clone().requires_grad_()
    q = dist.Bernoulli(logits=logit)
    h = torch.tensor([0.0, 1.0], dtype=x.dtype)
    joint = dist.Normal(MU + 1.5 * h[:, None], S).log_prob(x) + PI.log()
    log_r = joint.logsumexp(-1) + dist.Bernoulli(0.4).log_prob(h) - q.log_prob(h)
    pair = (log_r[:, None].exp() + log_r.exp()).log() - math.log(2)
    log_q = q.log_prob(h)
    expected = ((log_q[:, None] + log_q).exp() * pair).sum()
    return torch.autograd.grad(expected, [logit])[0]


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("estimator", ["vimco", "reinforce"])
def test_score_gradient_beside_guide_enumeration_is_unbiased(estimator, vectorize):
    """VIMCO's and REINFORCE's gradient of a sampled binary site, with a label
    enumerated in the guide, against the exact gradient of the expected bound
    (k = 2): each point has its own q(h), and 600 replicas of each of two points
    run in one call."""
    x = torch.tensor([0.3, 2.0], dtype=torch.float64)
    draws = 600
    elbo = IWELBO(2, estimator, vectorize_particles=vectorize)
    loss = elbo.differentiable_loss(switched_model, switched_guide, x.repeat(draws))
    logits = pyro.param("h_logits").unconstrained()
    (grad,) = torch.autograd.grad(loss, [logits])
    grad = -grad.reshape(draws, 2)
    mean, se = grad.mean(0), grad.std(0) / draws**0.5
    for i in range(2):
        exact = exact_switched_gradient(x[i], torch.tensor(0.3, dtype=torch.float64))
        assert (mean[i] - exact).abs() < 4 * se[i], (i, mean[i], se[i], exact)
    assert (mean.abs() > 4 * se).any()  # the test can tell a zero gradient


def test_ais_samples_sites_marked_for_enumeration():
    """AIS moves or redraws every latent: a mark for enumeration changes nothing
    (the same estimate, draw for draw, as the unmarked model)."""

    def unmarked(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(PI))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(MU[y] + z, S), obs=x)

    x = torch.tensor([-1.5, 0.2, 2.7], dtype=torch.float64)
    estimates = []
    for model in (shifted_mixture, unmarked):
        pyro.set_rng_seed(3)
        result = ais_log_likelihood(
            model, shifted_guide, x, num_steps=4, num_chains=3, chunk_size=3
        )
        estimates.append(result.log_likelihood)
    assert torch.isfinite(estimates[0]).all()
    assert torch.equal(estimates[0], estimates[1])


def annealed_mixture_prior(x, beta=0.3, split=False):
    """z ~ sum_y PI[y] N(MU[y], 1) as its prior, annealed by ``beta`` (the whole
    summed-out factor; with ``split``, only the label's)."""
    with pyro.plate("data", x.shape[0]):
        with poutine.scale(scale=beta):
            y = pyro.sample("y", dist.Categorical(PI), infer={"enumerate": "parallel"})
        with poutine.scale(scale=1.0 if split else beta):
            z = pyro.sample("z", dist.Normal(MU[y], 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x)


def annealed_guide(x, beta=0.3, split=False):
    loc = pyro.param("loc", x.clone())
    with pyro.plate("data", x.shape[0]), poutine.scale(scale=1.0 if split else beta):
        pyro.sample("z", dist.Normal(loc, 0.7))


@pytest.mark.parametrize("vectorize", [True, False])
def test_an_annealed_enumerated_factor_enters_times_its_scale(vectorize):
    """KL annealing of a mixture prior: beta multiplies the summed-out factor,
    outside its sum over y, as it does the guide's log q (checked per particle
    from the traces); factors of different scales are refused in one line."""
    x, beta = LABELLED[0], 0.3
    elbo = IWELBO(3, vectorize_particles=vectorize)
    particles = elbo.particles(annealed_mixture_prior, annealed_guide, x, beta)
    loc = pyro.param("loc")
    for i, (_, guide_trace) in enumerate(particles.traces):
        z = guide_trace.nodes["z"]["value"]
        log_prior = (
            PI.log() + dist.Normal(MU, 1.0).log_prob(z.unsqueeze(-1))
        ).logsumexp(-1)
        expected = beta * (log_prior - dist.Normal(loc, 0.7).log_prob(z)) + dist.Normal(
            z, S
        ).log_prob(x)
        ours = particles.log_weights if vectorize else particles.log_weights[i]
        assert torch.allclose(ours, expected)
    with pytest.raises(ValueError, match="'z' and 'y' have different scales"):
        IWELBO(2).loss(annealed_mixture_prior, annealed_guide, x, beta, True)


@pytest.mark.parametrize("k", [1, 3])
def test_model_enumeration_of_a_single_point(k):
    """A data plate of one element is in no packed factor (size-1 dims are
    dropped): the sum still lands on the plate's dims."""
    a, b = mixture_data(n=1)
    loss = IWELBO(k, max_plate_nesting=2).differentiable_loss(
        mixture_model, mixture_guide, a, b
    )
    assert torch.allclose(-loss, mixture_log_marginal(a, b))


def test_one_objective_enumerates_after_a_program_without_marked_sites():
    """The first call runs under enum, later ones only once marked sites were
    found: a call on another program that marks sites must still enumerate
    them (exact for a model-only label, whatever the draws)."""

    def plain_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def plain_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    def labelled(x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(PI), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(MU[y], S), obs=x)

    x = torch.tensor([0.3, 1.2], dtype=torch.float64)
    exact = (
        (dist.Normal(MU, S).log_prob(x.unsqueeze(-1)) + PI.log()).logsumexp(-1).sum()
    )
    elbo = IWELBO(3)
    elbo.loss(plain_model, plain_guide, x)
    for _ in range(3):
        assert elbo.loss(labelled, lambda x: None, x) == pytest.approx(-exact.item())
