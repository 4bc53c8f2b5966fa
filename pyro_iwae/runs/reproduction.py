"""A grid of fit + eval-nll runs, resumable, spread over processes and machines;
its report is :mod:`pyro_iwae.runs.grid_report`."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from . import distributed, run_writer
from .callbacks import FitCallback
from .checkpoints import (
    CHECKPOINT_FILE,
    CheckpointError,
    RunError,
    load_checkpoint,
    trained_steps,
)
from .config import RunConfig
from .eval_results import EvalSettings, result_path
from .locks import HAS_FILE_LOCKS, hold_for_ranks
from .locks import hold as _run_lock  # noqa: F401  (imported from here by tests)
from .run import evaluate_run, train_run
from .settings import anchored


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
    all, as :func:`~pyro_iwae.evaluate_run` takes them)."""

    base: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    eval_samples: int = 5000
    eval_limit: int | None = None
    claims: list[list[Any]] = dataclasses.field(default_factory=list)
    ais: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Grid:
        """Reads a grid from JSON: ``{"base": {...}, "runs": {name: {...}}, ...}``.

        :raises RunError: if the file is missing or broken, names unknown settings,
            or gives a run settings that do not go together.
        """
        try:
            values = json.loads(Path(path).read_text(), object_pairs_hook=_unique)
        except _Repeated as e:
            raise RunError(
                f"grid {path}: key {e.args[0]!r} is given twice in one object; "
                "give each run name and setting once: fix the file"
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"cannot read grid {path} ({e}); fix the file") from e
        problem = _shape_problem(values)
        if problem is not None:
            raise RunError(f"grid {path}: {problem}; fix the file")
        try:
            grid = cls(**_from_folder(values, Path(path).parent))
        except TypeError as e:
            raise RunError(f"cannot read grid {path} ({e}); fix the file") from e
        for settings, names in grid.evaluations():
            try:
                EvalSettings(**settings)
            except ConfigError as e:
                raise RunError(f"grid {path}: {e.render(names)}; fix the file") from e
        for name in grid.runs:
            try:
                grid.config(name)  # fails early on unknown or clashing settings
            except (ValueError, RunError) as e:  # RunError: unknown settings
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

    @property
    def eval_fields(self) -> dict[str, Any]:
        """The grid's evaluation as fields of :class:`EvalSettings` (and keyword
        arguments of :func:`~pyro_iwae.evaluate_run`)."""
        return {"num_samples": self.eval_samples, "limit": self.eval_limit}

    @property
    def ais_fields(self) -> dict[str, Any]:
        """The grid's AIS evaluation as :attr:`eval_fields` are, defaults filled
        in (steps 1000, chains 16, limit 1000)."""
        ais = {"steps": 1000, "chains": 16, "limit": 1000, **(self.ais or {})}
        return {
            "method": "ais",
            "ais_steps": ais["steps"],
            "num_chains": ais["chains"],
            "limit": ais["limit"],
        }

    def evaluations(self) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """The fields of the grid's evaluation (and AIS evaluation, if any),
        each with the grid's names for them."""
        found = [
            (self.eval_fields, {"num_samples": "eval_samples", "limit": "eval_limit"})
        ]
        if self.ais is not None:
            names = {"ais_steps": "steps", "num_chains": "chains", "limit": "limit"}
            found.append((self.ais_fields, {k: f"ais {v}" for k, v in names.items()}))
        return found

    def config(
        self,
        name: str,
        data_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ) -> RunConfig:
        """The run config of run ``name``, with ``data_dir`` and ``device`` (None:
        the grid's), checked as :meth:`RunConfig.merge` checks a new run's (a
        data file made absolute from the working directory, its ``x_dim`` read
        from it unless the grid sets it)."""
        values = {**self.base, **self.runs[name]}
        if data_dir is not None:
            values["data_dir"] = str(data_dir)
        if device is not None:
            values["device"] = str(device)
        return RunConfig.merge(values, named=())


