"""Trackers: what a 2-epoch fit and an evaluation logged, read back with
TensorBoard's own reader, MLflow's client and the csv module."""

import contextlib
import csv
import json
import math
import shutil
import sys

import pytest
import torch
from click.testing import CliRunner
from small_run import small_config

from pyro_iwae import FitCallback, RunError, evaluate_run, train_run
from pyro_iwae.runs import locks
from pyro_iwae.runs.callbacks import CallbackList
from pyro_iwae.runs.mlflow_store import params_to_log
from pyro_iwae.runs.tracking import (
    MLFLOW_RUN_FILE,
    CSVTracker,
    MLflowTracker,
    TensorBoardTracker,
    TrackingError,
    log_evaluation,
    make_trackers,
)
from pyro_iwae_cli.main import cli

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
)
mlflow_tracking = pytest.importorskip("mlflow.tracking")

SCALARS = (
    "train/bound",
    "test/bound",
    "train/lr",
    "train/points_per_s",
    "train/epoch_seconds",
    "train/grad_norm",
)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 2-epoch run logged to all three trackers (images every epoch), then
    evaluated and the evaluation logged; its history and evaluation."""
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    trackers = make_trackers(["tensorboard", "mlflow", "csv"], run_dir, images_every=1)
    history = train_run(
        small_config(epochs=2), run_dir, callback=CallbackList(trackers)
    )
    result = evaluate_run(run_dir, num_samples=30, limit=20)
    log_evaluation(["tensorboard", "mlflow", "csv"], run_dir, result)
    return run_dir, history, result


def test_tensorboard_events_read_back(tracked):
    run_dir, history, result = tracked
    acc = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert set(SCALARS) <= set(tags["scalars"])
    for tag, key in (("train/bound", "train_bound"), ("test/bound", "test_bound")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx(
            [m[key] for m in history], rel=1e-6
        )
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))
    for name in ("samples", "reconstructions"):
        images = acc.Images(name)
        assert [i.step for i in images] == [1, 2]
        assert images[0].width > 28 and images[0].height > 28
    (nll,) = acc.Scalars("eval_test-k30/nll")
    assert nll.step == 2 and nll.value == pytest.approx(result["nll"], rel=1e-6)
    assert "eval_test-k30/khat_median" in tags["scalars"]
    assert "config/text_summary" in tags["tensors"]


def test_mlflow_store_read_back(tracked):
    run_dir, history, result = tracked
    remembered = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())
    assert remembered["tracking_uri"] == "run directory"
    client = _local_client(run_dir)
    run = client.get_run(remembered["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["num_particles"] == "2"
    assert run.data.params["batch_size"] == "50"
    bounds = client.get_metric_history(run.info.run_id, "train/bound")
    bounds = sorted((m.step, m.value) for m in bounds)
    assert [step for step, _ in bounds] == [1, 2]
    assert [v for _, v in bounds] == pytest.approx([m["train_bound"] for m in history])
    for name in SCALARS:
        assert len(client.get_metric_history(run.info.run_id, name)) == 2
    assert run.data.metrics["eval_test-k30/nll"] == pytest.approx(result["nll"])
    assert run.data.metrics["eval_test-k30/ess_median"] == pytest.approx(
        result["diagnostics"]["ess_median"]
    )
    samples = client.list_artifacts(run.info.run_id, "samples")
    assert [a.path for a in samples] == [
        "samples/epoch-0001.png",
        "samples/epoch-0002.png",
    ]


def _local_client(run_dir):
    return mlflow_tracking.MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")


def test_a_copied_run_logs_into_its_own_mlflow_store(tracked, tmp_path):
    # mlflow-run.json named the original's database by its absolute path: the
    # copy's resumed epochs went there (or into a new database at that path).
    original, _, _ = tracked
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    trackers = make_trackers(["mlflow"], copy)
    train_run(small_config(epochs=3), copy, resume=True, callback=trackers[0])
    run_id = json.loads((copy / MLFLOW_RUN_FILE).read_text())["run_id"]
    steps = [
        m.step for m in _local_client(copy).get_metric_history(run_id, "train/bound")
    ]
    assert sorted(steps) == [1, 2, 3]
    kept = _local_client(original).get_metric_history(run_id, "train/bound")
    assert sorted(m.step for m in kept) == [1, 2]


def test_an_mlflow_run_missing_from_its_store_is_one_line(tracked, tmp_path):
    """Said when the tracker opens the run, as it first logs; the store it made
    for it goes."""
    copy = tmp_path / "copy"
    shutil.copytree(tracked[0], copy)
    (copy / "mlflow.db").unlink()
    (tracker,) = make_trackers(["mlflow"], copy)
    with pytest.raises(TrackingError, match=r"cannot find run \w+, which .*delete"):
        tracker.log_params({"lr": 0.001})
    assert not (copy / "mlflow.db").exists()


def test_csv_read_back(tracked):
    run_dir, history, result = tracked
    with (run_dir / "tracking.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row, metrics in zip(rows, history, strict=True):
        assert float(row["train/bound"]) == pytest.approx(metrics["train_bound"])
        assert float(row["train/lr"]) == metrics["lr"]
        assert math.isfinite(float(row["train/grad_norm"]))
    with (run_dir / "tracking-evaluation.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["eval_test-k30/nll"]) == pytest.approx(result["nll"])
    config = json.loads((run_dir / "tracking-config.json").read_text())
    assert config["num_particles"] == 2
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "reconstructions-epoch-0001.png",
        "reconstructions-epoch-0002.png",
        "samples-epoch-0001.png",
        "samples-epoch-0002.png",
    ]


def test_a_tracked_run_is_the_run_untracked(tracked, tmp_path):
    # The pictures after epoch 1 drew from training's random stream: epoch 2
    # of a run with trackers was another than without (and a resume another
    # than an unbroken run).
    _, history, _ = tracked
    untracked = train_run(small_config(epochs=2), tmp_path / "run")
    for key in ("train_bound", "test_bound"):
        assert [m[key] for m in history] == [m[key] for m in untracked]


def test_grad_norm_is_the_norm_of_the_step_gradient(tmp_path):
    class Check(FitCallback):
        checked = 0

        def on_step(self, info):
            grads = [p.grad.flatten() for p in info.parameters if p.grad is not None]
            expected = torch.cat(grads).double().norm()
            assert float(info.grad_norm()) == pytest.approx(float(expected), rel=1e-5)
            Check.checked += 1

    train_run(small_config(), tmp_path / "run", callback=Check())
    assert Check.checked == 6  # 300 points in batches of 50


def test_missing_library_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(TrackingError, match=r"pip install 'pyro-iwae\[tensorboard\]'"):
        make_trackers(["tensorboard"], tmp_path)
    with pytest.raises(TrackingError, match="unknown logger 'wandb'"):
        make_trackers(["wandb"], tmp_path)
    result = CliRunner().invoke(
        cli,
        ["fit", "--epochs", "1", "--train-limit", "100", "--test-limit", "10"]
        + ["--out", str(tmp_path / "run"), "--logger", "tensorboard", "--quiet"],
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the tensorboard logger needs the tensorboard package: "
        "pip install 'pyro-iwae[tensorboard]'"
    ]


def test_an_mlflow_server_out_of_reach_is_one_line(tmp_path, monkeypatch):
    """A refused tracking URI: one line naming it, before training, and no
    run folder made for the logger."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = CliRunner().invoke(
        cli,
        ["fit", "--epochs", "1", "--train-limit", "100", "--test-limit", "10"]
        + ["--out", str(tmp_path / "run"), "--logger", "mlflow", "--quiet"],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: the mlflow logger cannot use http://127.0.0.1:9")
    assert line.endswith("unset MLFLOW_TRACKING_URI to log into the run directory")
    assert not (tmp_path / "run").exists()


