"""fit and log_likelihood for any nn.Module / PyroModule model and guide, and
one clear error for each bad input of log_likelihood and dataset_log_likelihood."""

import json
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LATENT_DIM, OBS_DIM, SIGMA, LinearGaussian
from pyro.nn import PyroModule, PyroParam
from torch import nn

from pyro_iwae import (
    IWELBO,
    dataset_log_likelihood,
    fit,
    log_likelihood,
    make_objective,
    paper_architecture,
    sbn_architecture,
)

D, Z = 4, 2


class LinearModel(PyroModule):
    """x ~ N(W z + b, sigma^2): a PyroModule with an nn.Linear and a PyroParam."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(Z, D)
        self.scale = PyroParam(torch.tensor(2.0), dist.constraints.positive)

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            loc = self.decoder(z)
            pyro.sample("x", dist.Normal(loc, self.scale).to_event(1), obs=x)


class LinearGuide(PyroModule):
    """q(z|x): an nn.Linear encoder and a PyroParam named as the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(D, Z)
        self.scale = PyroParam(torch.full((Z,), 0.5), dist.constraints.positive)

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.encoder(x), self.scale).to_event(1))


def data(n: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, Z, generator=g)
    return torch.randn(n, Z, generator=g) @ w.T + 0.3 * torch.randn(n, D, generator=g)


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_fit_trains_pyro_modules_made_outside_local_param_mode(estimator):
    """The issue's AttributeError: '_Context' object has no attribute 'param_state'."""
    model, guide = LinearModel(), LinearGuide()
    x = data()
    before = log_likelihood(model, guide, x, num_samples=50).mean()
    history = fit(
        model,
        guide,
        x,
        IWELBO(num_particles=5, estimator=estimator),
        schedule=[(15, 1e-2)],
        test_data=x[:100],
    )
    after = log_likelihood(model, guide, x, num_samples=50).mean()
    assert after > before + 1.0
    assert history[-1]["test_bound"] > history[0]["test_bound"]
    # Same-named PyroParams of model and guide stay each their own.
    assert model.scale.shape == () and guide.scale.shape == (Z,)


def test_log_likelihood_of_pyro_modules_does_not_mix_their_parameters():
    model, guide = LinearModel(), LinearGuide()
    x = data(20)
    pyro.clear_param_store()
    first = log_likelihood(model, guide, x, num_samples=20)
    assert first.shape == (20,) and torch.isfinite(first).all()
    assert model.scale.shape == () and guide.scale.shape == (Z,)


def test_train_run_with_a_registered_pyro_module_model(tmp_path):
    from pyro_iwae import RunConfig, register_model, train_run
    from pyro_iwae.nn.registry import MODELS

    class Bernoulli(PyroModule):
        def __init__(self, x_dim: int) -> None:
            super().__init__()
            self.decoder = nn.Linear(50, x_dim)

        def forward(self, x: torch.Tensor) -> None:
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z1", dist.Normal(x.new_zeros(50), 1.0).to_event(1))
                logits = self.decoder(z)
                pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    register_model("test-pyro-module")(lambda x_dim, **_: Bernoulli(x_dim))
    try:
        config = RunConfig(
            model="test-pyro-module",
            train_limit=200,
            test_limit=50,
            batch_size=50,
            num_particles=2,
            epochs=1,
        )
        (metrics,) = train_run(config, tmp_path / "run")
        assert metrics["test_bound"] < 0
    finally:
        del MODELS["test-pyro-module"]


# -- bad input: one sentence that names the argument and what to do ----------


@pytest.fixture(scope="module")
def paper():
    return paper_architecture(1)


def test_a_point_without_its_batch_dimension(paper):
    x = torch.bernoulli(torch.full((784,), 0.3))
    with pytest.raises(ValueError, match=r"shape \[784\].*unsqueeze\(0\)") as e:
        log_likelihood(*paper, x, num_samples=3)
    assert "\n" not in str(e.value)
    assert log_likelihood(*paper, x.unsqueeze(0), num_samples=3).shape == (1,)


