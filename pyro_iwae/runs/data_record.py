"""The data a run trains on, recorded in the run directory (``data.json``), so
that other data are refused, not silently trained or evaluated on as the
run's: of a data file, the SHA-256 of its bytes; of a built-in data set read
from a folder (not the embedded mnist-mini), the folder and a fingerprint of
the points the run used (another folder's files of the same names read as
the same data set)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..data import DATASETS, Dataset, default_data_dir, is_data_file
from ..errors import DataError
from .checkpoints import write_json

__all__ = [
    "DATA_RECORD",
    "check_data",
    "check_dir",
    "check_points",
    "data_folder",
    "digest",
    "fingerprint",
    "is_recorded",
    "record_data",
    "record_or_check",
]

#: The file, in a run directory, that records the run's data.
DATA_RECORD = "data.json"


def digest(path: str | os.PathLike) -> str:
    """The SHA-256 of the file's bytes, in hex."""
    hashed = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hashed.update(block)
    return hashed.hexdigest()


def fingerprint(data: Dataset, train_limit: int | None = None) -> str:
    """The SHA-256, in hex, of the points a run uses of ``data``: its first
    ``train_limit`` (None: all) training points and its test points, with
    their shapes."""
    hashed = hashlib.sha256()
    for x in (data.train[:train_limit], data.test):
        hashed.update(repr(tuple(x.shape)).encode())
        hashed.update(x.detach().cpu().contiguous().numpy())
    return hashed.hexdigest()


def data_folder(dataset: str, data_dir: str | os.PathLike | None) -> str | None:
    """The absolute folder the built-in data set ``dataset`` is read from
    (``data_dir``, None: the default, ``$PYRO_IWAE_DATA`` as it is now); None
    for ``mnist-mini`` and a data file, which read none."""
    if dataset not in DATASETS or dataset == "mnist-mini":
        return None
    folder = default_data_dir() if data_dir is None else Path(data_dir)
    return str(folder.expanduser().resolve())


def check_dir(dataset: str, recorded: str | None) -> None:
    """:raises DataError: where the folder ``recorded``, that a run's fit read
    the built-in data set ``dataset`` from, is gone (a download would make it
    anew, or name a file missing in it)."""
    if recorded is None or data_folder(dataset, recorded) is None:
        return
    if not Path(recorded).expanduser().is_dir():
        raise DataError(
            f"{dataset}: {recorded}, the folder the run's fit read it from (see "
            "its config.json), is gone; pass data_dir=FOLDER, where the data are now"
        )


def record_data(
    run_dir: Path,
    dataset: str,
    data: Dataset | None = None,
    train_limit: int | None = None,
    folder: str | None = None,
) -> None:
    """Records the data file ``dataset``, or the points a run uses of the
    built-in ``data`` (see :func:`fingerprint`) and the ``folder`` they are
    read from."""
    if is_data_file(dataset):
        record = {"dataset": str(dataset), "sha256": digest(dataset)}
    elif data is not None:
        record = {
            "dataset": str(dataset),
            "data_dir": folder,
            "fingerprint": fingerprint(data, train_limit),
        }
    else:
        return
    write_json(run_dir / DATA_RECORD, record)


def _record(run_dir: Path) -> dict | None:
    try:
        record = json.loads((run_dir / DATA_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_recorded(
    run_dir: Path,
    dataset: str,
    data: Dataset | None = None,
    train_limit: int | None = None,
) -> bool | None:
    """Whether ``dataset`` (with its points ``data``, which a built-in data set
    needs, of which a run uses the first ``train_limit`` training points)
    holds what the run recorded (a moved file does); None where the run
    recorded nothing (a run older than the record), or the file cannot be read
    (its loader says why)."""
    record = _record(run_dir) or {}
    if isinstance(points := record.get("fingerprint"), str):
        if record.get("dataset") != str(dataset):
            return False
        return None if data is None else fingerprint(data, train_limit) == points
    recorded = record.get("sha256")
    if not isinstance(recorded, str):
        return None
    if not is_data_file(dataset):
        return False
    try:
        return digest(Path(dataset).expanduser()) == recorded
    except OSError:
        return None


def check_data(run_dir: Path, dataset: str, advice: str) -> bool | None:
    """:func:`is_recorded`, hashing the file once.

    :raises DataError: where the run's data file ``dataset`` no longer holds
        what the run recorded; the message ends in ``advice``.
    """
    recorded = is_recorded(run_dir, dataset)
    if recorded is False:
        raise DataError(
            f"{dataset} has changed since the run was trained on it (its contents "
            f"differ from those recorded in {run_dir / DATA_RECORD}); put the "
            f"file back as it was, or {advice}"
        )
    return recorded


def check_points(
    run_dir: Path,
    data: Dataset,
    train_limit: int | None,
    folder: str | None,
    advice: str,
) -> bool | None:
    """:func:`is_recorded` for the run's own built-in data set ``data``, read
    from ``folder``.

    :raises DataError: where they are not the points the run recorded; the
        message ends in ``advice``.
    """
    recorded = is_recorded(run_dir, data.name, data, train_limit)
    if recorded is False:
        then = (_record(run_dir) or {}).get("data_dir")
        where = f" in {folder}" if folder else ""
        fix = (
            "put its files back as they were"
            if then is None or then == folder
            else f"pass data_dir={then}, where they were"
        )
        raise DataError(
            f"{data.name}{where} holds other points than the run was trained on "
            f"(their fingerprint is recorded in {run_dir / DATA_RECORD}); {fix}, "
            f"or {advice}"
        )
    return recorded


def record_or_check(
    path: Path,
    dataset: str,
    data: Dataset,
    train_limit: int | None,
    folder: str | None,
    resume: bool,
) -> None:
    """Records in run directory ``path`` the data of a new run (a built-in set's
    read from ``folder``, of which ``train_limit`` training points), or on a
    resume checks them against the record (a run made before runs recorded
    them records them now)."""
    advice = "start a new run on it"
    # One hash of the file to check it (it was hashed twice on a resume).
    if folder is not None:  # a built-in data set but the embedded mnist-mini
        if not resume or check_points(path, data, train_limit, folder, advice) is None:
            record_data(path, dataset, data, train_limit, folder)
    elif not resume or check_data(path, dataset, advice) is None:
        record_data(path, dataset)
