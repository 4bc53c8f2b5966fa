"""The writer of a run directory: a run trained there (new, resumed or
extended by more epochs or stages) under the run's lock, and nothing left
behind by a new run that failed before its first checkpoint. Used through
:class:`pyro_iwae.runs.run.Run`."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..data import Dataset, is_data_file
from ..data_files import holds_test_set
from ..errors import (
    BuilderError,
    CheckpointError,
    ConfigError,
    DataError,
    RunBusy,
    RunError,
    literal,
    one_line,
)
from ..infer.estimable import check_program
from ..infer.evaluation import evaluating
from ..infer.objectives import IWELBO
from ..nn.likelihoods import LIKELIHOODS, support_problem
from ..nn.registry import build_guide, build_model, own_default, takes
from . import distributed, locks
from .callbacks import FitCallback
from .checkpoints import CHECKPOINT_FILE, METRICS_FILE, load_checkpoint, read_metrics
from .config import CONFIG_FILE, RunConfig
from .data_record import DATA_RECORD, data_folder, record_or_check
from .fit_steps import check_continues, check_test_bound
from .settings import held_out_error
from .training import fit

__all__ = [
    "EXTENDABLE",
    "MEANS",
    "build_run",
    "check_support",
    "differing",
    "model_likelihood",
    "resumed_config",
    "train",
]

#: Settings a resumed run may change: its schedule may go on for longer.
EXTENDABLE = ("epochs", "stages")
#: The files of a run (globs), which a new run refuses to replace.
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    CHECKPOINT_FILE,
    DATA_RECORD,
    "eval-*.json",
    "estimates-*.txt",
    "diagnostics-*.txt",
)
#: Settings that change where, from what and how a run computes, not what it
#: computes (compiled steps agree with eager ones to float rounding).
MEANS = ("device", "data_dir", "compile")


def resumed_config(path: Path, given: dict[str, Any] | None = None) -> RunConfig:
    """The config of the run in ``path`` with the settings ``given`` (field ->
    value): only :data:`EXTENDABLE` ones, device, data folder and compile may differ
    from the run's, and a data file that moved (the run's is gone) its path.

    :raises ConfigError: for another setting that differs, or settings that
        do not go together.
    :raises RunError: for an unknown setting.
    :raises CheckpointError: for a schedule shorter than the run has trained.
    """
    saved = RunConfig.load(path)
    # A setting the run has already changes nothing, and counts as not named: a
    # run's own config.json given back (its unused "stages": null with the
    # constant schedule) was refused as naming settings that take no effect.
    given = {
        name: value
        for name, value in (given or {}).items()
        if not hasattr(saved, name) or getattr(saved, name) != value
    }
    for name, value in given.items():
        if name in EXTENDABLE or name in MEANS or not hasattr(saved, name):
            continue  # an unknown name is refused by merge below, as a new run's
        if name == "dataset" and _moved(saved.dataset, value):
            continue  # its points are checked against the run's model on loading
        if getattr(saved, name) != value:
            raise ConfigError(
                f"{{{name}}} {literal(value)} differs from the run's "
                f"{literal(getattr(saved, name))}; drop {{{name}}} to resume "
                f"{literal(path)}, or start a new run"
            )
    config = RunConfig.merge(given, base=saved)
    checkpoint = path / CHECKPOINT_FILE
    if checkpoint.is_file():
        # Said here too, not only once training starts: a printed config
        # (--print-config) was one that fit then refused.
        # Mapped, not read: training loads it again, and a big model's weights
        # were read twice.
        state = load_checkpoint(checkpoint, "cpu", mmap=True)
        check_continues(state, config.make_schedule(), config.batch_size, checkpoint)
    return config


def _moved(saved: str, given: Any) -> bool:
    """Whether the data file ``given`` may stand for the run's file ``saved``,
    which is no longer where the run found it."""
    return (
        isinstance(given, str | os.PathLike)
        and is_data_file(given)
        and is_data_file(saved)
        and not Path(saved).expanduser().exists()
    )


def train(
    path: Path,
    config: RunConfig | None = None,
    *,
    resume: bool = False,
    data_dir: str | os.PathLike | None = None,
    callback: FitCallback | None = None,
    made: bool = False,
) -> list[dict[str, Any]]:
    """Trains ``config`` here (writing ``config.json``), or resumes the run.

    On ``resume`` ``config`` (None: the run's own) must equal the saved one
    but for ``device``, ``data_dir`` and a schedule that goes on for longer
    (see :data:`EXTENDABLE`). ``data_dir`` overrides ``config.data_dir``
    for loading only. Returns the metrics of every epoch (see :func:`fit`).
    Where it fails or is interrupted before the run keeps a checkpoint, a new
    run's files are removed, and ``callback.on_run_discarded`` is called (the
    trackers remove theirs).

    :raises RunBusy: if another process (group) trains the run.
    :raises ConfigError, ValueError: if ``config`` was changed, since it was
        made, into settings that do not go together (see
        :meth:`RunConfig.validate`), or under torchrun does not split over
        the ranks.
    :raises RunError: on a config that differs from the run's, or a broken run.
    :raises CheckpointError: on ``resume`` with no usable checkpoint.
    :raises pyro_iwae.data.DataError: if the data cannot be loaded.
    :raises TrainingDiverged: see :func:`fit`.

    Under torchrun, every rank calls it alike: rank 0 holds the lock, checks
    and writes the run directory, and the ranks train the run together.
    """
    config = RunConfig.load(path) if config is None else config
    config.validate()  # before anything is written
    distributed.init(config.device)
    ranks = distributed.current()
    if ranks is not None:
        distributed.check_batch_size(config.batch_size, ranks.world)
        distributed.check_objective(config.make_objective())
    made = distributed.from_main(lambda m=made: _make_folder(path, resume, m))
    try:
        with locks.hold_for_ranks(path, locks.WRITER) as holder:
            if holder is not None:
                holder = (
                    holder or locks.holder(path, locks.WRITER) or "its lock is taken"
                )
                raise RunBusy(
                    f"{path} is being written by another process ({holder}); "
                    "nothing was changed: wait for it to end, or choose another "
                    "run directory"
                )
            # Checked before anything can be discarded: a refused folder's
            # files are not the run's to remove.
            changed = distributed.from_main(
                lambda: _check(path, config, resume, callback)
            )
            if not resume and distributed.is_main():
                distributed.record_job(path)
            try:
                return _train(path, config, resume, data_dir, callback, changed)
            except BaseException:
                if not resume and distributed.is_main():
                    _discard_unsaved(path)
                raise
    except BaseException:
        # The trackers' files too (made before the lock was taken, the lock's
        # own file gone now): a fresh fit in the folder took over the MLflow run
        # of the discarded one, with its parameters.
        discarded = getattr(callback, "on_run_discarded", None)  # None: none
        if discarded is not None and distributed.is_main():
            if not (path / CHECKPOINT_FILE).is_file():
                discarded()
        raise
    finally:
        if made and distributed.is_main():
            _remove_if_empty(path)


def _make_folder(path: Path, resume: bool, made: bool) -> bool:
    """Makes the folder of a new run; whether it was made for it."""
    if resume:
        RunConfig.load(path)  # raises if it is no run directory
        return False
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return made
    return True


def _train(
    path: Path,
    config: RunConfig,
    resume: bool,
    data_dir: str | os.PathLike | None,
    callback: FitCallback | None,
    changed: bool,
) -> list[dict[str, Any]]:
    """:func:`train`, with the lock held and the run directory checked
    (``changed``: whether ``config.json`` is to be written)."""
    folder = data_folder(config.dataset, data_dir or config.data_dir)
    if folder is not None and not resume:
        # The folder read, absolute, saved: a later evaluation or resume under
        # another $PYRO_IWAE_DATA read other data as the run's.
        config = dataclasses.replace(config, data_dir=folder)
    try:
        data = config.load_data(data_dir)
    except DataError as e:
        gone = is_data_file(config.dataset) and not Path(config.dataset).exists()
        if not (resume and gone):
            raise
        # Other points are refused on resume: it said "or to another .npy ... file".
        raise DataError(
            f"data file {literal(config.dataset)} not found; set {{dataset}} to "
            "where it is now (a resumed run trains on the points it began with)",
            template=True,
        ) from e
    recorded = (path, config.dataset, data, config.train_limit, folder, resume)
    distributed.from_main(lambda: record_or_check(*recorded))
    if data.x_dim != config.x_dim:
        # A resumed run's model takes its x_dim: other data are what to change.
        fix = (
            "pass the data the run was trained on"
            if resume
            else f"set x_dim to {data.x_dim}"
        )
        raise RunError(
            f"{config.dataset} points have {data.x_dim} values, the config "
            f"says {config.x_dim}; {fix}"
        )
    if not resume:
        _check_held_out(config)
    check_support(config, data)
    device = distributed.init(config.device)
    try:
        model, guide = build_run(config, data.train_mean, device)
    except BuilderError as e:
        raise RunError(one_line(e)) from e
    # A model and guide that give no bound, or that the estimator cannot train,
    # fail here, before the run is written; in eval mode, so that no batch-norm
    # statistics move.
    # The first test point: binarised already where the data are, as training's are.
    point = (data.test if len(data.test) else data.train)[:1].to(device)
    with evaluating(model, guide):
        # Trained, tested each epoch and evaluated as deep as its plates nest (as
        # estimates.run_nesting finds it again): a user's model with a plate in
        # the data plate was refused, with advice to pass max_plate_nesting,
        # which no option or builder could.
        nesting = check_program(model, guide, point)
        objective = config.make_objective(nesting)
        if isinstance(objective, IWELBO):
            objective.check_guide(guide, point)
    if len(data.test) and config.test_limit != 0:
        # Said as a setting of the run: fit's own advice names its test_size.
        check_test_bound(model, guide, point, "set {test_limit} 0")
    with _config_saved(path, config, changed and distributed.is_main()):
        return fit(
            model,
            guide,
            data,
            objective,
            schedule=config.make_schedule(),
            batch_size=config.batch_size,
            seed=config.seed,
            test_size=config.test_limit,
            run_dir=path,
            resume=resume,
            config=config.to_dict(),
            checkpoint_every=config.checkpoint_every,
            device=device,
            callback=callback,
        )


@contextlib.contextmanager
def _config_saved(path: Path, config: RunConfig, saving: bool) -> Iterator[None]:
    """Writes ``config`` as the run's ``config.json`` where ``saving``, and puts a
    resumed run's config back as it was where the block fails before writing a
    checkpoint: a refused ``--resume --epochs 1`` (fit checks the checkpoint only
    once it starts) left the run asking for one epoch, and a plain resume was
    refused from then on. Once a checkpoint is written, the run has moved on
    under the new settings, which stay."""
    if not saving:
        yield
        return
    file, checkpoint = path / CONFIG_FILE, path / CHECKPOINT_FILE
    before = file.read_bytes() if file.is_file() and checkpoint.is_file() else None
    stamp = _stamp(checkpoint)
    config.save(path)
    try:
        yield
    except BaseException:
        if before is not None and _stamp(checkpoint) == stamp:
            file.write_bytes(before)
        raise


def _stamp(file: Path) -> tuple[int, int] | None:
    try:
        status = file.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


def _check(
    path: Path, config: RunConfig, resume: bool, callback: FitCallback | None
) -> bool:
    """Checks that the run can be resumed with ``config`` (or, without
    ``resume``, holds no run), and that ``callback`` can start on it
    (:meth:`~FitCallback.on_run_start`); whether ``config.json`` is to be
    written."""
    changed = _check_run(path, config, resume)
    starting = getattr(callback, "on_run_start", None)  # None: no callback
    if starting is not None:
        starting(path, resume)
    return changed


def _check_run(path: Path, config: RunConfig, resume: bool) -> bool:
    """:func:`_check`, less the callback."""
    if not resume:
        if (path / CHECKPOINT_FILE).is_file():
            raise RunError(
                f"{literal(path)} holds a run already; resume it "
                "(resume=True) or choose another run directory ({run_dir})",
                template=True,
            )
        _check_fresh(path)
        return True
    saved = RunConfig.load(path)
    if not (path / CHECKPOINT_FILE).is_file():
        epochs = len(read_metrics(path))
        if epochs:  # a checkpoint was written and is gone, or (see _untrained)
            # the process stopped as the first epoch ended, before writing it
            afresh = (
                ", or, if its process stopped as that epoch ended, start the run "
                "afresh (without resume=True)"
                if epochs == 1
                else ", or start a new run"
            )
            raise CheckpointError(
                f"{literal(path)} has no {CHECKPOINT_FILE} to resume, though "
                f"{METRICS_FILE} records {epochs} finished epoch(s); put it back if "
                f"it was moved{afresh}",
                template=True,
            )
        raise CheckpointError(
            f"{path} has no checkpoint to resume (it never finished an "
            "epoch); start a new run instead"
        )
    differences = [
        f"{name}={getattr(saved, name)!r} (not {getattr(config, name)!r})"
        for name in differing(saved, config)
    ]
    if differences:
        raise RunError(
            f"run {path} was started with {', '.join(differences)}; "
            "resume it with its own settings or start a new run"
        )
    moved = _moved(saved.dataset, config.dataset)
    return moved or bool(differing(saved, config, EXTENDABLE))


def differing(
    saved: RunConfig, config: RunConfig, fields: Iterable[str] | None = None
) -> list[str]:
    """Those of ``fields`` that differ between ``saved``, a run's config, and
    ``config``; by default, of the settings a resumed run may not change: all
    but :data:`MEANS`, :data:`EXTENDABLE` and the path of a data file that
    moved."""
    if fields is None:
        kept = {*MEANS, *EXTENDABLE}
        if _moved(saved.dataset, config.dataset):
            kept.add("dataset")
        fields = [name for name in saved.to_dict() if name not in kept]
    return [name for name in fields if getattr(saved, name) != getattr(config, name)]


def _check_fresh(path: Path) -> None:
    """:raises RunError: if the folder of a new run holds files of a run, which
    the new one would replace or stand beside; not for those of a run stopped
    before its first epoch (a killed process, or a worker torchrun restarts,
    left them: nothing trained to lose, whatever its settings)."""
    found = sorted(
        p.name
        for pattern in RUN_FILES
        for p in path.glob(pattern)
        if not p.name.startswith(".")
    )
    if not found or _untrained(path, found):
        return
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if found[3:] else "")
    # Only a checkpoint can be resumed (an evaluation alone cannot).
    resume = (
        ", or resume the run there (resume=True)" if CHECKPOINT_FILE in found else ""
    )
    raise RunError(
        f"{literal(path)} holds run files ({literal(shown)}) that a new run would "
        "replace or stand beside; choose an empty or new folder ({run_dir})" + resume,
        template=True,
    )


def _untrained(path: Path, found: list[str]) -> bool:
    """Whether the run files ``found`` in ``path`` are those of a run that
    wrote no checkpoint (one that finished at most its first epoch)."""
    if not set(found) <= {CONFIG_FILE, METRICS_FILE, DATA_RECORD} or (
        CONFIG_FILE not in found
    ):
        return False
    try:
        RunConfig.load(path)  # a run's config, not a file of the user's
        # A process stopped as the first epoch ended wrote that epoch's metrics
        # but not its checkpoint: nothing to resume either.
        return len(read_metrics(path)) <= 1
    except (RunError, ConfigError, ValueError):
        return False  # not a run's config, or not one fit wrote


def _discard_unsaved(path: Path) -> None:
    """Removes the files of a new run that has no checkpoint yet."""
    if not (path / CHECKPOINT_FILE).is_file():
        for name in (CONFIG_FILE, METRICS_FILE, DATA_RECORD, distributed.JOB_FILE):
            (path / name).unlink(missing_ok=True)


def _remove_if_empty(path: Path) -> None:
    """Removes the folder made for a run if it holds no more than its lock."""
    try:
        contents = list(path.iterdir())
        if [p.name for p in contents] in ([], [f".{locks.WRITER}.lock"]):
            for item in contents:
                item.unlink()
            path.rmdir()
    except OSError:
        pass  # another process is at it: it is not ours to remove


def build_run(
    config: RunConfig,
    data_mean: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Model and guide of ``config``, initialised from ``config.seed``.

    :param data_mean: ``[x_dim]`` training grey-level means for the model's output
        bias (None keeps the default initialisation).
    """
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        x_dim=config.x_dim,
        stochastic_layers=config.stochastic_layers,
        data_mean=data_mean,
        **config.builder_settings("model"),
    )
    guide = build_guide(
        config.guide,
        x_dim=config.x_dim,
        stochastic_layers=config.stochastic_layers,
        **config.builder_settings("guide"),
    )
    device = torch.device(config.device if device is None else device)
    return model.to(device), guide.to(device)


