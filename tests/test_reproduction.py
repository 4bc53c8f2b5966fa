"""The reproduction grid: runs, skips, resumes and reports."""

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pyro_iwae.runs.checkpoints import RunError
from pyro_iwae.runs.grid_report import (
    check_claims,
    collect,
    markdown_claims,
    markdown_table,
    nll_series,
)
from pyro_iwae.runs.reproduction import Grid, _run_lock, run_grid
from pyro_iwae.runs.run import read_estimates
from pyro_iwae_cli.main import cli

GRID = {
    "base": {
        "dataset": "mnist-mini",
        "epochs": 1,
        "train_limit": 200,
        "test_limit": 40,
        "batch_size": 50,
    },
    "runs": {
        "vae-k1": {"objective": "vae", "num_particles": 1},
        "iwae-k5": {"objective": "iwae", "num_particles": 5},
        "miwae-2x2": {"objective": "miwae", "num_particles": 2, "num_groups": 2},
    },
    "eval_samples": 8,
    "eval_limit": 30,
    "claims": [["iwae-k5", "vae-k1"], ["miwae-2x2", "iwae-k5"]],
}


@pytest.fixture
def grid_file(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(GRID))
    return path


def test_grid_runs_skips_and_reports(grid_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["reproduce", str(grid_file), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "table.json").read_text())
    assert [r["run"] for r in rows] == list(GRID["runs"])
    for row in rows:
        assert row["eval_k"] == 8 and row["eval_points"] == 30
        assert 0 < row["test_nll"] < 600 and row["epochs"] == 1
        assert row["versions"]["torch"]
    assert rows[2]["k"] == 4
    # mnist-mini: not the papers' data, so no paper column.
    assert all(row["paper_nll"] is None for row in rows)
    for name in ("table.md", "test-bound-by-epoch.png", "nll-by-k.png"):
        assert (tmp_path / name).stat().st_size > 0
    claims = json.loads((tmp_path / "claims.json").read_text())
    nll = {row["run"]: row["test_nll"] for row in rows}
    # Paired over the same 30 test points, from the per-point estimates (6 decimals).
    difference = nll["vae-k1"] - nll["iwae-k5"]
    assert claims[0]["difference"] == pytest.approx(difference, abs=1e-5)
    assert all(claim["paired"] for claim in claims)
    run_dir = tmp_path / "runs" / "vae-k1"
    evaluation = json.loads((run_dir / "eval-test-k8.json").read_text())
    estimates = read_estimates(run_dir, evaluation)
    assert estimates.dtype == torch.float64 and estimates.shape == (30,)
    assert -estimates.mean().item() == pytest.approx(evaluation["nll"], abs=1e-5)
    assert {c["verdict"] for c in claims} <= {"holds", "reversed", "not shown"}
    assert "| iwae-k5 below vae-k1 |" in (tmp_path / "table.md").read_text()

    again = runner.invoke(cli, ["reproduce", str(grid_file), "--quiet"])
    assert again.exit_code == 0
    assert again.stderr.count(": skip") == 3


def test_an_interrupted_run_resumes_and_a_missing_one_is_reported(grid_file, tmp_path):
    runner = CliRunner()
    only = ["reproduce", str(grid_file), "--quiet", "--only", "vae-k1"]
    assert runner.invoke(cli, only).exit_code == 0
    # kill after training: the evaluation is missing, the checkpoint is there
    (tmp_path / "runs" / "vae-k1" / "eval-test-k8.json").unlink()
    result = runner.invoke(cli, only)
    assert result.exit_code == 0 and "vae-k1: resume" in result.stderr
    table = (tmp_path / "table.md").read_text()
    runs_table = table.split("\n\nClaims")[0]
    assert runs_table.count("not run yet") == 2  # the two runs left out by --only
    # Trained but not evaluated: the table says so rather than "not run".
    (tmp_path / "runs" / "vae-k1" / "eval-test-k8.json").unlink()
    rows = collect(Grid.load(grid_file), tmp_path / "runs")
    assert "| vae-k1 |" in markdown_table(rows)
    assert "not evaluated yet" in markdown_table(rows)
    bad = runner.invoke(cli, ["reproduce", str(grid_file), "--only", "nope"])
    assert bad.exit_code != 0 and "no run nope in the grid" in bad.output
    assert "Traceback" not in bad.output


