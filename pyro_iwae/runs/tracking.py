"""Experiment tracking: :func:`pyro_iwae.fit`'s progress and ``eval-nll``'s
results to TensorBoard, MLflow or CSV files.

A tracker is a :class:`~pyro_iwae.FitCallback`: pass it to :func:`~pyro_iwae.fit`
or :func:`~pyro_iwae.train_run` (several at once in a
:class:`~pyro_iwae.runs.callbacks.CallbackList`). Per epoch it logs the train and
test bounds (nats per point), the learning rate, throughput (points per
second), the mean gradient norm over the epoch's steps and the seconds spent;
images of samples from the model and of test points above their reconstructions
every ``images_every`` epochs (for image data); and, at the start of each fit,
the run's configuration as hyper-parameters. :meth:`Tracker.log_evaluation`
logs an evaluation (the NLL with its standard error, the median ESS and k-hat
and the share of points with k-hat above 0.7), once: a repeat replaces it or is
not logged again. The base class :class:`Tracker` is in
``pyro_iwae.runs.tracker``.

TensorBoard and MLflow are optional: ``pip install 'pyro-iwae[tensorboard]'`` or
``'pyro-iwae[mlflow]'``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PyroIwaeError, literal, one_line
from . import distributed
from .checkpoints import RunError, check_writable
from .config import CONFIG_FILE
from .eval_results import Evaluation
from .mlflow_store import (
    LOCAL_STORE,
    MLFLOW_DB,
    forget_store,
    param_text,
    params_to_log,
    quick_requests,
    remembered_run,
)
from .tracker import Tracker

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
CSV_CONFIG_FILE = "tracking-config.json"

#: What each tracker writes in, or adds to, inside a run directory.
_FILES = {  # the first: what a fit's tracker leaves (see trackers_of)
    "tensorboard": (TENSORBOARD_DIR,),
    "mlflow": (MLFLOW_RUN_FILE, MLFLOW_DB, MLFLOW_ARTIFACTS),
    "csv": (CSV_FILE, CSV_EVALUATION_FILE, "images", CSV_CONFIG_FILE),
}


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


class TensorBoardTracker(Tracker):
    """Event files for TensorBoard in ``log_dir`` (``tensorboard --logdir``).

    The event file is opened when it first logs: a fit refused before it starts
    adds none to a run's folder."""

    def __init__(self, log_dir: str | os.PathLike, images_every: int = 5) -> None:
        super().__init__(images_every)
        self._tensorboard = _require("torch.utils.tensorboard", "tensorboard")
        self.log_dir = Path(log_dir)
        found = self.log_dir.is_dir()
        self._found = set(self.log_dir.iterdir()) if found else set()
        self.make_dir(self.log_dir, whole=True)
        self._writer = None

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, made on first use."""
        if self._writer is None:
            self._writer = self._tensorboard.SummaryWriter(str(self.log_dir))
        return self._writer

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

    def logged(self, name: str, value: float, step: int) -> bool:
        from tensorboard.backend.event_processing import event_accumulator

        self.writer.flush()
        kinds = ("images", "audio", "histograms", "tensors", "compressedHistograms")
        found = event_accumulator.EventAccumulator(
            str(self.log_dir), size_guidance=dict.fromkeys(kinds, 1)
        ).Reload()
        if name not in found.Tags()["scalars"]:
            return False
        value = float(
            torch.tensor(value, dtype=torch.float32)
        )  # as TensorBoard keeps it
        return any(e.step == step and e.value == value for e in found.Scalars(name))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def _keep(self) -> None:
        super()._keep()
        self._found = set(self.log_dir.iterdir())

    def discard(self) -> None:
        if self.discarded:
            return
        if self._writer is not None:
            self._writer.close()
        # In a folder it found: the event files it wrote, not the others.
        for path in set(self.log_dir.glob("events.out.tfevents.*")) - self._found:
            path.unlink(missing_ok=True)
        super().discard()


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

    A tracking server is reached at once; the MLflow run (and a local store)
    is opened when it first logs: a fit refused before it starts (another
    process writes the run, or it holds a run already) marks none RUNNING.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tracking_uri: str | None = None,
        experiment: str = "pyro-iwae",
        images_every: int = 5,
    ) -> None:
        super().__init__(images_every)
        self._tracking = _require("mlflow.tracking", "mlflow")
        self.run_dir = Path(run_dir)
        self.experiment = experiment
        remembered = self.run_dir / MLFLOW_RUN_FILE
        self._previous = remembered_run(remembered)
        #: The MLflow run it made (None: one it found), and what
        #: mlflow-run.json said before: see discard.
        self._made_run: str | None = None
        self._remembered = remembered.read_bytes() if remembered.is_file() else None
        self._run_id: str | None = None
        if tracking_uri is None:
            tracking_uri = self._previous.get("tracking_uri") or os.environ.get(
                "MLFLOW_TRACKING_URI"
            )
        self._local = tracking_uri in (None, LOCAL_STORE)
        if self._local:
            tracking_uri = f"sqlite:///{(self.run_dir / MLFLOW_DB).resolve()}"
        self.tracking_uri: str = tracking_uri
        self.client: Any = None
        if not self._local:
            self._open()  # a server out of reach is said now, before training
        # Made now, not when the run opens: made after the other trackers'
        # files, it was removed before them (discard goes last made first),
        # and, not empty then, stayed.
        self.make_dir(self.run_dir)

    @property
    def run_id(self) -> str:
        """The MLflow run it logs into, opened at the first call: the one
        mlflow-run.json names in its store (marked RUNNING), or a new one."""
        if self._run_id is None:
            try:
                self._start()
            except BaseException:
                self.discard()  # what it made of a run it cannot start
                raise
        assert self._run_id is not None
        return self._run_id

    def _open(self) -> None:
        """Opens the store (a local one is made)."""
        with warnings.catch_warnings(), quick_requests():
            # SQLAlchemy's deprecation warnings about MLflow's own store code.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = self._tracking.MlflowClient(self.tracking_uri)
            try:
                self.client.search_experiments(max_results=1)  # sets up the store
            except Exception as e:  # MLflow's own, or its store's, errors
                raise TrackingError(
                    f"the mlflow logger cannot use {self.tracking_uri} "
                    f"({one_line(e)}); start its server, or unset "
                    "MLFLOW_TRACKING_URI to log into the run directory"
                ) from e

    def _start(self) -> None:
        """Opens the MLflow run: the one mlflow-run.json names in this store, or
        a new one."""
        remembered = self.run_dir / MLFLOW_RUN_FILE
        if self._local:
            self.note_made(self.run_dir / MLFLOW_DB)
            self.note_made(self.run_dir / MLFLOW_ARTIFACTS, whole=True)
            self._open()
        # The run directory's own store is remembered as such, not by its path:
        # a copied or moved run logged into the database of the original.
        remembered_uri = LOCAL_STORE if self._local else self.tracking_uri
        if self._previous.get("tracking_uri") == remembered_uri:
            run_id = self._previous["run_id"]
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception as e:  # MLflow's own errors: the run is not there
                raise TrackingError(
                    f"the mlflow logger cannot find run {run_id}, which "
                    f"{remembered} names, in {self.tracking_uri} ({one_line(e)}); "
                    f"delete {remembered} to log into a new MLflow run"
                ) from e
            self._run_id = run_id
            return
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = self.run_dir.resolve() / MLFLOW_ARTIFACTS
            experiment_id = self.client.create_experiment(
                self.experiment,
                artifact_location=artifacts.as_uri() if self._local else None,
            )
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name)
        self._run_id = self._made_run = run.info.run_id
        self.note_made(remembered)
        remembered.write_text(
            json.dumps({"tracking_uri": remembered_uri, "run_id": self._run_id})
        )

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        run_id, now = self.run_id, _millis()
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(run_id, metrics=metrics)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        run_id = self.run_id
        logged = self.client.get_run(run_id).data.params
        texts = {k: param_text(v) for k, v in params.items()}
        # MLflow refuses to change a parameter: a resume that changed settings
        # logs them as resume.<n>.<key>.
        new = [Param(k, v) for k, v in params_to_log(logged, texts).items()]
        if new:
            self.client.log_batch(run_id, params=new)

    def log_image(self, name: str, picture: torch.Tensor, step: int) -> None:
        run_id = self.run_id
        array = (picture.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
        self.client.log_image(run_id, array, f"{name}/epoch-{step:04d}.png")

    def logged(self, name: str, value: float, step: int) -> bool:
        run_id = self.run_id
        history = self.client.get_metric_history(run_id, name)
        return any(m.step == step and m.value == value for m in history)

    def close(self) -> None:
        if not self.discarded and self._run_id is not None:  # else none opened
            self.client.set_terminated(self._run_id)

    def interrupted(self) -> None:
        # Not left RUNNING; a resume marks it RUNNING again.
        if not self.discarded and self._run_id is not None:
            self.client.set_terminated(self._run_id, status="KILLED")

    def _keep(self) -> None:
        super()._keep()
        self._made_run = self._remembered = None

    def discard(self) -> None:
        if self.discarded:
            return  # its store may be gone: not to be opened again
        db = self.run_dir / MLFLOW_DB
        if any(path == db for path, _ in self._made):
            # Its database goes with the file; MLflow's engine of it too, else a
            # later tracker of this process logged into the removed file.
            forget_store(self.tracking_uri)
        elif self._made_run is not None:
            with contextlib.suppress(Exception):  # MLflow's own, or its store's
                self.client.delete_run(self._made_run)
        if self._remembered is not None and self._made_run is not None:
            # The MLflow run of another store it remembered, as it was.
            with contextlib.suppress(OSError):
                (self.run_dir / MLFLOW_RUN_FILE).write_bytes(self._remembered)
        super().discard()


class CSVTracker(Tracker):
    """One CSV row per epoch (``tracking.csv``) and per evaluation
    (``tracking-evaluation.csv``) in ``log_dir``; images as PNG files in
    ``log_dir/images``, the configuration in ``log_dir/tracking-config.json``.
    A new run refuses a ``log_dir`` that holds such files it did not make."""

    def __init__(self, log_dir: str | os.PathLike, images_every: int = 5) -> None:
        super().__init__(images_every)
        self.log_dir = Path(log_dir)

    def on_run_start(self, run_dir: Path, resume: bool) -> None:
        # A new run's files are its own: a user's tracking.csv gained the run's
        # rows and tracking-config.json was written over (and, the run
        # discarded, kept with the run's content).
        if resume:
            return
        config = self.log_dir / CSV_CONFIG_FILE
        images = self.log_dir / "images"
        found = [self.log_dir / CSV_FILE, self.log_dir / CSV_EVALUATION_FILE]
        found += sorted(images.glob("samples-epoch-*.png"))
        found += sorted(images.glob("reconstructions-epoch-*.png"))
        if (Path(run_dir) / CONFIG_FILE).is_file():
            # The run's folder passed as a new run's: a run stopped (killed)
            # before its first checkpoint left this, to go with the run's.
            if config.is_file():
                self._made.append((config, False))
        else:
            found.append(config)
        for path in found:
            if path.exists():
                raise TrackingError(
                    f"the csv logger of a new run would write over "
                    f"{literal(path)}, which it did not make; move that away, "
                    "or choose another run directory ({run_dir})",
                    template=True,
                )

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        evaluation = any(name.startswith("eval_") for name in values)
        path = self.log_dir / (CSV_EVALUATION_FILE if evaluation else CSV_FILE)
        row = {"step": step, **values}
        self.make_dir(self.log_dir)
        self.note_made(path)
        if path.exists():
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
        else:
            header = []
        fields = header + [k for k in row if k not in header]
        rows: list[dict[str, str]] = []
        if path.exists() and (evaluation or fields != header):
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        # A repeated evaluation replaces its row (as it does its JSON): the
        # row of its step that holds its columns, named after its file.
        kept = [
            r
            for r in rows
            if not (evaluation and r["step"] == str(step) and _holds(r, values))
        ]
        if path.exists() and (fields != header or len(kept) < len(rows)):
            # A new column, or a row replaced: rewrite the file.
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fields)
                writer.writeheader()
                writer.writerows(kept)
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fields)
            if not path.stat().st_size:
                writer.writeheader()
            writer.writerow(row)

    def log_params(self, params: dict[str, Any]) -> None:
        self.make_dir(self.log_dir)
        path = self.log_dir / CSV_CONFIG_FILE
        self.note_made(path)
        path.write_text(json.dumps(params, indent=1) + "\n")

    def log_image(self, name: str, picture: torch.Tensor, step: int) -> None:
        from torchvision.utils import save_image

        path = self.log_dir / "images" / f"{name}-epoch-{step:04d}.png"
        self.make_dir(path.parent)
        self.note_made(path)
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
    try:
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                trackers.append(
                    TensorBoardTracker(run_dir / TENSORBOARD_DIR, images_every)
                )
            elif name == "mlflow":
                trackers.append(
                    MLflowTracker(run_dir, mlflow_uri, images_every=images_every)
                )
            else:
                trackers.append(CSVTracker(run_dir, images_every))
    except BaseException:
        for tracker in reversed(trackers):  # those made: their files go
            tracker.discard()
        raise
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


def _holds(row: dict[str, str], values: dict[str, float]) -> bool:
    """Whether the CSV ``row`` holds any of the columns of ``values``."""
    return any(row.get(name) for name in values)


def _millis() -> int:
    import time

    return int(time.time() * 1000)
