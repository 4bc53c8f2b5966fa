"""What the ranks of tests/test_distributed.py run, in processes of their own
started by torch.multiprocessing.spawn (gloo, on the CPU).

Each worker starts the process group itself, as a Python user's torchrun
script would (with a short timeout, so that a test whose peer died fails fast),
then calls the library.
"""

import datetime
import os
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from small_run import BATCH, TEST, TRAIN, K

from pyro_iwae import evaluate_run, paper_architecture
from pyro_iwae.data import Dataset, load_dataset
from pyro_iwae.runs import distributed
from pyro_iwae.runs.callbacks import FitCallback
from pyro_iwae.runs.schedules import make_objective
from pyro_iwae.runs.training import fit

WORLD = 2
#: Steps per epoch of the small data, and when runs are stopped (mid-epoch 2).
STEPS = TRAIN // BATCH
CHECKPOINT_EVERY = 4
STOP_AT = STEPS + 3


def spawn(worker, *args):
    """Runs ``worker(rank, port, *args)`` on WORLD ranks; raises if one fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(worker, port, *args), nprocs=WORLD)


def _rank(rank, worker, port, *args):
    try:
        worker(rank, port, *args)
    finally:
        # Ended as the command line ends it: a CI run once saw a rank of a
        # group left to the interpreter's exit die of SIGABRT ("terminate
        # called without an active exception", what a thread destroyed while
        # still joinable gives).
        distributed.shutdown()


def _init(rank, port):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))


def small_data():
    mini = load_dataset("mnist-mini")
    return Dataset("mnist-mini", mini.train[:TRAIN], mini.test[:TEST])


def small_fit(run_dir, epochs=2, seed=0, watch=None, objective=None, **kwargs):
    """fit of the small data: model and guide initialised from ``seed``;
    ``watch(model, guide)`` makes the callback; ``objective``: IWELBO(K)."""
    data = small_data()
    torch.manual_seed(seed)
    model, guide = paper_architecture(1, data_mean=data.train_mean)
    if watch is not None:
        kwargs["callback"] = watch(model, guide)
    fit(
        model,
        guide,
        data,
        objective or make_objective("iwae", K),
        schedule=[(epochs, 1e-3)],
        batch_size=BATCH,
        seed=seed,
        run_dir=run_dir,
        checkpoint_every=CHECKPOINT_EVERY,
        **kwargs,
    )
    return model, guide


def state(model, guide):
    return {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **{f"guide.{k}": v for k, v in guide.state_dict().items()},
    }


class FirstGradient(FitCallback):
    """Keeps the gradient of the first step (still in .grad after it)."""

    def __init__(self, model, guide):
        self.modules, self.grads = (model, guide), None

    def on_step(self, info):
        if self.grads is None:
            self.grads = {
                f"{i}.{name}": p.grad.clone()
                for i, module in enumerate(self.modules)
                for name, p in module.named_parameters()
            }


class Stop(FitCallback):
    """At global step ``at``: raises KeyboardInterrupt, or kills the process."""

    def __init__(self, at, kill=False):
        self.at, self.kill, self.steps = at, kill, 0

    def on_step(self, info):
        self.steps += 1
        if self.steps == self.at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt


def train_two_runs(rank, port, tmp):
    """One epoch with the first step's gradient kept, eagerly and as a traced
    graph, and an uninterrupted two-epoch run; each rank saves its parameters."""
    _init(rank, port)
    tmp = Path(tmp)
    # compile=None: the traced graph, uncompiled (inductor takes seconds).
    for name, compile in (("one-epoch", False), ("one-epoch-traced", None)):
        watched = []
        model, guide = small_fit(
            tmp / name,
            epochs=1,
            objective=make_objective("iwae", K, compile=compile),
            watch=lambda *modules, w=watched: w.append(FirstGradient(*modules)) or w[0],
        )
        torch.save(
            {"state": state(model, guide), "grads": watched[0].grads},
            tmp / f"{name}-rank{rank}.pt",
        )
    model, guide = small_fit(tmp / "whole")
    torch.save(state(model, guide), tmp / f"whole-rank{rank}.pt")


def killed_mid_epoch(rank, port, tmp):
    """Rank 1 is killed in the middle of epoch 2."""
    _init(rank, port)
    small_fit(Path(tmp) / "killed", callback=Stop(STOP_AT, kill=rank == 1))


def resume_and_evaluate(rank, port, tmp):
    """Resumes the killed run and a run of one process; evaluates a run."""
    _init(rank, port)
    tmp = Path(tmp)
    model, guide = small_fit(tmp / "killed", resume=True)
    torch.save(state(model, guide), tmp / f"resumed-rank{rank}.pt")
    small_fit(tmp / "single", resume=True)
    evaluate_run(tmp / "evaluated", num_samples=20, limit=100, batch_size=30)
