"""What :class:`~pyro_iwae.runs.tracking.MLflowTracker` keeps of its MLflow
run: which run the run directory remembers (``mlflow-run.json``), its requests
to a store, and the parameters a resume logs (MLflow refuses to change one)."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LOCAL_STORE", "MLFLOW_DB", "forget_store", "param_text", "params_to_log"]

#: The run directory's own MLflow store.
MLFLOW_DB = "mlflow.db"

#: What ``mlflow-run.json`` says for the run directory's own store.
LOCAL_STORE = "run directory"

#: A parameter that a resume changed: ``resume.<n>.<key>``.
_RESUMED = re.compile(r"resume\.(\d+)\.(.+)")


def param_text(value: Any) -> str:
    """``value`` as an MLflow parameter (text): numbers, strings, booleans and
    None as MLflow's own ``log_param`` writes them (``str``: ``None``,
    ``True``), lists as JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return str(value)
    return json.dumps(value)


def params_to_log(logged: dict[str, str], params: dict[str, str]) -> dict[str, str]:
    """Of ``params`` (key -> text), those to log into an MLflow run that holds
    ``logged``: the keys it lacks, and the values a resume changed as
    ``resume.<n>.<key>``, ``n`` counting the resumes that changed any (MLflow
    refuses to change a logged parameter)."""
    latest = {k: v for k, v in logged.items() if not _RESUMED.fullmatch(k)}
    resumes = 0
    changes = ((_RESUMED.fullmatch(k), v) for k, v in logged.items())
    for found, value in sorted(((int(m[1]), m[2]), value) for m, value in changes if m):
        resumes = found[0]
        latest[found[1]] = value
    new = {k: v for k, v in params.items() if k not in latest}
    changed = {k: v for k, v in params.items() if k in latest and latest[k] != v}
    new.update({f"resume.{resumes + 1}.{k}": v for k, v in changed.items()})
    return new


def remembered_run(path: Path) -> dict[str, Any]:
    """The MLflow run that ``path`` remembers; a run directory's own store
    remembered by pyro-iwae 0.1 (by its absolute path) as :data:`LOCAL_STORE`."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    uri = previous.get("tracking_uri", "")
    own = uri.startswith("sqlite:///") and uri.endswith(f"/{MLFLOW_DB}")
    if own and (path.parent / MLFLOW_DB).exists():
        previous["tracking_uri"] = LOCAL_STORE
    return previous


@contextlib.contextmanager
def quick_requests() -> Iterator[None]:
    """MLflow's HTTP requests without retries and with a 10 s timeout, unless
    set by the user: by MLflow's defaults a server out of reach was said after
    about four minutes of silence."""
    quick = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    added = [name for name in quick if name not in os.environ]
    os.environ.update({name: quick[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def forget_store(tracking_uri: str | None) -> None:
    """Drops what MLflow keeps, for the process, of the SQLite store
    ``tracking_uri``, whose file is to be removed: its store of each URI and
    their engines, whose pooled connections went on writing to the removed
    file (a later tracker of the process found no tables in the new one)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service import utils
    except ImportError:
        return
    # MLflow's own caches, not public: looked up, not relied on.
    registry = getattr(utils, "_tracking_store_registry", None)
    stores = getattr(type(registry), "_get_store_with_resolved_uri", None)
    if hasattr(stores, "cache_clear"):
        stores.cache_clear()  # all URIs': an lru_cache drops no single one
    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(tracking_uri, None)
    if engine is not None:
        engine.dispose()
