"""Runs: a :class:`~pyro_iwae.RunConfig` trained in a run directory, loaded
back, and evaluated, through :class:`Run`.

A *run directory* holds everything about one training run:

- ``config.json``: the :class:`~pyro_iwae.RunConfig` that rebuilds model, guide
  and data (see :mod:`pyro_iwae.runs.config`);
- ``checkpoint.pt`` and ``metrics.jsonl``, written by :func:`pyro_iwae.fit`
  (see :mod:`pyro_iwae.runs.checkpoints`);
- the evaluations of :meth:`Run.evaluate` (see :mod:`pyro_iwae.runs.eval_results`);
- while a process trains the run, ``.writer.lock`` and ``.writer.claim``: the
  lock of :func:`pyro_iwae.runs.locks.hold` that keeps a second writer out.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..data import DATASETS, Dataset, is_data_file, load_dataset
from ..errors import (
    DataError,
    RunError,
    one_line,
)
from ..infer.evaluation import warn_of_problems
from ..infer.hooks import compiles
from ..nn.likelihoods import support_problem
from . import distributed, locks, run_writer
from .auto_compile import (
    batch_shapes,
    cached_graphs,
    choose_compile,
    compile_outcome,
    graph_keys,
    remember_graphs,
)
from .callbacks import FitCallback
from .checkpoints import (
    CHECKPOINT_FILE,
    check_writable,
    load_state,
    load_trained,
    read_metrics,
    trained_steps,
)
from .config import CONFIG_FILE, RunConfig
from .data_record import check_data, check_dir, check_points, data_folder, is_recorded
from .estimates import estimate_points
from .eval_results import (
    EVAL_METHODS,
    EvalSettings,
    Evaluation,
    activity_of,
    read_estimates,
    result_path,
    summarise,
    versions,
)
from .run_dirs import find_latest_run, new_run_dir
from .run_writer import build_run

__all__ = [
    "EVAL_METHODS",
    "Evaluation",
    "EvalSettings",
    "Run",
    "build_run",
    "evaluate_run",
    "find_latest_run",
    "load_run",
    "new_run_dir",
    "plan_fit",
    "read_estimates",
    "train_run",
    "versions",
]


class Run:
    """A run directory and what can be done with it: train a new run there,
    resume it (for more epochs or stages, too), load, evaluate.

    Training holds the run's lock (see the module), so that a second writer,
    of this machine or another sharing the folder, is refused with
    :class:`~pyro_iwae.errors.RunBusy` and changes nothing; the lock of a
    process that died is taken over. A new run that fails or is interrupted
    before its first checkpoint leaves nothing behind: no files, and no folder
    where :class:`Run` made it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._made = False  # whether this object made the folder
        self._new_config: RunConfig | None = None  # the config of Run.new

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def new(cls, config: RunConfig, runs_dir: str | os.PathLike = "runs") -> Run:
        """A run in a fresh folder of ``runs_dir`` (see :func:`new_run_dir`)."""
        run = cls(new_run_dir(runs_dir, config))
        run._made, run._new_config = True, config
        return run

    @classmethod
    def find(
        cls,
        path: str | os.PathLike | None = None,
        runs_dir: str | os.PathLike = "runs",
        trained: bool = False,
    ) -> Run:
        """The run at ``path``, else the latest in ``runs_dir`` (with ``trained``,
        the latest with a checkpoint: not one of a fit killed before it).

        :raises RunError: if ``runs_dir`` holds no such run.
        """
        latest = Path(path) if path is not None else find_latest_run(runs_dir)
        if path is None and trained and not (latest / CHECKPOINT_FILE).is_file():
            done = Path(runs_dir).glob(f"*/{CHECKPOINT_FILE}")
            done = [(c.stat().st_mtime, c.parent) for c in done if c.is_file()]
            if not done:
                raise RunError(f"no run in {runs_dir} has finished an epoch; train one")
            latest = max(done)[1]
        return cls(latest)

    @property
    def config(self) -> RunConfig:
        """The run's saved configuration (see :meth:`RunConfig.load`)."""
        return RunConfig.load(self.path)

    @property
    def has_checkpoint(self) -> bool:
        """Whether the run has finished an epoch (or step) it can resume from."""
        return (self.path / CHECKPOINT_FILE).is_file()

    def metrics(self) -> list[dict[str, Any]]:
        """The per-epoch metrics of the run (see :func:`read_metrics`)."""
        return read_metrics(self.path)

    def load(
        self, device: torch.device | str | None = None
    ) -> tuple[RunConfig, torch.nn.Module, torch.nn.Module]:
        """Config, model and guide with the checkpoint's parameters (see
        :func:`load_run`)."""
        return load_run(self.path, device)

    def data(
        self,
        data_dir: str | os.PathLike | None = None,
        dataset: str | os.PathLike | None = None,
        config: RunConfig | None = None,
    ) -> Dataset:
        """The run's data, all of it, binarised as in training; ``dataset`` and
        ``data_dir`` override where they are (such as a data file since moved).

        :raises DataError: if they cannot be read or are of another width, or
            the run's own data file has changed since it was trained on it, or
            its built-in data set's folder holds other points than it recorded.
        """
        config = self.config if config is None else config
        name = config.dataset if dataset is None else _as_dataset(dataset)
        # Said to eval-nll, sample and check-guide alike: not all evaluate.
        advice = f"use them as other data with dataset={str(name)!r}"
        if dataset is None and name not in DATASETS:
            check_data(self.path, name, advice)
        if data_dir is None:
            check_dir(name, config.data_dir)
        data = load_dataset(
            name,
            data_dir or config.data_dir,
            binarize=config.binarization,
            test_fraction=config.test_fraction,
        )
        if dataset is None and name in DATASETS:
            folder = data_folder(name, data_dir or config.data_dir)
            check_points(self.path, data, config.train_limit, folder, advice)
        if data.x_dim != config.x_dim:
            raise DataError(
                f"{name} points have {data.x_dim} values, the run's model takes "
                f"{config.x_dim}; pass the data the run was trained on"
            )
        return data

    def holds_own(self, data: Dataset) -> bool:
        """Whether ``data`` are the run's own: its recorded data file's contents
        (a moved copy's too) or built-in data set's points, or where nothing is
        recorded, its data set's name."""
        config = self.config
        recorded = is_recorded(self.path, data.name, data, config.train_limit)
        return data.name == config.dataset if recorded is None else recorded

    def resumed_config(self, given: dict[str, Any] | None = None) -> RunConfig:
        """The run's config with the settings ``given`` (field -> value): only
        ``pyro_iwae.runs.run_writer.EXTENDABLE`` ones (more epochs or stages),
        device, data folder and compile may differ from the run's.

        :raises ConfigError: for another setting that differs, or settings that
            do not go together.
        """
        return run_writer.resumed_config(self.path, given)

    def train(
        self,
        config: RunConfig | None = None,
        *,
        resume: bool = False,
        data_dir: str | os.PathLike | None = None,
        callback: FitCallback | None = None,
    ) -> list[dict[str, Any]]:
        """Trains ``config`` (None: the one :meth:`new` was given) here, writing
        ``config.json``, or resumes the run with ``config`` (None: its own; more
        epochs or stages extend it): see
        ``pyro_iwae.runs.run_writer.train``. Returns the metrics of every epoch.

        :raises RunBusy: if another process (group) trains the run.
        :raises RunError: without ``config`` for a new run not made by :meth:`new`.
        """
        if config is None and not resume:
            config = self._new_config
            if config is None and not (self.path / CONFIG_FILE).is_file():
                # Else refused as "run directory ... does not exist", a resume's.
                raise RunError(
                    f"no config to train {self.path} with: pass a RunConfig, "
                    "Run(path).train(config), or resume an existing run (resume=True)"
                )
        return run_writer.train(
            self.path,
            config,
            resume=resume,
            data_dir=data_dir,
            callback=callback,
            made=self._made,
        )

    def evaluate(
        self,
        settings: EvalSettings | None = None,
        *,
        data_dir: str | os.PathLike | None = None,
        dataset: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        callback: Callable[[torch.Tensor, int], None] | None = None,
    ) -> Evaluation:
        """Estimates the negative log-likelihood of the run's model, per point.

        With ``settings`` (None: the defaults of :class:`EvalSettings`) of method
        ``"iwae"``: -L_k, the IWAE bound with ``num_samples`` particles, with the
        effective sample size and Pareto k-hat of each point's importance
        weights (:func:`~pyro_iwae.log_likelihood_with_diagnostics`;
        ``compile``: True or a ``torch.compile`` backend computes each chunk's
        log-weights in one graph compiled once per batch shape, ``"auto"`` does
        so from ``pyro_iwae.runs.auto_compile.AUTO_COMPILE_WORK``
        particle-points on, where compiling pays, and the result's ``compiled``
        and ``compile_choice`` say which it took); of method
        ``"ais"``: annealed importance sampling with ``ais_steps`` HMC steps and
        ``num_chains`` chains (:func:`~pyro_iwae.ais_log_likelihood`).

        Uses the first ``limit`` points (None, or ``limit`` at least the
        split's size: all, saved as None) of ``split`` (``"test"``:
        the test set; ``"train"``: the points the run trained on, the first
        ``train_limit`` of the training data, binarised once with
        ``seed`` if the run binarises them dynamically) of the run's data, or of
        ``dataset`` and ``data_dir`` where given (a data file since moved, say),
        and counts the active units of each latent site on them. Writes the
        result and the per-point estimates and diagnostics to the run directory
        (see ``pyro_iwae.runs.eval_results``: one of other settings is never
        replaced). ``callback(estimates, total)`` is called after each batch
        with its estimates (``[batch]``, nats) and the number of points (under
        torchrun: this rank's batches and points).

        The particles of batch ``i`` (of ``batch_size`` points) are drawn with
        torch's random stream seeded by ``(seed, i)``, so the estimates depend on
        ``seed`` and ``batch_size``, not on how many processes share the work:
        under torchrun the batches are dealt to the ranks, rank 0 gathers the
        estimates and writes the same files as one process (every rank returns
        the result). The run directory must be readable by every rank.

        :raises RunError, CheckpointError, pyro_iwae.data.DataError: see
            :func:`load_run` and :meth:`data`.
        """
        settings = EvalSettings() if settings is None else settings
        device = distributed.init(device)
        config, model, guide, steps = _load_run(self.path, device)
        distributed.from_main(lambda: check_writable(self.path))
        data = self.data(data_dir, dataset, config)
        # Data other than the run's (not a moved copy): named in the result, and
        # in its file's name, apart from the run's own evaluations.
        other = dataset is not None and distributed.from_main(
            lambda: not self.holds_own(data)
        )
        split = _split(data, settings, config.train_limit)
        if settings.limit is not None and settings.limit >= len(split):
            # The whole split: the evaluation, and its files, of limit None.
            settings = dataclasses.replace(settings, limit=None)
        points = _points(split, data, settings)
        fix = (
            f"the run reads its data with binarize {config.binarization}: pass data "
            "like those it was trained on"
        )
        problem = support_problem(
            run_writer.model_likelihood(config), points, "points", fix
        )
        if problem is not None:
            raise DataError(f"{data.name} ({settings.split} split): {problem}")
        points = points.to(next(model.parameters()).device)
        compile, choice, keys = False, "not with ais", []
        if settings.method == "iwae":
            if settings.compile == "auto" or compiles(settings.compile):
                keys = _graph_keys(model, guide, points, settings)
            compile, choice = choose_compile(
                settings.compile,
                points.shape[0],
                settings.num_samples,
                points.device,
                len(keys),
                cached_graphs(keys),
            )
            settings = dataclasses.replace(settings, compile=compile)
        results, seconds, compile_time, fallback = estimate_points(
            model, guide, points, settings, callback
        )
        # The outcome: compiled where the graphs ran, not where they fell back.
        compiled, choice = compile_outcome(compile, choice, fallback)
        activity = distributed.from_main(lambda: activity_of(guide, points, settings))
        main = distributed.is_main()
        # The files' name is chosen as they are written, one process at a time:
        # two evaluations of other settings that ran together took one name.
        with locks.waiting(self.path, "evaluations") if main else nullcontext():
            on = _label(data.name, data_dir or config.data_dir) if other else None
            path = distributed.from_main(
                lambda: result_path(self.path, settings, points.shape[0], on)
            )
            evaluation = summarise(results, settings, config, activity, path, on)
            evaluation.time, evaluation.compile_time = seconds, compile_time
            evaluation.compiled = compiled
            evaluation.compile_choice = choice
            evaluation.trained_steps = steps
            if compile_time > 0 and compiled and main:
                remember_graphs(keys)  # for a later evaluation's "auto"
            if main:
                warn_of_problems(results[:, 0])
                evaluation.write(results[:, 0], results[:, 1:])
        distributed.barrier()  # the files are written when any rank returns
        return evaluation