@pytest.mark.parametrize("architecture", [paper_architecture, sbn_architecture])
def test_images_that_are_not_flattened(architecture):
    model, guide = architecture(1)
    x = torch.bernoulli(torch.full((3, 28, 28), 0.3))
    with pytest.raises(ValueError, match=r"\[batch, 784\].*\[3, 28, 28\]") as e:
        log_likelihood(model, guide, x, num_samples=3)
    assert "\n" not in str(e.value) and "x.reshape(len(x), -1)" in str(e.value)
    assert log_likelihood(model, guide, x.flatten(1), num_samples=3).shape == (3,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool])
def test_data_of_another_dtype_than_the_networks(paper, dtype):
    """float64 arrays (numpy's default), integer or boolean pixels: one line that
    names both dtypes, where the first layer would raise torch's matmul error."""
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    with pytest.raises(ValueError, match=rf"dtype torch.float32, got {dtype}") as e:
        log_likelihood(*paper, x.to(dtype), num_samples=3)
    assert "\n" not in str(e.value) and "x.to(torch.float32)" in str(e.value)
    # fit said it with Pyro's "Trace Shapes:" dump on the lines after.
    with pytest.raises(ValueError, match=rf"dtype torch.float32, got {dtype}") as e:
        fit(*paper_architecture(1), x.to(dtype), IWELBO(2), test_size=0)
    assert "\n" not in str(e.value) and "x.to(torch.float32)" in str(e.value)
    model, guide = (module.double() for module in paper_architecture(1))
    log_px = log_likelihood(model, guide, x.double(), num_samples=3)
    assert log_px.dtype == torch.float64 and log_px.shape == (3,)


def test_a_dtype_mismatch_in_users_own_networks_is_one_line():
    # Torch's matmul raises a RuntimeError, not a ValueError: fit said it with
    # Pyro's "Trace Shapes:" dump on the lines after.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(2, 3)

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.out(z), 1.0).to_event(1), obs=x)

    class Guide(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Linear(3, 2)

        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(self.loc(x), 1.0).to_event(1))

    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype") as e:
        fit(Model(), Guide(), x, IWELBO(2), test_size=0, schedule=[(1, 1e-3)])
    assert "\n" not in str(e.value) and "Trace Shapes" not in str(e.value)


def test_data_with_nan_are_named_as_the_problem(paper):
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    x[2, 17] = float("nan")
    with pytest.raises(ValueError, match=r"data hold NaN.*1 of 4 points") as e:
        log_likelihood(*paper, x, num_samples=3)
    assert "guide" not in str(e.value) and "\n" not in str(e.value)


def test_a_count_given_as_a_float_is_named(paper):
    x = torch.bernoulli(torch.full((2, 784), 0.3))
    with pytest.raises(ValueError, match=r"num_samples must be an integer.*500\.0"):
        log_likelihood(*paper, x, num_samples=5e2)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer"):
        log_likelihood(*paper, x, num_samples=4, chunk_size=2.0)


def test_an_empty_batch(paper):
    with pytest.raises(ValueError, match=r"empty batch.*\[0, 784\].*at least one"):
        log_likelihood(*paper, torch.zeros(0, 784), num_samples=3)
    with pytest.raises(ValueError, match=r"data has shape \[0, 784\]"):
        dataset_log_likelihood(*paper, torch.zeros(0, 784), num_samples=3)


def test_dataset_batch_size_zero(paper):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        dataset_log_likelihood(*paper, torch.zeros(3, 784), batch_size=0)


def _guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))


