"""A grid of fit + eval-nll runs, resumable, and its table beside the paper's."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .callbacks import FitCallback
from .checkpoints import CHECKPOINT_FILE, RunError, read_metrics
from .config import RunConfig
from .runs import evaluate_run, read_estimates, train_run

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
_HAS_FILE_LOCKS = fcntl is not None

#: Burda et al. (2016), Table 1: MNIST test NLL (nats, k = 5000), by
#: (stochastic layers, objective, k).
PAPER_NLL = {
    (1, "vae", 1): 86.76,
    (1, "vae", 5): 86.47,
    (1, "vae", 50): 86.35,
    (1, "iwae", 1): 86.76,
    (1, "iwae", 5): 85.54,
    (1, "iwae", 50): 84.78,
    (2, "vae", 1): 85.33,
    (2, "vae", 5): 85.01,
    (2, "vae", 50): 84.78,
    (2, "iwae", 1): 85.33,
    (2, "iwae", 5): 83.89,
    (2, "iwae", 50): 82.90,
}
#: Rainforth et al. (2018) on dynamically binarised MNIST, by objective.
RAINFORTH_NLL = {"miwae": 84.97, "piwae": 84.46, "ciwae": 84.57}


@dataclasses.dataclass(frozen=True)
class Grid:
    """Runs that share one budget: ``base`` settings of :class:`RunConfig`,
    overridden per run by ``runs`` (name -> settings); each is evaluated on the
    first ``eval_limit`` test points (None: all) with ``eval_samples`` particles.
    ``claims`` are ``[lower, higher]`` pairs of run names, each the claim that run
    ``lower`` reaches a lower test NLL than run ``higher``, or pairs of such pairs,
    ``[[lower, higher], [lower2, higher2]]``: the claim that ``lower`` gains more
    over ``higher`` than ``lower2`` over ``higher2`` (nats). ``ais`` adds an
    AIS column for some runs: ``{"runs": [names], "steps": 1000, "chains": 16,
    "limit": 1000}`` (steps, chains and the first ``limit`` test points, None:
    all, as :func:`~pyro_iwae.runs.evaluate_run` takes them)."""

    base: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    eval_samples: int = 5000
    eval_limit: int | None = None
    claims: list[list[Any]] = dataclasses.field(default_factory=list)
    ais: dict[str, Any] | None = None

    @property
    def ais_settings(self) -> dict[str, Any]:
        """The AIS evaluation's steps, chains and limit, defaults filled in."""
        return {"steps": 1000, "chains": 16, "limit": 1000, **(self.ais or {})}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Grid:
        """Reads a grid from JSON: ``{"base": {...}, "runs": {name: {...}}, ...}``.

        :raises RunError: if the file is missing or broken, names unknown settings,
            or gives a run settings that do not go together.
        """
        try:
            values = json.loads(Path(path).read_text())
            grid = cls(**values)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise RunError(f"cannot read grid {path} ({e}); fix the file") from e
        for name in grid.runs:
            try:
                grid.config(name)  # fails early on unknown or clashing settings
            except ValueError as e:
                raise RunError(f"run {name} of grid {path}: {e}; fix the file") from e
        unknown = [n for n in (grid.ais or {}).get("runs", []) if n not in grid.runs]
        if unknown or set(grid.ais or {}) - {"runs", "steps", "chains", "limit"}:
            raise RunError(
                f"the ais entry of {path} must be {{'runs': [run names of the grid], "
                "'steps': N, 'chains': C, 'limit': L}}; fix the file"
            )
        for claim in grid.claims:
            if not _is_claim(claim, grid.runs):
                raise RunError(
                    f"claim {claim!r} in {path} is not a pair of run names of the "
                    "grid nor a pair of such pairs; write it as [lower, higher] or "
                    "[[lower, higher], [lower2, higher2]]"
                )
        return grid

    def config(self, name: str) -> RunConfig:
        """The run config of run ``name``."""
        return RunConfig.from_dict({**self.base, **self.runs[name]})


def _is_pair(claim: Any, runs: dict[str, Any]) -> bool:
    return (
        isinstance(claim, list)
        and len(claim) == 2
        and all(isinstance(name, str) and name in runs for name in claim)
    )