def plan_fit(
    given: dict[str, Any],
    *,
    out: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike = "runs",
    resume: bool = False,
    restarted: bool = False,
    defaults: dict[str, Any] | None = None,
    make_folder: bool = True,
    named: Iterable[str] | None = None,
) -> tuple[Run, RunConfig, bool]:
    """The run a fit means, its config, and whether it resumes.

    ``given``: the settings a user chose (field -> value); ``defaults``: a
    command's own, where they take effect, and ``named``: the settings a user
    named (see ``RunConfig.merge``). With
    ``resume``, the run at ``out`` (else the latest in ``runs_dir``) with
    ``given`` over its config (see :meth:`~pyro_iwae.Run.resumed_config`); else a
    new run at ``out`` (else in a fresh folder of ``runs_dir``). ``restarted``: torchrun
    restarted the workers, which resume the run at ``out`` if this torchrun job
    started it and it has a checkpoint. Under torchrun, rank 0 decides for all. Without
    ``make_folder`` (to learn the config alone), a new run in ``runs_dir`` is
    ``Run(runs_dir)``, its folder not made.

    :raises ConfigError, ValueError: for settings that do not go together.
    :raises RunError: if there is no run to resume.
    """
    if restarted and out is not None and not resume:
        # Only the run this job started: a new run the first attempt refused (at
        # a finished run, or one another process trains) stays refused.
        resume = distributed.from_main(
            lambda: (
                Run(out).has_checkpoint and distributed.started_by_this_job(Path(out))
            )
        )
    if resume:
        run = distributed.from_main(lambda: Run.find(out, runs_dir))
        return run, distributed.from_main(lambda: run.resumed_config(given)), True
    config = RunConfig.merge(given, defaults=defaults, named=named)
    if out is not None:
        return Run(out), config, False
    if not make_folder:
        return Run(runs_dir), config, False
    return distributed.from_main(lambda: Run.new(config, runs_dir)), config, False


