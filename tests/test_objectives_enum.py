"""IWELBO on programs beyond sampled continuous latents (float64, seeded): networks
that do not broadcast over the particle dimension (a one-line error), discrete sites
enumerated in the model (summed out of log p exactly) and in the guide (each value
with its own particles), each checked against exact values on small models."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_iwae import IWELBO, PyroIwaeError


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
    with pytest.raises(PyroIwaeError) as error:
        IWELBO(3).loss(model, guide, x)
    message = str(error.value)
    assert "\n" not in message
    assert "leading particle dimension of size 3" in message
    assert "vectorize_particles=False" in message
    assert isinstance(error.value, ValueError)
    # what the message offers works, and so does a network that broadcasts
    assert IWELBO(3, vectorize_particles=False).loss(model, guide, x) > 0
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