def _is_claim(claim: Any, runs: dict[str, Any]) -> bool:
    return _is_pair(claim, runs) or (
        isinstance(claim, list)
        and len(claim) == 2
        and all(_is_pair(pair, runs) for pair in claim)
    )


def _claim_terms(claim: list[Any]) -> dict[str, float]:
    """The claim's difference as a sum of run NLLs: run name -> coefficient."""
    if isinstance(claim[0], str):
        lower, higher = claim
        return {lower: -1.0, higher: 1.0}
    terms: dict[str, float] = {}
    for pair, sign in zip(claim, (1.0, -1.0), strict=True):
        for name, coefficient in _claim_terms(pair).items():
            terms[name] = terms.get(name, 0.0) + sign * coefficient
    return terms


def _claim_text(claim: list[Any]) -> str:
    if isinstance(claim[0], str):
        return f"{claim[0]} below {claim[1]}"
    return f"{_claim_text(claim[0])} by more than {_claim_text(claim[1])}"


def run_grid(
    grid: Grid,
    runs_dir: str | os.PathLike,
    *,
    only: list[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    jobs: int = 1,
    on_run: Callable[[str, str], None] | None = None,
    fit_callback: FitCallback | None = None,
    eval_callback: Callable[[torch.Tensor, int], None] | None = None,
) -> None:
    """Trains and evaluates each run of ``grid`` in ``runs_dir/<name>``.

    A run with an evaluation is skipped, one with a checkpoint is resumed, and any
    other is started, so that the grid can be stopped at any moment and run again.
    A run that another process is working on, on this machine or on another that
    shares ``runs_dir`` (see :func:`_run_lock`), is left to it. ``on_run(name,
    what)`` is told ``what`` happens to each run ("skip", "busy", "train",
    "resume", "evaluate"; "busy" may be followed by who holds the run).

    Under torchrun the ranks train and evaluate each run together (rank 0 takes
    the run's lock), so several torchrun jobs, on one machine or several, can
    share one grid; ``jobs`` must then be 1.

    With ``jobs`` > 1, that many worker processes share the runs, each with
    ``cpu_count // jobs`` torch threads; the callbacks for progress within a run
    are then not called.

    :raises RunError: on unknown run names, or when a run (or a worker) fails.
    """
    names = only or list(grid.runs)
    unknown = sorted(set(names) - set(grid.runs))
    if unknown:
        raise RunError(
            f"no run {', '.join(unknown)} in the grid; choose from "
            f"{', '.join(grid.runs)}"
        )
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    device = distributed.init(device)
    if jobs > 1 and distributed.current() is not None:
        raise RunError(
            "parallel jobs and torchrun do not go together: under torchrun the "
            "processes train each run together; use --jobs 1, or start several "
            "torchrun jobs on the grid"
        )
    if jobs > 1 and not _HAS_FILE_LOCKS:
        raise RunError(
            "parallel jobs need file locks, which this system lacks; use --jobs 1"
        )
    if distributed.is_main():
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
    if jobs == 1:
        for name in names:
            _run_one(
                grid,
                runs_dir,
                name,
                data_dir,
                device,
                on_run,
                fit_callback,
                eval_callback,
            )
        return
    _run_parallel(grid, runs_dir, names, data_dir, device, jobs, on_run)


def _run_one(
    grid: Grid,
    runs_dir: str | os.PathLike,
    name: str,
    data_dir: str | os.PathLike | None,
    device: torch.device | str | None,
    on_run: Callable[[str, str], None] | None,
    fit_callback: FitCallback | None = None,
    eval_callback: Callable[[torch.Tensor, int], None] | None = None,
) -> None:
    run_dir = Path(runs_dir) / name

    def evaluated() -> bool:
        paths = [_evaluation_path(grid, run_dir), _ais_path(grid, name, run_dir)]
        return all(path is None or path.is_file() for path in paths)

    if distributed.from_main(evaluated):
        _tell(on_run, name, "skip")
        return
    with _ranks_lock(Path(runs_dir), name) as holder:
        if holder is not None:
            _tell(on_run, name, "busy" + (f" ({holder})" if holder else ""))
            return
        if distributed.from_main(evaluated):  # finished while we waited
            _tell(on_run, name, "skip")
            return
        resume = distributed.from_main((run_dir / CHECKPOINT_FILE).is_file)
        _tell(on_run, name, "resume" if resume else "train")
        train_run(
            grid.config(name),
            run_dir,
            resume=resume,
            data_dir=data_dir,
            callback=fit_callback,
        )
        _tell(on_run, name, "evaluate")
        if not distributed.from_main(_evaluation_path(grid, run_dir).is_file):
            evaluate_run(
                run_dir,
                num_samples=grid.eval_samples,
                limit=grid.eval_limit,
                data_dir=data_dir,
                device=device,
                callback=eval_callback,
            )
        if _ais_path(grid, name, run_dir) is not None:
            ais = grid.ais_settings
            evaluate_run(
                run_dir,
                method="ais",
                ais_steps=ais["steps"],
                num_chains=ais["chains"],
                limit=ais["limit"],
                data_dir=data_dir,
                device=device,
                callback=eval_callback,
            )


@contextmanager
def _ranks_lock(runs_dir: Path, name: str) -> Iterator[str | None]:
    """:func:`_run_lock`, taken by rank 0 for all the ranks under torchrun;
    yields None if this process (group) holds the run, else who holds it."""
    main = distributed.is_main()
    with _run_lock(runs_dir, name) if main else nullcontext(None) as holder:
        yield distributed.from_main(lambda: holder)


@contextmanager
def _run_lock(runs_dir: Path, name: str) -> Iterator[str | None]:
    """Holds run ``name`` of ``runs_dir`` while the body runs; yields None, or
    if another process holds it, who (``""`` when unknown).

    Two locks, both needed:

    - ``.<name>.lock``, an ``fcntl.flock``: between the processes of one
      machine; the operating system releases it when a process dies. Not
      reliable between machines on NFS.
    - ``.<name>.claim``, created with ``O_CREAT | O_EXCL`` (atomic on a local
      disk and on NFS version 3 and later) and holding the host, process id and
      start time of its holder; removed when the body ends. Between machines
      that share ``runs_dir``. A claim of a process of this machine that has
      died is taken over (under the flock, so by one process only); a claim of
      another machine stays until that machine's process ends it, or someone
      deletes the file by hand once sure that process is gone.
    """
    if not _HAS_FILE_LOCKS:  # Windows: the claim file alone
        with _claim(runs_dir / f".{name}.claim", takeover=False) as holder:
            yield holder
        return
    with open(runs_dir / f".{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield ""
            return
        try:
            with _claim(runs_dir / f".{name}.claim", takeover=True) as holder:
                yield holder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _claim(path: Path, takeover: bool) -> Iterator[str | None]:
    """Creates the claim file ``path`` exclusively for the body; yields None, or
    who holds it if it exists (see :func:`_run_lock`)."""
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
        return f"claimed in {path}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claim.get("since", 0)))
    return (
        f"claimed by process {claim.get('pid')} on {claim.get('host')} since "
        f"{since}; delete {path} if that process is gone"
    )


def _run_parallel(
    grid: Grid,
    runs_dir: str | os.PathLike,
    names: list[str],
    data_dir: str | os.PathLike | None,
    device: torch.device | str | None,
    jobs: int,
    on_run: Callable[[str, str], None] | None,
) -> None:
    context = multiprocessing.get_context("spawn")
    # Workers take runs from one queue, so each run is tried by one of them and
    # "busy" only ever means another pyro-iwae process.
    tasks, events = context.Queue(), context.Queue()
    for name in [*names, *[None] * jobs]:
        tasks.put(name)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    device = None if device is None else str(device)
    workers = [
        context.Process(
            target=_worker,
            args=(grid, str(runs_dir), tasks, data_dir, device, threads, events),
            daemon=True,
        )
        for _ in range(jobs)
    ]
    for worker in workers:
        worker.start()
    errors, running = [], len(workers)
    try:
        while running:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers):
                    break  # a worker died without saying so
                continue
            if event is None:
                running -= 1
            elif event[0] == "error":
                errors.append(event[1])
            else:
                _tell(on_run, *event)
    finally:
        stopped = []
        for worker in workers:
            worker.join(timeout=30.0)
            if worker.is_alive():
                worker.terminate()
                stopped.append(worker)
    # A worker that reported its last run and was slow to exit (a loaded
    # machine) did not fail; one stopped before it reported did.
    died = [
        w.exitcode
        for w in workers
        if w.exitcode not in (0, None) and not (running == 0 and w in stopped)
    ]
    if errors or died:
        detail = "; ".join(errors) or f"a worker exited with code {died[0]}"
        raise RunError(f"the grid did not finish: {detail}")


def _worker(
    grid: Grid,
    runs_dir: str,
    tasks: Any,
    data_dir: str | os.PathLike | None,
    device: str | None,
    threads: int,
    events: Any,
) -> None:
    """One process of a parallel grid: the runs it takes from ``tasks`` until a
    None."""
    torch.set_num_threads(threads)

    def report(name: str, what: str) -> None:
        events.put((name, what))

    try:
        for name in iter(tasks.get, None):
            try:
                _run_one(grid, runs_dir, name, data_dir, device, report)
            except Exception as e:  # reported by the parent, which raises
                events.put(("error", f"{name}: {e}"))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
        pass  # the run resumes from its last checkpoint next time
    finally:
        events.put(None)


def _tell(on_run: Callable[[str, str], None] | None, name: str, what: str) -> None:
    if on_run is not None:
        on_run(name, what)


def _evaluation_path(grid: Grid, run_dir: Path) -> Path:
    return run_dir / f"eval-test-k{grid.eval_samples}.json"


def _ais_path(grid: Grid, name: str, run_dir: Path) -> Path | None:
    """The AIS evaluation of run ``name``; None if the grid asks for none."""
    if name not in (grid.ais or {}).get("runs", []):
        return None
    ais = grid.ais_settings
    return run_dir / f"eval-test-ais{ais['steps']}x{ais['chains']}.json"


def collect(grid: Grid, runs_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per run of ``grid`` from its files: settings, test NLL with its
    standard error (None until evaluated), active units, epochs and train time."""
    rows = []
    for name in grid.runs:
        config = grid.config(name)
        run_dir = Path(runs_dir) / name
        metrics = read_metrics(run_dir) if run_dir.is_dir() else []
        path = _evaluation_path(grid, run_dir)
        result = json.loads(path.read_text()) if path.is_file() else {}
        ais_path = _ais_path(grid, name, run_dir)
        ais = (
            json.loads(ais_path.read_text())
            if ais_path is not None and ais_path.is_file()
            else {}
        )
        k = config.make_objective().num_particles  # all particles: M K for MIWAE
        rows.append(
            {
                "run": name,
                "dataset": config.dataset,
                "stochastic_layers": config.stochastic_layers,
                "objective": config.objective,
                "estimator": config.estimator,
                "k": k,
                "num_groups": config.num_groups,
                "beta": config.beta,
                "schedule": config.schedule,
                "stages": config.stages,
                "batch_size": config.batch_size,
                "seed": config.seed,
                "epochs": len(metrics),
                "train_time_s": sum(m["time"] for m in metrics),
                "likelihood": config.likelihood,
                "test_nll": result.get("nll"),
                "test_nll_stderr": result.get("stderr"),
                "bits_per_dim": result.get("bits_per_dim"),
                "eval_k": result.get("k"),
                "eval_points": result.get("points"),
                "active_units": result.get("active_units"),
                "estimates_file": result.get("estimates_file"),
                "ais_nll": ais.get("nll"),
                "ais_nll_stderr": ais.get("stderr"),
                "ais_points": ais.get("points"),
                "paper_nll": _paper_nll(config, k),
                "versions": result.get("versions"),
                "evaluated": result.get("date"),
            }
        )
    return rows


def _paper_nll(config: RunConfig, k: int) -> float | None:
    variant = config.builder_settings("model") or config.binarization != "dynamic"
    if variant or (config.model, config.guide) != ("paper", "paper"):
        return None  # not the paper's model and data
    if config.objective in RAINFORTH_NLL:
        return RAINFORTH_NLL[config.objective]
    if config.estimator != "iwae" or config.objective not in ("iwae", "vae"):
        return None
    return PAPER_NLL.get((config.stochastic_layers, config.objective, k))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, the paper's NLL beside ours (and an AIS
    column when some row has one)."""
    with_ais = any(row.get("ais_nll") is not None for row in rows)
    ais_head = " AIS NLL (nats, points) |" if with_ais else ""
    lines = [
        "| run | layers | objective | estimator | k | epochs | test NLL (nats) "
        f"| paper |{ais_head} active units | train time (min) |",
        "| --- " * (10 + with_ais) + "|",
    ]
    for row in rows:
        if row["test_nll"] is not None:
            nll = f"{row['test_nll']:.2f} ± {row['test_nll_stderr']:.2f}"
            if row.get("bits_per_dim") is not None:
                nll += f" ({row['bits_per_dim']:.4f} bits/dim)"
        else:
            nll = "not evaluated yet" if row["epochs"] else "not run yet"
        train_time = f"{row['train_time_s'] / 60:.1f}" if row["epochs"] else ""
        paper = "" if row["paper_nll"] is None else f"{row['paper_nll']:.2f}"
        active = ", ".join(f"{k} {v}" for k, v in (row["active_units"] or {}).items())
        objective = row["objective"]
        if objective in ("miwae", "piwae"):
            objective += f" (M={row['num_groups']})"
        elif objective == "ciwae":
            objective += f" (beta={row['beta']})"
        estimator = "" if row["objective"] in ("vae", "renyi") else row["estimator"]
        ais = ""
        if with_ais and row.get("ais_nll") is not None:
            ais = (
                f" {row['ais_nll']:.2f} ± {row['ais_nll_stderr']:.2f} "
                f"({row['ais_points']}) |"
            )
        elif with_ais:
            ais = " |"
        lines.append(
            f"| {row['run']} | {row['stochastic_layers']} | {objective} | "
            f"{estimator} | {row['k']} | {row['epochs']} | {nll} | {paper} |{ais} "
            f"{active} | {train_time} |"
        )
    return "\n".join(lines) + "\n"


#: A difference counts as shown when it exceeds this many standard errors.
CLAIM_Z = 2.0


def check_claims(
    grid: Grid, rows: list[dict[str, Any]], runs_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Each claim of ``grid`` against the rows: its ``claim`` as in the grid and as
    ``text``, the ``difference`` (nats; for ``[lower, higher]`` the NLL of
    ``higher`` minus that of ``lower``, for a pair of pairs the first pair's
    difference minus the second's), its standard error, and a ``verdict``:
    "holds" (difference above :data:`CLAIM_Z` standard errors), "reversed" (below
    minus that), "not shown" (in between) or "not run yet".

    Where every run of the claim in ``runs_dir`` kept its per-point estimates on
    the same points, the standard error is that of the mean per-point difference
    (``paired`` is True); otherwise the runs' standard errors are combined as if
    independent, which overstates the error of the difference.
    """
    by_run = {row["run"]: row for row in rows}
    # A run is in several claims; read its 10,000 estimates once.
    run_estimates = functools.cache(
        lambda name: (
            None
            if runs_dir is None
            else read_estimates(Path(runs_dir) / name, by_run[name])
        )
    )
    results = []
    for claim in grid.claims:
        terms = _claim_terms(claim)
        result = {
            "claim": claim,
            "text": _claim_text(claim),
            "difference": None,
            "stderr": None,
            "paired": False,
            "verdict": "not run yet",
        }
        if all(by_run[name]["test_nll"] is not None for name in terms):
            difference = sum(c * by_run[name]["test_nll"] for name, c in terms.items())
            stderr = math.sqrt(
                sum(
                    (c * (by_run[name]["test_nll_stderr"] or 0.0)) ** 2
                    for name, c in terms.items()
                )
            )
            estimates = [run_estimates(name) for name in terms]
            if all(e is not None and e.shape == estimates[0].shape for e in estimates):
                # NLL differences per point: minus the log-likelihood estimates.
                per_point = -sum(
                    c * e for c, e in zip(terms.values(), estimates, strict=True)
                )
                difference = float(per_point.mean())
                stderr = float(per_point.std() / math.sqrt(per_point.numel()))
                result["paired"] = True
            if difference > CLAIM_Z * stderr:
                verdict = "holds"
            elif difference < -CLAIM_Z * stderr:
                verdict = "reversed"
            else:
                verdict = "not shown"
            result.update(difference=difference, stderr=stderr, verdict=verdict)
        results.append(result)
    return results


def markdown_claims(claims: list[dict[str, Any]]) -> str:
    """The checked claims as a Markdown table."""
    lines = [
        "| claim | NLL difference (nats) | pairing | verdict |",
        "| --- | --- | --- | --- |",
    ]
    for claim in claims:
        difference = (
            ""
            if claim["difference"] is None
            else f"{claim['difference']:+.2f} ± {claim['stderr']:.2f}"
        )
        kind = ""
        if claim["difference"] is not None:
            kind = "paired" if claim["paired"] else "unpaired"
        lines.append(
            f"| {claim['text']} | {difference} | {kind} | {claim['verdict']} |"
        )
    return "\n".join(lines) + "\n"


#: Markers between which :func:`write_report` puts the table into a Markdown file.
TABLE_MARKERS = ("<!-- grid-table:start -->", "<!-- grid-table:end -->")


def write_report(
    grid: Grid,
    runs_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    readme: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Writes ``table.json``, ``table.md`` (with the claims checked, if the grid
    has any, also in ``claims.json``) and the plots of ``grid`` into ``out_dir``;
    returns their paths by kind. With ``readme``, also replaces what stands
    between the :data:`TABLE_MARKERS` lines of that Markdown file by table.md.

    :raises RunError: if ``readme`` lacks the markers.
    """
    from .plots import save_grid_curves, save_nll_against_k

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(grid, runs_dir)
    paths = {"json": out_dir / "table.json", "markdown": out_dir / "table.md"}
    paths["json"].write_text(json.dumps(rows, indent=2) + "\n")
    markdown = markdown_table(rows)
    if grid.claims:
        claims = check_claims(grid, rows, runs_dir)
        paths["claims"] = out_dir / "claims.json"
        paths["claims"].write_text(json.dumps(claims, indent=2) + "\n")
        markdown += (
            f"\nClaims (difference: NLL of the second run minus the first, or for "
            "'by more than' the first pair's difference minus the second's, ± its "
            "standard error, paired over test points where all the runs kept their "
            f"per-point estimates; holds beyond {CLAIM_Z:g} standard errors):\n\n"
            + markdown_claims(claims)
        )
    paths["markdown"].write_text(markdown)
    if readme is not None:
        before, after = table_slot(readme)
        paths["readme"] = Path(readme)
        paths["readme"].write_text(before + markdown + after)
    curves = {name: read_metrics(Path(runs_dir) / name) for name in grid.runs}
    paths["curves"] = save_grid_curves(curves, out_dir / "test-bound-by-epoch.png")
    paths["nll_k"] = save_nll_against_k(nll_series(rows), out_dir / "nll-by-k.png")
    return paths


def nll_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float]]]:
    """The evaluated VAE and IWAE rows (any estimator) as series for the plot of
    NLL against k: label -> ``(k, NLL, standard error)`` points, one series per
    objective, estimator and number of stochastic layers."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        if row["test_nll"] is None or row["objective"] not in ("vae", "iwae"):
            continue
        label = "VAE" if row["objective"] == "vae" else "IWAE"
        if row["estimator"] != "iwae":
            label += f"-{row['estimator'].upper()}"
        if row["stochastic_layers"] != 1:
            label += f", {row['stochastic_layers']} layers"
        series.setdefault(label, []).append(
            (row["k"], row["test_nll"], row["test_nll_stderr"] or 0.0)
        )
    return series


def table_slot(path: str | os.PathLike) -> tuple[str, str]:
    """The text of Markdown file ``path`` up to and including the first of the
    :data:`TABLE_MARKERS` lines, and from the second on.

    :raises RunError: if the file cannot be read or lacks the markers.
    """
    start, end = TABLE_MARKERS
    try:
        content = Path(path).read_text()
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror})") from e
    before, found_start, rest = content.partition(start + "\n")
    _, found_end, after = rest.partition(end)
    if not (found_start and found_end):
        raise RunError(
            f"{path} has no lines {start} and {end} to put the table between; "
            "add them where the table should go"
        )
    return before + start + "\n", end + after
