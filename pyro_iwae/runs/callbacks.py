"""What :func:`pyro_iwae.fit` tells about its progress: :class:`FitCallback`
hooks, called with a :class:`StepInfo` after each step and with the metrics
after each epoch."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["CallbackList", "FitCallback", "StepInfo"]


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
    parameters: Sequence[torch.nn.Parameter] = ()

    def grad_norm(self) -> torch.Tensor | None:
        """The Euclidean norm of this step's gradient over all trained
        parameters, as a 0-d tensor on the training device (None: no gradient).
        Computed only when asked; reading it as a number synchronises."""
        grads = [p.grad for p in self.parameters if p.grad is not None]
        if not grads:
            return None
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    @property
    def loss(self) -> float:
        """This step's loss: the negative bound per data point, in nats."""
        return float(self.loss_tensor)

    @property
    def running_bound(self) -> float:
        """Mean bound per data point over the epoch's steps so far, in nats."""
        return -float(self.loss_sum) / self.step


class FitCallback:
    """Hooks called by :func:`pyro_iwae.fit`; override any of them (they do nothing)."""

    def on_run_start(self, run_dir: Path, resume: bool) -> None:
        """Once, where :func:`pyro_iwae.train_run` (:meth:`pyro_iwae.Run.train`)
        holds the lock of ``run_dir`` and has checked it, before it writes the
        run (``resume``: it goes on with the run there). Raising refuses the
        folder: the run is not written."""

    def on_fit_start(
        self,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        test_data: torch.Tensor | None,
        config: dict[str, Any],
    ) -> None:
        """Once, before the first step of this call of :func:`pyro_iwae.fit`:
        the model and guide it trains, its test points (``[M, x_dim]``, None
        without), and the ``config`` it was given (a run's settings)."""

    def on_epoch_start(
        self, epoch: int, num_epochs: int, num_steps: int, lr: float
    ) -> None:
        """Before epoch ``epoch`` (from 1) of ``num_epochs``, of ``num_steps`` steps."""

    def on_step(self, info: StepInfo) -> None:
        """After each optimisation step."""

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        """After each epoch, once its metrics and checkpoint are written."""

    def on_run_discarded(self) -> None:
        """Once, where :func:`pyro_iwae.train_run` (:meth:`pyro_iwae.Run.train`)
        failed or was interrupted before the run kept a checkpoint, and removed
        what the run wrote: what this callback wrote of it should go too."""


class CallbackList(FitCallback):
    """Several callbacks (trackers, a progress bar) as one, called in order;
    None entries are left out."""

    def __init__(self, callbacks: Iterable[FitCallback | None]) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_run_start(self, run_dir: Path, resume: bool) -> None:
        for c in self.callbacks:
            c.on_run_start(run_dir, resume)

    def on_fit_start(self, *args: Any) -> None:
        for c in self.callbacks:
            c.on_fit_start(*args)

    def on_epoch_start(self, *args: Any) -> None:
        for c in self.callbacks:
            c.on_epoch_start(*args)

    def on_step(self, info: StepInfo) -> None:
        for c in self.callbacks:
            c.on_step(info)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_epoch_end(metrics)

    def on_run_discarded(self) -> None:
        # Last made, first undone: a folder the first one made is empty by
        # the time it comes to remove it.
        for c in reversed(self.callbacks):
            c.on_run_discarded()
