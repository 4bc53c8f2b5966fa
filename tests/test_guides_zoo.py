"""The guide zoo (paper, lowrank, iaf, coupling) trains with every estimator
and its log_likelihood is a bound; a user's guide by import path and by entry
point is stored in config.json and rebuilt by eval-nll and --resume."""

import json

import pyro
import pytest
import torch
from linear_gaussian import LATENT_DIM, OBS_DIM, SIGMA, LinearGaussian
from pyro.infer import Trace_ELBO
from test_cli import assert_ok, assert_one_line_error, invoke

from pyro_iwae import IWELBO, PaperModel, build_guide, build_model, log_likelihood
from pyro_iwae.errors import ConfigError
from pyro_iwae_cli import progress

ZOO = ["paper", "lowrank", "iaf", "coupling"]


def linear_model(lg: LinearGaussian) -> PaperModel:
    """The linear-Gaussian model as a PaperModel: no hidden layer, fixed sigma."""
    model = PaperModel(
        x_dim=OBS_DIM,
        likelihood="gaussian",
        sigma=SIGMA,
        hidden=(),
        latent_dim=LATENT_DIM,
    )
    with torch.no_grad():
        model.pixels[-1].weight.copy_(lg.W)
        model.pixels[-1].bias.copy_(lg.b)
    return model.requires_grad_(False)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("name", ZOO)
def test_each_guide_trains_and_gives_a_bound(name, estimator):
    lg = LinearGaussian()
    model = linear_model(lg)
    torch.manual_seed(0)
    guide = build_guide(
        name, x_dim=OBS_DIM, stochastic_layers=1, hidden=(16,), latent_dim=LATENT_DIM
    )
    x = lg.sample_data(100)
    exact = lg.log_marginal(x)
    x = x.float()  # the library's dtype (Pyro's stable IAF inverts in float32 only)
    objective = IWELBO(num_particles=5, estimator=estimator)
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
    losses = []
    # As fit trains: the torch optimizer holds the parameters.
    with pyro.settings.context(module_local_params=True):
        for _ in range(100):
            optimizer.zero_grad()
            loss = objective.differentiable_loss(model, guide, x) / x.shape[0]
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-10:]) < sum(losses[:10])  # it trained
    estimate = log_likelihood(model, guide, x, num_samples=50).double()
    gap = exact - estimate
    # A bound: below the exact value but for Monte Carlo noise, and a close one.
    assert float(gap.mean()) > -3 * float(gap.std()) / len(gap) ** 0.5
    assert float(gap.mean()) < 0.5


@pytest.mark.parametrize("name", ["lowrank", "iaf", "coupling"])
def test_zoo_guides_with_two_layers(name):
    """With a second stochastic layer, k = 1 is Trace_ELBO's bound from the same
    draws, and the bound rises with k (by several standard errors at k = 50)."""
    torch.manual_seed(0)
    guide = build_guide(name, x_dim=20, stochastic_layers=2)
    model = build_model("paper", x_dim=20, stochastic_layers=2)
    x = torch.bernoulli(torch.full((32, 20), 0.3))
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        k1 = IWELBO(1).loss(model, guide, x)
        pyro.set_rng_seed(seed)
        elbo = Trace_ELBO(max_plate_nesting=1).loss(model, guide, x)
        assert k1 == pytest.approx(elbo, rel=1e-5)
    gain = log_likelihood(model, guide, x, num_samples=50) - log_likelihood(
        model, guide, x, num_samples=1
    )
    assert gain.shape == (32,)
    assert gain.mean() > 3 * gain.std() / len(gain) ** 0.5


SMALL = ["--train-limit", 200, "--test-limit", 20, "--batch-size", 50, "-k", 2]