@pytest.mark.parametrize("event", [True, False])
def test_an_observed_site_outside_every_plate(event):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
        likelihood = dist.Normal(z.sum(-1, keepdim=True).expand(x.shape), 1.0)
        pyro.sample("x", likelihood.to_event(1) if event else likelihood, obs=x)

    with pytest.raises(ValueError, match="site 'x' is outside every plate") as e:
        log_likelihood(model, _guide, torch.randn(5, D), num_samples=3)
    assert "pyro.plate('data', len(x))" in str(e.value)
    assert "\n" not in str(e.value)


def test_fit_uses_continuous_data_as_given():
    """The issue's silent binarisation: a Gaussian model must see the values."""
    seen = []

    class Recording(LinearModel):
        def forward(self, x):
            seen.append(x.detach().clone())
            super().forward(x)

    x = torch.rand(100, D)
    fit(Recording(), LinearGuide(), x, IWELBO(num_particles=2), test_size=0)
    # Each point as given (the first once more: fit's checks run on it).
    assert torch.equal(torch.cat(seen).unique(dim=0), x.unique(dim=0))
    with pytest.raises(ValueError, match=r"binarize needs training values in \[0, 1\]"):
        fit(LinearModel(), LinearGuide(), 3 * x, IWELBO(2), binarize=True)


def test_fit_refuses_bad_arguments_in_one_line():
    """No data, an objective that is not an ELBO, a stage without its rate: each a
    one-line error that says what fit takes, before anything trains."""
    model, guide = LinearModel(), LinearGuide()
    x = torch.rand(10, D)
    with pytest.raises(ValueError, match=r"one point, got shape \[0, "):
        fit(model, guide, x[:0], IWELBO(2))
    # A single point without its batch dimension trained as D points of one value.
    with pytest.raises(ValueError, match=r"got shape \[4\] \(one point: x.unsqueeze"):
        fit(model, guide, x[0], IWELBO(2))
    # Test points unlike the training ones failed after a whole epoch.
    for test in (torch.rand(5, D + 1), torch.rand(5, D, dtype=torch.float64)):
        with pytest.raises(ValueError, match="pass test points like the training"):
            fit(model, guide, x, IWELBO(2), test_data=test)
    # What the checkpoint could not load back, and a seed that is no integer.
    with pytest.raises(ValueError, match="keeps JSON values only"):
        fit(model, guide, x, IWELBO(2), config={"data": Path("x")})
    with pytest.raises(ValueError, match="seed must be an integer, got None"):
        fit(model, guide, x, IWELBO(2), seed=None)
    frozen, frozen_guide = LinearModel().requires_grad_(False), LinearGuide()
    frozen_guide.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter .* frozen"):
        fit(frozen, frozen_guide, x, IWELBO(2))
    with pytest.raises(TypeError, match="callback must be a FitCallback, got list"):
        fit(model, guide, x, IWELBO(2), callback=[])
    holes = x.clone()
    holes[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(1 of 10 points\)"):
        fit(model, guide, holes, IWELBO(2))
    # NumPy arrays failed on their missing tensor methods (no attribute 'dim').
    with pytest.raises(TypeError, match=r"^fit's data is a ndarray, not a tensor; "):
        fit(model, guide, x.numpy(), IWELBO(2))
    with pytest.raises(TypeError, match=r"^fit's test_data is a ndarray, not a "):
        fit(model, guide, x, IWELBO(2), test_data=x.numpy())
    with pytest.raises(TypeError, match=r"objective is a Pyro ELBO.*got str$"):
        fit(model, guide, x, "iwae")
    with pytest.raises(
        ValueError, match=r"list of \(epochs, lr\) stages, got \[\(1,\)\]"
    ):
        fit(model, guide, x, IWELBO(2), schedule=[(1,)])


class TwoSiteModel(nn.Module):
    """z1 ~ N(0, I), z2 | z1 ~ N(A z1, I), x | z2 ~ N(B z2, I)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(Z, Z), nn.Linear(Z, D)

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(self.a(z1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.b(z2), 1.0).to_event(1), obs=x)


class TwoSiteEncoder(nn.Module):
    """q(z1|x) q(z2|x, z1), diagonal Gaussians from two linear maps."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(D, 2 * Z), nn.Linear(D + Z, 2 * Z)

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.first(x).chunk(2, -1)
            z1 = pyro.sample("z1", dist.Normal(loc, log_scale.exp()).to_event(1))
            inputs = torch.cat([x.expand(z1.shape[:-1] + x.shape[-1:]), z1], -1)
            loc, log_scale = self.second(inputs).chunk(2, -1)
            pyro.sample("z2", dist.Normal(loc, log_scale.exp()).to_event(1))


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_a_function_guide_with_pyro_module_has_the_module_guides_gradient(estimator):
    # The DMM / semi-supervised VAE pattern: a function that registers its
    # networks with pyro.module. Its parameters are held constant in log q as
    # the module guide's are: the same draws give the same gradients.
    torch.manual_seed(0)
    model, encoder, x = TwoSiteModel(), TwoSiteEncoder(), data(30)

    def function_guide(x):
        pyro.module("encoder", encoder)
        encoder(x)

    grads = []
    for guide in (encoder, function_guide):
        encoder.zero_grad()
        pyro.set_rng_seed(1)
        IWELBO(6, estimator).differentiable_loss(model, guide, x).backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for module_grad, function_grad in zip(*grads, strict=True):
        assert module_grad.abs().max() > 0
        torch.testing.assert_close(function_grad, module_grad)
    # And not the iwae estimator's gradient, which these draws also give.
    encoder.zero_grad()
    pyro.set_rng_seed(1)
    IWELBO(6, "iwae").differentiable_loss(model, function_guide, x).backward()
    assert not torch.allclose(encoder.first.weight.grad, grads[0][0])


def test_a_guide_module_registering_a_foreign_module_is_refused_in_one_line():
    foreign = TwoSiteEncoder()

    class Guide(nn.Module):
        def forward(self, x):
            pyro.module("foreign", foreign)
            foreign(x)

    guide = Guide()
    guide.anchor = nn.Parameter(torch.zeros(()))  # a module with parameters
    with pytest.raises(NotImplementedError, match="register it as a submodule"):
        IWELBO(3, "dreg").differentiable_loss(TwoSiteModel(), guide, data(5))


class ParamModel(LinearModel):
    """LinearModel whose noise scale is a pyro.param of Pyro's global store."""

    def forward(self, x):
        scale = pyro.param("noise", torch.tensor(3.0), dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), scale).to_event(1), obs=x)


