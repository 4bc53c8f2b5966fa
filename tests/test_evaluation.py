"""log_likelihood and latent activity against closed forms (float64, seeded)."""

import math
import warnings
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LATENT_DIM, PriorSiteModel
from pyro.distributions.transforms import AffineTransform

from pyro_iwae import (
    IWELBO,
    active_units,
    joint_log_likelihood,
    latent_activity,
    log_likelihood,
    paper_architecture,
)
from pyro_iwae.errors import ParticleBroadcastError, ProgramError
from pyro_iwae.infer.evaluation import (
    LARGEST_TENSOR,
    EstimateWarning,
    dataset_log_likelihood,
    default_chunk_size,
    estimate_problem,
    evaluating,
)


def test_log_likelihood_is_within_hundredths_of_a_nat(lg):
    x = lg.sample_data(20)
    estimate = log_likelihood(lg.model, lg.diagonal_guide(0.1, 1.3), x)
    assert estimate.shape == (20,)
    assert not estimate.requires_grad
    assert (estimate - lg.log_marginal(x)).abs().max() < 0.04


def test_a_seed_gives_one_estimate_whether_the_chunk_size_is_chosen_or_given(lg):
    """Choosing the chunk size runs model and guide once, off the random stream:
    the seeded estimate is the one with the chunk size given, and the bound
    IWELBO(K) gives from the same seed."""
    x = lg.sample_data(4)
    guide = lg.diagonal_guide()
    estimates = []
    for chunk_size in (None, 200):
        pyro.set_rng_seed(1)
        estimates.append(
            log_likelihood(lg.model, guide, x, num_samples=200, chunk_size=chunk_size)
        )
    assert torch.equal(*estimates)
    pyro.set_rng_seed(1)
    bound = -IWELBO(200).loss(lg.model, guide, x)
    assert estimates[0].sum().item() == pytest.approx(bound, rel=1e-12, abs=0)


def test_chunked_and_unchunked_agree_under_a_fixed_seed(lg):
    # 4 points x 2 latent dims x 16 particles: every chunk draws a multiple of 16
    # normals, so torch's generator yields the same stream in one draw or several.
    x = lg.sample_data(4)
    guide = lg.diagonal_guide()
    estimates = []
    for chunk_size in (64, 16, 32):
        pyro.set_rng_seed(7)
        estimates.append(
            log_likelihood(lg.model, guide, x, num_samples=64, chunk_size=chunk_size)
        )
    for other in estimates[1:]:
        assert torch.allclose(estimates[0], other, rtol=0, atol=1e-12)


def test_default_chunk_size_follows_the_memory_budget(lg):
    x = lg.sample_data(10)
    small = default_chunk_size(lg.model, lg.exact_guide, x, memory_budget=2**16)
    large = default_chunk_size(lg.model, lg.exact_guide, x, memory_budget=2**24)
    assert 1 <= small < large
    assert large == pytest.approx(256 * small, rel=0.01)


def test_default_chunk_size_keeps_each_tensor_under_the_mmap_threshold():
    model, guide = paper_architecture(1)
    x = torch.zeros(100, 784)
    chunk = default_chunk_size(model, guide, x, memory_budget=2**40)
    per_particle = 100 * 784 * 4  # the pixel logits, float32
    assert chunk * per_particle <= LARGEST_TENSOR < (chunk + 1) * per_particle
    # The paper's model at batch 100: the cap binds before the 256 MiB budget (126).
    assert default_chunk_size(model, guide, x) == chunk == 106


def test_exact_guide_gives_log_marginal_with_any_chunking(lg):
    x = lg.sample_data(6)
    for chunk_size in (None, 1, 7):
        estimate = log_likelihood(
            lg.model, lg.exact_guide, x, num_samples=50, chunk_size=chunk_size
        )
        assert torch.allclose(estimate, lg.log_marginal(x))