def fit_interrupted_and_reloaded(run, guide, monkeypatch):
    """A run of ``guide`` cut after its first of two epochs: config.json names
    the guide, and eval-nll and --resume rebuild it."""

    def interrupt(self, metrics):
        raise KeyboardInterrupt

    args = [*SMALL, "--guide", guide, "--latent-dim", 10, "--epochs", 2, "--quiet"]
    with monkeypatch.context() as m:
        m.setattr(progress.FitProgress, "on_epoch_end", interrupt)
        assert invoke("fit", *args, "--out", run).exit_code == 130
    assert json.loads((run / "config.json").read_text())["guide"] == guide
    assert_ok(invoke("eval-nll", run, "--k", 3, "--limit", 10, "--quiet"))
    assert_ok(invoke("fit", "--resume", "--out", run, "--quiet"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_user_guide_by_import_path(tmp_path, monkeypatch):
    fit_interrupted_and_reloaded(
        tmp_path / "run", "user_guides:build_guide", monkeypatch
    )


def test_user_guide_by_entry_point(tmp_path, monkeypatch):
    dist_info = tmp_path / "site" / "my_guides-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-guides\n")
    (dist_info / "entry_points.txt").write_text(
        "[pyro_iwae.nn.guides]\nmean-field = user_guides:build_guide\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fit_interrupted_and_reloaded(tmp_path / "run", "mean-field", monkeypatch)


def test_an_entry_point_two_packages_provide_is_refused(tmp_path, monkeypatch):
    # The first found was taken, so which builder ran hung on sys.path's order.
    for dist, module in [("my_guides", "user_guides"), ("other_guides", "elsewhere")]:
        dist_info = tmp_path / "site" / f"{dist}-0.1.dist-info"
        dist_info.mkdir(parents=True)
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\n")
        (dist_info / "entry_points.txt").write_text(
            f"[pyro_iwae.nn.guides]\nmean-field = {module}:build_guide\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = invoke("fit", *SMALL, "--guide", "mean-field", "--out", tmp_path / "r")
    assert_one_line_error(result, "in several packages (my_guides: user_guides:")
    assert "other_guides: elsewhere:build_guide" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "guide, words",
    [
        # Trained, reporting a number that was no bound; eval-nll a traceback.
        ("user_guides:build_other_site_guide", "guide's latent site 'zz' is not in"),
        # Pyro's traceback of shapes (mat1 and mat2 shapes cannot be multiplied).
        ("user_guides:build_small_guide", "model and guide fail when run together"),
    ],
)
def test_a_guide_that_does_not_fit_the_model_is_refused_before_training(
    tmp_path, guide, words
):
    run = tmp_path / "run"
    result = invoke("fit", *SMALL, "--guide", guide, "--epochs", 1, "--out", run)
    assert_one_line_error(result, words)
    assert not run.exists()


def test_eval_nll_of_a_guide_the_model_does_not_fit_is_one_line(tmp_path):
    # The evaluators' refusal was raised again as a plain ValueError: a traceback.
    run = tmp_path / "run"
    args = ["--guide", "user_guides:build_guide", "--epochs", 1, "--quiet"]
    assert_ok(invoke("fit", *SMALL, *args, "--out", run))
    config = json.loads((run / "config.json").read_text())
    config["guide"] = "user_guides:build_other_site_guide"  # the same parameters
    (run / "config.json").write_text(json.dumps(config))
    result = invoke("eval-nll", run, "--k", 3, "--limit", 10)
    assert_one_line_error(result, "guide's latent site 'zz' is not in the model")


def test_a_guide_that_can_no_longer_be_imported(tmp_path):
    run = tmp_path / "run"
    args = ["--guide", "user_guides:build_guide", "--latent-dim", 10, "--epochs", 1]
    assert_ok(invoke("fit", *SMALL, *args, "--quiet", "--out", run))
    config = json.loads((run / "config.json").read_text())
    config["guide"] = "gone_package.guides:build_guide"
    (run / "config.json").write_text(json.dumps(config))
    for command in (
        ["eval-nll", run],
        ["sample", run],
        ["fit", "--resume", "--out", run],
    ):
        assert_one_line_error(
            invoke(*command), "cannot import guide 'gone_package.guides:build_guide'"
        )


def test_a_builder_that_takes_no_such_setting(tmp_path):
    result = invoke(
        "fit",
        *SMALL,
        "--guide",
        "user_guides:build_guide",
        "--hidden",
        20,
        "--out",
        tmp_path / "r",
    )
    assert_one_line_error(result, "takes no hidden")


def test_a_coupling_guide_of_one_latent_unit_is_told_to_set_latent_dim(tmp_path):
    # It said "failed to build (ValueError: ...); fix its builder": a built-in's.
    result = invoke(
        "fit", *SMALL, "--guide", "coupling", "--latent-dim", 1, "--out", tmp_path / "r"
    )
    message = assert_one_line_error(result, "--latent-dim 2 or more")
    assert "fix its builder" not in message
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="set latent_dim 2 or more"):
        build_guide("coupling", x_dim=4, stochastic_layers=1, latent_dim=1)
