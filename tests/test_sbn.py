"""The sigmoid belief network: built by name, trained with VIMCO, from the CLI."""

import json

import pyro
import pytest
import torch
from click.testing import CliRunner

from pyro_iwae import (
    IWELBO,
    ConfigError,
    RunConfig,
    build_guide,
    build_model,
    log_likelihood,
)
from pyro_iwae.data import load_dataset, minibatches
from pyro_iwae.nn.sbn import sbn_architecture
from pyro_iwae_cli.main import cli


@pytest.mark.parametrize("layers", [1, 2])
def test_sbn_sites_are_binary_and_guide_sites_have_no_rsample(layers):
    model = build_model("sbn", x_dim=12, stochastic_layers=layers)
    guide = build_guide("sbn", x_dim=12, stochastic_layers=layers)
    x = (torch.rand(3, 12) < 0.5).float()
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    model_trace = pyro.poutine.trace(
        pyro.poutine.replay(model, trace=guide_trace)
    ).get_trace(x)
    names = [f"h{i + 1}" for i in range(layers)]
    for name in names:
        site = guide_trace.nodes[name]
        assert not site["fn"].has_rsample
        assert site["value"].shape == (3, 200)
        assert set(site["value"].unique().tolist()) <= {0.0, 1.0}
        assert model_trace.nodes[name]["value"] is site["value"]
    with pytest.raises(ValueError, match="stochastic_layers"):
        build_model("sbn", stochastic_layers=0)


def test_vimco_trains_the_sbn():
    data = load_dataset("mnist-mini")
    torch.manual_seed(0)
    model, guide = sbn_architecture(1, data_mean=data.train_mean)
    loss_fn = IWELBO(5, "vimco")(model, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=3e-3)
    test = data.test[:200].round()
    before = -log_likelihood(model, guide, test, num_samples=50).mean()
    for x in minibatches(data.train[:2000], batch_size=25, binarize=True):
        optimizer.zero_grad()
        (loss_fn(x) / x.shape[0]).backward()
        optimizer.step()
    after = -log_likelihood(model, guide, test, num_samples=50).mean()
    assert after < before - 10, (before, after)


SMALL = ["--train-limit", "100", "--test-limit", "20", "--batch-size", "50"]
SMALL += ["--particles", "2", "--epochs", "1", "--quiet"]


@pytest.mark.parametrize("layers", [1, 3])
def test_cli_fits_the_sbn_with_vimco_and_names_vimco_otherwise(tmp_path, layers):
    out = tmp_path / "run"
    sbn = ["fit", "--model", "sbn", "--guide", "sbn", "--layers", layers, *SMALL]
    result = CliRunner().invoke(cli, [*sbn, "--estimator", "vimco", "--out", out])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["guide"], config["estimator"]) == (
        "sbn",
        "sbn",
        "vimco",
    )
    assert config["stochastic_layers"] == layers
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    names = " ".join(str(key) for key in checkpoint["model"])
    assert names.count("latent_layers.") == 2 * (layers - 1)  # weight and bias
    plain = tmp_path / "plain"
    result = CliRunner().invoke(cli, [*sbn, "--out", plain])
    assert result.exit_code == 1
    assert "Error:" in result.output and "--estimator vimco" in result.output
    assert "Traceback" not in result.output
    assert not (plain / "config.json").exists()  # refused before it was written
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, [*sbn, "--runs-dir", runs])
    assert result.exit_code == 1 and "--estimator vimco" in result.output
    assert not runs.exists() or not any(runs.iterdir())  # no empty run folder


@pytest.mark.parametrize(
    ("model", "guide", "fragment"),
    [
        ("sbn", "paper", "--guide sbn with --estimator vimco"),
        ("paper", "sbn", "the paper model does not: use --model sbn"),
    ],
)
def test_the_sbn_pairs_only_with_itself(tmp_path, model, guide, fragment):
    """An SBN half with a Gaussian half samples sites the other does not score:
    refused in one line before anything is written."""
    args = ["--model", model, "--guide", guide, "--estimator", "vimco"]
    result = CliRunner().invoke(cli, ["fit", *args, *SMALL, "--runs-dir", tmp_path])
    assert result.exit_code == 2 and "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Err")]
    assert fragment in error
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="does not: use"):
        RunConfig(model=model, guide=guide, estimator="vimco").validate()


def test_three_layers_are_for_the_sbn_only(tmp_path):
    result = CliRunner().invoke(cli, ["fit", "--layers", "3", *SMALL])
    assert result.exit_code != 0
    # It named the Python argument (stochastic_layers) and not the sbn model.
    assert (
        "Error: --layers of the paper's networks is 1 or 2, got 3; --model sbn "
        "takes any number\n"
    ) in result.output
    assert "Traceback" not in result.output


def test_eval_nll_with_ais_on_the_sbn_says_to_use_iwae(tmp_path):
    """AIS cannot move the SBN's binary latents: one line pointing to the
    importance-sampling estimate, not a traceback."""
    out = tmp_path / "run"
    fit = ["fit", "--model", "sbn", "--guide", "sbn", *SMALL, "--estimator", "vimco"]
    assert CliRunner().invoke(cli, [*fit, "--out", out]).exit_code == 0
    ais = ["eval-nll", out, "--method", "ais", "--ais-steps", 2, "--limit", 4]
    result = CliRunner().invoke(cli, [str(a) for a in ais])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Err")]
    assert "discrete site 'h1'" in error and "--method iwae" in error