def test_log_likelihood_needs_a_data_plate(lg):
    def model(x):
        w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x[:, 0])

    def guide(x):
        pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0))

    with pytest.raises(ValueError, match="data plate that encloses every sample site"):
        log_likelihood(model, guide, torch.zeros(3, 1), num_samples=10)
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(model, guide, torch.zeros(3, 1), num_samples=0)


def test_evaluating_restores_modes():
    model, guide = paper_architecture(1)
    model.train()
    guide.eval()
    x = torch.zeros(2, 784)
    log_likelihood(model, guide, x, num_samples=3)
    assert model.training and all(m.training for m in model.modules())
    assert not guide.training
    with evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training


def test_latent_activity_is_the_variance_of_the_posterior_mean(lg):
    """For q(z|x) = N(A x + c, s) the activity of unit u is Var_x[(A x)_u]."""
    x = lg.sample_data(500)
    A = lg.A.clone()
    A[1] = 0.0  # the second unit ignores x: inactive

    def guide(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(data @ A.T, 0.3).to_event(1))

    activity = latent_activity(guide, x, num_samples=3, batch_size=128)["z"]
    assert activity.shape == (LATENT_DIM,)
    assert torch.allclose(activity, (x @ A.T).var(0, unbiased=False))
    assert active_units(guide, x, num_samples=3) == {"z": 1}


