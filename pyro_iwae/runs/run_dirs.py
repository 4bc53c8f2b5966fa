"""Where runs live in a folder of runs: a fresh run directory named after its
run, and the latest run there."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from ..data import is_data_file
from ..errors import RunError, literal
from .checkpoints import CHECKPOINT_FILE
from .config import CONFIG_FILE, RunConfig

__all__ = ["find_latest_run", "new_run_dir"]


def new_run_dir(
    runs_dir: str | os.PathLike, config: RunConfig, now: datetime | None = None
) -> Path:
    """Creates and returns a fresh folder under ``runs_dir`` for a run of ``config``,
    named ``<YYYYmmdd-HHMMSS>-<dataset>-<objective>-k<k>`` (with a suffix if taken)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    dataset = (
        Path(config.dataset).stem if is_data_file(config.dataset) else config.dataset
    )
    base = f"{stamp}-{dataset}-{config.objective}-k{config.num_particles}"
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = runs_dir / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunError(f"too many runs named {base} in {runs_dir}; pass another folder")


def find_latest_run(runs_dir: str | os.PathLike) -> Path:
    """The run directory under ``runs_dir`` whose checkpoint (or config, before its
    first epoch) was written last.

    :raises RunError: if ``runs_dir`` holds no run.
    """
    runs_dir = Path(runs_dir)
    candidates = []
    if runs_dir.is_dir():
        for path in runs_dir.iterdir():
            for name in (CHECKPOINT_FILE, CONFIG_FILE):
                if (path / name).is_file():
                    candidates.append(((path / name).stat().st_mtime, path.name, path))
                    break
    if not candidates:
        where = (
            f"in {runs_dir}" if runs_dir.is_dir() else f"({runs_dir} does not exist)"
        )
        # {runs_dir} names the setting as the caller spells it (--runs-dir).
        raise RunError(
            f"no run found {literal(where)}; train one with fit, pass a run "
            "directory, or set {runs_dir} to the folder of runs to look in",
            template=True,
        )
    return max(candidates)[2]
