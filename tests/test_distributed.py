"""Training and evaluation under torch.distributed: real process groups of two
ranks (gloo, on the CPU), started by torch.multiprocessing (see
distributed_workers.py). Three groups are started in all, for speed; each test
checks what one of them left behind."""

import itertools
import shutil

import pytest
import torch
from distributed_workers import (
    BATCH,
    CHECKPOINT_EVERY,
    STEPS,
    STOP_AT,
    killed_mid_epoch,
    resume_and_evaluate,
    small_data,
    small_fit,
    spawn,
    train_two_runs,
)
from small_run import K, small_config

from pyro_iwae import evaluate_run, paper_architecture, train_run
from pyro_iwae.data import minibatches
from pyro_iwae.runs import distributed
from pyro_iwae.runs.callbacks import FitCallback
from pyro_iwae.runs.checkpoints import CHECKPOINT_FILE, load_checkpoint, read_metrics
from pyro_iwae.runs.schedules import ConfigError, make_objective


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run, for equal rounding
    yield
    torch.set_num_threads(threads)


class StopAtEpochEnd(FitCallback):
    def on_epoch_end(self, metrics):
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def groups(tmp_path_factory, one_thread):
    """The folder the three process groups wrote to, in turn: (1) one epoch and
    an uninterrupted two-epoch run; (2) a two-epoch run whose rank 1 is killed
    in epoch 2; (3) that run resumed, a one-process run resumed, and a run
    evaluated, under two ranks. The one-process runs are made here."""
    tmp = tmp_path_factory.mktemp("distributed")
    spawn(train_two_runs, str(tmp))
    with pytest.raises(Exception, match="signal|exit"):
        spawn(killed_mid_epoch, str(tmp))
    # The checkpoint the kill left, as it was, for the tests below.
    shutil.copytree(tmp / "killed", tmp / "killed-before-resume")
    with pytest.raises(KeyboardInterrupt):
        small_fit(tmp / "single", callback=StopAtEpochEnd())
    train_run(small_config(), tmp / "evaluated")
    spawn(resume_and_evaluate, str(tmp))
    return tmp


def test_after_one_epoch_the_ranks_hold_identical_parameters(groups):
    rank0 = torch.load(groups / "one-epoch-rank0.pt")
    rank1 = torch.load(groups / "one-epoch-rank1.pt")
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
    # Rank 0 alone wrote the run: one metrics line, reduced over the ranks.
    (metrics,) = read_metrics(groups / "one-epoch")
    assert metrics["steps"] == STEPS
    assert -250 < metrics["train_bound"] < -150


def test_first_step_gradient_is_the_single_process_gradient(groups):
    """Each rank drew its particles from noise_seed(2 * seed, rank) on its half
    of the first global batch; one process drawing the same particles on the
    same halves has the same gradient of the loss per point of the batch."""
    data = small_data()
    torch.manual_seed(0)
    model, guide = paper_architecture(1, data_mean=data.train_mean)
    generator = torch.Generator().manual_seed(1)  # fit's data generator, seed 0
    batch = next(minibatches(data.train, BATCH, generator=generator, binarize=True))
    objective = make_objective("iwae", K)
    loss = 0.0
    for rank, half in enumerate(batch.tensor_split(2)):
        torch.manual_seed(distributed.noise_seed(0, rank))
        loss = loss + objective.differentiable_loss(model, guide, half)
    (loss / BATCH).backward()
    expected = {
        f"{i}.{name}": p.grad
        for i, module in enumerate((model, guide))
        for name, p in module.named_parameters()
    }
    # The traced graph too: traced under the first call's poutine.scale of 1,
    # the loss and gradients of a compiled run were batch / ranks (50) times
    # too large.
    # (The graph's rewrites round otherwise: a looser tolerance.)
    runs = {"one-epoch": (1e-5, 1e-6), "one-epoch-traced": (1e-4, 1e-5)}
    for (run, (rtol, atol)), rank in itertools.product(runs.items(), (0, 1)):
        grads = torch.load(groups / f"{run}-rank{rank}.pt")["grads"]
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[name], rtol=rtol, atol=atol)
    (eager,) = read_metrics(groups / "one-epoch")
    (traced,) = read_metrics(groups / "one-epoch-traced")
    assert traced["compiled"] and not eager["compiled"]
    assert traced["train_bound"] == pytest.approx(eager["train_bound"], rel=1e-4)


