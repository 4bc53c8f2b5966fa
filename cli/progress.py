"""Progress reporting for the CLI: tqdm bars and per-epoch lines on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import torch
from tqdm import tqdm

from pyro_iwae.runs.callbacks import FitCallback, StepInfo

# Seconds between refreshes of a bar's running bound: reading it copies a number
# from the training device.
_REFRESH = 0.5


def bars_enabled(quiet: bool) -> bool:
    """Progress bars are drawn unless ``--quiet`` or stderr is not a terminal."""
    return not quiet and sys.stderr.isatty()


def format_metrics(metrics: dict[str, Any], unit: str = "img/s") -> str:
    """One line summarising an epoch's metrics; ``unit``: of its speed."""
    test = metrics.get("test_bound")
    test_text = "n/a" if test is None else f"{test:.2f}"
    return (
        f"epoch {metrics['epoch']}: train bound {metrics['train_bound']:.2f}, "
        f"test bound {test_text} nats (k={metrics['k']}), lr {metrics['lr']:.2g}, "
        f"{metrics['time']:.1f} s, {speed_text(metrics, unit)}"
    )


def counted(n: int, noun: str) -> str:
    """``n`` of ``noun``, plural but for one: ``"1 point"``, ``"2 points"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def speed_text(metrics: dict[str, Any], unit: str = "img/s") -> str:
    """An epoch's training speed; with compiling in it, the speed without it
    and the seconds spent compiling apart."""
    seconds, compiling = metrics["time"], metrics.get("compile_time") or 0.0
    if compiling <= 0 or compiling >= seconds:
        return f"{metrics['images_per_s']:.0f} {unit}"
    points = metrics["images_per_s"] * seconds
    return (
        f"{points / (seconds - compiling):.0f} {unit} besides {compiling:.1f} s "
        "compiling"
    )


class FitProgress(FitCallback):
    """A tqdm bar per epoch (running bound, speed in ``unit``, such as img/s)
    and a line after each epoch."""

    def __init__(self, quiet: bool, unit: str = "img/s") -> None:
        self.quiet = quiet
        self.unit = unit
        self.enabled = bars_enabled(quiet)
        self.bar: tqdm | None = None
        self.last_refresh = 0.0
        self.epochs_run = 0

    def on_epoch_start(
        self, epoch: int, num_epochs: int, num_steps: int, lr: float
    ) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=num_steps,
                desc=f"epoch {epoch}/{num_epochs}",
                unit="step",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            self.last_refresh = 0.0

    def on_step(self, info: StepInfo) -> None:
        if self.bar is None:
            return
        if self.bar.n == 0:
            # A resumed epoch starts part-way through.
            self.bar.update(info.step - 1)
        now = time.monotonic()
        if now - self.last_refresh > _REFRESH or info.step == info.num_steps:
            self.last_refresh = now
            self.bar.set_postfix(
                bound=f"{info.running_bound:.2f}",
                **{self.unit.replace("/", "_"): f"{info.images_per_s:.0f}"},
                refresh=False,
            )
        self.bar.update(1)

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        self.epochs_run += 1
        self.close()
        if not self.quiet:
            click.echo(format_metrics(metrics, self.unit), err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EvalProgress:
    """A tqdm bar over data points with the running NLL; a callable for
    :func:`pyro_iwae.runs.run.evaluate_run`."""

    def __init__(self, quiet: bool) -> None:
        self.bar = tqdm(
            total=None,
            desc="eval-nll",
            unit="pt",
            file=sys.stderr,
            disable=not bars_enabled(quiet),
            dynamic_ncols=True,
        )
        self.total_nll = 0.0
        self.points = 0

    def __call__(self, estimates: torch.Tensor, total: int) -> None:
        n = estimates.shape[0]
        self.bar.total = total
        self.total_nll -= float(estimates.sum())
        self.points += n
        self.bar.set_postfix(nll=f"{self.total_nll / self.points:.2f}", refresh=False)
        self.bar.update(n)

    def reset(self) -> None:
        """Starts the count afresh, for the next evaluation."""
        self.bar.reset()
        self.total_nll = 0.0
        self.points = 0

    def close(self) -> None:
        self.bar.close()