def _grid_with(grid_file, **changes):
    grid = json.loads(grid_file.read_text())
    for name, settings in changes.items():
        grid["runs"][name].update(settings)
    grid_file.write_text(json.dumps(grid))


def test_a_run_the_grid_trains_longer_is_resumed_and_evaluated_again(
    grid_file, tmp_path
):
    runner = CliRunner()
    only = ["reproduce", str(grid_file), "--quiet", "--only", "vae-k1"]
    assert runner.invoke(cli, only).exit_code == 0
    run_dir = tmp_path / "runs" / "vae-k1"
    first = json.loads((run_dir / "eval-test-k8.json").read_text())
    assert first["trained_steps"] == 4  # 200 points in batches of 50
    _grid_with(grid_file, **{"vae-k1": {"epochs": 2}})
    result = runner.invoke(cli, only)
    assert result.exit_code == 0, result.output
    assert "vae-k1: resume" in result.stderr and ": skip" not in result.stderr
    again = json.loads((run_dir / "eval-test-k8.json").read_text())
    assert again["trained_steps"] == 8 and again["nll"] != first["nll"]
    assert collect(Grid.load(grid_file), tmp_path / "runs")[0]["epochs"] == 2


def test_an_evaluation_older_than_the_checkpoint_is_made_again(grid_file, tmp_path):
    # As after eval-nll during a fit: the file scored fewer steps than are saved.
    runner = CliRunner()
    only = ["reproduce", str(grid_file), "--quiet", "--only", "vae-k1"]
    assert runner.invoke(cli, only).exit_code == 0
    path = tmp_path / "runs" / "vae-k1" / "eval-test-k8.json"
    stale = {**json.loads(path.read_text()), "trained_steps": 3, "nll": -1.0}
    path.write_text(json.dumps(stale))
    result = runner.invoke(cli, only)
    assert result.exit_code == 0 and "vae-k1: evaluate" in result.stderr
    assert json.loads(path.read_text())["trained_steps"] == 4
    assert json.loads(path.read_text())["nll"] > 0
    # One written before evaluations said what they scored is taken as it is.
    del stale["trained_steps"]
    path.write_text(json.dumps(stale))
    assert ": skip" in runner.invoke(cli, only).stderr


def test_a_run_whose_settings_the_grid_changed_is_refused_not_relabelled(
    grid_file, tmp_path
):
    runner = CliRunner()
    only = ["reproduce", str(grid_file), "--quiet", "--only", "iwae-k5"]
    assert runner.invoke(cli, only).exit_code == 0
    _grid_with(grid_file, **{"iwae-k5": {"num_particles": 7}})
    result = runner.invoke(cli, only)
    assert result.exit_code != 0 and "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "iwae-k5"
    # Said in fit's options and advice (--particles, resume it), and after a
    # line "iwae-k5: resume" though nothing was resumed.
    assert result.output.strip().splitlines() == [
        f"Error: run iwae-k5 ({run_dir}) was trained with other settings than the "
        "grid's: num_particles 5 (the grid's: 7); set them back in the grid, or "
        f"delete {run_dir} to train the run afresh"
    ]
    # The table shows what the run was trained with.
    rows = collect(Grid.load(grid_file), tmp_path / "runs")
    assert {row["run"]: row["k"] for row in rows}["iwae-k5"] == 5


def test_a_run_trained_past_the_grids_schedule_is_refused_in_the_grids_keys(
    grid_file, tmp_path
):
    # Said as "drop --epochs and --stages to finish it", after "vae-k1: resume".
    runner = CliRunner()
    only = ["reproduce", str(grid_file), "--quiet", "--only", "vae-k1"]
    _grid_with(grid_file, **{"vae-k1": {"epochs": 2}})
    assert runner.invoke(cli, only).exit_code == 0
    _grid_with(grid_file, **{"vae-k1": {"epochs": 1}})
    result = runner.invoke(cli, only)
    assert result.exit_code == 1 and "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "vae-k1"
    assert result.output.strip().splitlines() == [
        f"Error: run vae-k1 ({run_dir}) has trained past the grid's schedule: "
        "epochs 2 (the grid's: 1); a run's schedule may only go on: give the grid "
        f"the run's (or more), or delete {run_dir} to train the run afresh"
    ]


