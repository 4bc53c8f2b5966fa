"""The files of a run directory that training writes: checkpoints and metrics.

- ``checkpoint.pt``: parameters, optimizer state, schedule position and random
  states after the last finished epoch (or step), loaded with
  ``torch.load(weights_only=True)``, so a checkpoint never executes code;
- ``metrics.jsonl``: one JSON object per finished epoch (see
  :func:`pyro_iwae.fit`).

Every file is written atomically (:func:`atomic_write`), so a killed process
leaves the old file or the new one, never a partial one.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ..errors import CheckpointError, RunError, one_line
from . import locks

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "CheckpointError",
    "RunError",
    "append_metrics",
    "atomic_write",
    "check_writable",
    "load_checkpoint",
    "load_resumed",
    "load_trained",
    "load_state",
    "read_metrics",
    "restore_rng",
    "resumed_metrics",
    "rng_state",
    "save_checkpoint",
    "write_json",
    "write_metrics",
    "write_text",
]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"

_CHECKPOINT_FORMAT = "pyro-iwae-checkpoint"
_CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = {"version", "model", "guide", "optimizer", "position", "rng", "fit"}


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
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


def check_writable(
    path: Path, advice: str = "copy the run to a folder you can write in"
) -> None:
    """:raises RunError: where no file can be made in the folder ``path``, or
    the file ``path`` cannot be added to (read-only): said before the work whose
    results would go there, not after it. Nothing is checked where ``path``
    does not exist."""
    try:
        if path.is_dir():
            with tempfile.TemporaryFile(dir=path):
                pass
        elif path.exists():
            with open(path, "ab"):
                pass
    except OSError as e:
        raise RunError(
            f"cannot write in {path} ({e.strerror or one_line(e)}); make it "
            f"writable, or {advice}"
        ) from e


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically, a NaN or infinite
    number as null (strict JSON has none)."""
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    """``obj`` with its NaN and infinite floats (in dicts and lists) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(value) for value in obj]
    return obj


# ---------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, contents: dict[str, Any]) -> None:
    """Writes ``contents`` atomically as a checkpoint for :func:`load_checkpoint`.

    ``contents`` holds ``model``, ``guide``, ``optimizer``, ``position``, ``rng``
    and ``fit`` (see :func:`pyro_iwae.fit`), and may hold more; only tensors and
    plain Python values, as ``weights_only`` loading reads no others.
    """
    state = {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, **contents}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(
    path: str | os.PathLike,
    map_location: torch.device | str | None = None,
    mmap: bool = False,
) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`pyro_iwae.fit`, without executing any
    code; with ``mmap`` its tensors are mapped from the file, read only where
    used (for a look at its counts).

    :raises CheckpointError: if the file is missing, truncated, corrupt or not a
        pyro-iwae checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass the checkpoint of a run that finished "
            "at least one epoch"
        )
    try:
        checkpoint = torch.load(
            path, map_location=map_location, weights_only=True, mmap=mmap
        )
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


def load_trained(
    path: str | os.PathLike, map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """:func:`load_checkpoint` of a run to read (evaluate, sample): where it has
    none yet and another process is training it, says so.

    :raises CheckpointError: see :func:`load_checkpoint`.
    """
    path = Path(path)
    # The writer's lock of pyro_iwae.runs.run_writer, held while a fit trains.
    trainer = None if path.is_file() else locks.held(path.parent, locks.WRITER)
    if trainer is not None:
        raise CheckpointError(
            f"{path.parent} is being trained and has no checkpoint yet "
            f"({trainer or 'its writer lock is taken'}); wait for its first "
            "epoch to end"
        )
    if not path.is_file():  # said as to a reader, who has no run to start
        raise CheckpointError(
            f"no checkpoint at {path}: its run never finished an epoch; start it "
            "afresh and train it for one, or pass the directory of a run that has"
        )
    return load_checkpoint(path, map_location)


def load_resumed(
    path: str | os.PathLike, map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """:func:`load_checkpoint` of a run to resume (``fit``): where it has none,
    says to start the run afresh.

    :raises CheckpointError: see :func:`load_checkpoint`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path} to resume: its run never finished an epoch; "
            "start it afresh (without resume=True)"
        )
    return load_checkpoint(path, map_location)


def trained_steps(checkpoint: dict[str, Any]) -> int | None:
    """The training steps, over all epochs, that ``checkpoint`` holds the result
    of (None: it does not say): what tells one state of a run from a later one."""
    position = checkpoint.get("position")
    steps = position.get("global_step") if isinstance(position, dict) else None
    return steps if isinstance(steps, int) else None


def load_state(module: torch.nn.Module, state: Any, what: str, path: Path) -> None:
    """Loads ``state``, the ``what`` (model or guide) of checkpoint ``path``,
    into ``module``.

    :raises CheckpointError: if the state is of another architecture or holds
        values that are not finite (fit never saves those).
    """
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {path} holds a {what} of another architecture "
            f"({one_line(e)[:200]}); use the run directory that wrote it, or start "
            "a new run"
        ) from e
    for name, value in state.items():
        if value.is_floating_point() and not value.isfinite().all():
            raise CheckpointError(
                f"checkpoint {path} holds values that are not finite in {what} "
                f"{name!r}; it was altered after training: start a new run"
            )


def rng_state(device: torch.device, data_rng: torch.Tensor) -> dict[str, Any]:
    """Torch's random states for a checkpoint, with ``data_rng``, the state of the
    generator of mini-batch order and binarisation."""
    state = {
        "device": str(device),
        "torch": torch.get_rng_state(),
        "cuda": None,
        "data": data_rng,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(
    state: dict[str, Any], device: torch.device, generator: torch.Generator
) -> torch.Tensor | None:
    """Restores the random states of :func:`rng_state`; returns the data
    generator's state to resume from, or None where ``generator`` is reseeded.

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


# ---------------------------------------------------------------------------
# Metrics


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


def resumed_metrics(run_dir: Path, epochs_done: int) -> list[dict[str, Any]]:
    """The metrics of the ``epochs_done`` epochs that a run's checkpoint finished
    (a later line, of an epoch whose checkpoint was never written, left out).

    :raises RunError: where the file records fewer (deleted, or cut short by
        hand): resumed, the run would keep a record without them.
    """
    history = read_metrics(run_dir, limit=epochs_done)
    if len(history) < epochs_done:
        raise RunError(
            f"{Path(run_dir) / METRICS_FILE} records {len(history)} of the "
            f"{epochs_done} epochs that the checkpoint finished; put the file back, "
            "or start a new run"
        )
    return history


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Replaces the metrics file of ``run_dir`` by ``history``, one line an epoch."""
    write_text(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in history))


def append_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Adds one epoch's ``metrics`` to the metrics file of ``run_dir``.

    An append, not an atomic rewrite: a line cut short by a kill is dropped on
    resume, which reads only the epochs of the checkpoint.
    """
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(metrics) + "\n")
