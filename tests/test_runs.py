"""Run directories: their files, and the runs that cannot be used; Run: one
writer at a time, evaluations that keep each other, data pointed at again,
Ctrl-C advice that works, runs extended, through the CLI as a user meets them."""

import dataclasses
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from small_run import BATCH, TEST, TRAIN, K, linear_gaussian_config, small_config
from test_cli import SMALL, assert_ok, assert_one_line_error, invoke

from pyro_iwae import FitCallback, PyroIwaeError
from pyro_iwae.errors import ConfigError, DataError, RunBusy, TrainingDiverged
from pyro_iwae.runs import eval_results, locks
from pyro_iwae.runs.checkpoints import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    CheckpointError,
    RunError,
    load_checkpoint,
    read_metrics,
)
from pyro_iwae.runs.config import CONFIG_FILE, RunConfig
from pyro_iwae.runs.eval_results import EvalSettings, result_path
from pyro_iwae.runs.run import Run, find_latest_run, load_run, train_run
from pyro_iwae_cli import common as cli_common
from pyro_iwae_cli import main as cli_main
from pyro_iwae_cli import progress
from pyro_iwae_cli.options import cli_text


def test_one_epoch_writes_run_files(tmp_path):
    runs, tmp_path = tmp_path, tmp_path / "run"
    config = small_config()
    history = train_run(config, tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    assert RunConfig.load(tmp_path) == config
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["num_particles"] == K
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 1
    metrics = json.loads(lines[0])
    assert metrics == history[0] == read_metrics(tmp_path)[0]
    assert metrics["epoch"] == 1 and metrics["k"] == K
    assert metrics["test_points"] == TEST and metrics["steps"] == TRAIN // BATCH
    assert -400 < metrics["train_bound"] < 0 and -400 < metrics["test_bound"] < 0
    assert metrics["time"] > 0 and metrics["images_per_s"] > 0
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert checkpoint["config"] == config.to_dict()
    assert checkpoint["position"]["epochs_done"] == 1
    _, model, guide = load_run(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][key])
    assert find_latest_run(runs) == tmp_path


