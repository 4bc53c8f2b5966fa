"""Experiment tracking: :func:`pyro_iwae.fit`'s progress and ``eval-nll``'s
results to TensorBoard, MLflow or CSV files.

A tracker is a :class:`~pyro_iwae.FitCallback`: pass it to :func:`~pyro_iwae.fit`
or :func:`~pyro_iwae.train_run` (several at once in a
:class:`~pyro_iwae.runs.callbacks.CallbackList`). Per epoch it logs the train and
test bounds (nats per point), the learning rate, throughput (points per
second), the mean gradient norm over the epoch's steps and the seconds spent;
images of samples from the model and of test points above their reconstructions
every ``images_every`` epochs (for image data); and, once, the run's
configuration as hyper-parameters. :meth:`Tracker.log_evaluation` logs an
evaluation (the NLL with its standard error, the median ESS and k-hat and the share
of points with k-hat above 0.7).

TensorBoard and MLflow are optional: ``pip install 'pyro-iwae[tensorboard]'`` or
``'pyro-iwae[mlflow]'``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PyroIwaeError, one_line
from . import distributed
from .callbacks import FitCallback, StepInfo
from .checkpoints import RunError, check_writable
from .eval_results import Evaluation
from .mlflow_store import (
    LOCAL_STORE,
    MLFLOW_DB,
    param_text,
    params_to_log,
    quick_requests,
    remembered_run,
)
from .plots import image_grid, reconstruction_grid

__all__ = [
    "CSVTracker",
    "MLflowTracker",
    "TRACKERS",
    "TensorBoardTracker",
    "Tracker",
    "TrackingError",
    "log_evaluation",
    "make_trackers",
    "trackers_of",
]

#: Where each tracker writes inside a run directory.
TENSORBOARD_DIR = "tensorboard"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_RUN_FILE = "mlflow-run.json"
CSV_FILE = "tracking.csv"
CSV_EVALUATION_FILE = "tracking-evaluation.csv"

#: What each tracker writes in, or adds to, inside a run directory.
_FILES = {  # the first: what a fit's tracker leaves (see trackers_of)
    "tensorboard": (TENSORBOARD_DIR,),
    "mlflow": (MLFLOW_RUN_FILE, MLFLOW_DB, MLFLOW_ARTIFACTS),
    "csv": (CSV_FILE, CSV_EVALUATION_FILE, "images", "tracking-config.json"),
}

#: How many samples and test points the images show.
NUM_IMAGES = 32


class TrackingError(PyroIwaeError):
    """A tracker that cannot start: its library is missing, or a bad name."""


def _require(module: str, extra: str) -> Any:
    """``module``, or a one-line error naming the extra that installs it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise TrackingError(
            f"the {extra} logger needs the {extra} package: "
            f"pip install 'pyro-iwae[{extra}]'"
        ) from e