def _label(name: str, data_dir: str | os.PathLike | None) -> str:
    """The name of other data in an evaluation: a built-in data set's with the
    folder it was read from (that of the run's name, from another folder, got
    the run's own name), ``<folder>/<name>``."""
    folder = data_folder(name, data_dir)
    return name if folder is None else str(Path(folder) / name)


def _as_dataset(dataset: str | os.PathLike) -> str:
    """A built-in name as it is; a data file's path made absolute."""
    if is_data_file(dataset):
        return str(Path(dataset).expanduser().resolve())
    return str(dataset)


def train_run(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    data_dir: str | os.PathLike | None = None,
    callback: FitCallback | None = None,
) -> list[dict[str, Any]]:
    """Trains run ``config`` in ``run_dir``, or resumes it: :meth:`Run.train`."""
    return Run(run_dir).train(
        config, resume=resume, data_dir=data_dir, callback=callback
    )


def load_run(
    run_dir: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[RunConfig, torch.nn.Module, torch.nn.Module]:
    """The config, model and guide of a run, with the checkpoint's parameters.

    :param device: where to put model and guide (default: the CPU).
    :raises RunError: if ``run_dir`` is not a run directory.
    :raises CheckpointError: if the checkpoint is missing, corrupt, or of
        another architecture.
    """
    config, model, guide, _ = _load_run(run_dir, device)
    return config, model, guide


def _load_run(
    run_dir: str | os.PathLike, device: torch.device | str | None
) -> tuple[RunConfig, torch.nn.Module, torch.nn.Module, int | None]:
    """:func:`load_run`, and the training steps its checkpoint holds (None: not
    recorded)."""
    run_dir = Path(run_dir)
    config = RunConfig.load(run_dir)
    device = torch.device("cpu" if device is None else device)
    path = run_dir / CHECKPOINT_FILE
    checkpoint = load_trained(path, map_location=device)
    try:
        model, guide = build_run(config, device=device)
    except ValueError as e:
        raise RunError(
            f"{run_dir / CONFIG_FILE} names no buildable model and guide "
            f"({one_line(e)}); restore it or start a new run"
        ) from e
    load_state(model, checkpoint["model"], "model", path)
    load_state(guide, checkpoint["guide"], "guide", path)
    return config, model, guide, trained_steps(checkpoint)


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    num_samples: int = 5000,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 100,
    chunk_size: int | None = None,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    callback: Callable[[torch.Tensor, int], None] | None = None,
    method: str = "iwae",
    ais_steps: int = 1000,
    num_chains: int = 16,
    compile: bool | str | None = "auto",
    dataset: str | os.PathLike | None = None,
) -> Evaluation:
    """Estimates the negative log-likelihood of a run's model, per point, with
    the settings of :class:`EvalSettings` (the other method's keep their
    defaults): ``Run(run_dir).evaluate(...)``, see :meth:`Run.evaluate`.

    :returns: an :class:`Evaluation`, the content of the JSON file.
    :raises ConfigError: for settings out of range or of the other method.
    :raises RunError, CheckpointError, pyro_iwae.data.DataError: see
        :func:`load_run` and :meth:`Run.data`.
    """
    settings = EvalSettings(
        num_samples=num_samples,
        split=split,
        limit=limit,
        chunk_size=chunk_size,
        batch_size=batch_size,
        seed=seed,
        method=method,
        ais_steps=ais_steps,
        num_chains=num_chains,
        compile=compile,
    )
    return Run(run_dir).evaluate(
        settings, data_dir=data_dir, dataset=dataset, device=device, callback=callback
    )


