"""Tests of pyro_iwae.infer.estimable: the evaluators refuse, in one line, the
programs whose weights are no per-point estimate of log p(x) (a plate that draws
a sub-sample, a latent scaled apart from the data, a guide latent the model
lacks), eagerly, compiled and under AIS; a sub-sample given as indices, and a
scale on the whole model, still give exact answers."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_iwae import (
    IWELBO,
    ais_log_likelihood,
    log_likelihood,
    log_likelihood_with_diagnostics,
)
from pyro_iwae.errors import ProgramError
from pyro_iwae.infer.estimable import check_program

A, B, S = 1.5, 0.3, 0.7  # x | z ~ N(A z + B, S), z ~ N(0, 1)


def exact_log_px(x: torch.Tensor) -> torch.Tensor:
    return dist.Normal(B, math.sqrt(A**2 + S**2)).log_prob(x)


def exact_posterior(x: torch.Tensor) -> dist.Normal:
    var = 1 / (1 + A**2 / S**2)
    return dist.Normal(var * A * (x - B) / S**2, math.sqrt(var))


def model(
    x,
    plate_kwargs=None,
    latent_scale=1.0,
    scale=1.0,
    extra=False,
    again_scale=None,
    model_scale=1.0,
    model_mask=None,
    observed_z=None,
):
    with pyro.poutine.scale(scale=scale * model_scale):
        with pyro.plate("data", len(x), **(plate_kwargs or {})) as i:
            with (
                pyro.poutine.scale(scale=latent_scale),
                pyro.poutine.mask(mask=True if model_mask is None else model_mask),
            ):
                z = pyro.sample("z", dist.Normal(0.0, 1.0), obs=observed_z)
            pyro.sample("x", dist.Normal(A * z + B, S), obs=x[i])
            if again_scale is not None:  # a second observation, scaled apart
                with pyro.poutine.scale(scale=again_scale):
                    pyro.sample("again", dist.Normal(z, 1.0), obs=x[i])


def guide(x, plate_kwargs=None, latent_scale=1.0, scale=1.0, extra=False, **_):
    with pyro.poutine.scale(scale=scale):
        with pyro.plate("data", len(x), **(plate_kwargs or {})) as i:
            with pyro.poutine.scale(scale=latent_scale):
                pyro.sample("z", exact_posterior(x[i]))
            if extra:
                pyro.sample("extra", dist.Normal(0.0, 1.0))


X = torch.tensor([-1.0, 0.2, 0.9, 2.5, -0.4, 1.3])

EVALUATORS = {
    "log_likelihood": lambda *a, **k: log_likelihood(model, guide, *a, **k),
    "diagnostics": lambda *a, **k: log_likelihood_with_diagnostics(
        model, guide, *a, **k
    ),
    "ais": lambda *a, num_samples, **k: ais_log_likelihood(
        model, guide, *a, num_chains=2, num_steps=3, **k
    ),
}


@pytest.mark.parametrize("evaluator", sorted(EVALUATORS))
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"plate_kwargs": {"subsample_size": 3}}, "plate 'data' draws a sub-sample"),
        ({"latent_scale": 0.3}, r"latent site 'z' has another scale \(0.3\)"),
        ({"again_scale": 2.0}, "need one scale for the observed sites.*'again'"),
        # Each gave numbers silently: the point masked in the model only weighed
        # -log q; the conditioned z was scored at its observed value in p.
        ({"model_mask": X > 0}, "site 'z' is masked otherwise in the model than"),
        ({"observed_z": torch.zeros(6)}, "latent site 'z' is observed in the model"),
        # The message named the model's scale as that of the site, and said to
        # drop it: scaling the guide alike is the other way.
        ({"model_scale": 2.0}, r"the guide's latent site 'z' has another scale"),
    ],
)
def test_refused_in_one_line(evaluator, kwargs, words):
    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match=words) as error:
        EVALUATORS[evaluator](X, num_samples=4, chunk_size=2, **kwargs)
    # One line, and no objective named: the evaluators use none.
    assert "\n" not in str(error.value) and "IWELBO" not in str(error.value)


def test_a_guide_latent_the_model_lacks_is_refused():
    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match="guide's latent site 'extra' is not in"):
        log_likelihood(model, guide, X, num_samples=4, extra=True)


def test_compiled_log_likelihood_refuses_a_drawn_sub_sample():
    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match="draws a sub-sample"):
        log_likelihood(
            model,
            guide,
            X,
            num_samples=4,
            plate_kwargs={"subsample_size": 3},
            compile=None,  # the traced graph, uncompiled: no inductor needed
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"plate_kwargs": {"subsample": torch.tensor([4, 0, 2])}},
        {"scale": 0.25},  # the whole model and guide: the weights stay unscaled
    ],
    ids=["given-sub-sample", "whole-model-scale"],
)
def test_what_stays_exact(kwargs):
    pyro.set_rng_seed(0)
    # With the exact posterior as the guide each weight is p(x) itself.
    got = log_likelihood(model, guide, X, num_samples=8, chunk_size=3, **kwargs)
    points = kwargs.get("plate_kwargs", {}).get("subsample", torch.arange(len(X)))
    assert torch.allclose(got, exact_log_px(X[points]), atol=1e-5)


def forgotten_event_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        # .to_event(1) forgotten: the log-prob's dim -2 is in no plate.
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), S), obs=x)


def forgotten_event_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.mean(-1), 1.0))


@pytest.mark.parametrize(
    "run, vectorize",
    [
        ("log_likelihood", True),
        ("log_likelihood", False),
        ("ais", True),
        ("IWELBO", True),
        ("IWELBO", False),
        ("fit", True),
    ],
)
def test_a_batch_dim_in_no_plate_is_refused(run, vectorize):
    # Drawn one particle at a time, the undeclared dim (as long as the batch)
    # was taken for the particles: numbers came out, silently wrong; vectorized,
    # the advice was vectorize_particles=False.
    pyro.set_rng_seed(0)
    x = torch.randn(3, 3)
    args = (forgotten_event_model, forgotten_event_guide, x)
    calls = {
        "log_likelihood": lambda: log_likelihood(
            *args, num_samples=8, vectorize_particles=vectorize
        ),
        "ais": lambda: ais_log_likelihood(*args, num_chains=2, num_steps=3),
        "IWELBO": lambda: IWELBO(num_particles=5, vectorize_particles=vectorize).loss(
            *args
        ),
        "fit": lambda: check_program(*args),
    }
    words = r"site 'x' has batch shape \[3, 3\], whose dim -2 \(size 3\) is in no"
    with pytest.raises(ProgramError, match=words) as error:
        calls[run]()
    assert "\n" not in str(error.value) and ".to_event(1)" in str(error.value)


def test_an_observed_value_of_size_one_along_the_data_plate_is_told_to_be_an_event():
    # It said the data lacked their batch dimension, which they have.
    pyro.set_rng_seed(0)
    with pytest.raises(ProgramError, match=r"dim -1.*has size 1: make each") as e:
        log_likelihood(
            forgotten_event_model,
            forgotten_event_guide,
            torch.randn(4, 1),
            num_samples=4,
        )
    assert "lack their batch" not in str(e.value)


def test_a_dim_right_of_the_data_plate_is_summed_as_pyro_does():
    # Pyro's own shape check allows a dim in no plate right of a plate's: the
    # values along it are one point's. With the exact posterior each weight is p(x).
    x = torch.tensor([[0.3, -1.0, 0.5], [2.0, 1.1, 0.4]])
    var = 1 / (1 + x.shape[1] * A**2 / S**2)

    def model(x):
        with pyro.plate("data", len(x), dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(A * z + B, S), obs=x)

    def guide(x):
        with pyro.plate("data", len(x), dim=-2):
            mean = var * A * (x - B).sum(-1, keepdim=True) / S**2
            pyro.sample("z", dist.Normal(mean, math.sqrt(var)))

    cov = A**2 * torch.ones(3, 3) + S**2 * torch.eye(3)
    exact = dist.MultivariateNormal(torch.full((3,), B), cov).log_prob(x)
    assert_exact_in_both_modes(model, guide, x, exact)


def vector_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ torch.ones(2), S), obs=x)


def test_a_guide_of_other_event_dims_than_the_model_is_refused_before_training():
    # It passed, and training ended in Pyro's traceback "Model and guide
    # event_dims disagree at site 'z': 1 vs 2".
    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(2))

    with pytest.raises(ProgramError, match="'z' has 2 event dims in the guide but 1"):
        check_program(vector_model, guide, X)


def test_a_program_failing_on_its_own_is_not_told_to_match_shapes():
    # Every failure was told to make the guide's latent sites those of the
    # model, of the same shapes: wrong for a guide that raises by itself.
    def crashing(x):
        raise ValueError("guide crashed")

    def small_guide(x):  # z of 3, where the model's has 2: a mismatch
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    cases = [
        (vector_model, crashing, r"^the guide fails .*\(ValueError: guide crashed\)$"),
        (crashing, small_guide, r"^the model fails .*\(ValueError: guide crashed\)$"),
        (vector_model, small_guide, "though each runs alone; make the guide's"),
    ]
    for model, guide, words in cases:
        with pytest.raises(ProgramError, match=words):
            check_program(model, guide, X)


def test_a_dim_left_of_the_data_plate_within_the_nesting_is_summed():
    # Refused in both modes though summed right (it lies among the plate dims
    # max_plate_nesting=2 gives), while IWELBO took it vectorised: now the two
    # modes agree. Each z[d, n] has its exact posterior N(x / 2, 1 / 2), so each
    # weight is the exact p(x_n) = prod_d N(x[d, n]; 0, 2).
    x = torch.tensor(
        [[0.3, -1.0, 0.5, 2.0], [1.1, 0.4, -0.2, 0.0], [0.7, 1.5, -1.2, 0.9]]
    )

    def model(x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).sum(0)
    assert_exact_in_both_modes(model, guide, x, exact)
    for vectorize in (True, False):
        bound = IWELBO(3, max_plate_nesting=2, vectorize_particles=vectorize)
        assert abs(-bound.loss(model, guide, x) - exact.sum().item()) < 1e-3
        # One plate deep, the dim is where the particles go: refused in both.
        with pytest.raises(ProgramError, match=r"dim -2 \(size 3\) is in no pyro"):
            log_likelihood(
                model,
                guide,
                x,
                num_samples=4,
                max_plate_nesting=1,
                vectorize_particles=vectorize,
            )


def assert_exact_in_both_modes(model, guide, x, exact):
    """log_likelihood with two plate dims is ``exact`` per point, the particles
    drawn at once and one at a time (the guide is the exact posterior)."""
    for vectorize in (True, False):
        pyro.set_rng_seed(0)
        got = log_likelihood(
            model,
            guide,
            x,
            num_samples=4,
            max_plate_nesting=2,
            vectorize_particles=vectorize,
        )
        assert torch.allclose(got.squeeze(), exact, atol=1e-4)
