"""``pyro-iwae check-guide``, through Click's CliRunner (cli/check_guide.py)."""

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


def test_bad_options_are_one_line_errors():
    result = invoke("--draws", 5)
    assert result.exit_code == 2 and "--draws" in result.output
    result = invoke("--estimator", "vimco", "--particles", 1)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith("Error:")


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