def test_a_grid_run_whose_data_file_moved_is_blamed_only_for_what_changed(
    grid_file, tmp_path
):
    # The moved data file, which resuming accepts, was named among the settings
    # the run was trained with other than the grid's.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", (rng.random((100, 12)) < 0.5).astype(np.float32))
    grid = json.loads(grid_file.read_text())
    grid["base"]["dataset"] = str(tmp_path / "x.npy")
    grid_file.write_text(json.dumps(grid))
    runner = CliRunner()
    only = ["reproduce", str(grid_file), "--quiet", "--only", "vae-k1"]
    assert runner.invoke(cli, only).exit_code == 0
    (tmp_path / "x.npy").rename(tmp_path / "y.npy")
    grid["base"]["dataset"] = str(tmp_path / "y.npy")
    grid["runs"]["vae-k1"]["num_particles"] = 2
    grid_file.write_text(json.dumps(grid))
    result = runner.invoke(cli, only)
    run_dir = tmp_path / "runs" / "vae-k1"
    assert result.output.strip().splitlines() == [
        f"Error: run vae-k1 ({run_dir}) was trained with other settings than the "
        "grid's: num_particles 1 (the grid's: 2); set them back in the grid, or "
        f"delete {run_dir} to train the run afresh"
    ]


def test_relative_data_paths_are_saved_absolute(grid_file, tmp_path, monkeypatch):
    # A later process (resume, eval-nll) in another folder must find the data.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    args = ["reproduce", str(grid_file), "--only", "vae-k1", "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--data-dir", "data"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "runs" / "vae-k1" / "config.json").read_text())
    assert saved["data_dir"] == str(tmp_path / "data")
    np.save(tmp_path / "x.npy", np.zeros((30, 12), dtype=np.float32))
    grid = Grid({**GRID["base"], "data_dir": "data", "dataset": "x.npy"}, GRID["runs"])
    config = grid.config("vae-k1")
    assert config.data_dir == str(tmp_path / "data")
    assert config.dataset == str(tmp_path / "x.npy")
    assert config.x_dim == 12  # from the file, as fit --dataset x.npy learns it
    assert grid.config("vae-k1", "other").data_dir == str(tmp_path / "other")


def test_grid_errors_name_the_problem(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"base": {}, "runs": {"a": {"particles": 3}}}))
    # Said without the run or the grid, unlike the grid's other errors.
    with pytest.raises(RunError) as error:
        Grid.load(path)
    assert str(error.value) == (
        f"run a of grid {path}: unknown run settings particles (num_particles?); use "
        "the names of a run's config.json, the fields of RunConfig; fix the file"
    )
    path.write_text("{")
    with pytest.raises(RunError, match="cannot read grid"):
        Grid.load(path)
    path.write_text(json.dumps({"base": {}, "runs": {"a": {"beta": 0.1}}}))
    with pytest.raises(RunError, match="run a of grid .*beta applies to objective"):
        Grid.load(path)


