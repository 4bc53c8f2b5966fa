"""Where downloaded data go, and downloads that leave nothing of their own
behind when they fail."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def default_data_dir() -> Path:
    """Folder for downloaded data: ``$PYRO_IWAE_DATA``, else the user cache."""
    if "PYRO_IWAE_DATA" in os.environ:
        return Path(os.environ["PYRO_IWAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyro-iwae"


@contextlib.contextmanager
def undone_on_error(folder: Path) -> Iterator[None]:
    """On an exception, removes what the block added under ``folder`` (files and
    folders that were not there before, ``folder`` and its missing parents
    included), then re-raises; what was there stays."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    before = set(folder.rglob("*")) if folder.exists() else set()
    try:
        yield
    except BaseException:
        if missing:
            # The topmost folder the block made holds only what the block added.
            shutil.rmtree(missing[-1], ignore_errors=True)
        else:
            for path in sorted(set(folder.rglob("*")) - before, reverse=True):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
