"""What :func:`pyro_iwae.fit` tells about its progress: :class:`FitCallback`
hooks, called with a :class:`StepInfo` after each step and with the metrics
after each epoch."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["FitCallback", "StepInfo"]


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
    """Hooks called by :func:`pyro_iwae.fit`; override any of them (they do nothing)."""

    def on_epoch_start(
        self, epoch: int, num_epochs: int, num_steps: int, lr: float
    ) -> None:
        """Before epoch ``epoch`` (from 1) of ``num_epochs``, of ``num_steps`` steps."""

    def on_step(self, info: StepInfo) -> None:
        """After each optimisation step."""

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        """After each epoch, once its metrics and checkpoint are written."""