def test_active_units_of_the_paper_guides():
    """Each layer's output weights scaled so that its first units are active
    (activity 0.08 and more) and the rest are not (below 0.003): the counts are
    those units, and the first layer's activity is Var_x of its mean, exactly."""
    torch.manual_seed(0)
    x = (torch.rand(64, 784) < 0.3).float()
    for layers, active in ((1, {"z1": 10}), (2, {"z1": 10, "z2": 7})):
        _, guide = paper_architecture(layers)
        with torch.no_grad():
            for layer, (count, gain) in zip(
                guide.layers, ((10, 20.0), (7, 120.0)), strict=False
            ):
                loc_rows = layer.out.weight[: layer.out.out_features // 2]
                loc_rows.mul_(0.5)
                loc_rows[:count].mul_(gain)
        assert active_units(guide, x, num_samples=5) == active
        activity = latent_activity(guide, x, num_samples=5)
        with torch.no_grad():
            expected = guide.layers[0](x)[0].var(0, unbiased=False)
        torch.testing.assert_close(activity["z1"], expected, rtol=1e-5, atol=1e-7)


def flow_guide(loc_weights: torch.Tensor, scale: float) -> Callable:
    """q(z|x) = N(x W^T, scale^2 I) through an affine flow: no closed-form mean,
    so the activity averages sampled values."""

    def guide(data: torch.Tensor) -> None:
        with pyro.plate("data", data.shape[0]):
            base = dist.Normal(torch.zeros_like(data @ loc_weights.T), 1.0)
            flow = AffineTransform(data @ loc_weights.T, scale)
            pyro.sample("z", dist.TransformedDistribution(base, [flow]).to_event(1))

    return guide


def test_a_guide_without_a_closed_form_mean_has_no_active_units_where_none_are():
    # The sampled means' noise, Var_q / num_samples = 0.01, was taken for activity:
    # 23 of 50 units counted active at the default num_samples.
    x = torch.rand(200, 784)
    guide = flow_guide(torch.zeros(50, 784), 1.0)
    torch.manual_seed(0)
    assert active_units(guide, x) == {"z": 0}
    torch.manual_seed(0)
    assert latent_activity(guide, x)["z"].max() < 0.005


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_activity_of_a_flow_guide_is_the_variance_of_its_mean(vectorize):
    """Five units' means vary over x (Var_x 0.03 to 0.07), five do not; the
    sampled means' noise (0.01 a unit) is not counted."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g)
    weights = torch.zeros(10, 8)
    weights[:5, :5] = torch.diag(torch.linspace(0.03, 0.07, 5).sqrt())
    guide = flow_guide(weights, 1.0)
    torch.manual_seed(2)
    activity = latent_activity(guide, x, vectorize_particles=vectorize)["z"]
    exact = (x @ weights.T).var(0, unbiased=False)
    # Before, every unit came out about 0.01 above its exact activity.
    assert (activity - exact).abs().max() < 0.004, activity - exact
    torch.manual_seed(2)
    counts = active_units(guide, x, vectorize_particles=vectorize)
    assert counts == {"z": 5}


@pytest.mark.parametrize("kind", ["bernoulli", "normal"])
def test_log_likelihood_with_a_latent_site_left_to_the_prior(lg, kind):
    """u is proposed from its prior: the estimate is exact in expectation, not
    log 2 (or E[log p(u)]) below it."""
    m = PriorSiteModel(lg, kind)
    # Wider than q(z|x) of the model without u, so the weights have light tails.
    guide = lg.diagonal_guide(shift=0.0, inflate=1.5)
    x = lg.sample_data(20, seed=4)
    estimate = log_likelihood(m.model, guide, x, num_samples=5000)
    log_w = IWELBO(5000).particles(m.model, guide, x).log_weights
    w = (log_w - log_w.logsumexp(0)).exp().reshape(5000, -1) * 5000
    se = w.std(0) / math.sqrt(5000)  # delta method: sd of log of the mean weight
    error = estimate - m.log_marginal(x)
    assert (error.abs() < 4 * se + 1e-3).all(), (error, se)


def test_estimate_problem_names_non_finite_and_far_out_estimates():
    g = torch.Generator().manual_seed(0)
    # A realistic spread: easy and hard MNIST digits differ by 100 nats and more.
    spread = -90 + 25 * torch.randn(1000, generator=g, dtype=torch.float64)
    assert estimate_problem(spread) is None
    assert estimate_problem(spread[:3]) is None
    nan = spread.clone()
    nan[[3, 7]] = float("nan")
    assert estimate_problem(nan).startswith("2 of 1000 log-likelihood estimates")
    far = spread.clone()
    far[5] = 5000.0
    message = estimate_problem(far)
    assert message.startswith("1 of 1000") and "largest 5000.0 nats" in message
    near = spread.clone()
    near[5] = spread.max() + 50  # beyond the spread, not a gross failure
    assert estimate_problem(near) is None


def test_dataset_log_likelihood_warns_of_invalid_estimates(lg):
    def prior_guide(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1))

    x = lg.sample_data(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset_log_likelihood(lg.model, prior_guide, x, num_samples=3)
    x[2] = float("inf")  # a valid value of a Normal, of density 0
    with pytest.warns(EstimateWarning, match="1 of 6 log-likelihood estimates"):
        estimates = dataset_log_likelihood(
            lg.model, prior_guide, x, num_samples=3, batch_size=4
        )
    assert estimates.isfinite().tolist() == [True, True, False, True, True, True]


def test_a_joint_autoguide_is_told_to_use_auto_normal():
    from pyro.infer.autoguide import AutoDiagonalNormal

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoDiagonalNormal(model)
    with pytest.raises(ValueError, match="outside every plate") as e:
        log_likelihood(model, guide, torch.randn(4, 2), num_samples=3)
    assert "AutoNormal" in str(e.value) and "pyro.plate(" not in str(e.value)


def test_data_that_are_no_tensor_or_empty_are_refused_in_one_line_naming_the_caller(
    lg,
):
    # NumPy data failed inside the networks ('numpy.ndarray' object has no
    # attribute 'dim'); active_units' dtype message came with Pyro's trace
    # shapes; joint_log_likelihood's empty batch was log_likelihood's.
    x = lg.sample_data(3)
    with pytest.raises(TypeError, match="^argument 1 is a ndarray, not a tensor"):
        log_likelihood(lg.model, lg.exact_guide, x.numpy(), num_samples=4)
    with pytest.raises(TypeError, match="^data is a ndarray, not a tensor"):
        active_units(lg.exact_guide, x.numpy())
    with pytest.raises(ValueError, match="^joint_log_likelihood got an empty batch"):
        joint_log_likelihood(lg.model, lg.exact_guide, x[:0])

    def picky_guide(data):
        if data.dtype != torch.float64:
            raise ValueError("the guide takes float64 x")
        lg.exact_guide(data)

    with pytest.raises(ValueError) as info:
        active_units(picky_guide, x.float())
    assert str(info.value) == "the guide takes float64 x"


def test_dataset_log_likelihood_of_one_point_without_its_batch_dim_says_unsqueeze(lg):
    # Before, the point was cut into pieces of batch_size values, which the
    # programs refused as the wrong width (PaperGuide: "got shape [100]; the
    # networks were built for x_dim=784"); log_likelihood said unsqueeze(0).
    model, guide = paper_architecture(1)
    for function in (log_likelihood, dataset_log_likelihood):
        with pytest.raises(ValueError) as info:
            function(model, guide, torch.zeros(784), num_samples=10)
        assert str(info.value) == (
            "PaperGuide takes x of shape [batch, 784], got shape [784]; one point: "
            "x.unsqueeze(0)"
        )
    x = lg.sample_data(1)[0]
    with pytest.raises(ValueError, match=r"x.unsqueeze\(0\) for one point\)$"):
        dataset_log_likelihood(lg.model, lg.exact_guide, x, num_samples=4, batch_size=2)


def test_dataset_log_likelihood_of_scalar_points_is_exact():
    # x = z + noise, z and noise N(0, 1): p(x) = N(0, 2), p(z|x) = N(x/2, 1/2),
    # the guide: every weight is p(x), whatever the batches.
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    x = torch.randn(250, generator=torch.Generator().manual_seed(0)).double()
    estimates = dataset_log_likelihood(model, guide, x, num_samples=4, batch_size=100)
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x)
    assert torch.allclose(estimates, exact, atol=1e-10)


def _nested_plates():
    """A latent per point in a data plate at dim -2, three observed values per
    point in a plate at dim -1, its exact posterior as the guide; exact log p(x)."""
    a, b, s = 1.5, 0.3, 0.7
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)).double() * 2
    cov = s * s * torch.eye(3, dtype=x.dtype) + a * a
    exact = dist.MultivariateNormal(x.new_full((3,), b), cov).log_prob(x)
    precision = 1 + 3 * a * a / (s * s)
    loc = (a / (s * s)) * (x - b).sum(-1, keepdim=True) / precision

    def model(x):
        with pyro.plate("data", 6, dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            with pyro.plate("values", 3, dim=-1):
                pyro.sample("x", dist.Normal(a * z + b, s), obs=x)

    def guide(x):
        with pyro.plate("data", 6, dim=-2):
            pyro.sample("z", dist.Normal(loc, precision**-0.5))

    return model, guide, x, exact


def test_plates_nested_deeper_than_max_plate_nesting_are_refused_by_each_evaluator():
    # log_likelihood(vectorize_particles=False) failed with a bare IndexError;
    # joint_log_likelihood(vectorize_particles=False) with a bare RuntimeError.
    model, guide, x, exact = _nested_plates()
    advice = r"; pass max_plate_nesting=2$"
    with pytest.raises(ProgramError, match=r"plate 'data' .* at dim=-2, .*" + advice):
        log_likelihood(model, guide, x, num_samples=10, vectorize_particles=False)
    with pytest.raises(ProgramError, match=r"plate 'data' .* at dim=-2, .*" + advice):
        joint_log_likelihood(model, guide, x, num_samples=10, vectorize_particles=False)
    with pytest.raises(ParticleBroadcastError, match=r"down to dim=-2, .*" + advice):
        log_likelihood(model, guide, x, num_samples=10)
    for vectorize in (True, False):
        estimate = log_likelihood(
            model,
            guide,
            x,
            num_samples=10,
            max_plate_nesting=2,
            vectorize_particles=vectorize,
        )
        assert torch.allclose(estimate, exact)
