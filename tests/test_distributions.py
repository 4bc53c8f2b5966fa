"""The paper's distributions equal Pyro's Normal / Bernoulli with .to_event(1), and
the continuous Bernoulli is exact at every logit."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro import poutine

from pyro_iwae.nn.distributions import (
    BernoulliImage,
    ContinuousBernoulliImage,
    DiagonalNormal,
)


def test_diagonal_normal_is_normal_to_event():
    torch.manual_seed(0)
    loc, log_scale = torch.randn(4, 6).double(), torch.randn(4, 6).double()
    ours = DiagonalNormal(loc, log_scale)
    reference = dist.Normal(loc, log_scale.exp()).to_event(1)
    value = torch.randn(3, 4, 6).double()
    assert torch.allclose(ours.log_prob(value), reference.log_prob(value))
    expanded = ours.expand([3, 4])
    assert expanded.batch_shape == (3, 4) and expanded.event_shape == (6,)
    assert torch.allclose(
        expanded.log_prob(value), reference.expand([3, 4]).log_prob(value)
    )
    assert torch.equal(expanded.mean, loc.expand(3, 4, 6))
    assert torch.allclose(expanded.variance, reference.expand([3, 4]).variance)
    assert torch.allclose(ours.entropy(), reference.entropy())
    assert ours.has_rsample


def test_diagonal_normal_kl_is_normal_to_event_kl():
    torch.manual_seed(0)
    p_params, q_params = torch.randn(2, 3, 6).double(), torch.randn(2, 3, 6).double()
    ours = torch.distributions.kl_divergence(
        DiagonalNormal(*p_params), DiagonalNormal(*q_params)
    )
    reference = torch.distributions.kl_divergence(
        dist.Normal(p_params[0], p_params[1].exp()).to_event(1),
        dist.Normal(q_params[0], q_params[1].exp()).to_event(1),
    )
    assert ours.shape == (3,) and torch.allclose(ours, reference)


def test_diagonal_normal_draws_as_normal_and_broadcasts_its_parameters():
    loc, log_scale = torch.randn(4, 6), torch.randn(6)
    ours = DiagonalNormal(loc, log_scale)
    assert ours.batch_shape == (4,) and ours.event_shape == (6,)
    torch.manual_seed(1)
    value = ours.rsample((2,))
    torch.manual_seed(1)
    reference = dist.Normal(loc, log_scale.exp()).to_event(1).rsample((2,))
    assert torch.equal(value, reference)
    assert ours.expand([4]) is ours
    with pytest.raises(ValueError):
        DiagonalNormal(loc, log_scale, validate_args=True).log_prob(torch.randn(4, 5))


def test_bernoulli_image_is_bernoulli_to_event_and_validates():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 10).double() * 5
    x = (torch.rand(4, 10) < 0.5).double()
    ours, reference = BernoulliImage(logits), dist.Bernoulli(logits=logits).to_event(1)
    assert torch.allclose(ours.log_prob(x), reference.log_prob(x))
    assert torch.allclose(ours.mean, torch.sigmoid(logits))
    assert ours.expand([2, 3, 4]).batch_shape == (2, 3, 4)
    assert torch.allclose(ours.variance, reference.variance)
    torch.manual_seed(2)
    draws = ours.sample((400,))
    assert draws.shape == (400, 3, 4, 10) and set(draws.unique().tolist()) <= {0, 1}
    # Each pixel mean within 5 SE of its probability (SE <= 0.025 at 400 draws).
    assert ((draws.mean(0) - ours.mean).abs() < 0.125).all()
    with pytest.raises(ValueError):
        BernoulliImage(logits, validate_args=True).log_prob(x + 0.5)


def test_distributions_broadcast_in_plates():
    def model(x):
        with pyro.plate("particles", 5, dim=-2), pyro.plate("data", 4, dim=-1):
            z = pyro.sample("z", DiagonalNormal(x.new_zeros(6), x.new_zeros(6)))
            pyro.sample("x", BernoulliImage(z @ x.new_ones(6, 10)), obs=x[:, :10])

    trace = poutine.trace(model).get_trace(torch.zeros(4, 10))
    trace.compute_log_prob()
    assert trace.nodes["z"]["value"].shape == (5, 4, 6)
    assert trace.nodes["x"]["log_prob"].shape == (5, 4)


def test_mean_field_elbo_uses_the_closed_form_kl_with_the_paper_networks():
    from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

    from pyro_iwae import paper_architecture

    torch.manual_seed(0)
    model, guide = paper_architecture(1)
    x = (torch.rand(3, 784) < 0.3).float()
    options = dict(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    mean_field = TraceMeanField_ELBO(**options).loss(model, guide, x)
    sampled = Trace_ELBO(**options).loss(model, guide, x)
    # Same expectation; the sampled KL adds noise (a few nats per particle, so
    # well under 0.5 nats over 2000 particles and 3 points).
    assert abs(mean_field - sampled) < 0.5


# Logits on both sides of every switch between series and closed forms, and
# past the float32 clamp (|L| > 15.9) of torch's ContinuousBernoulli.
CB_LOGITS = [-60, -30, -16, -1, -1e-3, 0, 1e-3, 1, 16, 30, 60]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_integrates_to_one_at_every_logit(dtype):
    # It integrated to 0.53 at L = -30 and 0.27 at L = 60 in float32: the
    # normaliser came from probabilities clamped to [eps, 1 - eps], L x did not.
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    logits = torch.tensor(CB_LOGITS, dtype=dtype).unsqueeze(-1)
    log_density = ContinuousBernoulliImage(logits).log_prob(
        grid.to(dtype)[:, None, None]
    )
    totals = torch.trapezoid(log_density.double().exp(), grid, dim=0)
    # The trapezoid rule is off by about (L h)^2 / 12 = 8e-9 at L = 60.
    tolerance = 1e-7 if dtype == torch.float64 else 5e-6
    assert (totals - 1).abs().max() < tolerance, totals


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_log_prob_is_torchs_where_torch_is_exact(dtype):
    # Torch's float64 values, for |L| < 10, around its Taylor switch at 0 and
    # ours at 0.5 too (torch's float32 ones are off by up to 1e-4 there).
    torch.manual_seed(0)
    logits = (torch.rand(4, 50, dtype=torch.float64) - 0.5) * 20
    logits[0, :5] = torch.tensor([0.0, 0.003, 0.4999, 0.5001, -0.5])
    x = torch.rand(3, 4, 50, dtype=torch.float64)
    reference = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x)
    got = ContinuousBernoulliImage(logits.to(dtype)).log_prob(x.to(dtype))
    assert got.shape == (3, 4) and got.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(got.double(), reference.sum(-1), rtol=0, atol=50 * tolerance)
    pixels = ContinuousBernoulliImage(logits.reshape(-1, 1).to(dtype))
    got = pixels.log_prob(x.reshape(3, -1, 1).to(dtype)).double()
    assert torch.allclose(got, reference.reshape(3, -1), rtol=0, atol=tolerance)


def test_continuous_bernoulli_gradients_are_finite_and_exact_everywhere():
    # Each form is used only where it is finite, so torch.where passes no NaN
    # gradients from the other; at L = 0 exactly the slope is x - 1/2.
    big = [-1e30, -1e4, -800.0, -100.0, 100.0, 800.0, 1e4, 1e30]
    for dtype in (torch.float32, torch.float64):
        logits = torch.tensor(CB_LOGITS + big, dtype=dtype).unsqueeze(-1)
        logits.requires_grad_()
        x = torch.full_like(logits, 0.25)
        (grad,) = torch.autograd.grad(
            ContinuousBernoulliImage(logits).log_prob(x).sum(), logits
        )
        assert grad.isfinite().all(), grad
        assert grad[CB_LOGITS.index(0)].item() == pytest.approx(0.25 - 0.5)
    # Central differences, in float64, near 0 and at large |L|.
    logits = torch.tensor(
        [-60, -16, -0.7, -0.5, -0.3, -1e-4, 0, 1e-4, 0.3, 0.5, 0.7, 16, 60],
        dtype=torch.float64,
    ).unsqueeze(-1)
    x = torch.rand(logits.shape, dtype=torch.float64, generator=torch.Generator())

    def log_p(at):
        return ContinuousBernoulliImage(at).log_prob(x)

    logits.requires_grad_()
    (grad,) = torch.autograd.grad(log_p(logits).sum(), logits)
    h = 1e-6
    numeric = (log_p(logits.detach() + h) - log_p(logits.detach() - h)) / (2 * h)
    assert torch.allclose(grad.squeeze(-1), numeric, rtol=0, atol=1e-8)


def _cb_moments_by_quadrature(logit: float) -> tuple[float, float]:
    """The mean and variance of a continuous Bernoulli, from its density
    exp(L x) / integral, by quadrature (independent of the class's formulas)."""
    grid = np.linspace(0, 1, 400001)
    unnormalised = np.exp(logit * grid - max(logit, 0))
    total = np.trapezoid(unnormalised, grid)
    mean = np.trapezoid(grid * unnormalised, grid) / total
    return mean, np.trapezoid((grid - mean) ** 2 * unnormalised, grid) / total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_bernoulli_mean_and_variance_are_exact_at_every_logit(dtype):
    # The mean (the pictures' pixel values) came from clamped probabilities:
    # 0.937 at L = 60, where it is 1 - 1/60 = 0.983.
    logits = torch.tensor(CB_LOGITS + [-2.0, 2.0, 200.0], dtype=dtype).unsqueeze(-1)
    d = ContinuousBernoulliImage(logits)
    for logit, mean, variance in zip(CB_LOGITS, d.mean, d.variance, strict=False):
        expected_mean, expected_variance = _cb_moments_by_quadrature(logit)
        assert mean.item() == pytest.approx(expected_mean, abs=1e-7)
        assert variance.item() == pytest.approx(expected_variance, rel=1e-5)
    assert d.mean[-1].item() == pytest.approx(1 - 1 / 200, rel=1e-7)
    assert d.variance[-1].item() == pytest.approx(1 / 200**2, rel=1e-6)


@pytest.mark.parametrize("logit", [-60.0, -20.0, 0.0, 1e-3, 0.7, 20.0, 60.0])
def test_continuous_bernoulli_draws_follow_its_distribution(logit):
    # Draws came from the clamped distribution: their mean was 0.937 at L = 60.
    torch.manual_seed(0)
    n = 20000
    d = ContinuousBernoulliImage(torch.full((2, 1), logit))
    draws = d.sample((n // 2,))
    assert draws.shape == (n // 2, 2, 1)
    draws = draws.double().flatten().numpy()
    assert ((draws >= 0) & (draws <= 1)).all()

    def cdf(x):
        return x if logit == 0 else np.expm1(logit * x) / np.expm1(logit)

    assert scipy.stats.kstest(draws, cdf).pvalue > 1e-3
    mean, variance = _cb_moments_by_quadrature(logit)
    assert abs(draws.mean() - mean) < 5 * math.sqrt(variance / n)


def test_continuous_bernoulli_draws_are_differentiable_in_the_logits():
    # Reparameterised: x = F^-1(u) is continuous in L (also across 0) with
    # finite gradients at every logit, equal to central differences.
    logits = torch.tensor(
        [-800, -60, -1.5, -0.7, -0.3, -5e-3, 0, 5e-3, 0.3, 0.7, 1.5, 60, 800],
        dtype=torch.float64,
    ).unsqueeze(-1)

    def draw(at):
        torch.manual_seed(3)
        return ContinuousBernoulliImage(at).rsample((50,))

    logits.requires_grad_()
    (grad,) = torch.autograd.grad(draw(logits).sum(), logits)
    assert grad.isfinite().all()
    h = 1e-6
    numeric = (draw(logits.detach() + h) - draw(logits.detach() - h)).sum(0) / (2 * h)
    assert torch.allclose(grad, numeric, rtol=0, atol=1e-7)
