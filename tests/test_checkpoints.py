"""Broken, foreign and malicious checkpoints."""

import json
import math
import pickle

import pytest
import torch
from small_run import BATCH, K, small_config
from test_cli import assert_one_line_error, invoke

from pyro_iwae import paper_architecture
from pyro_iwae.data import load_dataset
from pyro_iwae.runs.checkpoints import CHECKPOINT_FILE, CheckpointError, write_json
from pyro_iwae.runs.run import Run, load_run, train_run
from pyro_iwae.runs.schedules import make_objective
from pyro_iwae.runs.training import fit


def test_truncated_checkpoint(run_dir):
    path = run_dir / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*start a new run"):
        load_run(run_dir)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train_run(small_config(), run_dir, resume=True)


def test_garbage_and_foreign_checkpoints(run_dir):
    path = run_dir / CHECKPOINT_FILE
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_run(run_dir)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a pyro-iwae checkpoint"):
        load_run(run_dir)


class Exploit:
    ran = False

    def __reduce__(self):
        return (setattr, (Exploit, "ran", True))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_never_runs_code(run_dir):
    path = run_dir / CHECKPOINT_FILE
    with open(path, "wb") as f:
        torch.save({"format": "pyro-iwae-checkpoint", "x": Exploit()}, f)
    with pytest.raises(CheckpointError):
        load_run(run_dir)
    assert not Exploit.ran
    with open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        load_run(run_dir)
    assert not Exploit.ran


def test_checkpoint_of_another_architecture(run_dir, tmp_path):
    other = tmp_path / "other"
    train_run(small_config(stochastic_layers=2), other)
    (run_dir / CHECKPOINT_FILE).write_bytes((other / CHECKPOINT_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="another architecture"):
        load_run(run_dir)


def test_a_resume_reads_the_checkpoint_once_and_maps_it_for_the_check(
    run_dir, monkeypatch
):
    # The schedule check read the whole checkpoint, then training read it again.
    loads = []
    real_load = torch.load

    def counted(*args, **kwargs):
        loads.append(kwargs.get("mmap", False))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    config = Run(run_dir).resumed_config({"epochs": 2})
    assert loads == [True]
    train_run(config, run_dir, resume=True)
    assert loads == [True, False]
    assert len(Run(run_dir).metrics()) == 2


def test_write_json_writes_non_finite_numbers_as_null(tmp_path):
    # It wrote NaN and Infinity, which strict JSON readers refuse.
    values = {"nan": math.nan, "list": [math.inf, 1.5], "tuple": (-math.inf,)}
    write_json(tmp_path / "x.json", {"outer": values, "n": 2})

    def strict(constant):
        raise AssertionError(f"{constant} is not JSON")

    text = (tmp_path / "x.json").read_text()
    assert json.loads(text, parse_constant=strict) == {
        "outer": {"nan": None, "list": [None, 1.5], "tuple": [None]},
        "n": 2,
    }


def test_a_missing_checkpoint_is_advised_in_its_callers_terms(run_dir, tmp_path):
    # eval-nll and sample said "start a new run (without resume)", fit's advice,
    # which means nothing to a command that reads a run.
    (run_dir / CHECKPOINT_FILE).unlink()
    for command in (["eval-nll", run_dir, "--k", 2], ["sample", run_dir]):
        error = assert_one_line_error(invoke(*command))
        assert error == (
            f"Error: no checkpoint at {run_dir / CHECKPOINT_FILE}: its run never "
            "finished an epoch; start it afresh and train it for one, or pass the "
            "directory of a run that has"
        )
    with pytest.raises(CheckpointError, match="never finished an epoch; start it"):
        load_run(run_dir)
    # fit's own: resume=True of a folder with no checkpoint.
    data = load_dataset("mnist-mini")
    model, guide = paper_architecture(1, data_mean=data.train_mean)
    with pytest.raises(CheckpointError) as error:
        fit(
            model,
            guide,
            data,
            make_objective("iwae", K),
            batch_size=BATCH,
            run_dir=tmp_path / "new",
            resume=True,
        )
    assert str(error.value) == (
        f"no checkpoint at {tmp_path / 'new' / CHECKPOINT_FILE} to resume: its run "
        "never finished an epoch; start it afresh (without resume=True)"
    )
