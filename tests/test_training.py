"""The fit loop: training, callbacks, resumption, divergence."""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from small_run import BATCH, TEST, TRAIN, K

from pyro_iwae import IWELBO, log_likelihood, paper_architecture
from pyro_iwae.data import Dataset, load_dataset
from pyro_iwae.runs.callbacks import FitCallback
from pyro_iwae.runs.checkpoints import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    read_metrics,
)
from pyro_iwae.runs.schedules import make_objective, paper_schedule
from pyro_iwae.runs.training import TrainingDiverged, fit


@pytest.fixture(scope="module")
def mini():
    return load_dataset("mnist-mini")


@pytest.fixture
def small(mini):
    return Dataset("mnist-mini", mini.train[:TRAIN], mini.test[:TEST])


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
    timing = {"time", "images_per_s", "eval_time", "compile_time", "elapsed"}
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
    history = fit(model, guide, data, objective, batch_size=BATCH, binarize=True)
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
            model,
            guide,
            small.train[:BATCH],
            make_objective(name, K),
            batch_size=BATCH,
            binarize=True,
        )
        results.append(state(model, guide))
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-6), key


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


def test_only_the_first_step_validates(small):
    """Pyro's and torch's argument checks read values back (a host-device sync
    each on CUDA): fit runs them on its first step only."""
    model, guide = make_pair(small)
    seen = []

    def record(module, args):
        if not module.training:
            return  # the check, before training, that the test bound can be had
        validate_args = torch.distributions.Distribution._validate_args
        seen.append((pyro.infer.util.is_validation_enabled(), validate_args))

    guide.register_forward_pre_hook(record)
    with pyro.validation_enabled(True):
        objective = make_objective("iwae", K)
        fit(model, guide, small, objective, schedule=[(1, 1e-3)], batch_size=BATCH)
        assert torch.distributions.Distribution._validate_args  # restored
    steps = TRAIN // BATCH
    assert seen[0] == (True, True)
    assert seen[1:steps] == [(False, False)] * (steps - 1)


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


@pytest.mark.parametrize("compile", [False, None], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "stop, checkpoint_every",
    # Made afresh for each case: a StopAfter counts the steps it has seen.
    [(lambda: StopAfter(epoch=1), None), (lambda: StopAfter(global_step=9), 2)],
    ids=["after-epoch-1", "mid-epoch"],
)
def test_resume_is_bit_for_bit(small, tmp_path, stop, checkpoint_every, compile):
    # compile=None: the traced step graph with Adam's update in it, uncompiled.
    objective = make_objective("iwae", K, compile=compile)
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
            callback=stop(),
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


def test_the_test_points_change_no_trained_parameter(small):
    # The test bound drew its particles from training's random stream: the
    # parameters after epoch 1 depended on the number of test points.
    trained = []
    for test_size in (TEST, 3, 0):
        model, guide = make_pair(small)
        options = dict(schedule=[(2, 1e-3)], batch_size=BATCH, test_size=test_size)
        history = fit(model, guide, small, make_objective("iwae", K), seed=3, **options)
        trained.append((state(model, guide), [m["train_bound"] for m in history]))
    for other, bounds in trained[1:]:
        assert_same_state(other, trained[0][0])
        assert bounds == trained[0][1]


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


def test_a_resume_of_another_objective_seed_or_data_is_refused(small, tmp_path):
    # fit(resume=True) checked the schedule and batch size only: another k and
    # estimator, seed or data went on silently, the history mixing k=2 and k=5.
    objective = make_objective("iwae", K)
    model, guide = make_pair(small)
    fit(model, guide, small, objective, run_dir=tmp_path, batch_size=BATCH)
    more = dict(schedule=[(2, 1e-3)], batch_size=BATCH, run_dir=tmp_path, resume=True)
    shorter = Dataset("mnist-mini", small.train[:250], small.test)
    other = Dataset("mnist-mini", small.train.flip(0) * 0.5, small.test)
    iwae, dreg = f"IWELBO(num_particles={K}, estimator='iwae')", "IWELBO(num_par"
    for changed, named in [
        (
            dict(objective=make_objective("iwae", 5, "dreg")),
            f"objective {iwae} (not {dreg}",
        ),
        (dict(seed=1), "with seed 0 (not 1); resume with the run's own objective"),
        (dict(data=shorter), "data of shape [300, 784] (not [250, 784])"),
        (dict(data=other), "with other training data of that shape"),
    ]:
        arguments = dict(data=small, objective=objective, **more) | changed
        with pytest.raises(CheckpointError, match=re.escape(named)):
            fit(model, guide, **arguments)
    assert len(read_metrics(tmp_path)) == 1
    history = fit(model, guide, small, make_objective("iwae", K), **more)
    assert [m["k"] for m in history] == [K, K]


def test_a_schedule_of_a_fraction_of_an_epoch_is_refused(small):
    # int() cut 1.5 epochs to 1, and fit trained one epoch.
    model, guide = make_pair(small)
    with pytest.raises(ValueError, match="whole epochs, got 1.5; give each stage"):
        fit(model, guide, small, make_objective("iwae", K), schedule=[(1.5, 1e-2)])


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


class _NestedPlates(torch.nn.Module):
    """Data plate at dim -2, a plate over the 4 values of a point at dim -1."""

    def __init__(self, guide=False):
        super().__init__()
        self.guide = guide
        self.net = torch.nn.Linear(4, 4) if guide else torch.nn.Linear(2, 4)

    def forward(self, x):
        with pyro.plate("data", x.shape[-2], dim=-2):
            if self.guide:
                loc, log_scale = self.net(x).unsqueeze(-2).chunk(2, -1)
                pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
                return
            z = pyro.sample("z", dist.Normal(x.new_zeros(1, 2), 1.0).to_event(1))
            with pyro.plate("values", x.shape[-1], dim=-1):
                pyro.sample("x", dist.Normal(self.net(z).squeeze(-2), 1.0), obs=x)


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_test_bound_takes_the_objectives_plate_nesting(vectorize):
    # Computed with the evaluators' default max_plate_nesting=1: a
    # ParticleBroadcastError advising max_plate_nesting=2, the value given.
    pyro.set_rng_seed(0)
    x = torch.randn(40, 4)
    model, guide = _NestedPlates(), _NestedPlates(guide=True)
    objective = IWELBO(3, max_plate_nesting=2, vectorize_particles=vectorize)
    history = fit(model, guide, x[:30], objective, test_data=x[30:], batch_size=10)
    # The test bound is one draw of the mean k = 3 bound of the test points.
    draws = torch.stack(
        [
            log_likelihood(
                model, guide, x[30:], num_samples=3, max_plate_nesting=2
            ).mean()
            for _ in range(200)
        ]
    )
    gap = abs(history[0]["test_bound"] - draws.mean().item())
    assert gap < 5 * draws.std().item(), (gap, draws.std())