class Tracker(FitCallback):
    """What every tracker logs; subclasses say how (:meth:`log_scalars`,
    :meth:`log_params`, :meth:`log_image`).

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

    def close(self) -> None:
        """Writes what is buffered and ends the run."""

    def interrupted(self) -> None:
        """The run stopped before its last epoch (Ctrl-C): writes what is
        buffered; a resume goes on logging."""
        self.close()

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

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
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
        self.log_image("samples", image_grid(samples, image_shape=shape), step)
        picture = reconstruction_grid(x, recon, image_shape=shape)
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
        self.log_scalars(_finite(values), step)
        self.close()


class TensorBoardTracker(Tracker):
    """Event files for TensorBoard in ``log_dir`` (``tensorboard --logdir``)."""

    def __init__(self, log_dir: str | os.PathLike, images_every: int = 5) -> None:
        super().__init__(images_every)
        tensorboard = _require("torch.utils.tensorboard", "tensorboard")
        self.log_dir = Path(log_dir)
        self.writer = tensorboard.SummaryWriter(str(self.log_dir))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        texts = {k: param_text(v) for k, v in params.items()}
        self.writer.add_text(
            "config", "\n".join(f"    {k}: {v}" for k, v in texts.items())
        )
        # Numbers, strings and booleans as they are, the others as text.
        hparams = {
            k: v if isinstance(v, (bool, int, float, str)) else texts[k]
            for k, v in params.items()
        }
        # run_name="." keeps the hyper-parameters in this run's folder.
        self.writer.add_hparams(hparams, {}, run_name=".")

    def log_image(self, name: str, picture: torch.Tensor, step: int) -> None:
        self.writer.add_image(name, picture, step)

    def close(self) -> None:
        self.writer.flush()


class MLflowTracker(Tracker):
    """An MLflow run: metrics, the configuration as parameters, images as
    artifacts.

    :param tracking_uri: a tracking server's URI (``http://host:5000``), or a
        local store; default: ``$MLFLOW_TRACKING_URI`` if set, else a local
        SQLite store, ``run_dir/mlflow.db``, with the images in
        ``run_dir/mlartifacts`` (MLflow's own file store is deprecated).
    :param run_dir: the run directory; it remembers the MLflow run
        (``mlflow-run.json``), so that a resumed fit and ``eval-nll`` log into
        the same MLflow run.
    :param experiment: the MLflow experiment's name.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        experiment: str = "pyro-iwae",
        images_every: int = 5,
    ) -> None:
        super().__init__(images_every)
        tracking = _require("mlflow.tracking", "mlflow")
        self.run_dir = Path(run_dir)
        remembered = self.run_dir / MLFLOW_RUN_FILE
        previous = remembered_run(remembered)
        if tracking_uri is None:
            tracking_uri = previous.get("tracking_uri") or os.environ.get(
                "MLFLOW_TRACKING_URI"
            )
        local = tracking_uri in (None, LOCAL_STORE)
        # The run directory's own store is remembered as such, not by its path:
        # a copied or moved run logged into the database of the original.
        remembered_uri = LOCAL_STORE if local else tracking_uri
        if local:
            tracking_uri = f"sqlite:///{(self.run_dir / MLFLOW_DB).resolve()}"
            self.run_dir.mkdir(parents=True, exist_ok=True)  # for the database
        self.tracking_uri = tracking_uri
        with warnings.catch_warnings(), quick_requests():
            # SQLAlchemy's deprecation warnings about MLflow's own store code.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = tracking.MlflowClient(tracking_uri)
            try:
                self.client.search_experiments(max_results=1)  # sets up the store
            except Exception as e:  # MLflow's own, or its store's, errors
                raise TrackingError(
                    f"the mlflow logger cannot use {tracking_uri} ({one_line(e)}); "
                    "start its server, or unset MLFLOW_TRACKING_URI to log into "
                    "the run directory"
                ) from e
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if previous.get("tracking_uri") == remembered_uri:
            self.run_id = previous["run_id"]
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except Exception as e:  # MLflow's own errors: the run is not there
                raise TrackingError(
                    f"the mlflow logger cannot find run {self.run_id}, which "
                    f"{remembered} names, in {tracking_uri} ({one_line(e)}); "
                    f"delete {remembered} to log into a new MLflow run"
                ) from e
        else:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                artifacts = self.run_dir.resolve() / MLFLOW_ARTIFACTS
                experiment_id = self.client.create_experiment(
                    experiment, artifact_location=artifacts.as_uri() if local else None
                )
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name)
            self.run_id = run.info.run_id
            remembered.write_text(
                json.dumps({"tracking_uri": remembered_uri, "run_id": self.run_id})
            )

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        texts = {k: param_text(v) for k, v in params.items()}
        # MLflow refuses to change a parameter: a resume that changed settings
        # logs them as resume.<n>.<key>.
        new = [Param(k, v) for k, v in params_to_log(logged, texts).items()]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def log_image(self, name: str, picture: torch.Tensor, step: int) -> None:
        array = (picture.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        self.client.log_image(self.run_id, array, f"{name}/epoch-{step:04d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)

    def interrupted(self) -> None:
        # Not left RUNNING; a resume marks it RUNNING again.
        self.client.set_terminated(self.run_id, status="KILLED")


class CSVTracker(Tracker):
    """One CSV row per epoch (``tracking.csv``) and per evaluation
    (``tracking-evaluation.csv``) in ``log_dir``; images as PNG files in
    ``log_dir/images``, the configuration in ``log_dir/tracking-config.json``."""

    def __init__(self, log_dir: str | os.PathLike, images_every: int = 5) -> None:
        super().__init__(images_every)
        self.log_dir = Path(log_dir)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        evaluation = any(name.startswith("eval_") for name in values)
        path = self.log_dir / (CSV_EVALUATION_FILE if evaluation else CSV_FILE)
        row = {"step": step, **values}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
        else:
            header = []
        fields = header + [k for k in row if k not in header]
        if fields != header and path.exists():
            # A new column: rewrite the file with it.
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fields)
                writer.writeheader()
                writer.writerows(rows)
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fields)
            if not path.stat().st_size:
                writer.writeheader()
            writer.writerow(row)

    def log_params(self, params: dict[str, Any]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "tracking-config.json"
        path.write_text(json.dumps(params, indent=1) + "\n")

    def log_image(self, name: str, picture: torch.Tensor, step: int) -> None:
        from torchvision.utils import save_image

        path = self.log_dir / "images" / f"{name}-epoch-{step:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(picture, path)


#: The trackers by the names ``fit --logger`` takes.
TRACKERS = ("tensorboard", "mlflow", "csv")


def make_trackers(
    names: Sequence[str],
    run_dir: str | os.PathLike,
    *,
    images_every: int = 5,
    mlflow_uri: str | None = None,
) -> list[Tracker]:
    """The trackers ``names`` (of :data:`TRACKERS`) of the run in ``run_dir``,
    writing inside it (MLflow: see :class:`MLflowTracker`). Under torchrun, only
    rank 0 tracks: other ranks get none.

    :raises TrackingError: for an unknown name or a missing library.
    """
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackingError(
            f"unknown logger {unknown[0]!r}; choose from {', '.join(TRACKERS)}"
        )
    if not distributed.is_main():
        return []
    run_dir = Path(run_dir)
    for name in names:  # said now, not after an epoch its tracker fails to log
        for path in (run_dir, *(run_dir / file for file in _FILES[name])):
            try:
                check_writable(path, f"leave out --logger {name}")
            except RunError as e:
                raise TrackingError(f"the {name} logger {e}") from e
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir / TENSORBOARD_DIR, images_every))
        elif name == "mlflow":
            trackers.append(
                MLflowTracker(run_dir, mlflow_uri, images_every=images_every)
            )
        else:
            trackers.append(CSVTracker(run_dir, images_every))
    return trackers


def trackers_of(run_dir: str | os.PathLike) -> list[str]:
    """The trackers (of :data:`TRACKERS`) whose files the run in ``run_dir``
    holds: those an earlier fit of it logged to."""
    return [
        name for name, files in _FILES.items() if (Path(run_dir) / files[0]).exists()
    ]


def log_evaluation(
    names: Sequence[str],
    run_dir: str | os.PathLike,
    result: Evaluation | dict[str, Any],
    *,
    mlflow_uri: str | None = None,
) -> None:
    """Logs an evaluation of the run in ``run_dir`` (see
    :meth:`Tracker.log_evaluation`) to the trackers ``names``, at the step of
    the run's last epoch (0 for an untrained run)."""
    from .checkpoints import read_metrics

    if not names:
        return  # nothing to log, and the metrics need not be read
    metrics = (
        read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").exists() else []
    )
    step = metrics[-1]["epoch"] if metrics else 0
    for tracker in make_trackers(names, run_dir, images_every=0, mlflow_uri=mlflow_uri):
        tracker.log_evaluation(result, step)


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


def _millis() -> int:
    import time

    return int(time.time() * 1000)
