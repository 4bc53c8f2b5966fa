"""The paper's distributions equal Pyro's Normal / Bernoulli with .to_event(1)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_iwae.nn.distributions import BernoulliImage, DiagonalNormal


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
