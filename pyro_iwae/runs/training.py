"""The fit loop: :func:`fit` trains a model and guide by Adam, epoch by epoch,
tells :class:`FitCallback` hooks, and writes checkpoints it resumes from bit
for bit.

:func:`fit` runs a :class:`_Fit`: its set-up, then :meth:`_Fit.start` or
:meth:`_Fit.resume`, then epochs (:meth:`_Fit.run_epoch`), each of steps
(:meth:`_Fit.train_step` around
:func:`~pyro_iwae.runs.fit_steps.adam_step`, the optimisation step itself)
and the end-of-epoch work (:meth:`_Fit.end_epoch`: test bound, metrics,
checkpoint). The files are those of :mod:`pyro_iwae.runs.checkpoints`. Under
``torchrun`` the ranks train one run together (see :mod:`pyro_iwae.runs.distributed`).

The loop is one class whose short methods share its state; the pieces
without state (argument checks, the data and parameters, one Adam step) are in
:mod:`pyro_iwae.runs.fit_steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO

from ..data import Dataset, minibatches
from ..errors import TrainingDiverged, one_line
from ..nn.networks import prepare_pyro_modules
from . import distributed
from .auto_compile import FitCompile
from .callbacks import FitCallback, StepInfo
from .checkpoints import (
    CHECKPOINT_FILE,
    CheckpointError,
    append_metrics,
    load_resumed,
    load_state,
    restore_rng,
    resumed_metrics,
    rng_state,
    save_checkpoint,
    write_metrics,
)
from .denormals import flush_denormals
from .fit_steps import (
    Position,
    adam_step,
    binarizes,
    check_continues,
    check_fit_program,
    check_same_fit,
    checked_schedule,
    diverged_message,
    fit_data,
    fit_record,
    fit_state,
    parameters_of,
    rate,
    test_bound,
)
from .schedules import locate

__all__ = ["TrainingDiverged", "fit"]

# Steps between checks that the loss is finite: each check reads a number from
# the device, so checking every step would synchronise a GPU every step.
_CHECK_EVERY = 50


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
    binarize: bool | None = None,
) -> list[dict[str, Any]]:
    """Trains ``model`` and ``guide`` (called as ``model(x)``, ``guide(x)``) by Adam.

    One :class:`torch.optim.Adam` (``betas=(0.9, 0.999)``, ``eps=1e-4``) updates
    the parameters of both. The loss of a step is the negative bound per data
    point, ``objective.differentiable_loss(model, guide, x) / batch`` (for
    objectives without ``differentiable_loss``, such as ``RenyiELBO``, the
    gradients of ``loss_and_grads`` divided by the batch size). Mini-batches of
    the training data are shuffled every epoch, and binarised afresh only where
    ``binarize`` says so. On the CPU the calling thread flushes subnormal floats
    to zero while it trains; call
    ``pyro_iwae.runs.denormals.flush_denormals_from_start()`` first thing in
    the program for torch's worker threads to flush too (``pyro-iwae fit`` does).

    :param data: a :class:`~pyro_iwae.data.Dataset` (its ``train`` data for
        training, its ``test`` set for the test bound) or a tensor ``[N, ...]``
        of training data, used as given.
    :param objective: a Pyro ELBO, e.g. from :func:`~pyro_iwae.make_objective`;
        its ``num_particles`` is the k of the per-epoch test bound.
    :param schedule: stages ``(epochs, lr)``, see
        :func:`~pyro_iwae.make_schedule`.
    :param seed: seeds torch's random numbers and the generator of the
        mini-batch order and binarisation.
    :param test_data: binary ``[M, x_dim]`` test points (default: ``data.test``
        of a Dataset); the first ``test_size`` (all if None) give the test bound.
    :param run_dir: where ``metrics.jsonl`` and ``checkpoint.pt`` go; None
        keeps nothing on disk.
    :param resume: continue from the checkpoint in ``run_dir``: the result is
        the same, bit for bit on the same device, as a run never interrupted.
    :param config: JSON-able values stored in the checkpoint (e.g. a
        :class:`~pyro_iwae.RunConfig` as a dict).
    :param checkpoint_every: also write a checkpoint every this many steps
        (checkpoints are always written after each epoch).
    :param device: where to train (model, guide and data are moved there);
        default: the device of the model's first parameter.
    :param callback: a :class:`FitCallback` told about every step and epoch
        (on every rank that passes one, under torchrun).
    :param binarize: replace each mini-batch by a Bernoulli draw of its values
        (dynamic binarisation; the values must lie in [0, 1]); None: as the
        Dataset says (``data.binarize == "dynamic"``), never for a tensor.
    :returns: the metrics of every epoch of the run (including those before a
        resume), each a dict: ``epoch`` (from 1), ``stage``, ``stage_epoch``,
        ``lr``, ``k``, ``train_bound`` (mean over the epoch's steps, nats per
        point), ``test_bound`` (nats per point, None without test data),
        ``test_points``, ``time`` (s of training), ``images_per_s``,
        ``eval_time`` (s), ``compile_time`` (s of ``time`` spent compiling, with a
        ``compile`` objective), ``compiled`` (whether the steps ran compiled
        graphs), ``compile_choice`` (why: ``"as asked"``, or how ``"auto"`` was
        settled: :class:`~pyro_iwae.runs.auto_compile.FitCompile`), ``elapsed``
        (s since the run began), ``steps``.
    :raises TrainingDiverged: when the loss or a parameter is NaN or infinite;
        the last checkpoint (all finite) is kept.
    :raises CheckpointError: on ``resume`` without a usable checkpoint (of this
        objective, seed and data), or where ``run_dir`` holds one and not ``resume``.

    Under ``torchrun`` (or once ``torch.distributed`` is initialised), every
    rank calls ``fit`` with the same arguments and they train one run with
    ``DistributedDataParallel`` (see :mod:`pyro_iwae.runs.distributed`):
    ``batch_size`` is the global batch, split evenly over the ranks; each rank
    draws its Monte Carlo noise from its own seed, and the averaged gradient is
    that of the single-process loss on the global batch. Rank 0 alone writes
    ``run_dir``; metrics are reduced over the ranks first, and every rank
    returns them. A checkpoint written by any number of ranks resumes under any
    other (the same number continues exactly). With ``device="cuda"`` each rank
    uses ``cuda:LOCAL_RANK``.
    """
    # _Fit takes fit's arguments, by their names.
    return _Fit(**locals()).run()


class _Fit:
    """One call of :func:`fit`: what it set up, and where training stands."""

    def __init__(
        self,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        data: Dataset | torch.Tensor,
        objective: ELBO,
        *,
        schedule: Iterable[Sequence[Any]],
        batch_size: int,
        seed: int,
        test_data: torch.Tensor | None,
        test_size: int | None,
        test_batch_size: int,
        run_dir: str | os.PathLike | None,
        resume: bool,
        config: dict[str, Any] | None,
        checkpoint_every: int | None,
        device: torch.device | str | None,
        callback: FitCallback | None,
        binarize: bool | None,
    ) -> None:
        checked = (schedule, batch_size, checkpoint_every, resume, run_dir, seed)
        schedule = checked_schedule(objective, *checked, config, callback)
        self.seed, self.resuming = seed, resume
        self.model, self.guide, self.objective = model, guide, objective
        self.schedule, self.batch_size = schedule, batch_size
        self.test_batch_size, self.checkpoint_every = test_batch_size, checkpoint_every
        self.config, self.callback = config or {}, callback
        params = parameters_of(model, guide)
        prepare_pyro_modules(model, guide)  # trained with module-local params
        if device is None:
            device = params[0].device if params else torch.device("cpu")
        self.device = distributed.init(device)
        # None in a single process; rank 0 alone writes files.
        self.ranks = distributed.current()
        self.writes = distributed.is_main()
        model.to(self.device)
        guide.to(self.device)
        self.train, self.test = fit_data(data, test_data, test_size, self.device)
        check_fit_program(model, guide, self.train, self.test)
        self.binarize = binarizes(data, binarize, self.train)
        distributed.check_batches(self.train.shape[0], batch_size, self.ranks)
        first = self.train[:batch_size]
        self.distributed_loss = (
            None
            if self.ranks is None
            else distributed.DistributedLoss(
                model,
                guide,
                objective,
                self.ranks,
                self.device,
                first.round() if self.binarize else first,
            )
        )
        # After the distributed loss's forward pass, which makes lazy parameters.
        self.params = parameters_of(model, guide)
        self.num_particles = getattr(objective, "num_particles", 1)
        self.num_steps = math.ceil(self.train.shape[0] / batch_size)
        self.num_epochs = sum(epochs for epochs, _ in schedule)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.checkpoint_path = self.run_dir and self.run_dir / CHECKPOINT_FILE
        # What a checkpoint must have been written with to be resumed here.
        self.fit_state = fit_state(schedule, batch_size)
        self.record = fit_record(objective, seed, self.train)  # what a resume checks
        self.differentiable = hasattr(objective, "differentiable_loss")
        self.optimizer = torch.optim.Adam(
            self.params, lr=schedule[0][1], betas=(0.9, 0.999), eps=1e-4, fused=True
        )
        self.generator = torch.Generator(device=self.device)
        self.position = Position()
        self.history: list[dict[str, Any]] = []
        # The (loss sum, seconds) of the steps of an epoch resumed mid-way.
        self.resumed_epoch: tuple[torch.Tensor, float] | None = None
        # The data generator's state at the start of the current epoch.
        self.epoch_rng: torch.Tensor | None = None
        self.first_step = True
        self.compile = FitCompile.choose(
            objective,
            model,
            guide,
            self.train.shape,
            batch_size,
            self.num_epochs * self.num_steps,
            self.device,
            self.distributed_loss is None,
        )

    def run(self) -> list[dict[str, Any]]:
        """Starts or resumes the run and trains the epochs left; returns the
        metrics of every epoch."""
        if self.resuming:
            self.resume()
        else:
            self.start()
        if self.callback is not None:
            self.callback.on_fit_start(self.model, self.guide, self.test, self.config)
        # IWAE's gradients are full of subnormals, each costing microcode on
        # the CPU: flushing them made a step ~1.6x as fast (see denormals.py).
        with flush_denormals(self.device.type == "cpu"), self.compile.settled():
            while self.position.stage < len(self.schedule):
                self.run_epoch()
        distributed.barrier()  # rank 0's files are written when fit returns
        return self.history

    # -- start and resume ---------------------------------------------------

    def start(self) -> None:
        """Seeds a new run and starts its metrics file."""
        # Distinct seeds, so that particle noise and binarisation noise are not
        # drawn from one and the same stream.
        # Each rank draws its own particles; all draw the same mini-batches.
        noise_seed = 2 * self.seed
        if self.ranks is not None:
            noise_seed = distributed.noise_seed(noise_seed, self.ranks.rank)
        torch.manual_seed(noise_seed)  # also seeds every CUDA device
        self.generator.manual_seed(2 * self.seed + 1)
        if self.run_dir is None:
            return
        if distributed.from_main(self.checkpoint_path.exists):
            raise CheckpointError(
                f"{self.run_dir} holds a checkpoint already; resume it or choose "
                "another run directory"
            )
        if self.writes:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_metrics(self.run_dir, [])

    def resume(self) -> None:
        """Restores parameters, optimizer, position and random states from the
        checkpoint, and the metrics of the epochs it has finished."""
        path = self.checkpoint_path
        # Rank 0 reads it and sends it to the others, on the CPU.
        where = self.device if self.ranks is None else "cpu"
        checkpoint = distributed.from_main(lambda: load_resumed(path, where))
        check_continues(checkpoint, self.schedule, self.batch_size, path)
        check_same_fit(checkpoint, self.record, path)
        load_state(self.model, checkpoint["model"], "model", path)
        load_state(self.guide, checkpoint["guide"], "guide", path)
        self.compile.resumed(checkpoint.get("compiled"))
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.position = Position(**checkpoint["position"])
            if checkpoint["fit"] != self.fit_state:  # a schedule extended
                done = self.position.epochs_done
                stage, stage_epoch = locate(self.schedule, done)
                self.position.stage, self.position.stage_epoch = stage, stage_epoch
            self.epoch_rng = restore_rng(checkpoint["rng"], self.device, self.generator)
            if self.ranks is not None:
                self.restore_rank_rng(checkpoint["rng"])
            if self.position.step:
                self.resumed_epoch = (
                    checkpoint["epoch_loss_sum"],
                    checkpoint["epoch_time"],
                )
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model and guide "
                f"({one_line(e)}); use the run directory that wrote it"
            ) from e
        epochs_done = self.position.epochs_done
        self.history = distributed.from_main(
            lambda: resumed_metrics(self.run_dir, epochs_done)
        )
        if self.writes:
            # Drop the lines of an epoch whose checkpoint was never written.
            write_metrics(self.run_dir, self.history)

    def restore_rank_rng(self, rng: dict[str, Any]) -> None:
        """Restores this rank's noise from a checkpoint's random states: each
        rank of a run with as many ranks continues exactly; a checkpoint of one
        process continues on rank 0, and ranks the writer lacked start afresh."""
        states = rng.get("ranks") or [{"torch": rng["torch"], "cuda": rng["cuda"]}]
        fallback = distributed.noise_seed(2 * self.seed, self.position.global_step)
        distributed.restore_rank_rng(states, self.device, fallback)

    # -- an epoch -----------------------------------------------------------

    def run_epoch(self) -> None:
        """Trains one epoch (what is left of it, after a resume) and ends it."""
        _, lr = self.schedule[self.position.stage]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        epoch = self.position.epochs_done + 1
        if self.callback is not None:
            self.callback.on_epoch_start(epoch, self.num_epochs, self.num_steps, lr)
        batches, loss_sum, start = self.begin_epoch()
        for batch in batches:
            loss_sum = self.train_step(batch, epoch, loss_sum, start)
        self.end_epoch(epoch, lr, loss_sum, start)

    def begin_epoch(self) -> tuple[Iterator[torch.Tensor], torch.Tensor, float]:
        """The epoch's mini-batches still to train on, its loss sum so far, and
        the ``time.perf_counter()`` at which it would have started."""
        if self.epoch_rng is None:
            self.epoch_rng = self.generator.get_state()
        else:
            self.generator.set_state(self.epoch_rng)
        batches = minibatches(
            self.train,
            self.batch_size,
            generator=self.generator,
            binarize=self.binarize,
        )
        if self.resumed_epoch is not None:
            # Replay the finished steps' draws from the data generator, then
            # restore the torch state saved after them.
            torch_rng = torch.get_rng_state()
            for _ in range(self.position.step):
                next(batches)
            torch.set_rng_state(torch_rng)
            loss_sum, train_time = self.resumed_epoch
            self.resumed_epoch = None
        else:
            loss_sum, train_time = torch.zeros((), device=self.device), 0.0
        self.model.train()
        self.guide.train()
        return batches, loss_sum, time.perf_counter() - train_time

    def train_step(
        self, batch: torch.Tensor, epoch: int, loss_sum: torch.Tensor, start: float
    ) -> torch.Tensor:
        """One step on ``batch``, with its checks, callback and checkpoint;
        returns the epoch's loss sum with this step's loss."""
        # Pyro's validation checks the first step's distributions; later steps
        # would pay for it again and again.
        validation = (
            contextlib.nullcontext()
            if self.first_step
            else pyro.validation_enabled(False)
        )
        # The optimizer holds the parameters; in Pyro's global store a PyroParam
        # took a same-named one's value (model's and guide's, an earlier fit's).
        local_params = pyro.settings.context(module_local_params=True)
        with validation, local_params:
            loss = adam_step(
                self.objective,
                self.differentiable,
                self.model,
                self.guide,
                batch,
                self.optimizer,
                self.distributed_loss,
            )
        self.first_step = False
        loss_sum = loss_sum + loss
        position = self.position
        position.step += 1
        position.global_step += 1
        if position.step % _CHECK_EVERY == 0:
            self.check_finite_loss(distributed.mean_over_ranks(loss_sum))
        if self.callback is not None:
            seconds = time.perf_counter() - start
            images = min(position.step * self.batch_size, self.train.shape[0])
            self.callback.on_step(
                StepInfo(
                    epoch=epoch,
                    num_epochs=self.num_epochs,
                    step=position.step,
                    num_steps=self.num_steps,
                    images_per_s=rate(images, seconds),
                    loss_tensor=loss,
                    loss_sum=loss_sum,
                    parameters=self.params,
                )
            )
        if (
            self.checkpoint_every is not None
            and position.global_step % self.checkpoint_every == 0
            and position.step < self.num_steps
        ):
            # The epoch's loss sum so far, over all the ranks, for every rank.
            loss_sum = distributed.mean_over_ranks(loss_sum)
            self.check_finite_loss(loss_sum)
            seconds = time.perf_counter() - start
            self.write_checkpoint(self.epoch_rng, (loss_sum.detach(), seconds))
        return loss_sum

    def end_epoch(
        self, epoch: int, lr: float, loss_sum: torch.Tensor, start: float
    ) -> None:
        """Checks, test bound, metrics and checkpoint after the epoch's steps."""
        loss_sum = distributed.mean_over_ranks(loss_sum)
        train_bound = -float(loss_sum) / self.num_steps
        train_time = time.perf_counter() - start
        self.check_finite_loss(loss_sum)
        self.check_finite_parameters()
        eval_start = time.perf_counter()
        test_bound = self.test_bound()
        eval_time = time.perf_counter() - eval_start
        position = self.position
        position.elapsed += train_time + eval_time
        compiled, choice = self.compile.outcome(self.model, self.guide)
        metrics = {
            "epoch": epoch,
            "stage": position.stage,
            "stage_epoch": position.stage_epoch + 1,
            "lr": lr,
            "k": self.num_particles,
            "train_bound": train_bound,
            "test_bound": test_bound,
            "test_points": 0 if self.test is None else self.test.shape[0],
            "time": train_time,
            "images_per_s": rate(self.train.shape[0], train_time),
            "eval_time": eval_time,
            "compile_time": self.compile.seconds_spent(),
            "compiled": compiled,
            "compile_choice": choice,
            "elapsed": position.elapsed,
            "steps": position.global_step,
        }
        # Graphs that fell back are not in inductor's cache for a later "auto".
        if metrics["compile_time"] > 0 and compiled and self.writes:
            self.compile.note_compiled()
        position.advance_epoch(self.schedule)
        self.epoch_rng = None
        self.history.append(metrics)
        if self.run_dir is not None and self.writes:
            append_metrics(self.run_dir, metrics)
        self.write_checkpoint(self.generator.get_state(), None)
        if self.callback is not None:
            self.callback.on_epoch_end(metrics)

    def test_bound(self) -> float | None:
        """The bound at the training k, mean over the test points (None: none)."""
        if self.test is None:
            return None
        return test_bound(
            self.model,
            self.guide,
            self.test,
            objective=self.objective,
            batch_size=self.test_batch_size,
            seed=(self.seed, self.position.epochs_done),
        )

    # -- checkpoints and checks ---------------------------------------------

    def write_checkpoint(
        self,
        epoch_start_rng: torch.Tensor,
        epoch_sums: tuple[torch.Tensor, float] | None,
    ) -> None:
        """Writes the checkpoint (if there is a run directory): after an epoch,
        or mid-epoch with the epoch's (loss sum, seconds) so far."""
        if self.checkpoint_path is None:
            return
        self.check_finite_parameters()
        # A collective: every rank's noise, for rank 0 to keep.
        ranks_rng = None if self.ranks is None else distributed.rng_states(self.device)
        if not self.writes:
            return
        contents = {
            "model": self.model.state_dict(),
            "guide": self.guide.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": dataclasses.asdict(self.position),
            "rng": rng_state(self.device, epoch_start_rng),
            "fit": self.fit_state,
            "record": self.record,
            "config": self.config,
            "compiled": self.compile.outcome(self.model, self.guide)[0],
        }
        if ranks_rng is not None:
            contents["rng"]["ranks"] = ranks_rng
        if epoch_sums is not None:
            contents["epoch_loss_sum"], contents["epoch_time"] = epoch_sums
        save_checkpoint(self.checkpoint_path, contents)

    def check_finite_loss(self, loss_sum: torch.Tensor) -> None:
        """:raises TrainingDiverged: if ``loss_sum`` is NaN or infinite."""
        if not math.isfinite(float(loss_sum)):
            raise TrainingDiverged(
                diverged_message("the loss", self.position, self.run_dir)
            )

    def check_finite_parameters(self) -> None:
        """:raises TrainingDiverged: if a parameter holds a NaN or infinity."""
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise TrainingDiverged(
                diverged_message("a parameter", self.position, self.run_dir)
            )
