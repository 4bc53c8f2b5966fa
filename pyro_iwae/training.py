"""Training of models and guides: schedules, the fit loop, checkpoints and runs.

A *run directory* holds everything about one training run:

- ``config.json``: the :class:`RunConfig` that rebuilds model, guide and data;
- ``checkpoint.pt``: parameters, optimizer state, schedule position and random
  states after the last finished epoch (or step), loaded with
  ``torch.load(weights_only=True)``, so a checkpoint never executes code;
- ``metrics.jsonl``: one JSON object per finished epoch (see :func:`fit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import platform
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO

from ._version import __version__
from .data import Dataset, load_dataset, minibatches, one_line
from .evaluation import (
    count_active,
    dataset_log_likelihood,
    latent_activity,
)
from .objectives import CIWELBO, IWELBO, MIWELBO, PIWELBO
from .registry import build_guide, build_model

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "OBJECTIVES",
    "SCHEDULES",
    "CheckpointError",
    "FitCallback",
    "RunConfig",
    "RunError",
    "StepInfo",
    "TrainingDiverged",
    "build_run",
    "constant_schedule",
    "evaluate_run",
    "find_latest_run",
    "fit",
    "load_checkpoint",
    "load_run",
    "make_objective",
    "make_schedule",
    "new_run_dir",
    "paper_schedule",
    "read_metrics",
    "train_run",
]

OBJECTIVES = ("iwae", "vae", "renyi", "miwae", "piwae", "ciwae")
#: Objectives whose guide gradient takes an ``estimator``.
IW_OBJECTIVES = ("iwae", "miwae", "piwae", "ciwae")
SCHEDULES = ("constant", "paper")
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


_CHECKPOINT_FORMAT = "pyro-iwae-checkpoint"
_CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = {"version", "model", "guide", "optimizer", "position", "rng", "fit"}
# Steps between checks that the loss is finite: each check reads a number from
# the device, so checking every step would synchronise a GPU every step.
_CHECK_EVERY = 50

Schedule = list[tuple[int, float]]


class RunError(Exception):
    """A run directory or its files cannot be used; the message says what to do."""


class CheckpointError(RunError):
    """A checkpoint is missing, unreadable or does not fit the model and guide."""


class TrainingDiverged(Exception):
    """The loss or the parameters became NaN or infinite during training."""


# ---------------------------------------------------------------------------
# Objectives and schedules


def make_objective(
    name: str,
    num_particles: int,
    estimator: str = "iwae",
    alpha: float = 0.0,
    num_groups: int = 1,
    beta: float = 0.5,
) -> ELBO:
    """The training objective ``name`` with ``num_particles`` (k) vectorized particles.

    - ``"iwae"``: :class:`~pyro_iwae.IWELBO` with gradient ``estimator``
      (``iwae``, ``stl`` or ``dreg``);
    - ``"vae"``: :class:`pyro.infer.Trace_ELBO`, the ELBO averaged over k
      samples (the paper's "VAE, k");
    - ``"renyi"``: :class:`pyro.infer.RenyiELBO` of order ``alpha`` (not 1);
    - ``"miwae"``, ``"piwae"``: :class:`~pyro_iwae.MIWELBO`,
      :class:`~pyro_iwae.PIWELBO` with ``num_groups`` (M) groups of k particles;
    - ``"ciwae"``: :class:`~pyro_iwae.CIWELBO` with weight ``beta`` on the ELBO.

    All use ``max_plate_nesting=1`` (one data plate).
    """
    if name not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}"
        )
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles}")
    common = {
        "num_particles": num_particles,
        "vectorize_particles": True,
        "max_plate_nesting": 1,
    }
    if name == "iwae":
        return IWELBO(estimator=estimator, **common)
    if name in ("miwae", "piwae"):
        cls = MIWELBO if name == "miwae" else PIWELBO
        return cls(num_groups=num_groups, estimator=estimator, **common)
    if name == "ciwae":
        return CIWELBO(beta=beta, estimator=estimator, **common)
    if name == "vae":
        return Trace_ELBO(**common)
    if alpha == 1:
        raise ValueError("renyi needs alpha != 1; alpha = 1 is the ELBO: use vae")
    return RenyiELBO(alpha=alpha, **common)


def paper_schedule(stages: int = 8, lr: float = 1e-3) -> Schedule:
    """The paper's schedule: stage i = 0..stages-1 runs 3**i epochs at
    ``lr * 10**(-i/7)``; the full schedule (8 stages) is 3,280 epochs."""
    if not 1 <= stages <= 8:
        raise ValueError(f"stages must be in 1..8, got {stages}")
    return [(3**i, lr * 10 ** (-i / 7)) for i in range(stages)]


def constant_schedule(epochs: int, lr: float = 1e-3) -> Schedule:
    """One stage of ``epochs`` epochs at learning rate ``lr``."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return [(epochs, lr)]


def make_schedule(
    name: str, *, epochs: int = 1, stages: int | None = None, lr: float = 1e-3
) -> Schedule:
    """Schedule ``name`` (``"constant"`` or ``"paper"``) as a list of (epochs, lr)."""
    if name == "paper":
        return paper_schedule(8 if stages is None else stages, lr)
    if name == "constant":
        return constant_schedule(epochs, lr)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


# ---------------------------------------------------------------------------
# Callbacks


@dataclasses.dataclass
class StepInfo:
    """Progress after one optimisation step, for :meth:`FitCallback.on_step`.

    ``epoch`` counts from 1 over the whole schedule and ``step`` from 1 within
    the epoch. Reading :attr:`loss` or :attr:`running_bound` copies a number
    from the training device; nothing else does.
    """

    epoch: int
    num_epochs: int
    step: int
    num_steps: int
    images_per_s: float
    loss_tensor: torch.Tensor
    loss_sum: torch.Tensor

    @property
    def loss(self) -> float:
        """This step's loss: the negative bound per data point, in nats."""
        return float(self.loss_tensor)

    @property
    def running_bound(self) -> float:
        """Mean bound per data point over the epoch's steps so far, in nats."""
        return -float(self.loss_sum) / self.step


class FitCallback:
    """Hooks called by :func:`fit`; override any of them (they do nothing)."""

    def on_epoch_start(
        self, epoch: int, num_epochs: int, num_steps: int, lr: float
    ) -> None:
        """Before epoch ``epoch`` (from 1) of ``num_epochs``, of ``num_steps`` steps."""

    def on_step(self, info: StepInfo) -> None:
        """After each optimisation step."""

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        """After each epoch, once its metrics and checkpoint are written."""


# ---------------------------------------------------------------------------
# Checkpoints and metrics files


def _atomic_write(path: Path, write: Any) -> None:
    """Calls ``write(file)`` on a temporary file, then renames it to ``path``.

    The rename is atomic, so ``path`` holds either its old or its new content,
    never a partial file, even if the process is killed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def _write_json(path: Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def load_checkpoint(
    path: str | os.PathLike, map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`fit`, without executing any code.

    :raises CheckpointError: if the file is missing, truncated, corrupt or not a
        pyro-iwae checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; start a new run (without resume) or pass the "
            "directory of a run that finished at least one epoch"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({one_line(e)}); delete it "
            "and start a new run"
        ) from e
    if (
        not isinstance(checkpoint, dict)
        or checkpoint.get("format") != _CHECKPOINT_FORMAT
    ):
        raise CheckpointError(
            f"{path} is not a pyro-iwae checkpoint; delete it and start a new run"
        )
    if checkpoint.get("version") != _CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {checkpoint.get('version')}, this "
            f"pyro-iwae reads version {_CHECKPOINT_VERSION}; use the pyro-iwae "
            "version that wrote it or start a new run"
        )
    missing = sorted(_CHECKPOINT_KEYS - set(checkpoint))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}; delete it and start a "
            "new run"
        )
    return checkpoint


def _load_state(module: torch.nn.Module, state: Any, what: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {path} holds a {what} of another architecture "
            f"({one_line(e)[:200]}); use the run directory that wrote it, or start "
            "a new run"
        ) from e


def read_metrics(
    run_dir: str | os.PathLike, limit: int | None = None
) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run, from its ``metrics.jsonl`` (empty if none).

    :param limit: read only the first ``limit`` epochs, ignoring later lines
        (such as one cut short when the run was killed).
    :raises RunError: if the file or one of the lines read cannot be parsed.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return [json.loads(line) for line in lines[:limit]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(
            f"cannot read {path} ({one_line(e)}); delete the broken lines"
        ) from e


# ---------------------------------------------------------------------------
# The fit loop


@dataclasses.dataclass
class _Position:
    """Where training stands: the next epoch to run, and how far into it."""

    stage: int = 0  # index into the schedule
    stage_epoch: int = 0  # epochs finished in this stage
    epochs_done: int = 0  # epochs finished in all
    step: int = 0  # steps finished in the current epoch
    global_step: int = 0
    elapsed: float = 0.0  # seconds of training and evaluation, over resumes

    def advance_epoch(self, schedule: Schedule) -> None:
        self.stage_epoch += 1
        self.epochs_done += 1
        self.step = 0
        if self.stage_epoch == schedule[self.stage][0]:
            self.stage, self.stage_epoch = self.stage + 1, 0


def _parameters(*modules: Any) -> list[torch.nn.Parameter]:
    """The parameters of the modules among ``modules``, each once."""
    params: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"fit needs the model and guide to be torch.nn.Module s (e.g. "
                f"PyroModule), got {type(module).__name__}; write it as a PyroModule "
                "with PyroParam s in place of pyro.param"
            )
        for p in module.parameters():
            params.setdefault(id(p), p)
    return list(params.values())


def _as_schedule(schedule: Iterable[Sequence[Any]]) -> Schedule:
    stages = [(int(epochs), float(lr)) for epochs, lr in schedule]
    if not stages or any(epochs < 1 for epochs, _ in stages):
        raise ValueError(f"a schedule needs stages of >= 1 epoch, got {stages}")
    return stages


def fit(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    data: Dataset | torch.Tensor,
    objective: ELBO,
    *,
    schedule: Iterable[Sequence[Any]] = ((1, 1e-3),),
    batch_size: int = 100,
    seed: int = 0,
    test_data: torch.Tensor | None = None,
    test_size: int | None = 1000,
    test_batch_size: int = 100,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    checkpoint_every: int | None = None,
    device: torch.device | str | None = None,
    callback: FitCallback | None = None,
) -> list[dict[str, Any]]:
    """Trains ``model`` and ``guide`` (called as ``model(x)``, ``guide(x)``) by Adam.

    One :class:`torch.optim.Adam` (``betas=(0.9, 0.999)``, ``eps=1e-4``) updates
    the parameters of both. The loss of a step is the negative bound per data
    point, ``objective.differentiable_loss(model, guide, x) / batch`` (for
    objectives without ``differentiable_loss``, such as ``RenyiELBO``, the
    gradients of ``loss_and_grads`` divided by the batch size). Mini-batches of
    the training grey levels are shuffled and binarised afresh every epoch.

    :param data: a :class:`~pyro_iwae.data.Dataset` (its ``train`` grey levels
        for training, its binary ``test`` set for the test bound) or a tensor
        ``[N, x_dim]`` of training grey levels in [0, 1].
    :param objective: a Pyro ELBO, e.g. from :func:`make_objective`; its
        ``num_particles`` is the k of the per-epoch test bound.
    :param schedule: stages ``(epochs, lr)``, see :func:`make_schedule`.
    :param seed: seeds torch's random numbers and the generator of the
        mini-batch order and binarisation.
    :param test_data: binary ``[M, x_dim]`` test points (default: ``data.test``
        of a Dataset); the first ``test_size`` (all if None) give the test bound.
    :param run_dir: where ``metrics.jsonl`` and ``checkpoint.pt`` go; None
        keeps nothing on disk.
    :param resume: continue from the checkpoint in ``run_dir``: the result is
        the same, bit for bit on the same device, as a run never interrupted.
    :param config: JSON-able values stored in the checkpoint (e.g. a
        :class:`RunConfig` as a dict).
    :param checkpoint_every: also write a checkpoint every this many steps
        (checkpoints are always written after each epoch).
    :param device: where to train (model, guide and data are moved there);
        default: the device of the model's first parameter.
    :param callback: a :class:`FitCallback` told about every step and epoch.
    :returns: the metrics of every epoch of the run (including those before a
        resume), each a dict: ``epoch`` (from 1), ``stage``, ``stage_epoch``,
        ``lr``, ``k``, ``train_bound`` (mean over the epoch's steps, nats per
        point), ``test_bound`` (nats per point, None without test data),
        ``test_points``, ``time`` (s of training), ``images_per_s``,
        ``eval_time`` (s), ``elapsed`` (s since the run began), ``steps``.
    :raises TrainingDiverged: when the loss or a parameter is NaN or infinite;
        the last checkpoint (all finite) is kept.
    :raises CheckpointError: on ``resume`` without a usable checkpoint, or when
        ``run_dir`` holds a checkpoint and ``resume`` is False.
    """
    schedule = _as_schedule(schedule)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if resume and run_dir is None:
        raise ValueError("resume needs the run_dir of the run to continue")
    params = _parameters(model, guide)
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    guide.to(device)

    if isinstance(data, Dataset):
        train = data.train
        if test_data is None:
            test_data = data.test
    else:
        train = data
    train = train.to(device)
    test = None
    if test_data is not None:
        test = test_data[:test_size] if test_size is not None else test_data
        test = test.to(device) if test.shape[0] else None
    num_particles = getattr(objective, "num_particles", 1)
    num_steps = math.ceil(train.shape[0] / batch_size)
    num_epochs = sum(epochs for epochs, _ in schedule)
    run_dir = None if run_dir is None else Path(run_dir)
    checkpoint_path = None if run_dir is None else run_dir / CHECKPOINT_FILE
    fit_state = {"schedule": [list(s) for s in schedule], "batch_size": batch_size}

    optimizer = torch.optim.Adam(
        params, lr=schedule[0][1], betas=(0.9, 0.999), eps=1e-4, fused=True
    )
    generator = torch.Generator(device=device)
    position = _Position()
    history: list[dict[str, Any]] = []
    resumed_epoch: tuple[torch.Tensor, float] | None = None  # (loss sum, seconds)
    epoch_rng: torch.Tensor | None = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        if checkpoint.get("fit") != fit_state:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} was written with schedule and batch "
                f"size {checkpoint.get('fit')}, not {fit_state}; resume with the "
                "run's own settings or start a new run"
            )
        _load_state(model, checkpoint["model"], "model", checkpoint_path)
        _load_state(guide, checkpoint["guide"], "guide", checkpoint_path)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            position = _Position(**checkpoint["position"])
            epoch_rng = _restore_rng(checkpoint["rng"], device, generator)
            if position.step:
                resumed_epoch = (
                    checkpoint["epoch_loss_sum"],
                    checkpoint["epoch_time"],
                )
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} does not fit this model and guide "
                f"({one_line(e)}); use the run directory that wrote it"
            ) from e
        history = read_metrics(run_dir, limit=position.epochs_done)
        # Drop the lines of an epoch whose checkpoint was never written.
        _write_metrics(run_dir, history)
    else:
        # Distinct seeds, so that particle noise and binarisation noise are not
        # drawn from one and the same stream.
        torch.manual_seed(2 * seed)  # also seeds every CUDA device
        generator.manual_seed(2 * seed + 1)
        if run_dir is not None:
            if checkpoint_path.exists():
                raise CheckpointError(
                    f"{run_dir} holds a checkpoint already; resume it or choose "
                    "another run directory"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_metrics(run_dir, [])

    def save_checkpoint(epoch_start_rng: torch.Tensor, epoch_sums: Any) -> None:
        if checkpoint_path is None:
            return
        _check_finite_parameters(params, position, run_dir)
        state = {
            "format": _CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "model": model.state_dict(),
            "guide": guide.state_dict(),
            "optimizer": optimizer.state_dict(),
            "position": dataclasses.asdict(position),
            "rng": _rng_state(device, epoch_start_rng),
            "fit": fit_state,
            "config": config or {},
        }
        if epoch_sums is not None:
            state["epoch_loss_sum"], state["epoch_time"] = epoch_sums
        _atomic_write(checkpoint_path, lambda f: torch.save(state, f))

    differentiable = hasattr(objective, "differentiable_loss")
    first_step = True
    while position.stage < len(schedule):
        epochs, lr = schedule[position.stage]
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch = position.epochs_done + 1
        if callback is not None:
            callback.on_epoch_start(epoch, num_epochs, num_steps, lr)
        if epoch_rng is None:
            epoch_rng = generator.get_state()
        else:
            generator.set_state(epoch_rng)
        batches = minibatches(train, batch_size, generator=generator, binarize=True)
        if resumed_epoch is not None:
            # Replay the finished steps' draws from the data generator, then
            # restore the torch state saved after them.
            torch_rng = torch.get_rng_state()
            for _ in range(position.step):
                next(batches)
            torch.set_rng_state(torch_rng)
            loss_sum, train_time = resumed_epoch
            resumed_epoch = None
        else:
            loss_sum, train_time = torch.zeros((), device=device), 0.0
        model.train()
        guide.train()
        start = time.perf_counter() - train_time
        for batch in batches:
            validation = (
                contextlib.nullcontext()
                if first_step
                else pyro.validation_enabled(False)
            )
            # The torch optimizer holds the parameters: on the differentiable path
            # modules need not register them with Pyro's global store every step.
            local_params = pyro.settings.context(module_local_params=differentiable)
            with validation, local_params:
                loss = _step(objective, differentiable, model, guide, batch, optimizer)
            first_step = False
            loss_sum = loss_sum + loss
            position.step += 1
            position.global_step += 1
            if position.step % _CHECK_EVERY == 0:
                _check_finite_loss(loss_sum, position, run_dir)
            if callback is not None:
                seconds = time.perf_counter() - start
                callback.on_step(
                    StepInfo(
                        epoch=epoch,
                        num_epochs=num_epochs,
                        step=position.step,
                        num_steps=num_steps,
                        images_per_s=_rate(
                            min(position.step * batch_size, train.shape[0]), seconds
                        ),
                        loss_tensor=loss,
                        loss_sum=loss_sum,
                    )
                )
            if (
                checkpoint_every is not None
                and position.global_step % checkpoint_every == 0
                and position.step < num_steps
            ):
                _check_finite_loss(loss_sum, position, run_dir)
                save_checkpoint(
                    epoch_rng, (loss_sum.detach(), time.perf_counter() - start)
                )
        train_bound = -float(loss_sum) / num_steps
        train_time = time.perf_counter() - start
        _check_finite_loss(loss_sum, position, run_dir)
        _check_finite_parameters(params, position, run_dir)

        eval_start = time.perf_counter()
        test_bound = None
        if test is not None:
            test_bound = float(
                dataset_log_likelihood(
                    model,
                    guide,
                    test,
                    num_samples=num_particles,
                    batch_size=test_batch_size,
                ).mean()
            )
        eval_time = time.perf_counter() - eval_start
        position.elapsed += train_time + eval_time
        metrics = {
            "epoch": epoch,
            "stage": position.stage,
            "stage_epoch": position.stage_epoch + 1,
            "lr": lr,
            "k": num_particles,
            "train_bound": train_bound,
            "test_bound": test_bound,
            "test_points": 0 if test is None else test.shape[0],
            "time": train_time,
            "images_per_s": _rate(train.shape[0], train_time),
            "eval_time": eval_time,
            "elapsed": position.elapsed,
            "steps": position.global_step,
        }
        position.advance_epoch(schedule)
        epoch_rng = None
        history.append(metrics)
        if run_dir is not None:
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        save_checkpoint(generator.get_state(), None)
        if callback is not None:
            callback.on_epoch_end(metrics)
    return history


def _step(
    objective: ELBO,
    differentiable: bool,
    model: torch.nn.Module,
    guide: torch.nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
) -> torch.Tensor:
    """One Adam step on the negative bound per point; returns it, detached."""
    n = batch.shape[0]
    optimizer.zero_grad(set_to_none=True)
    if differentiable:
        loss = objective.differentiable_loss(model, guide, batch) / n
        loss.backward()
        loss = loss.detach()
    else:
        # RenyiELBO: no differentiable_loss; it accumulates the gradient of the
        # summed bound, so scale the gradients to the bound per point.
        value = objective.loss_and_grads(model, guide, batch)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(n)
        loss = torch.as_tensor(value / n, device=batch.device)
    optimizer.step()
    return loss


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def _check_finite_loss(loss_sum: torch.Tensor, position: _Position, run_dir) -> None:
    if not math.isfinite(float(loss_sum)):
        raise TrainingDiverged(_diverged_message("the loss", position, run_dir))


def _check_finite_parameters(params, position: _Position, run_dir) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise TrainingDiverged(_diverged_message("a parameter", position, run_dir))


def _diverged_message(what: str, position: _Position, run_dir: Path | None) -> str:
    kept = (
        f"; the checkpoint of epoch {position.epochs_done} in {run_dir} is kept"
        if run_dir is not None and (run_dir / CHECKPOINT_FILE).exists()
        else ""
    )
    return (
        f"{what} became NaN or infinite in epoch {position.epochs_done + 1} "
        f"(by step {position.step}){kept}; start a new run with a lower learning "
        "rate or another seed (resuming would repeat the same steps)"
    )


def _rng_state(device: torch.device, data_rng: torch.Tensor) -> dict[str, Any]:
    state = {
        "device": str(device),
        "torch": torch.get_rng_state(),
        "cuda": None,
        "data": data_rng,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(
    state: dict[str, Any], device: torch.device, generator: torch.Generator
) -> torch.Tensor | None:
    """Restores the random states; returns the data generator's state to resume.

    A checkpoint from another device type cannot restore its generators (their
    states differ in kind): the run continues with fresh ones, reproducibly.
    """
    torch.set_rng_state(state["torch"].cpu())
    if torch.device(state["device"]).type != device.type:
        generator.manual_seed(int(state["data"].sum()))
        return None
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    return state["data"].cpu()


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in history)
    _atomic_write(run_dir / METRICS_FILE, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------
# Runs: a configuration, a directory, and the functions the CLI calls


@dataclasses.dataclass
class RunConfig:
    """Everything needed to rebuild a run's model, guide, data and training.

    Saved as ``config.json`` in the run directory. ``model`` and ``guide`` are
    registry names (see :func:`pyro_iwae.build_model`); ``epochs`` applies to the
    ``constant`` schedule, ``stages`` (None: all 8) to the ``paper`` schedule,
    whose first stage runs at ``lr``. ``train_limit`` keeps the first training
    points (None: all); ``test_limit`` test points give the per-epoch test bound.
    ``device`` is where the run was trained (``"cpu"``, ``"cuda"``).
    """

    dataset: str = "mnist-mini"
    data_dir: str | None = None
    stochastic_layers: int = 1
    model: str = "paper"
    guide: str = "paper"
    objective: str = "iwae"
    estimator: str = "iwae"
    num_particles: int = 5
    alpha: float = 0.0
    num_groups: int = 1
    beta: float = 0.5
    schedule: str = "constant"
    stages: int | None = None
    epochs: int = 5
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    x_dim: int = 784
    train_limit: int | None = None
    test_limit: int = 1000
    checkpoint_every: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """The config of ``values``; unknown keys raise :class:`RunError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RunError(
                f"unknown run settings {', '.join(unknown)}; the run was written by "
                "another pyro-iwae version: use that version or start a new run"
            )
        return cls(**values)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunConfig:
        """Reads ``config.json`` of ``run_dir``.

        :raises RunError: if the directory or its config is missing or broken.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunError(
                f"run directory {run_dir} does not exist; pass the directory of a "
                "run written by fit"
            )
        path = run_dir / CONFIG_FILE
        if not path.is_file():
            raise RunError(
                f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the "
                "directory of a run written by fit"
            )
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(
                f"cannot read {path} ({one_line(e)}); restore it or start a new run"
            ) from e
        if not isinstance(values, dict):
            raise RunError(
                f"{path} is not a JSON object; restore it or start a new run"
            )
        return cls.from_dict(values)

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Writes ``config.json`` into ``run_dir`` (created if needed); returns it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / CONFIG_FILE
        _write_json(path, self.to_dict())
        return path

    def make_schedule(self) -> Schedule:
        """The training schedule, a list of (epochs, lr)."""
        return make_schedule(
            self.schedule, epochs=self.epochs, stages=self.stages, lr=self.lr
        )

    def make_objective(self) -> ELBO:
        """The training objective (see :func:`make_objective`)."""
        return make_objective(
            self.objective,
            self.num_particles,
            self.estimator,
            self.alpha,
            self.num_groups,
            self.beta,
        )

    def load_data(self, data_dir: str | os.PathLike | None = None) -> Dataset:
        """The data set on the CPU, training set cut to ``train_limit``.

        :param data_dir: overrides ``self.data_dir``.
        :raises pyro_iwae.data.DataError: if the data cannot be found or read.
        """
        data = load_dataset(self.dataset, data_dir or self.data_dir)
        if self.train_limit is not None:
            data = dataclasses.replace(data, train=data.train[: self.train_limit])
        return data


def build_run(
    config: RunConfig,
    data_mean: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Model and guide of ``config``, initialised from ``config.seed``.

    :param data_mean: ``[x_dim]`` training grey-level means for the model's output
        bias (None keeps the default initialisation).
    """
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        x_dim=config.x_dim,
        stochastic_layers=config.stochastic_layers,
        data_mean=data_mean,
    )
    guide = build_guide(
        config.guide, x_dim=config.x_dim, stochastic_layers=config.stochastic_layers
    )
    device = torch.device(config.device if device is None else device)
    return model.to(device), guide.to(device)


def new_run_dir(
    runs_dir: str | os.PathLike, config: RunConfig, now: datetime | None = None
) -> Path:
    """Creates and returns a fresh folder under ``runs_dir`` for a run of ``config``,
    named ``<YYYYmmdd-HHMMSS>-<dataset>-<objective>-k<k>`` (with a suffix if taken)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{config.dataset}-{config.objective}-k{config.num_particles}"
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = runs_dir / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunError(f"too many runs named {base} in {runs_dir}; pass another folder")


def find_latest_run(runs_dir: str | os.PathLike) -> Path:
    """The run directory under ``runs_dir`` whose checkpoint (or config, before its
    first epoch) was written last.

    :raises RunError: if ``runs_dir`` holds no run.
    """
    runs_dir = Path(runs_dir)
    candidates = []
    if runs_dir.is_dir():
        for path in runs_dir.iterdir():
            for name in (CHECKPOINT_FILE, CONFIG_FILE):
                if (path / name).is_file():
                    candidates.append(((path / name).stat().st_mtime, path.name, path))
                    break
    if not candidates:
        raise RunError(
            f"no run found in {runs_dir}; train one with fit, or pass a run "
            "directory (or the runs folder that holds it)"
        )
    return max(candidates)[2]


def train_run(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    data_dir: str | os.PathLike | None = None,
    callback: FitCallback | None = None,
) -> list[dict[str, Any]]:
    """Trains run ``config`` in ``run_dir`` (writing ``config.json``), or resumes it.

    On ``resume`` the saved config must equal ``config`` but for ``device`` and
    ``data_dir``. ``data_dir`` overrides ``config.data_dir`` for loading only.
    Returns the metrics of every epoch (see :func:`fit`).

    :raises RunError: on a config that differs from the run's, or a broken run.
    :raises CheckpointError: on ``resume`` with no usable checkpoint.
    :raises pyro_iwae.data.DataError: if the data cannot be loaded.
    :raises TrainingDiverged: see :func:`fit`.
    """
    run_dir = Path(run_dir)
    if resume:
        saved = RunConfig.load(run_dir)
        load_checkpoint_path = run_dir / CHECKPOINT_FILE
        if not load_checkpoint_path.is_file():
            raise CheckpointError(
                f"{run_dir} has no checkpoint to resume (it never finished an "
                "epoch); start a new run instead"
            )
        ignored = {"device", "data_dir"}
        differences = [
            f"{name}={getattr(saved, name)!r} (not {getattr(config, name)!r})"
            for name in saved.to_dict()
            if name not in ignored and getattr(saved, name) != getattr(config, name)
        ]
        if differences:
            raise RunError(
                f"run {run_dir} was started with {', '.join(differences)}; resume "
                "it with its own settings or start a new run"
            )
    elif (run_dir / CHECKPOINT_FILE).exists():
        raise RunError(
            f"{run_dir} holds a run already; resume it or choose another directory"
        )
    data = config.load_data(data_dir)
    if data.x_dim != config.x_dim:
        raise RunError(
            f"{config.dataset} images have {data.x_dim} pixels, the config says "
            f"{config.x_dim}; set x_dim to {data.x_dim}"
        )
    if not resume:
        config.save(run_dir)
    model, guide = build_run(config, data.train_mean)
    return fit(
        model,
        guide,
        data,
        config.make_objective(),
        schedule=config.make_schedule(),
        batch_size=config.batch_size,
        seed=config.seed,
        test_size=config.test_limit,
        run_dir=run_dir,
        resume=resume,
        config=config.to_dict(),
        checkpoint_every=config.checkpoint_every,
        device=config.device,
        callback=callback,
    )


def load_run(
    run_dir: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[RunConfig, torch.nn.Module, torch.nn.Module]:
    """The config, model and guide of a run, with the checkpoint's parameters.

    :param device: where to put model and guide (default: the CPU).
    :raises RunError: if ``run_dir`` is not a run directory.
    :raises CheckpointError: if the checkpoint is missing, corrupt, or of
        another architecture.
    """
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir)
    device = torch.device("cpu" if device is None else device)
    path = run_dir / CHECKPOINT_FILE
    checkpoint = load_checkpoint(path, map_location=device)
    try:
        model, guide = build_run(config, device=device)
    except ValueError as e:
        raise RunError(
            f"{run_dir / CONFIG_FILE} names no buildable model and guide "
            f"({one_line(e)}); restore it or start a new run"
        ) from e
    _load_state(model, checkpoint["model"], "model", path)
    _load_state(guide, checkpoint["guide"], "guide", path)
    return config, model, guide


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    num_samples: int = 5000,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 100,
    chunk_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    callback: Callable[[torch.Tensor, int], None] | None = None,
) -> dict[str, Any]:
    """Estimates the negative log-likelihood of a run's model, -L_k per point.

    Uses the first ``limit`` points (None: all) of ``split`` (``"test"``: the
    binary test set; ``"train"``: the training grey levels, binarised once with
    ``seed``). Also counts the active units of each latent site on those points.
    Writes the result to ``eval-<split>-k<num_samples>.json`` in ``run_dir``.
    ``callback(estimates, total)`` is called after each batch with its
    log-likelihood estimates (``[batch]``, nats) and the number of points.

    :returns: a dict: ``nll`` (mean, nats), ``stderr`` (std / sqrt(n), None for
        one point), ``k``, ``split``, ``points``, ``time`` (s), ``active_units``
        (site -> count), ``latent_units`` (site -> size), ``seed``, ``file``, and
        ``estimates_file``: the per-point estimates, one per line in nats, beside
        the JSON (see :func:`read_estimates`).
    :raises RunError, CheckpointError, pyro_iwae.data.DataError: see
        :func:`load_run` and :func:`pyro_iwae.data.load_dataset`.
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    run_dir = Path(run_dir)
    config, model, guide = load_run(run_dir, device)
    # The test set keeps its fixed binarisation, so that every evaluation (and
    # the per-epoch test bound) sees the same points.
    data = load_dataset(config.dataset, data_dir or config.data_dir)
    if split == "test":
        points = data.test[:limit]
    else:
        generator = torch.Generator().manual_seed(seed)
        points = torch.bernoulli(data.train[:limit], generator=generator)
    points = points.to(next(model.parameters()).device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    estimates = dataset_log_likelihood(
        model,
        guide,
        points,
        num_samples=num_samples,
        batch_size=batch_size,
        chunk_size=chunk_size,
        callback=None if callback is None else lambda e: callback(e, points.shape[0]),
    )
    seconds = time.perf_counter() - start
    nll = -estimates.double()
    n = nll.shape[0]
    stderr = float(nll.std() / math.sqrt(n)) if n > 1 else None
    activity = latent_activity(guide, points)
    active = count_active(activity)
    latent = {name: a.numel() for name, a in activity.items()}
    path = run_dir / f"eval-{split}-k{num_samples}.json"
    estimates_path = run_dir / f"estimates-{split}-k{num_samples}.txt"
    result = {
        "nll": float(nll.mean()),
        "stderr": stderr,
        "k": num_samples,
        "split": split,
        "points": n,
        "time": seconds,
        "active_units": active,
        "latent_units": latent,
        "seed": seed,
        "dataset": config.dataset,
        "versions": versions(),
        "date": datetime.now().isoformat(timespec="seconds"),
        "file": str(path),
        "estimates_file": estimates_path.name,
    }
    # Per point, so that two runs scored on the same points can be compared pairwise.
    lines = "".join(f"{value:.6f}\n" for value in estimates.double().tolist())
    _write_text(estimates_path, lines)
    _write_json(path, result)
    return result


def read_estimates(run_dir: str | os.PathLike, evaluation: dict) -> torch.Tensor | None:
    """The per-point log-likelihood estimates (nats, float64) that ``evaluation``
    (a result of :func:`evaluate_run`) wrote in ``run_dir``; None if it has none."""
    name = evaluation.get("estimates_file")
    path = Path(run_dir) / name if name else None
    if path is None or not path.is_file():
        return None
    values = [float(line) for line in path.read_text().split()]
    return torch.tensor(values, dtype=torch.float64)


def versions() -> dict[str, str]:
    """Versions of Python, torch, Pyro and pyro-iwae, and the machine (with the
    number of threads torch uses), for the record."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyro_iwae": __version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": str(torch.get_num_threads()),
    }