def test_a_logger_that_fails_at_start_leaves_no_run_folder(tmp_path, monkeypatch):
    """Without --out too: the folder made under --runs-dir goes with the error."""
    from pyro_iwae.runs.tracking import TrackingError
    from pyro_iwae_cli import main

    def failing(loggers, path):
        raise TrackingError("the csv logger cannot start; fix it")

    monkeypatch.setattr(main, "make_trackers", failing)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(
        cli,
        ["fit", "--epochs", "1", "--train-limit", "100", "--test-limit", "10"]
        + ["--runs-dir", str(runs), "--logger", "csv", "--quiet"],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "the csv logger cannot start" in result.output
    assert not runs.exists() or not any(runs.iterdir())


def test_cli_logs_fit_and_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    fit = ["fit", "--epochs", "2", "--train-limit", "100", "--test-limit", "20"]
    result = CliRunner().invoke(
        cli, [*fit, "--out", str(run_dir), "--logger", "csv", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        cli, ["eval-nll", str(run_dir), "--k", "10", "--limit", "10", "--logger", "csv"]
    )
    assert result.exit_code == 0, result.output
    with (run_dir / "tracking.csv").open() as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]
    with (run_dir / "tracking-evaluation.csv").open() as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2"]


def test_a_resume_says_which_trackers_it_leaves_out(tmp_path, monkeypatch):
    # Resumed as the Ctrl-C hint said, a tracked run went on untracked, silently.
    from pyro_iwae_cli import progress

    run_dir = tmp_path / "run"
    fit = ["fit", "--train-limit", "100", "--test-limit", "20", "--out", str(run_dir)]

    def stop_at_epoch_2(self, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.FitProgress, "on_epoch_start", stop_at_epoch_2)
    result = CliRunner().invoke(cli, [*fit, "--epochs", "2", "--logger", "csv"])
    assert result.exit_code == 130
    hint = f"continue with: pyro-iwae fit --resume --out {run_dir} --logger csv"
    assert hint in result.output
    monkeypatch.undo()
    result = CliRunner().invoke(cli, ["fit", "--resume", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    note = "an earlier fit of this run logged to csv; add --logger csv to go on"
    assert note in result.output
    result = CliRunner().invoke(
        cli,
        ["fit", "--resume", "--out", str(run_dir), "--epochs", "3", "--logger", "csv"],
    )
    assert result.exit_code == 0 and "an earlier fit" not in result.output


@pytest.mark.parametrize("logger, file", [("csv", "tracking.csv"), ("tensorboard", "")])
def test_a_tracker_that_cannot_write_stops_fit_before_it_trains(
    tmp_path, monkeypatch, logger, file
):
    # A tracking.csv that could not be added to failed after epoch 3 had been
    # trained and saved: the resumed run's log then lacked epoch 3 for good.
    import tempfile

    run_dir = tmp_path / "run"
    fit = ["fit", "--train-limit", "100", "--test-limit", "20", "--out", str(run_dir)]
    result = CliRunner().invoke(cli, [*fit, "--epochs", "1", "--logger", logger])
    assert result.exit_code == 0, result.output
    before = (run_dir / "metrics.jsonl").read_text()
    refused = PermissionError(1, "Operation not permitted")
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if "a" in mode and str(path).endswith(file):
            raise refused
        return real_open(path, mode, *args, **kwargs)

    def no_new_files(*args, **kwargs):
        raise refused

    monkeypatch.setattr("builtins.open", read_only)
    if not file:  # TensorBoard writes a new events file in its folder
        monkeypatch.setattr(tempfile, "TemporaryFile", no_new_files)
    resume = ["fit", "--resume", "--out", str(run_dir), "--epochs", "2"]
    result = CliRunner().invoke(cli, [*resume, "--logger", logger])
    monkeypatch.undo()
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: the {logger} logger cannot write in ")
    assert line.endswith(
        f"(Operation not permitted); make it writable, or leave out --logger {logger}"
    )
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_an_interrupted_fit_leaves_its_mlflow_run_killed_not_running(
    tmp_path, monkeypatch
):
    from pyro_iwae_cli import progress

    def stop_at_epoch_2(self, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.FitProgress, "on_epoch_start", stop_at_epoch_2)
    run_dir = tmp_path / "run"
    fit = ["fit", "--train-limit", "100", "--test-limit", "20", "--out", str(run_dir)]
    result = CliRunner().invoke(cli, [*fit, "--epochs", "2", "--logger", "mlflow"])
    assert result.exit_code == 130
    run_id = json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    assert _local_client(run_dir).get_run(run_id).info.status == "KILLED"


class _StopAtStep(FitCallback):
    """Ctrl-C at step ``at`` of the fit."""

    def __init__(self, at):
        self.at, self.steps = at, 0

    def on_step(self, info):
        self.steps += 1
        if self.steps == self.at:
            raise KeyboardInterrupt


def _all_trackers(run_dir):
    return [
        TensorBoardTracker(run_dir / "tensorboard"),
        MLflowTracker(run_dir),
        CSVTracker(run_dir),
    ]


def test_a_run_interrupted_before_its_first_checkpoint_leaves_no_tracker_files(
    tmp_path,
):
    # Its mlflow-run.json, mlflow.db, tensorboard/ and tracking-config.json
    # stayed, and the next fresh run logged into the same MLflow run: its
    # parameters the discarded run's (lr 0.001), its own as resume.1.*.
    run_dir = tmp_path / "runs" / "run"
    config = small_config(compile="off", lr=1e-3)
    trackers = CallbackList([*_all_trackers(run_dir), _StopAtStep(3)])
    with pytest.raises(KeyboardInterrupt):
        train_run(config, run_dir, callback=trackers)
    assert not (tmp_path / "runs").exists()  # made by the trackers, for the run
    config = small_config(compile="off", lr=3e-3)
    train_run(config, run_dir, callback=CallbackList([MLflowTracker(run_dir)]))
    client = _local_client(run_dir)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert (
        run.info.run_id == json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"]
    )
    assert run.data.params["lr"] == "0.003"
    assert not [name for name in run.data.params if name.startswith("resume.")]


def test_an_interrupted_run_removes_only_the_tracker_files_it_made(tmp_path):
    # (As above: they all stayed.) A user's files in the folder are not its own.
    run_dir = tmp_path / "mine"
    (run_dir / "tensorboard").mkdir(parents=True)
    theirs = {"notes.txt": b"a user's", "tensorboard/events.out.tfevents.1.x": b"old"}
    for name, data in theirs.items():
        (run_dir / name).write_bytes(data)
    # Not MLflow: its store takes seconds to make (the test above has it).
    trackers = [TensorBoardTracker(run_dir / "tensorboard"), CSVTracker(run_dir)]
    trackers = CallbackList([*trackers, _StopAtStep(3)])
    with pytest.raises(KeyboardInterrupt):
        train_run(small_config(compile="off"), run_dir, callback=trackers)
    left = {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file()
    }
    assert left == theirs


def test_an_interrupted_run_deletes_the_mlflow_run_it_made_in_another_store(
    tmp_path,
):
    # (As above: its MLflow run stayed, RUNNING then KILLED, remembered by the
    # run folder's mlflow-run.json for the next fresh run to take over.)
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    run_dir = tmp_path / "run"
    trackers = CallbackList([MLflowTracker(run_dir, store), _StopAtStep(1)])
    with pytest.raises(KeyboardInterrupt):
        train_run(small_config(compile="off"), run_dir, callback=trackers)
    assert not run_dir.exists()
    client = mlflow_tracking.MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []  # active runs: none


def test_ctrl_c_before_the_first_checkpoint_leaves_no_tracker_files(
    tmp_path, monkeypatch
):
    # "nothing was kept", said the CLI, and left mlflow-run.json, mlflow.db and
    # tensorboard/, which the next fit took over.
    from pyro_iwae_cli import progress

    monkeypatch.setattr(progress.FitProgress, "on_step", _interrupt)
    run_dir = tmp_path / "run"
    fit = ["fit", "--train-limit", "100", "--test-limit", "20", "--compile", "off"]
    loggers = ["--logger", "mlflow", "--logger", "tensorboard"]
    result = CliRunner().invoke(cli, [*fit, "--out", str(run_dir), *loggers])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "no epoch had finished, so nothing was kept" in result.output
    assert not run_dir.exists()


def test_a_logger_that_cannot_start_removes_those_started_before_it(
    tmp_path, monkeypatch
):
    # The tensorboard folder made before the mlflow logger failed stayed.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        ["fit", "--epochs", "1", "--train-limit", "100", "--out", str(run_dir)]
        + ["--logger", "tensorboard", "--logger", "mlflow", "--quiet"],
    )
    assert result.exit_code == 1 and "the mlflow logger cannot use" in result.output
    assert not run_dir.exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_an_evaluation_logged_nowhere_reads_no_metrics(tmp_path):
    # eval-nll without --logger wrote its result, then failed on a metrics file
    # cut short, without printing it.
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss"')
    log_evaluation([], tmp_path, {"nll": 90.0, "stderr": 1.0, "split": "test"})
    with pytest.raises(RunError, match="metrics.jsonl"):
        log_evaluation(["csv"], tmp_path, {"nll": 90.0, "split": "test"})


def test_a_resume_that_extends_the_run_logs_its_settings_to_every_tracker(
    tracked, tmp_path
):
    # MLflow kept "epochs": "2" after a resume to 3 epochs, without a word,
    # and tracking-config.json wrote JSON's null as the text "None".
    copy = tmp_path / "copy"
    shutil.copytree(tracked[0], copy)
    trackers = make_trackers(["mlflow", "csv"], copy, images_every=0)
    config = small_config(epochs=3)
    train_run(config, copy, resume=True, callback=CallbackList(trackers))
    run_id = json.loads((copy / MLFLOW_RUN_FILE).read_text())["run_id"]
    params = _local_client(copy).get_run(run_id).data.params
    assert params["epochs"] == "2" and params["resume.1.epochs"] == "3"
    assert [k for k in params if k.startswith("resume.")] == ["resume.1.epochs"]
    assert params["data_dir"] == "None"  # as MLflow's log_param writes None
    saved = json.loads((copy / "tracking-config.json").read_text())
    assert saved["epochs"] == 3 and saved["data_dir"] is None


def test_each_resume_that_changes_a_setting_logs_it_under_its_own_number():
    # A second resume's change would have been refused by MLflow under the first's.
    logged = {"epochs": "2", "lr": "0.001", "resume.1.epochs": "3"}
    assert params_to_log(logged, {"epochs": "3", "lr": "0.001"}) == {}
    assert params_to_log(logged, {"epochs": "4", "lr": "0.001", "new": "1"}) == {
        "new": "1",
        "resume.2.epochs": "4",
    }
    assert params_to_log(logged, {"epochs": "2", "lr": "0.001"}) == {
        "resume.2.epochs": "2"
    }


def test_a_repeated_evaluation_is_logged_once(tracked, tmp_path):
    # eval-nll repeated logged a second, identical row (and point) at the same
    # step, where its JSON was replaced.
    copy = tmp_path / "copy"
    shutil.copytree(tracked[0], copy)
    result = tracked[2]
    log_evaluation(["tensorboard", "mlflow", "csv"], copy, result)
    with (copy / "tracking-evaluation.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["eval_test-k30/nll"]) == pytest.approx(result["nll"])
    run_id = json.loads((copy / MLFLOW_RUN_FILE).read_text())["run_id"]
    history = _local_client(copy).get_metric_history(run_id, "eval_test-k30/nll")
    assert [m.step for m in history] == [2]
    acc = event_accumulator.EventAccumulator(str(copy / "tensorboard"))
    assert [e.step for e in acc.Reload().Scalars("eval_test-k30/nll")] == [2]
    # Another result at that step (a checkpoint written within the epoch)
    # replaces the row, as it does the JSON.
    log_evaluation(["csv"], copy, {**result.to_json(), "nll": result["nll"] + 1})
    with (copy / "tracking-evaluation.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["eval_test-k30/nll"]) == pytest.approx(result["nll"] + 1)


@pytest.mark.parametrize("name", ["tracking.csv", "tracking-config.json"])
def test_a_new_run_refuses_a_csv_tracker_file_it_did_not_make(tmp_path, name):
    # A user's tracking.csv in a new run's folder gained the run's rows under a
    # merged header, and their tracking-config.json was written over.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).write_text("step,mine\n1,42\n")
    fit = ["fit", "--epochs", "1", "--train-limit", "100", "--test-limit", "10"]
    result = CliRunner().invoke(
        cli, [*fit, "--out", str(run_dir), "--logger", "csv", "--quiet"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line == (
        f"Error: the csv logger of a new run would write over {run_dir / name}, "
        "which it did not make; move that away, or choose another run directory "
        "(--out)"
    )
    assert [p.name for p in run_dir.iterdir()] == [name]  # nothing written
    assert (run_dir / name).read_text() == "step,mine\n1,42\n"


def test_the_tracker_config_of_a_run_killed_before_its_checkpoint_is_replaced(
    tmp_path,
):
    # A refusal of files the csv tracker did not make must not refuse those a
    # killed run left with its config.json: the run starts afresh, and, itself
    # interrupted before its first checkpoint, takes them away.
    run_dir = tmp_path / "run"
    small_config(compile="off").save(run_dir)
    (run_dir / "tracking-config.json").write_text('{"lr": 0.5}\n')
    trackers = CallbackList([CSVTracker(run_dir), _StopAtStep(2)])
    with pytest.raises(KeyboardInterrupt):
        train_run(small_config(compile="off"), run_dir, callback=trackers)
    assert list(run_dir.iterdir()) == []
    train_run(small_config(compile="off"), run_dir, callback=CSVTracker(run_dir))
    saved = json.loads((run_dir / "tracking-config.json").read_text())
    assert saved["lr"] == small_config().lr


@pytest.mark.parametrize("busy", [False, True])
def test_a_refused_fit_leaves_the_mlflow_run_as_it_was(tracked, tmp_path, busy):
    # A fit refused as the folder held a run (no --resume), or as another
    # process wrote it, had marked the run's MLflow run RUNNING, and left it so.
    copy = tmp_path / "copy"
    shutil.copytree(tracked[0], copy)
    run_id = json.loads((copy / MLFLOW_RUN_FILE).read_text())["run_id"]
    client = _local_client(copy)
    assert client.get_run(run_id).info.status == "FINISHED"
    _refused_fit(copy, "mlflow", busy)
    assert client.get_run(run_id).info.status == "FINISHED"
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(experiments)] == [run_id]


@pytest.mark.parametrize("busy", [False, True])
def test_a_refused_fit_adds_no_tensorboard_event_file(tracked, tmp_path, busy):
    # A refused fit with --logger tensorboard had opened a SummaryWriter, and so
    # left an empty event file in the finished run's tensorboard/ folder.
    pytest.importorskip("tensorboard")
    copy = tmp_path / "copy"
    shutil.copytree(tracked[0], copy)
    events = sorted((copy / "tensorboard").iterdir())
    _refused_fit(copy, "tensorboard", busy)
    assert sorted((copy / "tensorboard").iterdir()) == events


def _refused_fit(run_dir, logger, busy):
    """A fit with ``logger`` refused at the finished run ``run_dir``: without
    --resume, or (``busy``) with it while another process holds the run."""
    fit = ["fit", "--epochs", "3", "--out", str(run_dir), "--logger", logger]
    fit += ["--resume", "--quiet"] if busy else ["--quiet"]
    held = locks.hold(run_dir, locks.WRITER) if busy else contextlib.nullcontext()
    with held:
        result = CliRunner().invoke(cli, fit)
    assert result.exit_code == 1 and "Traceback" not in result.output
    refusal = "being written by another" if busy else "holds a run already"
    assert refusal in result.output
