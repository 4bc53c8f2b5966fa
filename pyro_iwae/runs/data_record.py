"""The data file a run trains on, recorded in the run directory by its contents'
digest (``data.json``), so that a file whose contents changed since is refused,
not silently trained or evaluated on. Built-in data sets are not recorded: their
loaders check their own files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..data import is_data_file
from ..errors import DataError
from .checkpoints import write_json

__all__ = ["DATA_RECORD", "check_data", "digest", "is_recorded", "record_data"]

#: The file, in a run directory, that records the run's data file.
DATA_RECORD = "data.json"


def digest(path: str | os.PathLike) -> str:
    """The SHA-256 of the file's bytes, in hex."""
    hashed = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            hashed.update(block)
    return hashed.hexdigest()


def record_data(run_dir: Path, dataset: str) -> None:
    """Records the data file ``dataset`` (nothing for a built-in data set)."""
    if is_data_file(dataset):
        record = {"dataset": str(dataset), "sha256": digest(dataset)}
        write_json(run_dir / DATA_RECORD, record)


def is_recorded(run_dir: Path, dataset: str) -> bool | None:
    """Whether ``dataset`` holds what the run recorded (a moved file does);
    None where the run recorded nothing (a built-in data set, or a run older
    than the record), or the file cannot be read (its loader says why)."""
    try:
        recorded = json.loads((run_dir / DATA_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
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