class _Repeated(Exception):
    """A key given twice in one object of a grid file."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; :raises _Repeated: on a key given twice
    (a run defined twice was one run, its last definition)."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise _Repeated(key)
        values[key] = value
    return values


def _shape_problem(values: Any) -> str | None:
    """What is wrong with the shape of a grid file's JSON (``values``), or None:
    objects where objects belong, and run names that are folder names."""
    if not isinstance(values, dict):
        return f"it holds a {type(values).__name__}, not an object"
    # Said by dataclass as "Grid.__init__() got an unexpected keyword argument".
    keys = [field.name for field in dataclasses.fields(Grid)]
    unknown = [key for key in values if key not in keys]
    if unknown:
        return f"{unknown[0]!r} is no key of a grid; the keys are {', '.join(keys)}"
    if not isinstance(values.get("base", {}), dict):
        return "base must be an object of settings"
    runs = values.get("runs")
    if not isinstance(runs, dict) or not runs:
        return 'runs must be an object of run names and their settings, {"a": {}}'
    for name, settings in runs.items():
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            return f"run name {name!r} is not a folder name"
        if not isinstance(settings, dict):
            return f"the settings of run {name!r} must be an object, {{}} for none"
    ais = values.get("ais")
    if ais is not None and not isinstance(ais, dict):
        return 'ais must be an object, {"runs": [...], "steps": N, ...}'
    if ais is not None and not isinstance(ais.get("runs", []), list):
        # A string's letters were taken for run names.
        return 'the runs of ais must be a list of run names, {"runs": ["a"]}'
    if not isinstance(values.get("claims", []), list):
        return "claims must be a list of [lower, higher] pairs"
    return None


def _from_folder(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``values`` with the relative paths of its base and runs read from the
    grid file's ``folder`` (see :func:`~.settings.anchored`)."""
    runs = {name: anchored(run, folder) for name, run in values["runs"].items()}
    return {**values, "base": anchored(values.get("base", {}), folder), "runs": runs}


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
    ``device`` (None: each run's own, ``"cpu"`` unless the grid sets it) is
    where the runs train and are evaluated.

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
    # As asked, not this rank's: training and evaluation map it to their rank.
    distributed.init(device)
    if jobs > 1 and distributed.current() is not None:
        raise RunError(
            "parallel jobs and torchrun do not go together: under torchrun the "
            "processes train each run together; use jobs=1, or start several "
            "torchrun jobs on the grid"
        )
    if jobs > 1 and not HAS_FILE_LOCKS:
        raise RunError(
            "parallel jobs need file locks, which this system lacks; use jobs=1"
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
    config = grid.config(name, data_dir, device)
    device = config.device  # it was trained there; it is evaluated there too

    def evaluated() -> bool:
        return _finished(grid, name, run_dir, data_dir)

    if distributed.from_main(evaluated):
        _tell(on_run, name, "skip")
        return
    with hold_for_ranks(Path(runs_dir), name) as holder:
        if holder is not None:
            _tell(on_run, name, "busy" + (f" ({holder})" if holder else ""))
            return
        if distributed.from_main(evaluated):  # finished while we waited
            _tell(on_run, name, "skip")
            return
        resume = distributed.from_main((run_dir / CHECKPOINT_FILE).is_file)
        if resume:  # refused before it is said to resume
            distributed.from_main(lambda: _check_resumable(name, run_dir, config))
        before = distributed.from_main(lambda: _steps(run_dir)) if resume else None
        _tell(on_run, name, "resume" if resume else "train")
        train_run(
            config,
            run_dir,
            resume=resume,
            data_dir=data_dir,
            callback=fit_callback,
        )
        _tell(on_run, name, "evaluate")
        steps = distributed.from_main(lambda: _steps(run_dir))
        # An evaluation that does not say what it scored is out of date once
        # the run has trained on.
        strict = steps != before
        if not distributed.from_main(
            lambda: _evaluated_after(evaluation_path(grid, run_dir), steps, strict)
        ):
            evaluate_run(
                run_dir,
                **grid.eval_fields,
                data_dir=data_dir,
                device=device,
                callback=eval_callback,
            )
        ais_file = ais_path(grid, name, run_dir)
        if ais_file is not None and not distributed.from_main(
            lambda: _evaluated_after(ais_file, steps, strict)
        ):
            evaluate_run(
                run_dir,
                **grid.ais_fields,
                data_dir=data_dir,
                device=device,
                callback=eval_callback,
            )


def _finished(
    grid: Grid, name: str, run_dir: Path, data_dir: str | os.PathLike | None
) -> bool:
    """Whether run ``name`` of ``grid`` holds the training the grid asks for (its
    saved settings are the grid's, but for where and how it computes) and
    evaluations of its checkpoint as it is now."""
    try:
        saved = RunConfig.load(run_dir)
    except RunError:
        return False
    wanted = grid.config(name, data_dir)
    if any(
        getattr(saved, field) != getattr(wanted, field)
        for field in saved.to_dict()
        if field not in run_writer.MEANS
    ):
        return False  # to be extended, or refused with the difference named
    steps = _steps(run_dir)
    paths = [evaluation_path(grid, run_dir), ais_path(grid, name, run_dir)]
    return all(path is None or _evaluated_after(path, steps) for path in paths)


def _check_resumable(name: str, run_dir: Path, config: RunConfig) -> None:
    """:raises RunError: if run ``name`` in ``run_dir`` cannot go on as ``config``,
    the grid's settings for it, says (see :func:`run_writer.resumed_config`):
    said in the grid's keys, with advice that fits a grid, not fit's options."""
    try:
        run_writer.resumed_config(run_dir, config.to_dict())
    except (ConfigError, CheckpointError) as e:
        saved = RunConfig.load(run_dir)
        schedule = isinstance(e, CheckpointError)  # shorter than it has trained
        fields = run_writer.EXTENDABLE if schedule else None
        differences = [
            f"{field} {json.dumps(getattr(saved, field))} (the grid's: "
            f"{json.dumps(getattr(config, field))})"
            for field in run_writer.differing(saved, config, fields)
        ]
        if not differences:
            raise  # no setting of the grid's to blame
        if schedule:
            what = "has trained past the grid's schedule"
            advice = (
                "a run's schedule may only go on: give the grid the run's (or more)"
            )
        else:
            what = "was trained with other settings than the grid's"
            advice = "set them back in the grid"
        raise RunError(
            f"run {name} ({run_dir}) {what}: {', '.join(differences)}; {advice}, "
            f"or delete {run_dir} to train the run afresh"
        ) from e


def _steps(run_dir: Path) -> int | None:
    """The training steps of the run's checkpoint (None: no readable one)."""
    try:
        return trained_steps(load_checkpoint(run_dir / CHECKPOINT_FILE))
    except CheckpointError:
        return None


def _evaluated_after(path: Path, steps: int | None, strict: bool = False) -> bool:
    """Whether the evaluation in ``path`` exists and scored ``steps`` training
    steps; one that does not say (written before pyro-iwae recorded them)
    counts as current unless ``strict``."""
    try:
        recorded = json.loads(path.read_text()).get("trained_steps")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == steps or (recorded is None and not strict)


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


def evaluation_path(grid: Grid, run_dir: Path) -> Path:
    """The evaluation of a run of ``grid`` (see :func:`result_path`)."""
    return result_path(run_dir, EvalSettings(**grid.eval_fields))


def ais_path(grid: Grid, name: str, run_dir: Path) -> Path | None:
    """The AIS evaluation of run ``name``; None if the grid asks for none."""
    if name not in (grid.ais or {}).get("runs", []):
        return None
    return result_path(run_dir, EvalSettings(**grid.ais_fields))
