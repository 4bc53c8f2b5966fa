"""Locks on folders that one process (group) at a time may write: a run of a
grid, a run directory being trained. See :func:`hold`."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from . import distributed

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = [
    "HAS_FILE_LOCKS",
    "WRITER",
    "held",
    "hold",
    "hold_for_ranks",
    "holder",
    "waiting",
]

#: Whether this system has ``fcntl.flock`` (not Windows).
HAS_FILE_LOCKS = fcntl is not None
#: The name of the lock a run's writer holds in the run directory.
WRITER = "writer"


@contextmanager
def hold_for_ranks(folder: Path, name: str) -> Iterator[str | None]:
    """:func:`hold`, taken by rank 0 for all the ranks under torchrun; yields
    None if this process (group) holds ``name``, else who holds it."""
    main = distributed.is_main()
    with hold(folder, name) if main else nullcontext(None) as holder:
        yield distributed.from_main(lambda: holder)


@contextmanager
def waiting(folder: Path, name: str) -> Iterator[None]:
    """Holds ``.<name>.lock`` of ``folder`` while the body runs, waiting for
    another process that holds it (a short step, such as choosing a file's name
    and writing it); removed after where this process made it; without file
    locks (Windows), runs the body as it is."""
    if fcntl is None:
        yield
        return
    path = folder / f".{name}.lock"
    lock, made = _locked(path, wait=True)
    try:
        yield
    finally:
        _let_go(path, lock, made)  # an evaluated run's folder kept it


@contextmanager
def hold(folder: Path, name: str) -> Iterator[str | None]:
    """Holds ``name`` of ``folder`` (a run of a grid, the writer of a run
    directory) while the body runs; yields None, or if another process holds
    it, who (``""`` when unknown). Taken again by the
    process that holds it, it yields who holds it: this process.

    Two locks, both needed:

    - ``.<name>.lock``, an ``fcntl.flock``: between the processes of one
      machine; the operating system releases it when a process dies. Not
      reliable between machines on NFS. Removed when the body ends where this
      process made it.
    - ``.<name>.claim``, created with ``O_CREAT | O_EXCL`` (atomic on a local
      disk and on NFS version 3 and later) and holding the host, process id and
      start time of its holder; removed when the body ends. Between machines
      that share ``folder``. A claim of a process of this machine that has
      died is taken over (under the flock, so by one process only); a claim of
      another machine stays until that machine's process ends it, or someone
      deletes the file by hand once sure that process is gone.
    """
    folder = Path(folder)
    if not HAS_FILE_LOCKS:  # Windows: the claim file alone
        with _claim(folder / f".{name}.claim", takeover=False) as holder:
            yield holder
        return
    path = folder / f".{name}.lock"
    lock, made = _locked(path)
    if lock is None:
        yield ""
        return
    try:
        with _claim(folder / f".{name}.claim", takeover=True) as holder:
            yield holder
    finally:
        # A folder left as it was found (a new run's interrupted before its
        # first checkpoint kept its lock).
        _let_go(path, lock, made)


def _let_go(path: Path, lock: int, made: bool) -> None:
    """Lets go of the flocked lock file ``path`` (descriptor ``lock``), removed
    first where this process ``made`` it: a process that opened it meanwhile
    sees it gone (:func:`_locked`) and makes it afresh."""
    if made:
        path.unlink(missing_ok=True)
    fcntl.flock(lock, fcntl.LOCK_UN)
    os.close(lock)


def _locked(path: Path, wait: bool = False) -> tuple[int | None, bool]:
    """The descriptor of the lock file ``path``, flocked by this process, and
    whether this process made the file; None if another process holds it (or
    with ``wait``, once it lets go)."""
    while True:
        try:
            fd, made = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), True
        except FileExistsError:
            try:
                fd, made = os.open(path, os.O_WRONLY), False
            except FileNotFoundError:
                continue  # removed by its holder as it let go: made afresh
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None, False
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, made
        os.close(fd)  # its holder removed it as it let go: locked a file now gone


def holder(folder: Path, name: str) -> str:
    """Who holds ``name`` of ``folder``, as far as its claim file tells
    (``""`` when it tells nothing)."""
    path = Path(folder) / f".{name}.claim"
    claim = _read_claim(path)
    return "" if claim is None else _holder_text(claim, path)


def held(folder: Path, name: str) -> str | None:
    """Who holds ``name`` of ``folder``, as its claim file tells (see
    :func:`holder`); None where no process does: no claim, or the claim of a
    process of this machine that has died."""
    path = Path(folder) / f".{name}.claim"
    if not path.exists():
        return None
    claim = _read_claim(path)
    if _claim_is_dead(claim, socket.gethostname()):
        return None
    return _holder_text(claim, path)


@contextmanager
def _claim(path: Path, takeover: bool) -> Iterator[str | None]:
    """Creates the claim file ``path`` exclusively for the body; yields None, or
    who holds it if it exists (see :func:`hold`)."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for attempt in (1, 2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_claim(path)
            if takeover and attempt == 1 and _claim_is_dead(holder, me["host"]):
                path.unlink(missing_ok=True)
                continue
            yield _holder_text(holder, path)
            return
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        break
    try:
        yield None
    finally:
        if _read_claim(path) == me:
            path.unlink(missing_ok=True)


def _read_claim(path: Path) -> dict[str, Any] | None:
    try:
        claim = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or being written
    return claim if isinstance(claim, dict) else None


def _claim_is_dead(claim: dict[str, Any] | None, host: str) -> bool:
    """Whether ``claim`` is of a process of this ``host`` that no longer runs."""
    if claim is None or claim.get("host") != host:
        return False
    try:
        os.kill(int(claim["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False


def _holder_text(claim: dict[str, Any] | None, path: Path) -> str:
    if claim is None:
        # Empty or cut short: most likely left by a process killed as it wrote it.
        return (
            f"claimed in {path}, which is unreadable; delete it if no process is "
            "at work"
        )
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.get("since", 0)))
    return (
        f"claimed by process {claim.get('pid')} on {claim.get('host')} since "
        f"{since}; delete {path} if that process is gone"
    )