def _points(split: torch.Tensor, data: Dataset, settings: EvalSettings) -> torch.Tensor:
    """The points to evaluate, of ``split`` of ``data``: the test set keeps its
    fixed binarisation, so that every evaluation (and the per-epoch test bound)
    sees the same points."""
    points = split[: settings.limit]
    if settings.split != "test" and data.binarize == "dynamic":
        generator = torch.Generator().manual_seed(settings.seed)
        return torch.bernoulli(points, generator=generator)
    return points


def _split(
    data: Dataset, settings: EvalSettings, train_limit: int | None
) -> torch.Tensor:
    """The split of ``data`` that ``settings`` evaluate, all of it: the training
    split of a run trained on its first ``train_limit`` points is those points
    (as :meth:`RunConfig.load_data` cuts them), so that a train/test gap is
    that of the points it learnt from."""
    if settings.split == "test":
        return data.test
    return data.train if train_limit is None else data.train[:train_limit]


def _graph_keys(
    model: torch.nn.Module,
    guide: torch.nn.Module,
    points: torch.Tensor,
    settings: EvalSettings,
) -> list[str]:
    """The keys of the log-weight graphs of an evaluation of ``points``."""
    chunk = {"num_samples": settings.num_samples, "chunk_size": settings.chunk_size}
    shapes = batch_shapes(points.shape, settings.batch_size)
    return graph_keys(
        settings.compile, {"log_likelihood": chunk}, model, guide, shapes, points.device
    )