def test_a_compiled_run_of_two_ranks_counts_its_compile_time(groups):
    # DDP's set-up built the first graph before fit took its baseline: every
    # epoch said compile_time 0.0, and fit --compile on no "s of it compiling".
    (traced,) = read_metrics(groups / "one-epoch-traced")
    assert traced["compiled"] and 0 < traced["compile_time"] <= traced["time"]


def test_a_rank_killed_mid_epoch_leaves_the_last_checkpoint_intact(groups):
    checkpoint = load_checkpoint(groups / "killed-before-resume" / CHECKPOINT_FILE)
    # Written at global step 8 (every 4 steps), before the kill at step 9.
    last = STOP_AT - STOP_AT % CHECKPOINT_EVERY
    assert checkpoint["position"]["global_step"] == last
    assert checkpoint["position"]["epochs_done"] == 1
    assert len(checkpoint["rng"]["ranks"]) == 2
    assert len(read_metrics(groups / "killed-before-resume")) == 1


def test_resume_under_two_ranks_continues_exactly(groups):
    whole = torch.load(groups / "whole-rank0.pt")
    for rank in (0, 1):
        resumed = torch.load(groups / f"resumed-rank{rank}.pt")
        for name, value in whole.items():
            assert torch.equal(value, resumed[name]), name
    assert [m["steps"] for m in read_metrics(groups / "killed")] == [STEPS, 2 * STEPS]
    bounds = ("train_bound", "test_bound")
    killed, whole = read_metrics(groups / "killed"), read_metrics(groups / "whole")
    assert [[m[b] for b in bounds] for m in killed] == [
        [m[b] for b in bounds] for m in whole
    ]


def test_checkpoints_of_one_or_two_ranks_resume_under_the_other(groups, tmp_path):
    # One process's checkpoint, finished by two ranks.
    metrics = read_metrics(groups / "single")
    assert [m["epoch"] for m in metrics] == [1, 2]
    # Two ranks' checkpoint, finished by one process.
    shutil.copytree(groups / "killed-before-resume", tmp_path / "run")
    small_fit(tmp_path / "run", resume=True)
    assert [m["steps"] for m in read_metrics(tmp_path / "run")] == [STEPS, 2 * STEPS]


def test_eval_estimates_of_two_ranks_equal_those_of_one(groups, tmp_path):
    shutil.copytree(groups / "evaluated", tmp_path / "run")
    two = (groups / "evaluated" / "estimates-test-k20.txt").read_text()
    one_result = evaluate_run(
        tmp_path / "run", num_samples=20, limit=100, batch_size=30
    )
    one = (tmp_path / "run" / "estimates-test-k20.txt").read_text()
    assert len(two.split()) == 100
    assert one == two
    assert one_result["ranks"] == 1


def test_single_process_eval_is_seeded_per_batch(run_dir):
    """Batch i's estimates depend on (seed, i) only: evaluating fewer points
    leaves the estimates of the batches kept as they were."""
    full = evaluate_run(run_dir, num_samples=10, limit=60, batch_size=20)
    head = (run_dir / full["estimates_file"]).read_text().split()[:40]
    # Of other points, it is kept apart from the first (see eval_results).
    fewer = evaluate_run(run_dir, num_samples=10, limit=40, batch_size=20)
    assert (run_dir / fewer["estimates_file"]).read_text().split() == head


def test_without_a_process_group_nothing_is_distributed():
    assert distributed.current() is None
    assert distributed.is_main()
    assert distributed.from_main(lambda: 3) == 3
    assert distributed.gather_objects("x") == ["x"]
    value = torch.tensor(2.0)
    assert distributed.mean_over_ranks(value) is value


def test_batch_size_must_split_over_the_ranks():
    with pytest.raises(ConfigError, match="multiple of 3"):
        distributed.check_batch_size(100, 3)
    ranks = distributed.Ranks(0, 4, 0)
    with pytest.raises(ConfigError, match="last mini-batch"):
        distributed.check_batches(302, 100, ranks)
    distributed.check_batches(304, 100, ranks)
