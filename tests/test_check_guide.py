"""``pyro-iwae check-guide``, through Click's CliRunner (cli/check_guide.py)."""

import pytest
import torch
from click.testing import CliRunner

from pyro_iwae_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, ["check-guide", *map(str, args)])


def test_a_sound_guide_passes():
    result = invoke("--guide", "user_guides:build_guide", "--draws", 20)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("IWELBO(num_particles=5): guide gradient of estimator")
    assert lines[1].split() == ["parameter", "size", "max", "|t|", "var", "ratio"] + [
        "verdict"
    ]
    assert lines[-1].startswith("passed")


def test_a_guide_whose_sampler_and_density_disagree_is_flagged():
    result = invoke("--guide", "check_guide_modules:build_guide", "--draws", 20)
    assert result.exit_code == 1, result.output
    assert "MEANS DIFFER" in result.output
    assert result.output.splitlines()[-1].startswith("FAILED")
    assert "differs for matrix:" in result.output


def test_a_trained_run_with_another_estimator(run_dir):
    result = invoke(run_dir, "--estimator", "stl", "--particles", 1, "--draws", 20)
    assert result.exit_code == 0, result.output
    assert "estimator 'stl' against 'iwae'" in result.output


def test_a_run_whose_data_file_moved_is_checked_on_it_with_dataset(tmp_path):
    # --dataset was refused with RUN_DIR, and the run's data were not found
    # without it: no way to check the run.
    x = (torch.rand(60, 16, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    torch.save(x, tmp_path / "points.pt")
    fit = ["fit", "--dataset", tmp_path / "points.pt", "--epochs", 1, "--quiet"]
    fit += ["--batch-size", 20, "--compile", "off", "--out", tmp_path / "run"]
    fit += ["--hidden", 8, "--latent-dim", 2]  # small networks: a fast check
    result = CliRunner().invoke(cli, list(map(str, fit)))
    assert result.exit_code == 0, result.output
    before = invoke(tmp_path / "run", "--draws", 20)
    assert before.exit_code == 0, before.output
    (tmp_path / "points.pt").rename(tmp_path / "moved.pt")
    result = invoke(tmp_path / "run", "--draws", 20)
    assert result.exit_code == 1 and "not found; set --dataset to" in result.output
    after = invoke(tmp_path / "run", "--draws", 20, "--dataset", tmp_path / "moved.pt")
    assert after.exit_code == 0, after.output
    assert after.output == before.output  # the same points, the same draws


@pytest.mark.parametrize(
    "option", [("--layers", 2), ("--guide", "iaf"), ("--model", "sbn")]
)
def test_options_a_run_gives_itself_are_refused_with_it(run_dir, option):
    # Dropped without a word (--layers), or refused for a clash with a guide
    # that was never checked (--model sbn).
    result = invoke(run_dir, *option, "--draws", 20)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        f"Error: {option[0]} does not apply with RUN_DIR, whose own model and "
        "guide are checked; drop it"
    )


def test_bad_options_are_one_line_errors():
    result = invoke("--draws", 5)
    assert result.exit_code == 2 and "--draws" in result.output
    result = invoke("--estimator", "vimco", "--particles", 1)
    assert result.exit_code == 2
    # It said estimator='vimco', a Python argument.
    assert result.output.splitlines()[-1].startswith(
        "Error: --estimator vimco needs at least 2 particles"
    )


def test_a_data_file_sets_the_width_of_the_fresh_networks(tmp_path):
    """Without RUN_DIR, a data file's points (16 values here) size the model
    and guide, as fit does; an error along the way is one line."""
    x = (torch.rand(40, 16, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    torch.save(x, tmp_path / "points.pt")
    result = invoke("--dataset", tmp_path / "points.pt", "--draws", 20)
    assert result.exit_code == 0, result.output
    sizes = {line.split()[0]: line.split()[1] for line in result.output.splitlines()}
    assert sizes["layers.0.hidden.0.weight"] == "3200"  # 200 x 16
    torch.save(x * 0.5, tmp_path / "grey.pt")  # outside Bernoulli's support
    result = invoke("--dataset", tmp_path / "grey.pt", "--draws", 20)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line[:6] for line in result.output.splitlines()] == ["Error:"]


def test_vimco_is_checked_on_a_discrete_guide_and_refused_on_a_gaussian_one():
    """On the paper's Gaussian guide VIMCO's gradient is reinforce's draw for
    draw: a check that could not fail is a usage error, in the options' words."""
    result = invoke("--estimator", "vimco", "--draws", 20)
    assert result.exit_code == 2, result.output
    error = result.output.splitlines()[-1]
    assert error.startswith("Error: --estimator vimco changes the gradient")
    assert error.endswith("check --estimator dreg instead")
    result = invoke(
        "--estimator", "reinforce", "--model", "sbn", "--guide", "sbn", "--draws", 20
    )
    assert result.exit_code == 2 and "check could not fail" in result.output
    result = invoke(
        "--estimator", "vimco", "--model", "sbn", "--guide", "sbn", "--draws", 20
    )
    assert result.exit_code == 0, result.output
    assert "estimator 'vimco' against 'reinforce'" in result.output
    t_values = [float(line.split()[2]) for line in result.output.splitlines()[2:-2]]
    assert max(t_values) > 0  # different draws of the gradient: a real check


def test_stl_at_many_particles_is_blamed_for_its_own_bias_in_options():
    result = invoke("--estimator", "stl", "--draws", 50)
    assert result.exit_code == 1, result.output
    verdict = result.output.splitlines()[-1]
    assert verdict.startswith("FAILED") and "as expected: STL is biased" in verdict
    assert "fix the guide" not in verdict and "=" not in verdict
    assert "--particles 1 or --estimator dreg" in verdict
    assert verdict.endswith("train with --estimator dreg")
    result = invoke("--guide", "check_guide_modules:build_guide", "--draws", 20)
    assert result.output.splitlines()[-1].endswith(
        "train with --estimator iwae or fix the guide"
    )


def test_a_model_that_does_not_broadcast_is_told_what_to_change():
    # It offered --sequential-particles, an option of eval-nll alone.
    model = "check_guide_modules:build_flat_model"
    result = invoke("--model", model, "--guide", "user_guides:build_guide")
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert line.startswith("Error: the model or guide fails under"), line
    assert line.endswith("not x.view(batch, -1))"), line