@pytest.mark.parametrize(
    "values, words",
    [  # Each gave a traceback, or trained a run before it was refused.
        ({"base": {}, "runs": "abc"}, "runs must be an object of run names"),
        ({"base": [], "runs": {"a": {}}}, "base must be an object"),
        ({"runs": {"a": None}}, "the settings of run 'a' must be an object"),
        ({"runs": {"a": []}}, "the settings of run 'a' must be an object"),
        ({"runs": {"": {}}}, "run name '' is not a folder name"),
        ({"runs": {"../escape": {}}}, "run name '../escape' is not a folder name"),
        ({"runs": {"a": {}}, "eval_samples": 0}, "eval_samples must be >= 1, got 0"),
        ({"runs": {"a": {}}, "eval_limit": "all"}, "eval_limit must be an integer"),
        ({"runs": {"a": {}}, "ais": {"runs": ["a"], "steps": 0}}, "ais steps must"),
        # Run "a" in a string was run names "a" (each letter one).
        (
            {"runs": {"a": {}}, "ais": {"runs": "a"}},
            'the runs of ais must be a list of run names, {"runs": ["a"]}',
        ),
        ([1], "it holds a list, not an object"),
        # An unknown key was "Grid.__init__() got an unexpected keyword argument".
        (
            {"base": {}, "runs": {"a": {}}, "extra": 1},
            "'extra' is no key of a grid; the keys are base, runs, eval_samples, "
            "eval_limit, claims, ais",
        ),
    ],
)
def test_a_grid_of_the_wrong_shape_is_refused_in_one_line(tmp_path, values, words):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(values))
    result = CliRunner().invoke(cli, ["reproduce", str(path), "--report-only"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: grid {path}: {words}")
    assert line.endswith("; fix the file") and not (tmp_path / "runs").exists()


def test_a_grid_files_paths_are_read_from_its_folder(tmp_path, monkeypatch):
    # A relative dataset was read from the working directory, and the advice
    # named a --dataset option that reproduce lacks.
    folder = tmp_path / "grids"
    folder.mkdir()
    np.save(folder / "points.npy", np.zeros((30, 12), dtype=np.float32))
    grid = {"base": {"dataset": "points.npy", "data_dir": "data"}, "runs": {"a": {}}}
    (folder / "grid.json").write_text(json.dumps(grid))
    monkeypatch.chdir(tmp_path)
    config = Grid.load("grids/grid.json").config("a")
    assert config.dataset == str(folder / "points.npy") and config.x_dim == 12
    assert config.data_dir == str(folder / "data")


def test_the_papers_numbers_stand_beside_runs_on_all_of_mnist_only():
    from pyro_iwae import RunConfig
    from pyro_iwae.runs.grid_report import _paper_nll

    mnist = RunConfig(dataset="mnist", num_particles=5)
    assert _paper_nll(mnist, 5) == 85.54
    for other in ({"dataset": "mnist-mini"}, {"train_limit": 1000}):
        assert _paper_nll(dataclasses.replace(mnist, **other), 5) is None


def test_table_before_any_run(tmp_path, grid_file):
    rows = collect(Grid.load(grid_file), tmp_path / "nothing")
    assert all(r["test_nll"] is None and r["epochs"] == 0 for r in rows)
    assert markdown_table(rows).count("not run yet") == 3


def test_claims_verdicts_follow_the_standard_error(grid_file):
    grid = Grid.load(grid_file)

    def row(run, nll, stderr=0.3):
        return {"run": run, "test_nll": nll, "test_nll_stderr": stderr}

    rows = [row("vae-k1", 90.0), row("iwae-k5", 88.0), row("miwae-2x2", None, None)]
    holds, missing = check_claims(grid, rows)
    # 2 nats against sqrt(0.3^2 + 0.3^2) = 0.42: shown.
    assert holds["verdict"] == "holds" and holds["difference"] == pytest.approx(2.0)
    assert holds["stderr"] == pytest.approx(0.3 * 2**0.5)
    assert missing["verdict"] == "not run yet"
    rows[1] = row("iwae-k5", 89.7)
    assert check_claims(grid, rows)[0]["verdict"] == "not shown"
    rows[1] = row("iwae-k5", 91.0)
    assert check_claims(grid, rows)[0]["verdict"] == "reversed"


@pytest.mark.parametrize(
    "claim",
    [
        ["iwae-k5", "nope"],
        ["iwae-k5"],
        [["iwae-k5", "vae-k1"], ["iwae-k5", "nope"]],
        [["iwae-k5", "vae-k1"], "vae-k1"],
    ],
)
def test_a_claim_must_name_two_runs_or_two_pairs(tmp_path, claim):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({**GRID, "claims": [claim]}))
    with pytest.raises(RunError, match="not a pair of run names"):
        Grid.load(path)


def _write_estimates(runs_dir, lls):
    """Per-point log-likelihood estimates of each run, as an evaluation keeps them,
    and the rows that :func:`collect` would make of them."""
    rows = []
    for name, ll in lls.items():
        (runs_dir / name).mkdir(parents=True)
        (runs_dir / name / "est.txt").write_text(
            "".join(f"{v:.6f}\n" for v in ll.tolist())
        )
        rows.append(
            {
                "run": name,
                "test_nll": -ll.mean().item(),
                "test_nll_stderr": 0.25,
                "estimates_file": "est.txt",
            }
        )
    return rows


def test_a_gain_claim_compares_two_differences(tmp_path):
    claim = [["iwae-k5", "vae-k1"], ["miwae-2x2", "iwae-k5"]]
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({**GRID, "claims": [claim]}))
    grid = Grid.load(path)
    # (NLL vae-k1 - NLL iwae-k5) - (NLL iwae-k5 - NLL miwae-2x2) = 0.3 - 0.2 = 0.1
    torch.manual_seed(0)
    base = 90 + 5 * torch.randn(400, dtype=torch.float64)
    noise = 0.01 * torch.randn(3, 400, dtype=torch.float64)
    lls = {
        "vae-k1": -(base + 0.3) + noise[0],
        "iwae-k5": -base + noise[1],
        "miwae-2x2": -(base - 0.2) + noise[2],
    }
    rows = _write_estimates(tmp_path / "runs", lls)
    unpaired = check_claims(grid, rows)[0]
    assert unpaired["difference"] == pytest.approx(0.1, abs=0.01)
    # The run in both pairs counts twice: sqrt(1 + 4 + 1) standard errors.
    assert unpaired["stderr"] == pytest.approx(0.25 * 6**0.5)
    assert unpaired["verdict"] == "not shown" and not unpaired["paired"]
    paired = check_claims(grid, rows, tmp_path / "runs")[0]
    assert paired["paired"] and paired["verdict"] == "holds"
    assert paired["difference"] == pytest.approx(0.1, abs=0.005)
    assert paired["stderr"] < 0.002
    assert paired["text"] == (
        "iwae-k5 below vae-k1 by more than miwae-2x2 below iwae-k5"
    )
    assert "| iwae-k5 below vae-k1 by more than miwae-2x2 below iwae-k5 |" in (
        markdown_claims([paired])
    )
    # Swapping the pairs reverses the claim.
    grid = dataclasses.replace(grid, claims=[[claim[1], claim[0]]])
    assert check_claims(grid, rows, tmp_path / "runs")[0]["verdict"] == "reversed"


