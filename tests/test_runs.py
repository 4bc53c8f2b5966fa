"""Run directories: their files, and the runs that cannot be used."""

import json

import pytest
import torch
from small_run import BATCH, TEST, TRAIN, K, small_config

from pyro_iwae.checkpoints import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    CheckpointError,
    RunError,
    load_checkpoint,
    read_metrics,
)
from pyro_iwae.config import CONFIG_FILE, RunConfig
from pyro_iwae.runs import find_latest_run, load_run, train_run


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
    with pytest.raises(RunError, match="no run found"):
        find_latest_run(tmp_path / "empty")
    (tmp_path / CONFIG_FILE).write_text("{broken")
    with pytest.raises(RunError, match="cannot read"):
        load_run(tmp_path)


def test_existing_run_is_not_overwritten_and_resume_needs_same_config(run_dir):
    with pytest.raises(RunError, match="holds a run already"):
        train_run(small_config(), run_dir)
    with pytest.raises(RunError, match="num_particles=2"):
        train_run(small_config(num_particles=3), run_dir, resume=True)