class PlainParamModel(nn.Module):
    """ParamModel as a plain nn.Module."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(Z, D)

    forward = ParamModel.forward


def test_fit_refuses_a_parameter_outside_the_modules_in_one_line():
    # fit trains module.parameters() alone: a pyro.param in an nn.Module's
    # forward stayed at its first value, the bound flat, and no word said; in a
    # PyroModule it failed in Pyro's NotImplementedError after the set-up.
    from pyro_iwae.errors import ProgramError

    x = data(20)
    pyro.clear_param_store()
    for model in (PlainParamModel(), ParamModel()):
        with pytest.raises(ProgramError, match="in place of pyro.param") as info:
            fit(model, LinearGuide(), x, IWELBO(2), test_size=0)
        assert "\n" not in str(info.value)
    assert "model's pyro.param 'noise' is none of them" in str(
        pytest.raises(
            ProgramError, fit, PlainParamModel(), LinearGuide(), x, IWELBO(2)
        ).value
    )
    # A program that is no module is told the same: the two advised apart.
    with pytest.raises(TypeError, match="got function; ") as not_module:
        fit(lambda x: None, LinearGuide(), x, IWELBO(2), test_size=0)
    advice = str(info.value).rsplit("; ", 1)[1]
    assert str(not_module.value).endswith(f"; {advice}")
    assert advice.startswith("write it as a PyroModule with PyroParam s (or nn.")
    foreign = nn.Linear(D, D)

    class Guide(LinearGuide):
        def forward(self, x):
            pyro.module("foreign", foreign)
            super().forward(foreign(x))

    with pytest.raises(ProgramError, match="register its module as a submodule"):
        fit(LinearModel(), Guide(), x, IWELBO(2), test_size=0)
    # A submodule registered with pyro.module is the guide's own: it trains.
    guide = Guide()
    guide.inner = foreign
    before = foreign.weight.detach().clone()
    fit(LinearModel(), guide, x, IWELBO(2), test_size=0, batch_size=10)
    assert not torch.equal(foreign.weight, before)


def test_fit_refuses_an_autoguide_up_front_in_one_line():
    # It failed in Pyro's local param mode ("global pyro.param statements in
    # PyroModules ... not yet implemented") with a dump of trace shapes.
    from pyro.infer.autoguide import AutoNormal
    from pyro.nn import PyroModule

    from pyro_iwae.errors import ProgramError

    model = LinearModel()
    wrapped = PyroModule()
    wrapped.auto = AutoNormal(model)
    for guide in (AutoNormal(model), wrapped):
        with pytest.raises(ProgramError) as info:
            fit(model, guide, data(100), IWELBO(5), schedule=[(2, 1e-2)], batch_size=50)
        assert str(info.value).startswith(
            "fit cannot train Pyro's autoguides (AutoNormal): it draws mini-batches"
        )
        assert "IWELBO(...)(model, guide) and an optimiser, or Pyro's SVI" in str(
            info.value
        )


GLOBAL_MODULES = """
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam


