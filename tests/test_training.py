"""The fit loop: schedules, run files, resumption, divergence, checkpoints."""

import json
import math
import pickle

import pyro
import pytest
import torch

from pyro_iwae import CIWELBO, MIWELBO, PIWELBO, paper_architecture
from pyro_iwae.data import Dataset, load_dataset
from pyro_iwae.training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    CheckpointError,
    FitCallback,
    RunConfig,
    RunError,
    TrainingDiverged,
    constant_schedule,
    find_latest_run,
    fit,
    load_checkpoint,
    load_run,
    make_objective,
    make_schedule,
    paper_schedule,
    read_metrics,
    train_run,
)

TRAIN, TEST, BATCH, K = 300, 100, 50, 2


@pytest.fixture(scope="module")
def mini():
    return load_dataset("mnist-mini")


@pytest.fixture
def small(mini):
    return Dataset("mnist-mini", mini.train[:TRAIN], mini.test[:TEST])


def small_config(**changes):
    values = dict(
        train_limit=TRAIN,
        test_limit=TEST,
        batch_size=BATCH,
        num_particles=K,
        epochs=1,
    )
    values.update(changes)
    return RunConfig(**values)


def make_pair(small, seed=0, layers=1):
    torch.manual_seed(seed)
    return paper_architecture(layers, data_mean=small.train_mean)


def state(model, guide):
    return {
        **{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        **{f"guide.{k}": v.clone() for k, v in guide.state_dict().items()},
    }


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def untimed(metrics):
    timing = {"time", "images_per_s", "eval_time", "elapsed"}
    return {key: value for key, value in metrics.items() if key not in timing}


class StopAfter(FitCallback):
    """Raises KeyboardInterrupt, as a kill would stop the run, at a given point."""

    def __init__(self, epoch=None, global_step=None):
        self.epoch, self.global_step, self.steps = epoch, global_step, 0

    def on_step(self, info):
        self.steps += 1
        if self.steps == self.global_step:
            raise KeyboardInterrupt

    def on_epoch_end(self, metrics):
        if metrics["epoch"] == self.epoch:
            raise KeyboardInterrupt


# -- schedules and objectives ------------------------------------------------


def test_paper_schedule_values_and_truncation():
    schedule = paper_schedule()
    assert [epochs for epochs, _ in schedule] == [1, 3, 9, 27, 81, 243, 729, 2187]
    assert sum(epochs for epochs, _ in schedule) == 3280
    for i, (_, lr) in enumerate(schedule):
        assert lr == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)
    assert schedule[-1][1] == pytest.approx(1e-4, rel=1e-12)
    assert paper_schedule(3) == schedule[:3]
    assert make_schedule("paper", stages=2) == schedule[:2]
    assert make_schedule("paper") == schedule
    assert make_schedule("constant", epochs=4, lr=3e-4) == [(4, 3e-4)]
    assert constant_schedule(2) == [(2, 1e-3)]
    for bad in (lambda: paper_schedule(0), lambda: paper_schedule(9)):
        with pytest.raises(ValueError, match="stages"):
            bad()
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("cosine")


def test_make_objective():
    iwelbo = make_objective("iwae", 7, "dreg")
    assert (iwelbo.num_particles, iwelbo.estimator) == (7, "dreg")
    # Pyro counts the particle plate in max_plate_nesting: 1 data plate + 1.
    assert iwelbo.vectorize_particles and iwelbo.max_plate_nesting == 2
    vae = make_objective("vae", 3)
    assert isinstance(vae, pyro.infer.Trace_ELBO) and vae.num_particles == 3
    renyi = make_objective("renyi", 4, alpha=0.5)
    assert isinstance(renyi, pyro.infer.RenyiELBO) and renyi.alpha == 0.5
    miwae = make_objective("miwae", 4, "dreg", num_groups=3)
    assert isinstance(miwae, MIWELBO) and miwae.num_particles == 12
    assert (miwae.num_groups, miwae.group_size, miwae.estimator) == (3, 4, "dreg")
    assert isinstance(make_objective("piwae", 4, num_groups=2), PIWELBO)
    ciwae = make_objective("ciwae", 6, beta=0.05)
    assert isinstance(ciwae, CIWELBO) and ciwae.beta == 0.05
    for args in (("nope", 2), ("iwae", 0), ("renyi", 2, "iwae", 1.0)):
        with pytest.raises(ValueError):
            make_objective(*args)


@pytest.mark.parametrize(
    "name, estimator, alpha",
    [
        ("iwae", "iwae", 0.0),
        ("iwae", "stl", 0.0),
        ("iwae", "dreg", 0.0),
        ("vae", "iwae", 0.0),
        ("renyi", "iwae", 0.5),
        ("miwae", "dreg", 0.0),
        ("piwae", "iwae", 0.0),
        ("ciwae", "stl", 0.0),
    ],
)
def test_each_objective_trains(small, name, estimator, alpha):
    model, guide = make_pair(small)
    before = state(model, guide)
    objective = make_objective(name, K, estimator, alpha)
    data = small.train[:100]
    history = fit(model, guide, data, objective, batch_size=BATCH)
    assert len(history) == 1 and history[0]["test_bound"] is None
    assert math.isfinite(history[0]["train_bound"]) and history[0]["steps"] == 2
    after = state(model, guide)
    for key in before:
        assert torch.isfinite(after[key]).all()
    assert any(not torch.equal(before[k], after[k]) for k in before if "guide" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "model" in k)