def _check_held_out(config: RunConfig) -> None:
    """:raises ConfigError: for a ``test_fraction`` other than its default where
    the data file holds its own test set (a built-in set's is refused by
    :meth:`RunConfig.validate`)."""
    if config.test_fraction == RunConfig.__dataclass_fields__["test_fraction"].default:
        return
    # Stored and without effect, where --sigma without the gaussian likelihood
    # is refused: so is this, a share held out of data that hold none out.
    if is_data_file(config.dataset) and holds_test_set(config.dataset):
        raise held_out_error(config.dataset)


def model_likelihood(config: RunConfig) -> str | None:
    """The likelihood of the run's model: ``config.likelihood``; at its default
    (which the builder is not given), the builder's own default where it names
    one of :data:`~pyro_iwae.nn.likelihoods.LIKELIHOODS`; None for a model
    whose builder takes no ``likelihood``, or whose own default is another
    (it sets its own).

    :raises BuilderError: see :func:`pyro_iwae.nn.registry.resolve`.
    """
    if not takes("model", config.model, "likelihood"):
        return None
    if "likelihood" in config.builder_settings("model"):
        return config.likelihood
    own = own_default("model", config.model, "likelihood")
    if own is inspect.Parameter.empty:
        return config.likelihood
    return own if own in LIKELIHOODS else None


def check_support(config: RunConfig, data: Dataset) -> None:
    """:raises DataError: if the data, as the model will see them, lie outside
    the support of the run's likelihood (or are not finite)."""
    splits = [("test", data.test)]
    if data.binarize != "dynamic":  # else binarised before the model sees them
        splits.insert(0, ("training", data.train))
    # A model that takes no likelihood has its own: real-valued data were
    # refused as outside the default Bernoulli's support, and --likelihood
    # gaussian as a setting its builder does not take.
    likelihood = model_likelihood(config)
    for split, x in splits:
        problem = support_problem(likelihood, x, f"{split} data")
        if problem is not None:
            raise DataError(f"{config.dataset}: {problem}")