class GlobalModel(PyroModule):
    def __init__(self, x_dim=4):
        super().__init__()
        self.decoder = torch.nn.Linear(2, x_dim)

    def forward(self, x):
        shift = pyro.sample("shift", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            loc = self.decoder(z) + shift.unsqueeze(-1)
            pyro.sample("x", dist.Bernoulli(logits=loc).to_event(1), obs=x)


class GlobalGuide(PyroModule):
    def __init__(self, x_dim=4):
        super().__init__()
        self.encoder = torch.nn.Linear(x_dim, 2)
        self.loc = PyroParam(torch.tensor(0.0))

    def forward(self, x):
        pyro.sample("shift", dist.Normal(self.loc, 0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.encoder(x), 0.5).to_event(1))


def build_model(x_dim, stochastic_layers, data_mean=None):
    return GlobalModel(x_dim)


def build_guide(x_dim, stochastic_layers):
    return GlobalGuide(x_dim)
"""


def test_test_points_a_global_latent_model_cannot_bound_are_refused_up_front(
    tmp_path, monkeypatch
):
    # A whole epoch trained before the test bound failed, naming log_likelihood
    # and joint_log_likelihood (no option of fit), and left a metrics.jsonl
    # without a checkpoint.
    from test_cli import assert_one_line_error, invoke

    from pyro_iwae.errors import ProgramError

    (tmp_path / "global_modules.py").write_text(GLOBAL_MODULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import global_modules

    x = torch.bernoulli(torch.full((100, D), 0.5), generator=torch.manual_seed(0))
    model, guide = global_modules.GlobalModel(D), global_modules.GlobalGuide(D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ProgramError) as info:
        fit(model, guide, x, IWELBO(2), test_data=x[:10], run_dir=tmp_path / "run")
    assert str(info.value) == (
        "the per-epoch test bound needs a data plate that encloses every sample "
        "site of model and guide, to give one estimate per data point, but site "
        "'shift' is outside every plate: train without test points (test_size=0)"
    )
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    history = fit(model, guide, x, IWELBO(2), test_data=x[:10], test_size=0)
    assert history[0]["test_bound"] is None
    plugins = ["--model", "global_modules:build_model"]
    plugins += ["--guide", "global_modules:build_guide"]
    result = invoke("fit", *plugins, "--train-limit", 100, "--out", "cli")
    assert_one_line_error(result, "train without test points (set --test-limit 0)")
    assert "log_likelihood" not in result.output
    assert not (tmp_path / "cli").exists()
    monkeypatch.delitem(sys.modules, "global_modules")


NESTED_MODULES = '''
import pyro
import pyro.distributions as dist
import torch
from torch import nn


class PlateModel(nn.Module):
    """Linear-Gaussian, x_j | z ~ N(w_j z + b_j, sigma^2) in a plate over the
    values j (dim -1) inside the data plate (dim -2)."""

    def __init__(self, x_dim):
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(x_dim, 2))
        self.b = nn.Parameter(torch.zeros(x_dim))
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            loc = z.squeeze(-2) @ self.w.T + self.b
            with pyro.plate("values", x.shape[-1], dim=-1):
                pyro.sample("x", dist.Normal(loc, self.log_sigma.exp()), obs=x)


class PlateGuide(nn.Module):
    def __init__(self, x_dim):
        super().__init__()
        self.encoder = nn.Linear(x_dim, 2)
        self.log_scale = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        with pyro.plate("data", x.shape[0], dim=-2):
            loc = self.encoder(x).unsqueeze(-2)
            pyro.sample("z", dist.Normal(loc, self.log_scale.exp()).to_event(1))


def build_model(x_dim, stochastic_layers, data_mean=None, **options):
    return PlateModel(x_dim)


def build_guide(x_dim, stochastic_layers, **options):
    return PlateGuide(x_dim)
'''


def test_a_user_model_nesting_a_plate_in_the_data_plate_trains_and_evaluates(
    tmp_path, monkeypatch
):
    # fit refused it: "nests plates 2 deep, more than max_plate_nesting=1 ...;
    # pass max_plate_nesting=2", which neither an option nor a builder can.
    import numpy as np
    from test_cli import assert_ok, invoke

    from pyro_iwae import load_run
    from pyro_iwae.data import load_dataset

    (tmp_path / "nested_modules.py").write_text(NESTED_MODULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, generator=g)
    x = (
        torch.randn(200, 2, generator=g) @ w.T
        + 1
        + 0.5 * torch.randn(200, 3, generator=g)
    )
    np.save(tmp_path / "lg.npy", x.numpy())
    plugins = ["--model", "nested_modules:build_model"]
    plugins += ["--guide", "nested_modules:build_guide"]
    args = ["--dataset", "lg.npy", "--likelihood", "gaussian", *plugins]
    args += ["--lr", 0.02, "--compile", "off", "--out", "run"]
    assert_ok(invoke("fit", *args, "--epochs", 29))
    # A resumed run finds the same nesting, and so tests each epoch as before.
    assert_ok(invoke("fit", "--resume", "--out", "run", "--epochs", 30))
    metrics = [json.loads(line) for line in open("run/metrics.jsonl")]
    assert len(metrics) == 30 and metrics[-1]["test_bound"] > metrics[0]["test_bound"]
    assert_ok(invoke("eval-nll", "run", "--k", 1000, "--limit", 0, "--quiet"))
    checked = invoke("check-guide", "run", "--estimator", "dreg", "--draws", 20)
    assert_ok(checked)
    assert "passed" in checked.output
    ais = ["--method", "ais", "--ais-steps", 10, "--limit", 3, "--quiet"]
    assert_ok(invoke("eval-nll", "run", *ais))
    # The trained model's exact log p(x): x ~ N(b, W W^T + sigma^2 I).
    _, model, _ = load_run("run")
    with torch.no_grad():
        w, b = model.w.double(), model.b.double()
        cov = w @ w.T + torch.eye(3, dtype=torch.float64) * model.log_sigma.exp() ** 2
        test = load_dataset("lg.npy", binarize="none").test.double()
        exact = torch.distributions.MultivariateNormal(b, cov).log_prob(test)
    run = tmp_path / "run"
    iwae = [float(v) for v in (run / "estimates-test-k1000.txt").read_text().split()]
    gap = exact - torch.tensor(iwae, dtype=torch.float64)
    # A bound, up to Monte Carlo noise, and a tight one at k = 1000 (ESS ~800).
    assert -0.01 < float(gap.mean()) < 0.02, gap
    ais = [float(v) for v in (run / "estimates-test-ais10x16.txt").read_text().split()]
    rows = (run / "diagnostics-test-ais10x16.txt").read_text().splitlines()[1:]
    stderr = torch.tensor([float(row.split()[0]) for row in rows], dtype=torch.float64)
    gap = exact[:3] - torch.tensor(ais, dtype=torch.float64)
    assert (gap.abs() < 3 * stderr).all(), (gap, stderr)
    monkeypatch.delitem(sys.modules, "nested_modules")


BATCH_NESTED_MODULES = (
    NESTED_MODULES
    + """

class OnePointModel(PlateModel):
    \"\"\"PlateModel, but one data plate alone on one point.\"\"\"

    def forward(self, x):
        if x.shape[0] > 1:
            return super().forward(x)
        with pyro.plate("data", 1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            loc = z @ self.w.T + self.b
            pyro.sample("x", dist.Normal(loc, self.log_sigma.exp()).to_event(1), obs=x)


class OnePointGuide(PlateGuide):
    def forward(self, x):
        if x.shape[0] > 1:
            return super().forward(x)
        with pyro.plate("data", 1):
            scale = self.log_scale.exp()
            pyro.sample("z", dist.Normal(self.encoder(x), scale).to_event(1))


def build_one_point_model(x_dim, stochastic_layers, data_mean=None, **options):
    return OnePointModel(x_dim)


def build_one_point_guide(x_dim, stochastic_layers, **options):
    return OnePointGuide(x_dim)
"""
)


def test_plates_nested_deeper_on_a_batch_than_on_a_point_get_advice_for_a_cli_user(
    tmp_path, monkeypatch
):
    # The CLI passed on the library's "pass max_plate_nesting=2", which no
    # option sets.
    from test_cli import assert_one_line_error, invoke

    (tmp_path / "batch_nested.py").write_text(BATCH_NESTED_MODULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    torch.save(torch.randn(40, 3, generator=torch.manual_seed(0)), "x.pt")
    plugins = ["--model", "batch_nested:build_one_point_model"]
    plugins += ["--guide", "batch_nested:build_one_point_guide"]
    args = ["--dataset", "x.pt", "--likelihood", "gaussian", *plugins]
    result = invoke("fit", *args, "--compile", "off", "--out", "run")
    error = assert_one_line_error(
        result, "has plates down to dim=-2", "from one data point"
    )
    assert "pass max_plate_nesting" not in error
    # With one particle (no particle plate) it trained to a number of no bound.
    result = invoke("fit", *args, "-k", 1, "--compile", "off", "--out", "run1")
    error = assert_one_line_error(
        result, "plate 'data' of the model or guide is at dim=-2", "from one data point"
    )
    assert "pass max_plate_nesting" not in error
    monkeypatch.delitem(sys.modules, "batch_nested")


class PlainLinearModel(nn.Module):
    """The linear-Gaussian model (tests/linear_gaussian.py), its offset b an
    nn.Parameter from 0: a plain module, no PyroModule nor pyro.module."""

    def __init__(self, lg: LinearGaussian) -> None:
        super().__init__()
        self.W = lg.W
        self.b = nn.Parameter(torch.zeros(OBS_DIM, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT_DIM), 1.0).to_event(1))
            loc = z @ self.W.T + self.b
            pyro.sample("x", dist.Normal(loc, SIGMA).to_event(1), obs=x)


class PlainLinearGuide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(OBS_DIM, LATENT_DIM, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.zeros(LATENT_DIM, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            scale = self.log_scale.exp()
            pyro.sample("z", dist.Normal(self.encoder(x), scale).to_event(1))


def test_fit_trains_plain_modules_by_pyros_renyi_elbo():
    # RenyiELBO.loss_and_grads calls backward only where its traces hold a param
    # site, which plain nn.Parameter s are not: fit left them as they were.
    lg = LinearGaussian()
    torch.manual_seed(0)
    model, guide = PlainLinearModel(lg), PlainLinearGuide()
    x = lg.sample_data(400)
    cov = lg.W @ lg.W.T + SIGMA**2 * torch.eye(OBS_DIM, dtype=torch.float64)

    def log_px(b: torch.Tensor) -> float:
        """The model's exact log p(x), mean over x, at offset b."""
        return float(dist.MultivariateNormal(b.detach(), cov).log_prob(x).mean())

    before = [p.detach().clone() for p in (*model.parameters(), *guide.parameters())]
    start = log_px(model.b)
    bound = float(log_likelihood(model, guide, x, num_samples=5).mean())
    objective = make_objective("renyi", 5, alpha=0.5)
    history = fit(model, guide, x, objective, schedule=[(8, 0.05)], batch_size=50)
    after = [*model.parameters(), *guide.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    trained = float(log_likelihood(model, guide, x, num_samples=5).mean())
    best = log_px(x.mean(0))  # the most likely b is the data's mean
    # log p(x) from 0.72 nats below its best to within 0.01 of it; the bound
    # from 5.7 nats below the model's log p(x) to within 0.05 of it.
    assert best - start > 0.7 and 0 <= best - log_px(model.b) < 0.01
    assert start - bound > 5 and 0 < log_px(model.b) - trained < 0.05
    assert history[-1]["train_bound"] > history[0]["train_bound"] + 3


class PlainGuide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(D, Z)
        self.log_scale = nn.Parameter(torch.zeros(Z))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            scale = self.log_scale.exp()
            pyro.sample("z", dist.Normal(self.encoder(x), scale).to_event(1))


def test_renyi_gradients_with_a_pyro_module_are_pyros_own_in_fits_step():
    # fit records the modules' parameters as param sites for RenyiELBO: where a
    # PyroModule has some already, the loss and gradients stay Pyro's own.
    from pyro.infer import RenyiELBO

    from pyro_iwae.runs.fit_steps import with_param_sites

    x = data(20)
    results = []
    for wrap in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = LinearModel(), PlainGuide()
        programs = (with_param_sites(model, "model"), with_param_sites(guide, "guide"))
        pyro.set_rng_seed(1)
        elbo = RenyiELBO(0.5, num_particles=5, vectorize_particles=True)
        loss = elbo.loss_and_grads(*(programs if wrap else (model, guide)), x)
        grads = [p.grad for p in (*model.parameters(), *guide.parameters())]
        assert all(g is not None for g in grads)
        results.append((loss, grads))
    (loss, grads), (wrapped_loss, wrapped_grads) = results
    assert wrapped_loss == loss
    assert all(torch.equal(a, b) for a, b in zip(grads, wrapped_grads, strict=True))


def test_renyi_fits_keep_each_pyro_params_own_value():
    # fit ran RenyiELBO with Pyro's global parameter store: the guide's scale
    # took the model's same-named one (a shape error), and a second fit's
    # PyroParams took the first fit's trained values, which Adam left as they were.
    x = data(200)
    objective = make_objective("renyi", 5, alpha=0.5)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model, guide = LinearModel(), LinearGuide()
        fit(model, guide, x, objective, schedule=[(2, 0.05)], batch_size=50)
        assert model.scale.shape == () and guide.scale.shape == (Z,)
        assert float(model.scale.detach()) != 2.0
        results.append([p.detach() for p in (*model.parameters(), *guide.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