def test_resume_without_checkpoint_and_bad_run_dirs(tmp_path):
    config = small_config()
    with pytest.raises(RunError, match="does not exist"):
        train_run(config, tmp_path / "missing", resume=True)
    config.save(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_run(config, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path.parent)
    with pytest.raises(RunError, match=r"no run found \(.*empty does not exist\)"):
        find_latest_run(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no run found in .*empty; train one") as e:
        find_latest_run(tmp_path / "empty")
    # The folder to look in was not named as the argument that sets it.
    assert str(e.value).endswith("or set runs_dir to the folder of runs to look in")
    with pytest.raises(RunError, match="is a file, not a folder"):
        load_run(tmp_path / CONFIG_FILE)
    (tmp_path / CONFIG_FILE).write_text("{broken")
    with pytest.raises(RunError, match="cannot read"):
        load_run(tmp_path)


def test_existing_run_is_not_overwritten_and_resume_needs_same_config(run_dir):
    with pytest.raises(RunError, match="holds a run already"):
        train_run(small_config(), run_dir)
    with pytest.raises(RunError, match="num_particles=2"):
        train_run(small_config(num_particles=3), run_dir, resume=True)


def test_a_new_run_refuses_a_folder_holding_run_files_and_deletes_none(run_dir):
    # A new run replaced, or on failing deleted, a config.json or metrics.jsonl
    # of a folder without checkpoint.pt, and left old evaluations beside it.
    folder = run_dir.parent / "mine"
    folder.mkdir()
    (folder / METRICS_FILE).write_text("my notes\n")
    (folder / CONFIG_FILE).write_text('{"mine": 1}\n')
    mine = _files(folder)
    with pytest.raises(RunError, match=r"holds run files \(config.json, metrics"):
        train_run(small_config(), folder)
    assert _files(folder) == mine
    result = invoke("fit", *SMALL, "--out", folder, "--quiet")
    error = assert_one_line_error(result, "choose an empty or new folder (--out)")
    assert "--resume" not in error  # no checkpoint there to resume
    assert _files(folder) == mine
    # A finished run whose checkpoint was removed keeps its record.
    (run_dir / "eval-test-k5.json").write_text("{}")
    (run_dir / CHECKPOINT_FILE).unlink()
    before = _files(run_dir)
    files = r"\(config.json, eval-test-k5.json, metrics.jsonl\)"
    with pytest.raises(RunError, match=files):
        train_run(small_config(), run_dir)
    assert _files(run_dir) == before
    # A folder holding an evaluation alone has no run to resume.
    evaluated = run_dir.parent / "evaluated"
    evaluated.mkdir()
    (evaluated / "eval-test-k5.json").write_text("{}")
    result = invoke("fit", *SMALL, "--out", evaluated, "--quiet")
    error = assert_one_line_error(result, "holds run files (eval-test-k5.json)")
    assert "--resume" not in error
    # A run's folder with its checkpoint is offered the resume.
    result = invoke("fit", *SMALL, "--out", run_dir.parent / "finished", "--quiet")
    assert_ok(result)
    result = invoke("fit", *SMALL, "--out", run_dir.parent / "finished", "--quiet")
    assert_one_line_error(result, "holds a run already; resume it (--resume)")


def test_a_refused_run_folder_names_train_runs_own_arguments(run_dir):
    # From Python the advice named fit's options as bare words: "resume it
    # (resume) or choose another run directory (out)"; train_run has no out.
    with pytest.raises(RunError) as error:
        train_run(small_config(), run_dir)
    assert str(error.value) == (
        f"{run_dir} holds a run already; resume it (resume=True) or choose "
        "another run directory (run_dir)"
    )
    folder = run_dir.parent / "mine"
    folder.mkdir()
    (folder / METRICS_FILE).write_text("my notes\n")
    with pytest.raises(RunError) as error:
        train_run(small_config(), folder)
    assert str(error.value).endswith("choose an empty or new folder (run_dir)")
    # The command line's own names for them.
    result = invoke("fit", *SMALL, "--out", run_dir, "--quiet")
    assert_one_line_error(
        result, "resume it (--resume) or choose another run directory (--out)"
    )


def test_a_run_killed_before_its_first_epoch_starts_again(tmp_path):
    # What a killed (or torchrun-restarted) new run leaves: its own config and an
    # empty metrics file, which a new run may replace, of the same settings or
    # others (other settings were refused, and --resume too: a dead end).
    config = small_config()
    config.save(tmp_path)
    (tmp_path / METRICS_FILE).write_text("")
    assert [m["epoch"] for m in train_run(config, tmp_path)] == [1]
    shutil.rmtree(tmp_path)
    small_config(seed=1).save(tmp_path)
    (tmp_path / METRICS_FILE).write_text("")
    assert [m["epoch"] for m in train_run(config, tmp_path)] == [1]
    assert RunConfig.load(tmp_path) == config


def test_a_run_stopped_as_its_first_epoch_ended_starts_again(tmp_path):
    # Stopped between the first epoch's metrics line and its checkpoint, a run
    # could be neither resumed ("was it deleted?") nor started again ("holds
    # run files"), by fit or by reproduce.
    config = small_config()
    first = train_run(config, tmp_path)
    (tmp_path / CHECKPOINT_FILE).unlink()  # what the stopped process left
    result = invoke("fit", "--resume", "--out", tmp_path, "--quiet")
    assert_one_line_error(
        result,
        "records 1 finished epoch(s); put it back if it was moved, or, if its "
        "process stopped as that epoch ended, start the run afresh (without "
        "--resume)",
    )
    again = train_run(config, tmp_path)
    assert again[0]["train_bound"] == first[0]["train_bound"]
    assert len(read_metrics(tmp_path)) == 1


def test_a_refused_resume_leaves_the_config_as_it_was(run_dir):
    # Fit finds a schedule shorter than the run only once it starts, after the
    # config was written: that config asked for one epoch of a run of two, and
    # every plain resume was refused from then on.
    train_run(small_config(epochs=2), run_dir, resume=True)
    before = (run_dir / CONFIG_FILE).read_bytes()
    with pytest.raises(CheckpointError, match="more than the 1 asked for"):
        train_run(small_config(epochs=1), run_dir, resume=True)
    assert (run_dir / CONFIG_FILE).read_bytes() == before
    # --print-config printed that config, and exited 0.
    result = invoke(
        "fit", "--resume", "--out", run_dir, "--epochs", 1, "--print-config"
    )
    assert_one_line_error(result, "has trained 2 epochs, more than the 1 asked for")
    assert "drop --epochs" in result.output and '"epochs"' not in result.output
    history = train_run(RunConfig.load(run_dir), run_dir, resume=True)
    assert [m["epoch"] for m in history] == [1, 2]


def test_a_resume_with_an_unknown_setting_is_refused_as_a_new_run_is(tmp_path):
    # An AttributeError traceback ('RunConfig' object has no attribute 'epoch').
    small_config().save(tmp_path)
    message = (
        "unknown run settings epoch (epochs?); use the names of a run's "
        "config.json, the fields of RunConfig"
    )
    with pytest.raises(RunError) as error:
        Run(tmp_path).resumed_config({"epoch": 7})
    assert str(error.value) == message
    (tmp_path / "t.json").write_text('{"epoch": 3}')
    result = invoke(
        "fit", "--resume", "--out", tmp_path, "--config", tmp_path / "t.json"
    )
    assert assert_one_line_error(result) == f"Error: {message}"


def test_a_new_run_trained_without_a_config_is_refused_for_that(tmp_path):
    # Refused as "run directory ... does not exist", which it was meant to be.
    with pytest.raises(RunError) as error:
        Run(tmp_path / "new").train()
    assert str(error.value) == (
        f"no config to train {tmp_path / 'new'} with: pass a RunConfig, "
        "Run(path).train(config), or resume an existing run (resume=True)"
    )
    assert not (tmp_path / "new").exists()


def test_a_resume_missing_a_file_says_which_and_changes_nothing(run_dir):
    # A deleted checkpoint was said never to have finished an epoch; a deleted
    # metrics file resumed silently, its record then missing the first epochs.
    config = small_config(epochs=2)
    metrics = (run_dir / METRICS_FILE).read_bytes()
    (run_dir / METRICS_FILE).unlink()
    with pytest.raises(RunError, match=r"records 0 of the 1 epochs .* put the file"):
        train_run(config, run_dir, resume=True)
    assert not (run_dir / METRICS_FILE).exists()
    (run_dir / METRICS_FILE).write_bytes(metrics)
    (run_dir / CHECKPOINT_FILE).rename(run_dir / "elsewhere.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint.pt .* records 1 fin"):
        train_run(config, run_dir, resume=True)
    (run_dir / "elsewhere.pt").rename(run_dir / CHECKPOINT_FILE)
    history = train_run(config, run_dir, resume=True)
    assert [m["epoch"] for m in history] == [1, 2]
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]


def test_resume_may_change_how_the_steps_run(run_dir):
    # compile=None: the traced step graph, uncompiled (inductor takes seconds).
    history = train_run(small_config(epochs=2, compile=None), run_dir, resume=True)
    assert [m["compiled"] for m in history] == [False, True]
    assert history[1]["compile_choice"] == "as asked"
    # Saved with the longer schedule: the settings of the call that extended it.
    assert RunConfig.load(run_dir).compile is None


def _files(folder):
    """Name -> bytes of every file of ``folder`` but its lock."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(f".{locks.WRITER}.")
    }


def test_errors_share_one_base_and_keep_their_old_bases():
    for cls in (ConfigError, RunError, CheckpointError, DataError, TrainingDiverged):
        assert issubclass(cls, PyroIwaeError)
    assert issubclass(ConfigError, ValueError) and issubclass(RunBusy, RunError)
    error = ConfigError("{num_particles} 0 is too few:\n use {objective} vae")
    assert str(error) == "num_particles 0 is too few: use objective vae"
    assert error.render({"num_particles": "--particles"}).startswith("--particles 0")


def test_cli_spells_python_arguments_as_options():
    message = "use estimator='vimco' (k >= 2), resume=True or num_particles=3"
    assert (
        cli_text(message) == "use --estimator vimco (k >= 2), --resume or --particles 3"
    )
    assert cli_text("x='y' stays") == "x='y' stays"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    assert_ok(invoke("fit", *SMALL, "--out", run_dir, "--quiet"))
    return run_dir


def test_the_latest_trained_run_passes_over_one_killed_before_its_first_epoch(
    trained, tmp_path
):
    # A fit killed before its first checkpoint became the latest run, which
    # eval-nll and sample then failed to load.
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs / "a")
    (runs / "b").mkdir()
    shutil.copy(trained / CONFIG_FILE, runs / "b")
    stamp = (runs / "a" / CHECKPOINT_FILE).stat().st_mtime
    os.utime(runs / "b" / CONFIG_FILE, (stamp + 10, stamp + 10))
    assert Run.find(None, runs).path == runs / "b"
    assert Run.find(None, runs, trained=True).path == runs / "a"
    assert Run.find(runs / "b", runs, trained=True).path == runs / "b"  # as named
    shutil.rmtree(runs / "a")
    with pytest.raises(RunError, match=r"^no run in .*runs has finished an epoch;"):
        Run.find(None, runs, trained=True)


def test_a_second_writer_is_refused_and_changes_nothing(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = _files(run_dir)
    with locks.hold(run_dir, locks.WRITER) as holder:  # as another process would
        assert holder is None
        for command in (
            ["fit", *SMALL, "--seed", 1, "--out", run_dir],
            ["fit", "--resume", "--out", run_dir],
        ):
            error = assert_one_line_error(invoke(*command, "--quiet"))
            assert "being written by another process" in error
            assert _files(run_dir) == before
    # A new run in a folder being written: refused, the folder left as it is.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with locks.hold(fresh, locks.WRITER):
        assert_one_line_error(invoke("fit", *SMALL, "--out", fresh), "being written")
    assert not (fresh / "config.json").exists()


def test_a_dead_writers_lock_is_taken_over(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    claim = run_dir / f".{locks.WRITER}.claim"
    dead = {"host": os.uname().nodename, "pid": 2**22 + 1, "since": 0}
    claim.write_text(json.dumps(dead))
    result = invoke("fit", "--resume", "--epochs", 2, "--out", run_dir, "--quiet")
    assert_ok(result)
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]
    assert not claim.exists()


def test_an_unreadable_claim_says_what_to_do(trained, tmp_path):
    # An empty claim (a writer killed as it wrote it) said "being written by
    # another process", with nothing to do but wait.
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    claim = run_dir / f".{locks.WRITER}.claim"
    claim.write_text("")
    result = invoke("fit", "--resume", "--epochs", 2, "--out", run_dir, "--quiet")
    assert_one_line_error(result, "which is unreadable; delete it if no process")
    claim.unlink()
    assert_ok(invoke("fit", "--resume", "--epochs", 2, "--out", run_dir, "--quiet"))


def test_an_evaluation_of_other_settings_is_kept(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    assert_ok(invoke("eval-nll", run_dir, "--k", 4, "--limit", 20, "--quiet"))
    first = (run_dir / "eval-test-k4.json").read_text()
    result = invoke("eval-nll", run_dir, "--k", 4, "--limit", 10, "--quiet")
    assert_ok(result)
    assert (run_dir / "eval-test-k4.json").read_text() == first
    other = json.loads((run_dir / "eval-test-k4-n10-seed0-batch100.json").read_text())
    assert other["points"] == 10 and other["k"] == 4
    estimates = (run_dir / other["estimates_file"]).read_text().split()
    assert len(estimates) == 10
    assert "wrote eval-test-k4-n10-seed0-batch100.json" in result.output
    assert str(run_dir) not in result.output.split("wrote")[1]
    # Another seed too; the same settings again replace their own file.
    assert_ok(invoke("eval-nll", run_dir, "--k", 4, "--limit", 20, "--seed", 1))
    assert (run_dir / "eval-test-k4-n20-seed1-batch100.json").is_file()
    assert_ok(invoke("eval-nll", run_dir, "--k", 4, "--limit", 20, "--quiet"))
    assert json.loads((run_dir / "eval-test-k4.json").read_text())["points"] == 20


def test_an_evaluation_records_where_its_file_is_from_anywhere(
    trained, tmp_path, monkeypatch
):
    # "file" was the path as given: relative to the folder eval-nll ran in.
    shutil.copytree(trained, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert_ok(invoke("eval-nll", "run", "--k", 4, "--limit", 10, "--quiet"))
    saved = json.loads((tmp_path / "run" / "eval-test-k4.json").read_text())
    assert saved["file"] == str((tmp_path / "run" / "eval-test-k4.json").resolve())


def test_an_evaluation_that_cannot_be_written_fails_before_it_computes(
    trained, tmp_path, monkeypatch
):
    # In a read-only run, eval-nll computed every estimate, then failed to write.
    import tempfile

    from pyro_iwae.runs import run as run_module

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    calls = []
    monkeypatch.setattr(run_module, "estimate_points", lambda *a: calls.append(a))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    before = _files(run_dir)
    result = invoke("eval-nll", run_dir, "--k", 4, "--limit", 10, "--quiet")
    assert_one_line_error(result, f"cannot write in {run_dir} (Permission denied")
    assert "copy the run to a folder you can write in" in result.output
    assert calls == [] and _files(run_dir) == before
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes in a read-only folder
        run_dir.chmod(0o555)
        try:
            result = invoke("eval-nll", run_dir, "--k", 4, "--limit", 10, "--quiet")
            assert_one_line_error(result, "cannot write in")
        finally:
            run_dir.chmod(0o755)


def test_two_evaluations_that_end_together_keep_their_own_files(
    trained, tmp_path, monkeypatch
):
    # Another process's evaluation of other settings writes the plain name while
    # this one computes: the name was chosen before, and one result was lost.
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    from pyro_iwae.runs import run as run_module

    estimate, others = run_module.estimate_points, []

    def while_another_ends(*args, **kwargs):
        if not others:  # the other evaluation, once (it runs through here too)
            others.append(1)
            assert_ok(invoke("eval-nll", run_dir, "--k", 4, "--limit", 20, "--quiet"))
        return estimate(*args, **kwargs)

    monkeypatch.setattr(run_module, "estimate_points", while_another_ends)
    assert_ok(invoke("eval-nll", run_dir, "--k", 4, "--limit", 10, "--quiet"))
    points = {
        p.name: json.loads(p.read_text())["points"]
        for p in run_dir.glob("eval-test-k4*.json")
    }
    assert points == {
        "eval-test-k4.json": 20,
        "eval-test-k4-n10-seed0-batch100.json": 10,
    }


def _fit_on_a_data_file(tmp_path):
    """A run fitted for one epoch on 120 random binary points saved as
    ``points.npy`` (12 of them the test split): (data file, run folder)."""
    generator = np.random.default_rng(0)
    data = tmp_path / "points.npy"
    np.save(data, (generator.random((120, 16)) < 0.3).astype(np.float32))
    run_dir = tmp_path / "run"
    options = ["--batch-size", 20, "--particles", 2, "--epochs", 1, "--quiet"]
    assert_ok(invoke("fit", "--dataset", data, *options, "--out", run_dir))
    return data, run_dir


def test_a_model_that_takes_no_likelihood_trains_on_real_valued_data(tmp_path):
    # Its points were refused as outside the support of the default bernoulli
    # likelihood, and likelihood="gaussian" as a setting its builder takes not.
    import pyro
    import pyro.distributions as dist

    from pyro_iwae import evaluate_run, register_model
    from pyro_iwae.nn.registry import MODELS
    from pyro_iwae.runs.run_writer import model_likelihood

    class OwnGaussian(torch.nn.Module):
        def __init__(self, x_dim: int) -> None:
            super().__init__()
            self.decoder = torch.nn.Linear(50, x_dim)

        def forward(self, x: torch.Tensor) -> None:
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z1", dist.Normal(x.new_zeros(50), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def build(x_dim, stochastic_layers, data_mean):
        return OwnGaussian(x_dim)

    register_model("test-own-likelihood")(build)
    try:
        config = _real_valued_run(tmp_path, "test-own-likelihood")
        assert model_likelihood(config) is None
        assert model_likelihood(small_config()) == "bernoulli"
        (metrics,) = train_run(config, tmp_path / "run")
        assert math.isfinite(metrics["test_bound"])
        evaluation = evaluate_run(tmp_path / "run", num_samples=3, compile="off")
        assert evaluation.points == 6 and math.isfinite(evaluation.nll)
        # Points that are not finite are refused still.
        bad = tmp_path / "nan.npy"
        np.save(bad, np.full((60, 3), np.nan, np.float32))
        with pytest.raises(DataError, match="nan or infinite"):
            train_run(dataclasses.replace(config, dataset=str(bad)), tmp_path / "nan")
    finally:
        del MODELS["test-own-likelihood"]


def test_a_model_builder_s_own_likelihood_default_is_the_one_checked(tmp_path):
    # A builder taking likelihood="gaussian" by default is not given the run's
    # default, bernoulli: it built a Gaussian model, yet real-valued points were
    # refused as outside the bernoulli support.
    from pyro_iwae import register_model
    from pyro_iwae.nn.models import paper_model
    from pyro_iwae.nn.registry import MODELS
    from pyro_iwae.runs.run_writer import model_likelihood

    def gaussian_by_default(x_dim, stochastic_layers, data_mean, likelihood="gaussian"):
        return paper_model(x_dim, stochastic_layers, data_mean, likelihood=likelihood)

    def other_default(x_dim, stochastic_layers, data_mean, likelihood="poisson"):
        return gaussian_by_default(x_dim, stochastic_layers, data_mean)

    register_model("test-gaussian-default")(gaussian_by_default)
    register_model("test-other-default")(other_default)
    try:
        config = _real_valued_run(tmp_path, "test-gaussian-default")
        assert model_likelihood(config) == "gaussian"
        (metrics,) = train_run(config, tmp_path / "run")
        assert math.isfinite(metrics["test_bound"])
        # Given, the run's setting is the builder's; a default of no known
        # likelihood is the builder's own (only finite values are asked for).
        given = dataclasses.replace(config, likelihood="continuous-bernoulli")
        assert model_likelihood(given) == "continuous-bernoulli"
        other = dataclasses.replace(config, model="test-other-default")
        assert model_likelihood(other) is None
    finally:
        del MODELS["test-gaussian-default"], MODELS["test-other-default"]


def _real_valued_run(tmp_path, model):
    """A one-epoch run of ``model`` on 60 standard-normal points of 3 values."""
    data = tmp_path / "points.npy"
    np.save(data, np.random.default_rng(0).standard_normal((60, 3), np.float32))
    return RunConfig(
        dataset=str(data),
        x_dim=3,
        model=model,
        batch_size=18,
        num_particles=2,
        epochs=1,
        compile="off",
    )


def test_a_test_fraction_of_data_with_their_own_test_set_is_refused(tmp_path):
    # It was accepted and stored, and held nothing out: the data's own test set,
    # a file's test array or a built-in set's, was the test set.
    generator = np.random.default_rng(0)
    points = generator.standard_normal((40, 3)).astype(np.float32)
    np.savez(tmp_path / "both.npz", train=points[:30], test=points[30:])
    torch.save(
        {"train": torch.tensor(points[:30]), "test": torch.tensor(points[30:])},
        tmp_path / "both.pt",
    )
    np.save(tmp_path / "train.npy", points)
    fit = ["fit", "--likelihood", "gaussian", "--epochs", 1, "--quiet"]
    for dataset in ("both.npz", "both.pt", "mnist-mini"):
        result = invoke(
            *fit,
            "--dataset",
            dataset if dataset == "mnist-mini" else tmp_path / dataset,
            "--test-fraction",
            0.5,
            "--train-limit",
            20,
            "--out",
            tmp_path / f"run-{dataset}",
        )
        assert_one_line_error(
            result,
            "--test-fraction applies to data without a test set; --dataset",
            "has its own: drop it",
        )
        assert not (tmp_path / f"run-{dataset}").exists()
    with pytest.raises(ConfigError, match="has its own"):
        train_run(
            linear_gaussian_config(str(tmp_path / "both.npz"), test_fraction=0.5),
            tmp_path / "py",
        )
    # A file without one holds half its points out.
    train_run(
        linear_gaussian_config(
            str(tmp_path / "train.npy"), test_fraction=0.5, test_limit=1000
        ),
        tmp_path / "half",
    )
    assert read_metrics(tmp_path / "half")[0]["test_points"] == 20


def test_a_data_files_test_fraction_from_a_settings_file_is_named_as_its_key(tmp_path):
    # The refusal said --test-fraction, an option the user never passed.
    points = np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32)
    np.savez(tmp_path / "both.npz", train=points[:30], test=points[30:])
    settings = tmp_path / "tf.json"
    config = linear_gaussian_config(str(tmp_path / "both.npz"), test_fraction=0.5)
    settings.write_text(json.dumps(config.to_dict()))
    result = invoke("fit", "--config", settings, "--out", tmp_path / "run")
    assert_one_line_error(
        result,
        "test_fraction (in tf.json) applies to data without a test set; dataset ",
        "both.npz has its own: drop it",
    )
    assert not (tmp_path / "run").exists()


def test_a_limit_past_the_split_is_the_whole_split(tmp_path):
    _, run_dir = _fit_on_a_data_file(tmp_path)
    evaluate = ["eval-nll", run_dir, "--k", 3, "--quiet"]
    assert_ok(invoke(*evaluate, "--limit", 50))  # of the 12 test points
    saved = json.loads((run_dir / "eval-test-k3.json").read_text())
    assert saved["points"] == 12 and saved["limit"] is None
    # Under a name that spells the settings: that of all points, not n50.
    assert_ok(invoke(*evaluate, "--seed", 1, "--limit", 0))
    result = invoke(*evaluate, "--seed", 1, "--limit", 50)
    assert_ok(result)
    assert "eval-test-k3-nall-seed1-batch100.json" in result.output
    assert sorted(p.name for p in run_dir.glob("eval-*.json")) == [
        "eval-test-k3-nall-seed1-batch100.json",
        "eval-test-k3.json",
    ]
    # Without the points, as a grid asks: a full evaluation answers the limit.
    settings = EvalSettings(num_samples=3, limit=50)
    assert result_path(run_dir, settings).name == "eval-test-k3.json"
    settings = EvalSettings(num_samples=3, seed=1, limit=50)
    assert result_path(run_dir, settings).name.endswith("-nall-seed1-batch100.json")
    settings = EvalSettings(num_samples=3, seed=1, limit=5)
    assert result_path(run_dir, settings).name.endswith("-n5-seed1-batch100.json")


def test_the_training_split_of_a_run_with_a_train_limit_is_its_trained_points(
    tmp_path,
):
    # split="train" scored the whole training split (108 points here), not the
    # 30 the run trained on, so a train/test gap read from it was wrong.
    from pyro_iwae import evaluate_run

    data = tmp_path / "points.npy"
    generator = np.random.default_rng(0)
    np.save(data, generator.standard_normal((120, 3)).astype(np.float32))
    run_dir = tmp_path / "run"
    config = linear_gaussian_config(str(data), train_limit=30)
    train_run(config, run_dir)
    trained = evaluate_run(run_dir, num_samples=3, split="train")
    assert trained.points == 30 and trained.limit is None
    # The first 30 training points, as training took them.
    first = evaluate_run(run_dir, num_samples=3, split="train", limit=30)
    assert first.nll == trained.nll and first.points == 30
    fewer = evaluate_run(run_dir, num_samples=3, split="train", limit=10)
    assert fewer.points == 10
    # The command line's --split train, past the limit: the same 30 points.
    result = invoke("eval-nll", run_dir, "--split", "train", "--k", 3, "--seed", 1)
    assert_ok(result)
    assert "train split, 30 points" in result.output
    saved = json.loads((run_dir / "eval-train-k3-nall-seed1-batch100.json").read_text())
    assert saved["points"] == 30 and saved["split"] == "train"


def test_a_resume_whose_data_file_moved_is_told_only_where_it_is_now(tmp_path):
    # It advised "where it is now, or another .npy, .npz or .pt file", which a
    # resume refuses (its points differ from those the run began with).
    data, run_dir = _fit_on_a_data_file(tmp_path)
    data.rename(tmp_path / "moved.npy")
    result = invoke("fit", "--resume", "--out", run_dir, "--epochs", 2, "--quiet")
    message = assert_one_line_error(
        result, f"{data} not found; set --dataset to where it is now (a resumed run"
    )
    assert "another" not in message
    # An evaluation may take other data: it is told so.
    result = invoke("eval-nll", run_dir, "--k", 2, "--quiet")
    assert_one_line_error(result, "where it is now, or to another .npy")


def test_a_moved_data_file_is_pointed_at_again(tmp_path):
    data, run_dir = _fit_on_a_data_file(tmp_path)
    moved = tmp_path / "elsewhere" / "points.npy"
    moved.parent.mkdir()
    data.rename(moved)
    missing = invoke("eval-nll", run_dir, "--k", 3)
    assert_one_line_error(missing, "not found; set --dataset to where it is now")
    result = invoke("eval-nll", run_dir, "--k", 3, "--dataset", moved, "--quiet")
    assert_ok(result)
    assert "12 points" in result.output
    assert_ok(invoke("sample", run_dir, "--dataset", moved))
    # Resumed from where the file is now (and it stays the run's file).
    more = ["--epochs", 2, "--quiet"]
    assert_ok(invoke("fit", "--resume", "--out", run_dir, "--dataset", moved, *more))
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == str(moved)
    assert len(read_metrics(run_dir)) == 2
    wrong = tmp_path / "wide.npy"
    np.save(wrong, np.zeros((50, 9), dtype=np.float32))
    error = assert_one_line_error(invoke("eval-nll", run_dir, "--dataset", wrong))
    assert "9 values" in error and "16" in error


def test_a_data_file_of_an_upper_case_suffix_is_a_data_file(tmp_path):
    points = tmp_path / "POINTS.NPY"
    with open(points, "wb") as f:
        np.save(f, np.zeros((40, 16), dtype=np.float32))
    options = ["--batch-size", 20, "--particles", 2, "--epochs", 1, "--quiet"]
    assert_ok(invoke("fit", "--dataset", points, *options, "--out", tmp_path / "r"))


def test_a_data_file_changed_since_training_is_refused_or_named(tmp_path):
    # Other contents in the same file were evaluated and resumed on silently,
    # the run's own evaluation replaced; other data given with --dataset were
    # labelled as the run's data set.
    data, run_dir = _fit_on_a_data_file(tmp_path)
    assert_ok(invoke("eval-nll", run_dir, "--k", 3, "--quiet"))
    own = (run_dir / "eval-test-k3.json").read_text()
    generator = np.random.default_rng(1)
    np.save(data, (generator.random((120, 16)) < 0.6).astype(np.float32))
    for command in (
        ["eval-nll", run_dir, "--k", 3],
        ["fit", "--resume", "--out", run_dir],
    ):
        error = assert_one_line_error(invoke(*command), "has changed since the run")
        assert "put the file back as it was" in error
    assert (run_dir / "eval-test-k3.json").read_text() == own
    result = invoke("eval-nll", run_dir, "--k", 3, "--dataset", data, "--quiet")
    assert_ok(result)
    other = json.loads((run_dir / "eval-test-k3-on-points.json").read_text())
    assert other["dataset"] == str(data) and other["nll"] != json.loads(own)["nll"]
    assert (run_dir / "eval-test-k3.json").read_text() == own


def test_other_data_files_of_one_name_keep_their_own_evaluations(tmp_path):
    # The third file named points.npy took the second's file name: its
    # estimate replaced the second's.
    _, run_dir = _fit_on_a_data_file(tmp_path)
    files = []
    for i, folder in enumerate("ABC"):
        (tmp_path / folder).mkdir()
        files.append(tmp_path / folder / "points.npy")
        points = np.random.default_rng(10 + i).random((120, 16)) < 0.2 + 0.2 * i
        np.save(files[-1], points.astype(np.float32))
        result = invoke("eval-nll", run_dir, "--k", 3, "--dataset", files[-1])
        assert_ok(result)
    saved = [json.loads(p.read_text()) for p in run_dir.glob("eval-*-on-*.json")]
    assert sorted(e["dataset"] for e in saved) == sorted(map(str, files))
    assert len({e["nll"] for e in saved}) == 3
    # Each found again under its own name: the same estimate, no new file.
    result = invoke("eval-nll", run_dir, "--k", 3, "--dataset", files[1])
    assert_ok(result)
    assert len(list(run_dir.glob("eval-*-on-*.json"))) == 3


def test_sample_says_when_it_reconstructs_other_data(tmp_path):
    # Other data given with --dataset were reconstructed without a word.
    data, run_dir = _fit_on_a_data_file(tmp_path)
    moved = tmp_path / "moved.npy"
    moved.write_bytes(data.read_bytes())
    result = invoke("sample", run_dir, "--n", 4, "--dataset", moved)
    assert_ok(result)
    assert "not the run's own data" not in result.output
    other = tmp_path / "other.npy"
    np.save(other, (np.random.default_rng(2).random((60, 16)) < 0.5).astype("f4"))
    result = invoke("sample", run_dir, "--n", 4, "--dataset", other)
    assert_ok(result)
    assert f"reconstructions of {other}, not the run's own data" in result.output


def test_an_evaluation_of_another_chunk_size_is_kept_apart(tmp_path):
    # The chunk size draws other particles: its estimates went into the file of
    # the default chunk, which did not record it.
    _, run_dir = _fit_on_a_data_file(tmp_path)
    assert_ok(invoke("eval-nll", run_dir, "--k", 4, "--quiet"))
    assert_ok(invoke("eval-nll", run_dir, "--k", 4, "--chunk-size", 3, "--quiet"))
    default = json.loads((run_dir / "eval-test-k4.json").read_text())
    chunked = run_dir / "eval-test-k4-nall-seed0-batch100-chunk3.json"
    assert default["chunk_size"] is None
    # No k-hat fitted at k = 4: the share above 0.7 is unknown, not 0.
    assert default["diagnostics"]["khat_above_0.7"] is None
    assert json.loads(chunked.read_text())["chunk_size"] == 3


def test_data_outside_the_runs_likelihood_are_refused_in_one_line(tmp_path):
    _, run_dir = _fit_on_a_data_file(tmp_path)
    grey = tmp_path / "grey.npy"
    np.save(grey, np.full((30, 16), 0.5, dtype=np.float32))
    result = invoke("eval-nll", run_dir, "--k", 3, "--dataset", grey)
    error = assert_one_line_error(result, "values other than 0 and 1", "binarize none")
    assert "grey.npy (test split)" in error
    assert not list(run_dir.glob("eval-*.json"))


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_before_the_first_epoch_ends_keeps_nothing(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(progress.FitProgress, "on_step", _interrupt)
        cut = invoke("fit", *SMALL, "--out", run_dir, "--quiet")
    assert cut.exit_code == 130 and "Traceback" not in cut.output
    assert "run the same command again" in cut.output and "--resume" not in cut.output
    assert not run_dir.exists()
    assert_ok(invoke("fit", *SMALL, "--out", run_dir, "--quiet"))  # as advised
    # In a new folder of --runs-dir: that folder goes too.
    runs = tmp_path / "runs"
    with monkeypatch.context() as m:
        m.setattr(progress.FitProgress, "on_epoch_start", _interrupt)
        cut = invoke("fit", *SMALL, "--runs-dir", runs, "--quiet")
    assert cut.exit_code == 130 and not any(runs.iterdir())


def test_a_run_interrupted_before_its_first_checkpoint_leaves_a_users_folder_as_it_was(
    tmp_path,
):
    # The writer's lock file stayed behind in the folder the user had made.
    stop = FitCallback()
    stop.on_step = _interrupt
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(KeyboardInterrupt):
        train_run(small_config(compile="off"), mine, callback=stop)
    assert list(mine.iterdir()) == []
    # A lock file the writer found there is not its own to remove.
    (mine / f".{locks.WRITER}.lock").touch()
    with pytest.raises(KeyboardInterrupt):
        train_run(small_config(compile="off"), mine, callback=stop)
    assert [p.name for p in mine.iterdir()] == [f".{locks.WRITER}.lock"]


def test_ctrl_c_mid_run_advises_a_resume_that_works(tmp_path, monkeypatch):
    run_dir = tmp_path / "my run"  # the advice quotes it for a shell
    args = [*SMALL[:-1], "3", "--checkpoint-every", 2, "--quiet"]
    calls = []

    def step_then_stop(self, info):
        calls.append(info)
        if len(calls) == 7:  # epoch 2, step 3: after the mid-epoch checkpoint
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(progress.FitProgress, "on_step", step_then_stop)
        cut = invoke("fit", *args, "--out", run_dir)
    assert cut.exit_code == 130
    advice = shlex.split(cut.output.split("continue with: ")[1].splitlines()[0])
    assert advice[:4] == ["pyro-iwae", "fit", "--resume", "--out"]
    assert_ok(invoke(*advice[1:], "--quiet"))
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]


@pytest.mark.parametrize(
    "schedule", [["--epochs", 1], ["--schedule", "paper", "--stages", 1]]
)
def test_a_run_resumes_with_its_own_config_file(tmp_path, schedule):
    # The settings that take no effect there ("stages": null, or the paper
    # schedule's "epochs") were counted as named, and the resume refused.
    run_dir = tmp_path / "run"
    assert_ok(invoke("fit", *SMALL[:-2], *schedule, "--out", run_dir, "--quiet"))
    own = run_dir / CONFIG_FILE
    assert_ok(invoke("fit", "--resume", "--out", run_dir, "--config", own, "--quiet"))


def test_a_finished_run_is_extended_by_more_epochs(tmp_path):
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    assert_ok(invoke("fit", *SMALL[:-1], "2", "--out", whole, "--quiet"))
    assert_ok(invoke("fit", *SMALL, "--out", extended, "--quiet"))
    result = invoke("fit", "--resume", "--epochs", 2, "--out", extended, "--quiet")
    assert_ok(result)
    assert [m["epoch"] for m in read_metrics(extended)] == [1, 2]
    assert json.loads((extended / "config.json").read_text())["epochs"] == 2
    a = load_checkpoint(whole / CHECKPOINT_FILE)
    b = load_checkpoint(extended / CHECKPOINT_FILE)
    for part in ("model", "guide"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), key
    # Fewer epochs than it has trained, or another learning rate: refused.
    assert_one_line_error(
        invoke("fit", "--resume", "--epochs", 1, "--out", extended), "schedule"
    )
    assert_one_line_error(
        invoke("fit", "--resume", "--lr", 0.1, "--out", extended), "--lr", "differs"
    )


def test_resume_without_runs_leaves_no_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYRO_IWAE_RUNS", raising=False)
    assert_one_line_error(invoke("fit", "--resume"), "no run found")
    assert not (tmp_path / "runs").exists()


def test_run_object_trains_and_evaluates_as_the_cli_does(tmp_path):
    from pyro_iwae.runs.run import EvalSettings

    config = RunConfig(train_limit=100, test_limit=20, batch_size=50, epochs=1)
    run = Run.new(config, tmp_path)
    history = run.train()  # the config it was made with
    assert len(history) == 1 and run.has_checkpoint
    assert run.config == config
    evaluation = run.evaluate(EvalSettings(num_samples=3, limit=8))
    assert evaluation.points == 8 and evaluation["k"] == 3
    saved = json.loads((run.path / "eval-test-k3.json").read_text())
    assert saved == evaluation.to_json() and "ais_steps" not in saved
    with pytest.raises(ConfigError, match="ais_steps applies to method ais"):
        EvalSettings(ais_steps=5)


def test_an_evaluation_is_a_read_only_mapping_of_its_json():
    # Only __getitem__ and get were defined: "nll" in r, dict(r) and list(r)
    # iterated by integer index and raised KeyError: 0.
    from collections.abc import Mapping

    fields = {f.name: None for f in dataclasses.fields(eval_results.Evaluation)}
    evaluation = eval_results.Evaluation(**{**fields, "nll": 90.5, "method": "iwae"})
    saved = evaluation.to_json()
    assert isinstance(evaluation, Mapping)
    assert "nll" in evaluation and "ais_steps" not in evaluation
    assert dict(evaluation) == saved and list(evaluation) == list(saved)
    assert len(evaluation) == len(saved) and evaluation.keys() == saved.keys()
    assert evaluation.get("nll") == 90.5 and evaluation.get("chains", 7) == 7
    with pytest.raises(KeyError):
        evaluation["chains"]  # as the JSON, AIS's settings with AIS only
    with pytest.raises(TypeError):
        evaluation["nll"] = 1.0


def test_two_fits_started_together_one_is_refused(tmp_path):
    """A real second process: the first fit's run comes out whole, as if alone."""
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pyro_iwae_cli.main", "fit", *map(str, SMALL)]
    first = subprocess.Popen(
        [*command[:-1], "10", "--out", str(run_dir), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    claim = run_dir / f".{locks.WRITER}.claim"
    deadline = time.monotonic() + 120
    while not claim.exists() and first.poll() is None:
        assert time.monotonic() < deadline, "the first fit never took its lock"
        time.sleep(0.05)
    second = invoke("fit", *SMALL, "--seed", 1, "--out", run_dir, "--quiet")
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    error = assert_one_line_error(second, "being written by another process")
    assert f"process {first.pid}" in error
    assert [m["epoch"] for m in read_metrics(run_dir)] == list(range(1, 11))
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 0
    assert load_checkpoint(run_dir / CHECKPOINT_FILE)["config"]["seed"] == 0
    assert not claim.exists()


def test_result_path_finds_an_evaluation_by_its_settings(tmp_path):
    from pyro_iwae.runs.eval_results import EvalSettings, result_path

    twenty = EvalSettings(num_samples=5, limit=20)
    assert result_path(tmp_path, twenty).name == "eval-test-k5.json"
    (tmp_path / "eval-test-k5.json").write_text(
        json.dumps({"method": "iwae", "k": 5, "split": "test", "points": 20,
                    "seed": 0, "batch_size": 100, "limit": 20})
    )  # fmt: skip
    assert result_path(tmp_path, twenty).name == "eval-test-k5.json"
    assert result_path(tmp_path, twenty, points=20).name == "eval-test-k5.json"
    every = EvalSettings(num_samples=5, limit=0)
    assert result_path(tmp_path, every).name == "eval-test-k5-nall-seed0-batch100.json"
    seeded = EvalSettings(num_samples=5, limit=20, seed=2)
    assert result_path(tmp_path, seeded).name.endswith("-n20-seed2-batch100.json")
    # A file of pyro-iwae 0.1 (no limit, no batch size) is known by its points.
    (tmp_path / "eval-test-k5.json").write_text(
        json.dumps({"k": 5, "split": "test", "points": 20, "seed": 0})
    )
    assert result_path(tmp_path, twenty).name == "eval-test-k5.json"
    assert result_path(tmp_path, EvalSettings(num_samples=5, limit=10)).name == (
        "eval-test-k5-n10-seed0-batch100.json"
    )


def test_a_vectorized_evaluation_beside_a_sequential_one_says_its_mode(tmp_path):
    # The sequential evaluation took the plain name; the vectorized one got a name
    # spelling settings equal to its own, the mode that told them apart left out.
    from pyro_iwae.runs.eval_results import EvalSettings, result_path

    (tmp_path / "eval-test-k5.json").write_text(
        json.dumps({"method": "iwae", "k": 5, "split": "test", "points": 10,
                    "seed": 0, "batch_size": 100, "limit": 10,
                    "sequential_particles": True})
    )  # fmt: skip
    vectorized = EvalSettings(num_samples=5, limit=10)
    assert result_path(tmp_path, vectorized).name == (
        "eval-test-k5-n10-seed0-batch100-vectorized.json"
    )
    sequential = EvalSettings(num_samples=5, limit=10, sequential_particles=True)
    assert result_path(tmp_path, sequential).name == "eval-test-k5.json"


def test_sample_says_when_the_test_points_are_fewer_than_asked(tmp_path):
    _, run_dir = _fit_on_a_data_file(tmp_path)  # 12 test points of 4 x 4
    result = invoke("sample", run_dir, "--n", 20)
    assert_ok(result)
    assert "reconstructions of the 12 test points there are" in result.output


def test_flat_weights_give_a_khat_of_minus_inf_not_too_few_samples():
    # k-hat -inf (all weights of a point equal) was read as no fit: eval-nll said
    # "needs more than 20 samples" at k=100, the JSON had null shares.
    inf = float("inf")
    results = torch.tensor(
        [[-1.0, 100.0, -inf], [-2.0, 100.0, -inf], [-1.5, 90.0, 0.9]],
        dtype=torch.float64,
    )
    diagnostics = eval_results._diagnostics(results, "iwae")
    assert diagnostics == {
        "ess_median": 100.0,
        "khat_median": None,  # -inf, which JSON cannot hold
        "khat_above_0.7": pytest.approx(1 / 3),
        "khat_flat": pytest.approx(2 / 3),
    }
    json.dumps(diagnostics, allow_nan=False)
    line = _khat_line(diagnostics, k=100, points=3)
    assert "needs more than 20" not in line
    assert "k-hat median -inf, above 0.7 on 33% of points, -inf" in line
    assert "on 67%" in line
    # Too few weights still say so.
    results[:, 2] = math.nan
    assert eval_results._diagnostics(results, "iwae")["khat_flat"] is None


def test_the_paper_model_is_trained_and_evaluated_with_its_data_plate_alone(
    tmp_path, monkeypatch
):
    # Runs find their plate nesting now (it was fixed at 1, and a user's nested
    # plates were refused); the paper model's must stay one plate, as before.
    from pyro_iwae.runs import estimates, run_writer

    objectives, nestings = [], []
    fit, estimator = run_writer.fit, estimates.per_point_estimator

    def fit_recorded(model, guide, data, objective, **kwargs):
        objectives.append(objective)
        return fit(model, guide, data, objective, **kwargs)

    def estimator_recorded(model, guide, settings, nesting):
        nestings.append(nesting)
        return estimator(model, guide, settings, nesting)

    monkeypatch.setattr(run_writer, "fit", fit_recorded)
    monkeypatch.setattr(estimates, "per_point_estimator", estimator_recorded)
    run = tmp_path / "run"
    train_run(small_config(), run)
    Run(run).evaluate(EvalSettings(num_samples=5, limit=2))
    Run(run).evaluate(EvalSettings(method="ais", ais_steps=2, num_chains=2, limit=2))
    # The data plate, and the particle plate left of it.
    assert [objective.max_plate_nesting for objective in objectives] == [2]
    assert nestings == [1, 1]
    assert "max_plate_nesting" not in json.loads((run / CONFIG_FILE).read_text())


def test_a_run_being_trained_before_its_first_checkpoint_is_said_to_be(
    trained, tmp_path
):
    # eval-nll and sample said "start a new run (without resume)" of a run
    # that another process was training and had not yet checkpointed.
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / CHECKPOINT_FILE).unlink()
    with locks.hold(run_dir, locks.WRITER):  # as the process training it would
        for command in (["eval-nll", run_dir, "--k", 2], ["sample", run_dir]):
            error = assert_one_line_error(invoke(*command))
            assert "is being trained and has no checkpoint yet" in error
            assert error.endswith("wait for its first epoch to end")
    # Not being trained: the run's own advice.
    error = assert_one_line_error(invoke("eval-nll", run_dir, "--k", 2))
    assert "its run never finished an epoch; start it afresh" in error


def test_an_evaluation_of_a_mid_epoch_checkpoint_says_so(tmp_path, monkeypatch):
    # eval-nll scored a checkpoint written within an epoch (--checkpoint-every)
    # as if it were the run's last epoch's, without a word.
    run_dir = tmp_path / "run"
    calls = []

    def step_then_stop(self, info):
        calls.append(info)
        if len(calls) == 7:  # epoch 2, step 3: after the checkpoint at step 6
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(progress.FitProgress, "on_step", step_then_stop)
        args = [*SMALL[:-1], "3", "--checkpoint-every", 2, "--out", run_dir]
        assert invoke("fit", *args, "--quiet").exit_code == 130
    evaluate = ["eval-nll", run_dir, "--k", 2, "--limit", 5]
    result = invoke(*evaluate)
    assert_ok(result)
    line = "scored the checkpoint at step 6 (2 steps into epoch 2)"
    assert f"{line}, where its fit stopped: fit --resume finishes" in result.output
    (saved,) = run_dir.glob("eval-*.json")
    assert json.loads(saved.read_text())["trained_steps"] == 6
    with locks.hold(run_dir, locks.WRITER):  # as a fit resuming it would
        result = invoke(*evaluate)
    assert_ok(result)
    assert f"{line} of a run still being trained" in result.output
    # The end of an epoch of a run no longer trained: nothing to say.
    assert (
        cli_main._checkpoint_line(SimpleNamespace(trained_steps=4), (1, 0), False)
        is None
    )


def test_infinite_and_unfitted_khats_count_as_above_0_7():
    # k-hat NaN at 43 of 50 points (weights spread beyond float64) read as not
    # above 0.7: "above 0.7 on 14% of points"; +inf (all weight on one
    # particle) printed as a median of -inf.
    inf, nan = math.inf, math.nan
    results = torch.tensor(
        [[-1.0, 1.0, inf], [-2.0, 1.0, inf], [-1.5, 1.0, nan], [-1.0, 3.0, 0.2]],
        dtype=torch.float64,
    )
    diagnostics = eval_results._diagnostics(results, "iwae")
    assert diagnostics == {
        "ess_median": 1.0,
        "khat_median": None,  # +inf, which JSON cannot hold
        "khat_above_0.7": pytest.approx(3 / 4),
        "khat_flat": 0.0,
    }
    json.dumps(diagnostics, allow_nan=False)
    line = _khat_line(diagnostics, k=200, points=4)
    assert "k-hat median inf, above 0.7 on 75% of points (unreliable there" in line
    # Half the points flat, the other middle value finite: the median is -inf.
    results[:2, 2] = -inf
    diagnostics = eval_results._diagnostics(results, "iwae")
    assert diagnostics["khat_median"] is None and diagnostics["khat_flat"] == 0.5
    line = _khat_line(diagnostics, k=200, points=4)
    assert "k-hat median -inf, above 0.7 on 25% of points, -inf" in line
    # NaN at every point is too few weights to fit, still.
    results[:, 2] = nan
    assert eval_results._diagnostics(results, "iwae")["khat_above_0.7"] is None


def test_the_median_ess_and_khat_of_an_even_count_are_the_mean_of_the_middle_two():
    # They were torch.median's lower middle value: ESS 2.0, k-hat 0.3.
    results = torch.tensor(
        [[-1.0, 1.0, 0.1], [-2.0, 4.0, 0.5], [-1.5, 2.0, 0.9], [-1.0, 10.0, 0.3]],
        dtype=torch.float64,
    )
    diagnostics = eval_results._diagnostics(results, "iwae")
    assert diagnostics["ess_median"] == pytest.approx(3.0)
    assert diagnostics["khat_median"] == pytest.approx(0.4)
    # An odd count: the middle value.
    diagnostics = eval_results._diagnostics(results[:3], "iwae")
    assert diagnostics["ess_median"] == 2.0
    assert diagnostics["khat_median"] == pytest.approx(0.5)
    # Middle values -inf and +inf: no median to hold, half the points flat.
    results[:, 2] = torch.tensor([-math.inf, -math.inf, math.inf, math.inf])
    diagnostics = eval_results._diagnostics(results, "iwae")
    assert diagnostics["khat_median"] is None and diagnostics["khat_flat"] == 0.5
    assert "k-hat median -inf" in _khat_line(diagnostics, k=200, points=4)


def _khat_line(diagnostics: dict, k: int, points: int) -> str:
    """The k-hat line of eval-nll's report of an evaluation with ``diagnostics``."""
    result = SimpleNamespace(
        stderr=0.1,
        method="iwae",
        k=k,
        diagnostics=diagnostics,
        nll=1.5,
        split="test",
        points=points,
        bits_per_dim=None,
        active_units={},
        latent_units={},
        compile_time=0.0,
        compiled=False,
        compile_choice="as asked",
        time=1.0,
        file=f"eval-test-k{k}.json",
        estimates_file=f"estimates-test-k{k}.txt",
        diagnostics_file=f"diagnostics-test-k{k}.txt",
    )
    return next(x for x in cli_main._eval_report(result) if "k-hat" in x)


def test_the_evaluations_lock_goes_when_let_go_and_still_orders_its_holders(tmp_path):
    # .evaluations.lock stayed in every evaluated run's folder.
    import threading

    order = []

    def evaluate(name):
        with locks.waiting(tmp_path, "evaluations"):
            order.append(f"{name} in")
            time.sleep(0.05)
            order.append(f"{name} out")

    threads = [threading.Thread(target=evaluate, args=(n,)) for n in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One at a time: each holder's "in" is followed by its own "out".
    assert [step.split()[0] for step in order[::2]] == [
        step.split()[0] for step in order[1::2]
    ]
    assert not (tmp_path / ".evaluations.lock").exists()
    # A lock file found there (not this process's) is left as it was.
    (tmp_path / ".evaluations.lock").touch()
    evaluate("c")
    assert (tmp_path / ".evaluations.lock").exists()


def test_a_torchrun_restart_resumes_only_the_run_its_own_job_started(
    tmp_path, monkeypatch
):
    # A restart resumed any run with a checkpoint at --out: a new fit refused at
    # a finished run (another job's) resumed it on the restart, and exited 0.
    args = [*SMALL[:-1], "2", "--compile", "off", "--quiet"]

    def attempt(job, count, out, *more):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", job)
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(count))
        return invoke("fit", *args, *more, "--out", tmp_path / out)

    with monkeypatch.context() as m:  # the first attempts die in epoch 2
        m.setattr(progress.FitProgress, "on_epoch_start", _stop_at_epoch_2)
        assert attempt("job-a", 0, "a").exit_code == 130
        assert attempt("none", 0, "n").exit_code == 130
    assert_ok(attempt("job-a", 1, "a"))
    assert [m["epoch"] for m in read_metrics(tmp_path / "a")] == [1, 2]
    # Job b, told to start a new run there, is refused on every attempt.
    for count in range(3):
        result = attempt("job-b", count, "a", "--epochs", 3)
        assert_one_line_error(result, "holds a run already; resume it (--resume)")
    assert [m["epoch"] for m in read_metrics(tmp_path / "a")] == [1, 2]
    # torchrun's id of a job without --rdzv-id ("none") is every such job's.
    assert_one_line_error(attempt("none", 1, "n"), "holds a run already")


def test_ctrl_c_under_torchrun_advises_a_resume_with_as_many_processes(
    tmp_path, monkeypatch
):
    # It advised "pyro-iwae fit --resume --out RUN" alone: resumed by one
    # process, a two-rank run went on with other noise.
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's; no process group here
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(progress.FitProgress, "on_epoch_start", _stop_at_epoch_2)
    run_dir = tmp_path / "my run"
    cut = invoke("fit", *SMALL[:-1], 2, "--quiet", "--out", run_dir)
    assert cut.exit_code == 130
    advice = shlex.split(cut.output.split("continue with: ")[1].splitlines()[0])
    assert advice == [
        *"torchrun --standalone --nproc-per-node=2 $(command -v pyro-iwae)".split(),
        *["fit", "--resume", "--out", str(run_dir)],
    ]
    # Four processes, two a machine: torchrun on each machine, as before.
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli_common.continue_with("fit --resume --out r") == (
        "continue with the same 4 processes (torchrun on each machine, as before) "
        "running: pyro-iwae fit --resume --out r"
    )


def test_ctrl_c_advice_resumes_a_cuda_run_on_cuda():
    # The advice left --cuda out, and a resume may change the device: pasted,
    # it went on training a CUDA run on the CPU.
    resume_arguments = cli_main.resume_arguments
    assert resume_arguments(Path("my run"), ["csv", "csv"], "cuda:0") == (
        "fit --resume --out 'my run' --logger csv --cuda"
    )
    assert resume_arguments(Path("r"), [], "cpu") == "fit --resume --out r"


def _stop_at_epoch_2(self, epoch, *args):
    if epoch == 2:
        raise KeyboardInterrupt
