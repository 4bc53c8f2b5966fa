"""The data a run records (data.json): a built-in data set read from another
folder, or from another $PYRO_IWAE_DATA, is refused or named as other data,
never evaluated, sampled or resumed on as the run's own."""

import json

import pytest
import torch
from test_cli import assert_ok, assert_one_line_error, invoke
from test_data import write_idx

from pyro_iwae.runs.checkpoints import read_metrics
from pyro_iwae.runs.data_record import DATA_RECORD

FIT = ["--train-limit", 40, "--test-limit", 10, "--batch-size", 20]
FIT += ["--particles", 2, "--epochs", 1, "--quiet"]
EVAL = ["--k", 3, "--quiet"]


def write_mnist(folder, seed, n_train=40, n_test=10):
    """A fake MNIST folder (MNIST/raw) of random images drawn with ``seed``."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train + n_test, 28, 28), generator=generator)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=generator)
    write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train:])
    return folder


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Two fake MNIST folders of other images, and $PYRO_IWAE_DATA unset."""
    monkeypatch.delenv("PYRO_IWAE_DATA", raising=False)
    return write_mnist(tmp_path / "A", 0), write_mnist(tmp_path / "B", 1)


def test_mnist_of_another_data_dir_is_refused_or_evaluated_as_other_data(
    tmp_path, folders
):
    # eval-nll --data-dir B scored B's images as the run's own and replaced its
    # evaluation of A's, labelled mnist; sample and resume read B silently.
    a, b = folders
    run_dir = tmp_path / "run"
    fit = ["fit", "--dataset", "mnist", *FIT, "--out", run_dir]
    assert_ok(invoke(*fit, "--data-dir", a))
    assert_ok(invoke("eval-nll", run_dir, *EVAL))
    own = (run_dir / "eval-test-k3.json").read_text()
    for command in (
        ["eval-nll", run_dir, *EVAL],
        ["sample", run_dir, "--n", 2],
        ["check-guide", run_dir],
        ["fit", "--resume", "--out", run_dir, "--epochs", 2, "--quiet"],
    ):
        error = assert_one_line_error(
            invoke(*command, "--data-dir", b), f"mnist in {b} holds other points"
        )
        assert f"pass --data-dir {a}, where they were" in error
        if command[0] != "fit":
            # It advised sample too to "evaluate it as other data".
            assert error.endswith("or use them as other data with --dataset mnist")
    assert (run_dir / "eval-test-k3.json").read_text() == own
    assert len(read_metrics(run_dir)) == 1
    # Deliberately: named as other data, beside the run's own evaluation.
    other = ["eval-nll", run_dir, *EVAL, "--dataset", "mnist"]
    assert_ok(invoke(*other, "--data-dir", b))
    saved = json.loads((run_dir / "eval-test-k3-on-mnist.json").read_text())
    assert saved["dataset"] == str(b / "mnist")
    assert saved["nll"] != json.loads(own)["nll"]
    assert (run_dir / "eval-test-k3.json").read_text() == own
    # A's own images, named as such, are the run's: its own evaluation again.
    assert_ok(invoke(*other, "--data-dir", a))
    again = json.loads((run_dir / "eval-test-k3.json").read_text())
    assert again["dataset"] == "mnist" and again["nll"] == json.loads(own)["nll"]
    assert len(list(run_dir.glob("eval-*.json"))) == 2


def test_a_run_keeps_the_data_folder_it_read_from_the_environment(
    tmp_path, folders, monkeypatch
):
    # config.json said "data_dir": null: under another $PYRO_IWAE_DATA, eval-nll
    # scored other images as the run's, without a word.
    a, b = folders
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PYRO_IWAE_DATA", str(a))
    assert_ok(invoke("fit", "--dataset", "mnist", *FIT, "--out", run_dir))
    assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(a)
    record = json.loads((run_dir / DATA_RECORD).read_text())
    assert record["dataset"] == "mnist" and record["data_dir"] == str(a)
    assert_ok(invoke("eval-nll", run_dir, *EVAL))
    own = json.loads((run_dir / "eval-test-k3.json").read_text())
    monkeypatch.setenv("PYRO_IWAE_DATA", str(b))
    assert_ok(invoke("eval-nll", run_dir, *EVAL))
    again = json.loads((run_dir / "eval-test-k3.json").read_text())
    assert again["dataset"] == "mnist" and again["nll"] == own["nll"]


def test_images_changed_in_the_run_s_own_folder_are_refused(tmp_path, folders):
    # Other images in the same folder were evaluated as the run's.
    a, _ = folders
    run_dir = tmp_path / "run"
    assert_ok(
        invoke("fit", "--dataset", "mnist", *FIT, "--data-dir", a, "--out", run_dir)
    )
    write_mnist(tmp_path / "C", 2)
    raw = a / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    raw.write_bytes((tmp_path / "C" / "MNIST" / "raw" / raw.name).read_bytes())
    assert_one_line_error(
        invoke("eval-nll", run_dir, *EVAL),
        "holds other points than the run was trained on",
        "put its files back as they were",
    )


def test_a_run_recorded_before_built_in_data_were_still_evaluates(tmp_path, folders):
    # Runs written before built-in data sets were recorded have no data.json
    # and a data_dir of null: they load and evaluate as before.
    a, _ = folders
    run_dir = tmp_path / "run"
    assert_ok(
        invoke("fit", "--dataset", "mnist", *FIT, "--data-dir", a, "--out", run_dir)
    )
    (run_dir / DATA_RECORD).unlink()
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "data_dir": None}))
    assert_ok(invoke("eval-nll", run_dir, *EVAL, "--data-dir", a))
    assert_ok(invoke("eval-nll", run_dir, *EVAL, "--data-dir", a, "--dataset", "mnist"))
    assert not list(run_dir.glob("eval-*-on-*.json"))
    # Resumed, it records them now.
    assert_ok(
        invoke(
            "fit",
            "--resume",
            "--out",
            run_dir,
            "--data-dir",
            a,
            "--epochs",
            2,
            "--quiet",
        )
    )
    assert json.loads((run_dir / DATA_RECORD).read_text())["dataset"] == "mnist"


def test_a_run_whose_data_folder_is_gone_is_refused_naming_it(tmp_path, folders):
    # eval-nll tried to download MNIST into the recorded folder, long gone.
    a, _ = folders
    run_dir = tmp_path / "run"
    assert_ok(
        invoke("fit", "--dataset", "mnist", *FIT, "--data-dir", a, "--out", run_dir)
    )
    moved = a.rename(tmp_path / "moved")
    for command in (["eval-nll", run_dir, *EVAL], ["sample", run_dir, "--n", 2]):
        assert_one_line_error(
            invoke(*command),
            f"mnist: {a}, the folder the run's fit read it from (see its "
            "config.json), is gone; pass --data-dir FOLDER, where the data are now",
        )
    assert not a.exists()
    assert_ok(invoke("eval-nll", run_dir, *EVAL, "--data-dir", moved))
