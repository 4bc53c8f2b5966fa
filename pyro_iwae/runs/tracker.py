"""The tracker's base class, :class:`Tracker`: what every tracker logs over a
fit and of an evaluation (its backends: :mod:`pyro_iwae.runs.tracking`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .callbacks import FitCallback, StepInfo
from .eval_results import Evaluation
from .plots import image_grid, image_range, reconstruction_grid

__all__ = ["NUM_IMAGES", "Tracker"]

#: How many samples and test points the images show.
NUM_IMAGES = 32


class Tracker(FitCallback):
    """What every tracker logs; subclasses say how (:meth:`log_scalars`,
    :meth:`log_params`, :meth:`log_image`) and, where they can tell, what they
    have logged (:meth:`logged`, so that an evaluation is logged once).

    :param images_every: log images every this many epochs (and after the last);
        0 for none.
    """

    def __init__(self, images_every: int = 5) -> None:
        if images_every < 0:
            raise ValueError(f"images_every must be >= 0, got {images_every}")
        self.images_every = images_every
        self.model: Any = None
        self.guide: Any = None
        self.test: torch.Tensor | None = None
        self.num_epochs = 0
        self._grad_norm_sum: torch.Tensor | None = None
        self._grad_norm_steps = 0
        #: What this tracker made (path, whether with all it holds), in order.
        self._made: list[tuple[Path, bool]] = []
        #: Whether :meth:`discard` removed them: it logs no more.
        self.discarded = False

    # -- what a backend provides --------------------------------------------

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Logs ``values`` (name -> number) at ``step`` (the epoch)."""
        raise NotImplementedError

    def log_params(self, params: dict[str, Any]) -> None:
        """Logs the configuration (nested settings flattened as ``a.b``; values
        numbers, strings, booleans, None or lists) at the start of each fit."""
        raise NotImplementedError

    def log_image(self, name: str, picture: torch.Tensor, step: int) -> None:
        """Logs a ``[C, H, W]`` picture with values in [0, 1]."""
        raise NotImplementedError

    def logged(self, name: str, value: float, step: int) -> bool:
        """Whether the series ``name`` holds ``value`` at ``step`` (False where
        the backend cannot tell, or replaces a repeated value itself)."""
        return False

    def close(self) -> None:
        """Writes what is buffered and ends the run."""

    def interrupted(self) -> None:
        """The run stopped before its last epoch (Ctrl-C): writes what is
        buffered; a resume goes on logging."""
        if not self.discarded:
            self.close()

    # -- what it made, for discard ------------------------------------------

    def make_dir(self, path: Path, whole: bool = False) -> None:
        """Makes the folder ``path`` and its parents, noting those it made;
        ``whole``: :meth:`discard` removes ``path`` with all it holds (its
        files are this tracker's), else only where empty."""
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self._made += [(p, whole and p == path) for p in reversed(missing)]

    def note_made(self, path: Path, whole: bool = False) -> None:
        """Notes ``path`` as made by this tracker if it is not there yet (call
        before writing it)."""
        if not path.exists():
            self._made.append((path, whole))

    def _keep(self) -> None:
        """Takes what this tracker made as a kept run's: :meth:`discard` leaves it."""
        self._made.clear()

    def discard(self) -> None:
        """Removes what this tracker made (files, and folders it made that are
        empty then), last made first; it logs no more. For a run that kept
        nothing: a fresh run in its folder starts afresh."""
        self.discarded = True
        for path, whole in reversed(self._made):
            try:
                if whole and path.is_dir():
                    shutil.rmtree(path)
                elif path.is_dir():
                    path.rmdir()  # only where empty: others' files stay
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                pass  # in use, or not empty: not this tracker's to remove
        self._made.clear()

    # -- fit's hooks ----------------------------------------------------------

    def on_fit_start(
        self,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        test_data: torch.Tensor | None,
        config: dict[str, Any],
    ) -> None:
        self.model, self.guide, self.test = model, guide, test_data
        self.log_params(_flat_params(config))

    def on_epoch_start(
        self, epoch: int, num_epochs: int, num_steps: int, lr: float
    ) -> None:
        self.num_epochs = num_epochs
        self._grad_norm_sum, self._grad_norm_steps = None, 0

    def on_step(self, info: StepInfo) -> None:
        norm = info.grad_norm()
        if norm is None:
            return
        # Summed on the device: read once an epoch, not once a step.
        total = self._grad_norm_sum
        self._grad_norm_sum = norm if total is None else total + norm
        self._grad_norm_steps += 1

    def on_run_discarded(self) -> None:
        self.discard()

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        # Its checkpoint is written: what this tracker made is the run's now,
        # not a later fit's to discard.
        self._keep()
        epoch = metrics["epoch"]
        values = {
            "train/bound": metrics["train_bound"],
            "test/bound": metrics["test_bound"],
            "train/lr": metrics["lr"],
            "train/points_per_s": metrics["images_per_s"],
            "train/epoch_seconds": metrics["time"],
        }
        if self._grad_norm_steps:
            values["train/grad_norm"] = (
                float(self._grad_norm_sum) / self._grad_norm_steps
            )
        self.log_scalars(_finite(values), epoch)
        last = epoch == self.num_epochs
        if self.images_every and (epoch % self.images_every == 0 or last):
            self.log_pictures(epoch)
        if last:
            self.close()

    def log_pictures(self, step: int) -> None:
        """Logs samples from the model and test points above their
        reconstructions, when the points are square images."""
        if self.model is None or self.test is None:
            return
        from ..infer.sampling import reconstruct, sample_images

        x = self.test[:NUM_IMAGES]
        shape = _square(x.shape[-1])
        if shape is None:
            return
        # Drawn from a stream of their own, seeded by the step: drawn from the
        # training's, they made a run with trackers another run than without,
        # and a resumed one another than an unbroken one.
        with distributed.forked_rng(x.device):
            torch.manual_seed(step)
            samples = sample_images(self.model, x.shape[0], x.shape[-1], x.device)
            recon = reconstruct(self.model, self.guide, x)
        scale = image_range(x)  # samples on the data's scale
        samples = image_grid(samples, image_shape=shape, value_range=scale)
        self.log_image("samples", samples, step)
        picture = reconstruction_grid(x, recon, image_shape=shape, value_range=scale)
        self.log_image("reconstructions", picture, step)

    def log_evaluation(
        self, result: Evaluation | dict[str, Any], step: int = 0
    ) -> None:
        """Logs an evaluation: an :class:`~pyro_iwae.Evaluation` as
        :func:`~pyro_iwae.evaluate_run` returns, or its JSON's dict (``nll``,
        ``stderr``, ``split`` and, where present, the ``diagnostics``' medians),
        under ``eval_<its file's name>/`` (``eval_test-k5000/nll``): evaluations
        of other settings are series of their own."""
        if isinstance(result, Evaluation):
            result = result.to_json()
        name = Path(result.get("file", "")).stem.removeprefix("eval-")
        prefix = f"eval_{name or result.get('split', 'test')}/"
        keys = {
            "nll": "nll",
            "stderr": "nll_stderr",
            "ess_median": "ess_median",
            "khat_median": "khat_median",
            "khat_above_0.7": "khat_above_0.7",
            "bits_per_dim": "bits_per_dim",
        }
        found = {**result, **(result.get("diagnostics") or {})}
        values = {
            prefix + name: found[key]
            for key, name in keys.items()
            if isinstance(found.get(key), (int, float))
        }
        values = _finite(values)
        # Logged once: a repeat of this evaluation (the same NLL at the same
        # step) adds no second point to logs that cannot be rewritten.
        nll = prefix + "nll"
        if nll not in values or not self.logged(nll, values[nll], step):
            self.log_scalars(values, step)
        self.close()


def _flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` with nested dicts flattened (``a.b``) and values as JSON has
    them (tuples as lists, other objects as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_params(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix + key] = value
        else:
            flat[prefix + key] = json.loads(json.dumps(value, default=str))
    return flat


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if v is not None and math.isfinite(float(v))
    }


def _square(x_dim: int) -> tuple[int, int] | None:
    side = math.isqrt(x_dim)
    return (side, side) if side * side == x_dim else None