def test_report_fills_a_readme_between_markers(grid_file, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Results\n\n<!-- grid-table:start -->\nstale table\n"
        "<!-- grid-table:end -->\n\nEnd.\n"
    )
    Grid.load(grid_file).config("vae-k1").save(tmp_path / "runs" / "vae-k1")
    runner = CliRunner()
    args = ["reproduce", str(grid_file), "--report-only", "--readme", str(readme)]
    for _ in range(2):  # the second run replaces the first table
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert text.startswith("# Results\n\n<!-- grid-table:start -->\n| run |")
    assert text.endswith("<!-- grid-table:end -->\n\nEnd.\n")
    assert "stale table" not in text and text.count("| vae-k1 |") == 1
    assert text.count("<!-- grid-table:start -->") == 1


def test_readme_without_markers_fails_before_training(grid_file, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n")
    result = CliRunner().invoke(
        cli, ["reproduce", str(grid_file), "--readme", str(readme)]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "no lines <!-- grid-table:start -->" in result.output
    assert not (tmp_path / "runs").exists()
    assert readme.read_text() == "# Results\n"


def test_parallel_jobs_share_the_runs(grid_file, tmp_path):
    result = CliRunner().invoke(
        cli, ["reproduce", str(grid_file), "--quiet", "--jobs", "2"]
    )
    assert result.exit_code == 0, result.output
    for name in GRID["runs"]:
        # each run trained and evaluated by exactly one of the two workers
        assert result.stderr.count(f"{name}: train") == 1
        assert result.stderr.count(f"{name}: evaluate") == 1
    rows = json.loads((tmp_path / "table.json").read_text())
    assert all(row["test_nll"] is not None for row in rows)
    # Run again: each finished run is reported once, never as busy.
    again = CliRunner().invoke(
        cli, ["reproduce", str(grid_file), "--quiet", "--jobs", "2"]
    )
    assert again.exit_code == 0, again.output
    for name in GRID["runs"]:
        assert again.stderr.count(f"{name}: skip") == 1
    assert "busy" not in again.stderr


def test_a_run_held_by_another_process_is_left_to_it(grid_file, tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    told = []
    with _run_lock(runs_dir, "vae-k1") as holder:
        assert holder is None  # this process holds it
        run_grid(
            Grid.load(grid_file),
            runs_dir,
            only=["vae-k1"],
            on_run=lambda name, what: told.append((name, what)),
        )
    assert told == [("vae-k1", "busy")]
    assert not (runs_dir / "vae-k1").exists()


def test_a_run_claimed_by_another_machine_is_left_to_it(grid_file, tmp_path):
    """The claim file, made with O_EXCL, holds runs between machines sharing the
    folder (where flock is not reliable); a dead process's claim on this
    machine is taken over, another machine's is not."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    claim = runs_dir / ".vae-k1.claim"
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    told = []
    grid = Grid.load(grid_file)
    run_grid(grid, runs_dir, only=["vae-k1"], on_run=lambda *a: told.append(a))
    ((name, what),) = told
    assert what.startswith("busy (claimed by process 1 on elsewhere since ")
    assert not (runs_dir / "vae-k1").exists() and claim.exists()
    # A claim of a process of this machine that no longer runs.
    dead = {"host": socket.gethostname(), "pid": 2**22 + 1, "since": 0}
    claim.write_text(json.dumps(dead))
    with _run_lock(runs_dir, "vae-k1") as holder:
        assert holder is None
        assert json.loads(claim.read_text())["pid"] == os.getpid()
    assert not claim.exists()


def test_paired_claims_use_the_per_point_differences(grid_file, tmp_path):
    grid = Grid.load(grid_file)
    runs_dir = tmp_path / "runs"
    # Two runs whose per-point NLLs differ by 0.1 + small noise: the per-point
    # spread (5 nats) hides it unpaired, the pairing shows it.
    torch.manual_seed(0)
    base = 90 + 5 * torch.randn(400, dtype=torch.float64)
    lls = {"vae-k1": -(base + 0.1), "iwae-k5": -(base + 0.01 * torch.randn(400))}
    rows = _write_estimates(runs_dir, lls)
    rows.append({"run": "miwae-2x2", "test_nll": None, "test_nll_stderr": None})
    unpaired = check_claims(grid, rows)[0]
    paired = check_claims(grid, rows, runs_dir)[0]
    assert unpaired["verdict"] == "not shown" and not unpaired["paired"]
    assert paired["verdict"] == "holds" and paired["paired"]
    assert paired["difference"] == pytest.approx(0.1, abs=0.003)
    assert paired["stderr"] < 0.001


def test_nll_series_keep_layers_and_estimators_apart():
    def row(objective, k, estimator="iwae", layers=1, nll=90.0):
        return {
            "objective": objective,
            "estimator": estimator,
            "stochastic_layers": layers,
            "k": k,
            "test_nll": nll,
            "test_nll_stderr": 0.2,
        }

    rows = [
        row("vae", 1),
        row("vae", 5),
        row("vae", 5, layers=2),
        row("iwae", 5, estimator="dreg"),
        row("miwae", 64),
        row("iwae", 50, nll=None),
    ]
    series = nll_series(rows)
    assert series == {
        "VAE": [(1, 90.0, 0.2), (5, 90.0, 0.2)],
        "VAE, 2 layers": [(5, 90.0, 0.2)],
        "IWAE-DREG": [(5, 90.0, 0.2)],
    }


def test_an_ais_column_for_chosen_runs(tmp_path):
    grid = {
        **GRID,
        "runs": {"vae-k1": GRID["runs"]["vae-k1"], "iwae-k5": GRID["runs"]["iwae-k5"]},
        "claims": [],
        "ais": {"runs": ["iwae-k5"], "steps": 2, "chains": 2, "limit": 4},
    }
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    run_grid(Grid.load(path), tmp_path / "runs", only=["iwae-k5"])
    ais = json.loads((tmp_path / "runs/iwae-k5/eval-test-ais2x2.json").read_text())
    assert ais["method"] == "ais" and ais["points"] == 4
    rows = collect(Grid.load(path), tmp_path / "runs")
    assert rows[1]["ais_nll"] == ais["nll"] and rows[0]["ais_nll"] is None
    table = markdown_table(rows)
    assert "AIS NLL" in table.splitlines()[0]
    assert f"{ais['nll']:.2f} ± {ais['stderr']:.2f} (4)" in table
    # A grid that gains an AIS row later evaluates only what is missing.
    (tmp_path / "runs/iwae-k5/eval-test-ais2x2.json").unlink()
    told = []
    run_grid(
        Grid.load(path),
        tmp_path / "runs",
        only=["iwae-k5"],
        on_run=lambda name, what: told.append(what),
    )
    assert told == ["resume", "evaluate"]
    assert (tmp_path / "runs/iwae-k5/eval-test-ais2x2.json").is_file()
    grid["ais"] = {"runs": ["nope"]}
    path.write_text(json.dumps(grid))
    with pytest.raises(RunError, match="the ais entry"):
        Grid.load(path)


def test_a_grid_on_the_gpu_trains_there_not_only_evaluates(grid_file, monkeypatch):
    # reproduce --cuda trained every run on the CPU and evaluated it on the GPU.
    import pyro_iwae.runs.reproduction as R

    trained, evaluated = [], []
    monkeypatch.setattr(R, "train_run", lambda c, d, **kw: trained.append(c.device))
    monkeypatch.setattr(
        R, "evaluate_run", lambda d, **kw: evaluated.append(str(kw["device"]))
    )
    grid = Grid.load(grid_file)
    run_grid(grid, grid_file.parent / "runs", only=["vae-k1"], device="cuda")
    assert trained == ["cuda"] and evaluated == ["cuda"]
    # Without a device, a run trains and is evaluated where the grid says.
    trained.clear(), evaluated.clear()
    grid = dataclasses.replace(grid, base={**grid.base, "device": "cuda:1"})
    run_grid(grid, grid_file.parent / "runs", only=["vae-k1"])
    assert trained == ["cuda:1"] and evaluated == ["cuda:1"]


@pytest.mark.parametrize("where", ["base", "run", "option"])
def test_cuda_asked_for_on_a_machine_without_it_is_refused_in_one_line(
    grid_file, monkeypatch, where
):
    # A grid's "device": "cuda" gave a traceback ("Found no NVIDIA driver").
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    grid = json.loads(grid_file.read_text())
    if where == "base":
        grid["base"]["device"] = "cuda"
    elif where == "run":
        grid["runs"]["iwae-k5"]["device"] = "cuda"
    grid_file.write_text(json.dumps(grid))
    args = ["reproduce", str(grid_file), "--quiet"]
    result = CliRunner().invoke(cli, args + ["--cuda"] * (where == "option"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    asked_by = "--cuda" if where == "option" else '"device": "cuda" (in grid.json)'
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {asked_by}: CUDA is not available on this machine (no GPU, or "
        f"torch was built without CUDA); drop {asked_by} to run on the CPU"
    )
    assert not (grid_file.parent / "runs").exists()


@pytest.mark.parametrize(
    "text, key",
    [
        ('{"runs": {"a": {}, "b": {}, "a": {"lr": 0.01}}}', "a"),
        ('{"base": {"epochs": 1, "epochs": 2}, "runs": {"a": {}}}', "epochs"),
        ('{"runs": {"a": {}}, "eval_samples": 5, "eval_samples": 6}', "eval_samples"),
    ],
)
def test_a_key_given_twice_in_a_grid_file_is_refused_in_one_line(tmp_path, text, key):
    # A run (or a setting) defined twice was silently its last definition.
    path = tmp_path / "grid.json"
    path.write_text(text)
    with pytest.raises(RunError) as error:
        Grid.load(path)
    assert str(error.value) == (
        f"grid {path}: key {key!r} is given twice in one object; give each run "
        "name and setting once: fix the file"
    )


def test_a_run_error_under_a_grid_names_no_option_of_fit(grid_file, tmp_path):
    # A run's errors named fit's --out (and its settings as fit's options).
    run_dir = tmp_path / "runs" / "vae-k1"
    run_dir.mkdir(parents=True)
    (run_dir / "eval-test-k8.json").write_text("{}")
    args = ["reproduce", str(grid_file), "--quiet", "--only", "vae-k1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "--out" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {run_dir} holds run files (eval-test-k8.json) that a new run would "
        "replace or stand beside; choose an empty or new folder (--runs-dir)"
    )


@pytest.mark.parametrize("made", [False, True])
def test_a_report_of_a_folder_without_the_grids_runs_is_refused(
    grid_file, tmp_path, made
):
    # A mistyped --runs-dir overwrote the report (and the readme's table) with
    # rows reading "not run yet".
    readme = tmp_path / "README.md"
    readme.write_text("<!-- grid-table:start -->\nold\n<!-- grid-table:end -->\n")
    (tmp_path / "table.md").write_text("old")
    runs_dir = tmp_path / "typo"
    if made:
        (runs_dir / "other-run").mkdir(parents=True)
    args = ["reproduce", str(grid_file), "--report-only", "--readme", str(readme)]
    result = CliRunner().invoke(cli, [*args, "--runs-dir", str(runs_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    where = "holds none of the grid's runs" if made else "does not exist"
    assert result.output.strip().splitlines() == [
        f"Error: the runs folder {runs_dir} {where}, so its report would say 'not "
        "run yet' for every run; nothing was written: pass the folder of the "
        "grid's runs (--runs-dir), or train them first"
    ]
    assert (tmp_path / "table.md").read_text() == "old" and "old" in readme.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["grid.json", "README.md", "table.md", *["typo"] * made]
    )


def test_two_grid_files_in_one_folder_keep_their_runs_and_reports_apart(
    grid_file, tmp_path, monkeypatch
):
    # Both read and wrote runs/ and table.md beside them: one report overwrote
    # the other's.
    import pyro_iwae_cli.grid as G

    used = []
    monkeypatch.setattr(G, "run_grid", lambda g, runs_dir, **kw: used.append(runs_dir))
    monkeypatch.setattr(
        G, "write_report", lambda g, runs, out, readme: used.append(out) or {}
    )
    other = tmp_path / "other.json"
    other.write_text(grid_file.read_text())
    for path in (grid_file, other):
        result = CliRunner().invoke(cli, ["reproduce", str(path), "--quiet"])
        assert result.exit_code == 0, result.output
    assert used == [
        tmp_path / "runs",
        tmp_path,
        tmp_path / "other" / "runs",
        tmp_path / "other",
    ]


@pytest.mark.parametrize("name", ["mnist", "continuous", "sbn"])
def test_the_results_grids_read_the_data_beside_the_checkout(name):
    # The grids said "../shared/data", read from the grid file's folder: results/
    # shared/data, not the ../shared/data beside the checkout that results/README.md
    # names for a run from the repository root.
    root = Path(__file__).resolve().parent.parent
    grid = Grid.load(root / "results" / name / "grid.json")
    wanted = str((root.parent / "shared" / "data").resolve())
    assert {grid.config(run).data_dir for run in grid.runs} == {wanted}
    assert "`../shared/data/MNIST/raw`" in (root / "results" / "README.md").read_text()


def test_a_missing_data_file_is_said_with_the_data_dir_option(tmp_path):
    # reproduce said "pass data_dir=FOLDER", a Python argument, on the command line.
    grid = {**GRID, "base": {**GRID["base"], "dataset": "omniglot"}}
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(grid))
    args = ["reproduce", str(grid_file), "--only", "vae-k1", "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: omniglot: ") and " not found; " in error
    assert "pass --data-dir FOLDER, the folder holding it" in error
    assert "data_dir=" not in error
