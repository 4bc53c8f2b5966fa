"""Tests of pyro_iwae.infer.particle_dims: under the particle plate, a dim of a
site's log-prob that sits at the particles' place without following their number
(data with a leading dim as long as the particles), or the particles' dim moved
elsewhere (a sum over it), is refused in one line where the bound was silently
wrong; the check runs once per program, off the random stream."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from global_gaussian import GlobalGaussian

from pyro_iwae import IWELBO, joint_log_likelihood, log_likelihood
from pyro_iwae.errors import ProgramError

A, B, S = 1.5, 0.3, 0.7  # x | z ~ N(A z + B, S), z ~ N(0, 1)
K = 5


def rows_model(x):
    # x is [K, N]: K values per point, its leading dim in no plate.
    with pyro.plate("data", x.shape[-1]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(A * z + B, S), obs=x)


def rows_guide(x):
    # The exact posterior of z given its point's K values.
    var = 1 / (1 + x.shape[0] * A**2 / S**2)
    with pyro.plate("data", x.shape[-1]):
        pyro.sample("z", dist.Normal(var * A * (x - B).sum(0) / S**2, math.sqrt(var)))


def point_model(x):
    # One latent per point of x, in the data plate.
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(A * z + B, S), obs=x)


def test_a_leading_dim_as_long_as_the_particles_is_refused():
    # It was taken for the particles': each particle weighed one row of the data,
    # and IWELBO gave about -10 where log p(x) is about -33, silently.
    pyro.set_rng_seed(0)
    x = torch.randn(K, 4, dtype=torch.float64)
    cov = A**2 * torch.ones(K, K) + S**2 * torch.eye(K)
    exact = dist.MultivariateNormal(torch.full((K,), B), cov).log_prob(x.T)
    words = r"site 'x' has batch shape \[5, 4\], whose dim -2 \(size 5\) does not "
    with pytest.raises(ProgramError, match=words) as error:
        IWELBO(K).loss(rows_model, rows_guide, x)
    assert "\n" not in str(error.value) and "pyro.plate" in str(error.value)
    # The evaluators refuse it as drawn one particle at a time.
    for vectorize in (True, False):
        with pytest.raises(ProgramError, match=r"dim -2 \(size 5\) is in no pyro"):
            log_likelihood(
                rows_model, rows_guide, x, num_samples=K, vectorize_particles=vectorize
            )

    # Declared as the event, the K values are each point's: exact.
    def event_model(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = (A * z + B).unsqueeze(-1).expand(z.shape + x.shape[:1])
            pyro.sample("x", dist.Normal(loc, S).to_event(1), obs=x.T)

    assert IWELBO(K).loss(event_model, rows_guide, x) == pytest.approx(
        -exact.sum().item(), rel=1e-6
    )


def test_a_leading_dim_of_a_prior_as_long_as_the_particles_is_refused():
    # The prior's rows were each taken for a particle's: its K rows in no plate
    # are refused drawn one at a time, and were let through vectorised.
    def model(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(torch.zeros(K, x.shape[-1]), 1.0))
            pyro.sample("x", dist.Normal(A * z + B, S), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    x = torch.randn(3)
    with pytest.raises(ProgramError, match="run with 5 particles but fail with 2"):
        IWELBO(K).loss(model, guide, x)


def sum_model(x):
    # No .to_event(1): z's dim -1 is in no plate (summed, within the nesting).
    z = pyro.sample("z", dist.Normal(torch.zeros(1, dtype=torch.float64), 1.0))
    pyro.sample("x", dist.Normal(A * z.sum(-1) + B, S), obs=x)


def sum_guide(x):
    var = 1 / (1 + A**2 / S**2)
    loc = (var * A * (x - B) / S**2).reshape(1)
    pyro.sample("z", dist.Normal(loc, math.sqrt(var)))


def test_a_sum_over_the_particles_dim_is_refused():
    # Without plates the particles' dim of z is its -2, and z.sum(-1) moved it to
    # x's dim -1: each particle's weight summed log p(x | z_j) over all j, and the
    # bound was about -7 where log p(x) is -1.33 (drawn one at a time: exact).
    x = torch.tensor(0.8, dtype=torch.float64)
    exact = dist.Normal(B, math.sqrt(A**2 + S**2)).log_prob(x).item()
    sequential = IWELBO(K, vectorize_particles=False).loss(sum_model, sum_guide, x)
    assert sequential == pytest.approx(-exact, rel=1e-6)
    words = (
        r"site 'x' has batch shape \[5, 5\], whose dim -1 \(size 5\) follows the "
        r"number of particles \(size 2 with 2\) though the particles' dim is -2"
    )
    with pytest.raises(ProgramError, match=words) as error:
        IWELBO(K).loss(sum_model, sum_guide, x)
    assert "\n" not in str(error.value) and ".to_event(1)" in str(error.value)
    # With two particles the other run has three.
    with pytest.raises(ProgramError, match=r"\(size 3 with 3\)"):
        IWELBO(2).loss(sum_model, sum_guide, x)


def test_the_check_runs_once_per_program_off_the_random_stream(lg):
    # Its run is once, not every step, and shifts no draw: a seeded loss is the
    # one without it.
    x = lg.sample_data(4)
    runs = []

    def guide(data, idx=None):
        runs.append(1)
        lg.diagonal_guide()(data, idx)

    elbo = IWELBO(K)
    losses = []
    for _ in range(3):
        pyro.set_rng_seed(0)
        losses.append(elbo.loss(lg.model, guide, x))
        runs.append(0)
    assert runs == [1, 1, 0, 1, 0, 1, 0]
    unchecked = IWELBO(K)
    unchecked._dims_check = None
    pyro.set_rng_seed(0)
    assert unchecked.loss(lg.model, guide, x) == losses[0] == losses[1]


def test_the_evaluators_check_the_first_chunk_only(lg):
    # Every chunk would have run the program once more.
    gg = GlobalGaussian()
    x, y = lg.sample_data(3), gg.sample_data(3)
    runs = []

    def counted(guide):
        def run(*args, **kwargs):
            runs.append(1)
            return guide(*args, **kwargs)

        return run

    log_likelihood(
        lg.model, counted(lg.diagonal_guide()), x, num_samples=8, chunk_size=2
    )
    assert len(runs) == 4 + 1  # four chunks, and the check
    runs.clear()
    joint_log_likelihood(
        gg.model,
        counted(gg.guide()),
        y,
        num_samples=3,
        num_local_samples=2,
        chunk_size=2,
    )
    # Three chunks, each run twice (again to tie the global latents), and the check.
    assert len(runs) == 3 * 2 + 1


class NormedGuide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(1)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = self.norm(x.unsqueeze(-1)).squeeze(-1)
            pyro.sample("z", dist.Normal(loc, 1.0))


def normed_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(A * z + B, S), obs=x)


def test_the_check_moves_no_running_statistics():
    # Its run put batch norm's running mean forward a second time on the first
    # step.
    x = torch.tensor([0.5, 2.0, -1.0, 3.0])
    means = []
    for check in (True, False):
        guide, elbo = NormedGuide(), IWELBO(K)
        if not check:
            elbo._dims_check = None
        elbo.loss(normed_model, guide, x)
        means.append(guide.norm.running_mean.clone())
        assert guide.training
    assert torch.equal(means[0], means[1]) and means[0].abs().sum() > 0


def test_a_guide_that_differentiates_is_not_refused():
    # The check's run with another number of particles ran without gradients:
    # a guide taking a gradient step of its own (semi-amortised) failed there,
    # and was refused as a dim "at the particles' place".
    def guide(x):
        loc = torch.zeros(len(x), requires_grad=True)
        fit = dist.Normal(A * loc + B, S).log_prob(x).sum()
        (step,) = torch.autograd.grad(fit, loc, create_graph=True)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc + 0.1 * step, 1.0))

    pyro.set_rng_seed(0)
    x = torch.randn(6)
    losses = [IWELBO(3).differentiable_loss(point_model, guide, x) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)


def test_a_program_asserting_its_number_of_particles_is_left_unchecked():
    # Pyro's test_vectorized_shape_ok asserts its value's shape [k, ...]: the
    # check's run with another number of particles failed that assert, and the
    # program, valid, raised it.
    def guide(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0))
        assert z.shape == (K, 1, len(x))

    pyro.set_rng_seed(0)
    x = torch.randn(3)
    assert math.isfinite(IWELBO(K, max_plate_nesting=2).loss(point_model, guide, x))