def test_renyi_alpha_zero_step_equals_iwae_step(small):
    # RenyiELBO(0) is the IWAE bound; its gradient, divided by the batch size,
    # must give the same Adam step as IWELBO's per-point loss.
    results = []
    for name in ("iwae", "renyi"):
        model, guide = make_pair(small)
        fit(
            model, guide, small.train[:BATCH], make_objective(name, K), batch_size=BATCH
        )
        results.append(state(model, guide))
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-6), key


# -- fit and run files -------------------------------------------------------


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


def test_bound_improves_over_epochs(small):
    model, guide = make_pair(small)
    history = fit(
        model,
        guide,
        small,
        make_objective("iwae", K),
        schedule=[(6, 3e-3)],
        batch_size=BATCH,
    )
    test = [m["test_bound"] for m in history]
    train = [m["train_bound"] for m in history]
    assert test[-1] > test[0] + 10, test
    assert train[-1] > train[0] + 10, train


def test_callback_sees_steps_and_epochs(small):
    events = []

    class Record(FitCallback):
        def on_epoch_start(self, epoch, num_epochs, num_steps, lr):
            events.append(("start", epoch, num_epochs, num_steps, lr))

        def on_step(self, info):
            events.append(("step", info.step, info.running_bound, info.images_per_s))

        def on_epoch_end(self, metrics):
            events.append(("end", metrics["train_bound"]))

    model, guide = make_pair(small)
    fit(
        model,
        guide,
        small,
        make_objective("iwae", K),
        schedule=paper_schedule(2),
        batch_size=BATCH,
        callback=Record(),
    )
    starts = [e for e in events if e[0] == "start"]
    assert [s[1:4] for s in starts] == [(e, 4, TRAIN // BATCH) for e in (1, 2, 3, 4)]
    assert starts[1][4] == pytest.approx(1e-3 * 10 ** (-1 / 7))
    steps = [e for e in events if e[0] == "step"]
    assert len(steps) == 4 * TRAIN // BATCH
    ends = [e for e in events if e[0] == "end"]
    # The last step's running bound is the epoch's train bound.
    last_steps = [s for s in steps if s[1] == TRAIN // BATCH]
    for step, end in zip(last_steps, ends, strict=True):
        assert step[2] == pytest.approx(end[1])


@pytest.mark.parametrize(
    "stop, checkpoint_every",
    [(StopAfter(epoch=1), None), (StopAfter(global_step=9), 2)],
    ids=["after-epoch-1", "mid-epoch"],
)
def test_resume_is_bit_for_bit(small, tmp_path, stop, checkpoint_every):
    objective = make_objective("iwae", K)
    kwargs = dict(
        schedule=paper_schedule(2),  # 1 + 3 epochs, with a change of lr
        batch_size=BATCH,
        seed=3,
        checkpoint_every=checkpoint_every,
    )
    model, guide = make_pair(small)
    full = fit(model, guide, small, objective, run_dir=tmp_path / "full", **kwargs)
    expected = state(model, guide)

    model, guide = make_pair(small)
    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            guide,
            small,
            objective,
            run_dir=tmp_path / "cut",
            callback=stop,
            **kwargs,
        )
    # Fresh objects, initialised differently: everything comes from the checkpoint.
    model, guide = make_pair(small, seed=99)
    resumed = fit(
        model, guide, small, objective, run_dir=tmp_path / "cut", resume=True, **kwargs
    )
    assert_same_state(state(model, guide), expected)
    assert [untimed(m) for m in resumed] == [untimed(m) for m in full]
    assert len(read_metrics(tmp_path / "cut")) == 4


def test_resume_of_finished_run_does_nothing(small, tmp_path):
    objective = make_objective("iwae", K)
    model, guide = make_pair(small)
    history = fit(model, guide, small, objective, run_dir=tmp_path, batch_size=BATCH)
    expected = state(model, guide)
    model, guide = make_pair(small, seed=5)
    again = fit(
        model, guide, small, objective, run_dir=tmp_path, resume=True, batch_size=BATCH
    )
    assert again == history
    assert_same_state(state(model, guide), expected)


def test_nan_stops_and_keeps_last_good_checkpoint(small, tmp_path):
    class Poison(FitCallback):
        def on_epoch_end(self, metrics):
            with torch.no_grad():
                next(guide.parameters()).fill_(float("nan"))

    model, guide = make_pair(small)
    with pytest.raises(TrainingDiverged, match="epoch 2.*checkpoint of epoch 1"):
        fit(
            model,
            guide,
            small,
            make_objective("iwae", K),
            schedule=[(3, 1e-3)],
            batch_size=BATCH,
            run_dir=tmp_path,
            callback=Poison(),
        )
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert checkpoint["position"]["epochs_done"] == 1
    for tensor in (*checkpoint["model"].values(), *checkpoint["guide"].values()):
        assert torch.isfinite(tensor).all()
    assert len(read_metrics(tmp_path)) == 1


# -- broken checkpoints and runs ---------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    train_run(small_config(), run)
    return run


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
