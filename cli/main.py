"""The ``pyro-iwae`` command: train, evaluate and sample IWAEs from the shell.

This module only parses options, calls :mod:`pyro_iwae` and reports; errors of
the library become one-line ``Error: ...`` messages with a non-zero exit code.
The options of fit and eval-nll are made from the settings the library
declares (see :mod:`.options`).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch

import pyro_iwae
from pyro_iwae.data import DATASETS
from pyro_iwae.errors import (
    ConfigError,
    ParticleBroadcastError,
    PyroIwaeError,
    RunError,
)
from pyro_iwae.infer.sampling import reconstruct, sample_images
from pyro_iwae.runs import distributed, locks
from pyro_iwae.runs.allocator import keep_freed_memory
from pyro_iwae.runs.callbacks import CallbackList
from pyro_iwae.runs.config import RunConfig
from pyro_iwae.runs.denormals import flush_denormals_from_start
from pyro_iwae.runs.eval_results import EvalSettings, Evaluation, checkpoint_place
from pyro_iwae.runs.plots import (
    image_range,
    save_curves,
    save_image_grid,
    save_reconstruction_grid,
)
from pyro_iwae.runs.run import Run, plan_fit
from pyro_iwae.runs.settings import read_settings
from pyro_iwae.runs.tracking import (
    TRACKERS,
    log_evaluation,
    make_trackers,
    trackers_of,
)

from .common import (
    continue_with,
    cuda_option,
    device_of,
    explicit,
    library_errors,
    particle_text,
    path_option,
    restarted,
    runs_dir_option,
)
from .options import OPTION_NAMES, cli_text, run_option, settings_options
from .progress import EvalProgress, FitProgress, counted, speed_text

#: RunConfig field -> its option, for the library's messages.
_OPTION_NAMES = OPTION_NAMES


_data_dir_option = run_option("data_dir")
#: --data-dir of a command on a trained run: the folder it recorded is the
#: default (the help claimed $PYRO_IWAE_DATA's).
_run_data_dir_option = run_option(
    "data_dir",
    default_text="the folder the run's fit read, recorded in its config.json; for "
    "a run that recorded none, $PYRO_IWAE_DATA, else ~/.cache/pyro-iwae",
)
_logger_option = click.option(
    "--logger",
    "loggers",
    type=click.Choice(TRACKERS),
    multiple=True,
    help="Also log to this tracker, in the run directory (repeat for several; "
    "mlflow uses $MLFLOW_TRACKING_URI when set).",
)


def _quiet_mlflow() -> None:
    # MLflow logs at INFO when it creates its database: noise on a terminal.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _dataset_option(other: str) -> Callable:
    """--dataset of a command on a trained run; ``other``: what it does with
    data other than the run's."""
    return run_option(
        "dataset",
        command_default=None,
        default_text="the run's",
        help="Where the run's data are now (a data file's new path, the same "
        f"points as in training), or other data of the same width: {other}.",
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pyro_iwae.__version__, prog_name="pyro-iwae")
def cli() -> None:
    """Importance weighted autoencoders (Burda et al. 2016) with Pyro.

    Train with `pyro-iwae fit`, then `pyro-iwae eval-nll --k 5000` estimates
    the test negative log-likelihood of the latest run.
    """


@cli.command(context_settings={"show_default": True})
@settings_options(RunConfig)
@path_option(
    "--config",
    "Settings file (JSON, TOML, or YAML with PyYAML installed) in the keys of a "
    "run's config.json; options given override it. Relative paths in it are read "
    "from its folder.",
    folder=False,
    exists=True,
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the settings the run would use, as JSON in the keys of a run's "
    "config.json, and train nothing.",
)
@path_option(
    "--out",
    "Run directory for config.json, metrics.jsonl and checkpoint.pt.",
    show_default="a new folder in --runs-dir named <time>-<dataset>-<objective>-k<k>",
)
@runs_dir_option("Folder for new run directories (and --resume without --out).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out (default: the latest run in --runs-dir) from "
    "its last checkpoint, with its own settings; more --epochs or --stages "
    "extend it.",
)
@cuda_option
@click.option(
    "--quiet",
    is_flag=True,
    help="No progress bar or per-epoch lines (the bar is also off when stderr "
    "is not a terminal).",
)
@_logger_option
@click.pass_context
@library_errors
def fit(ctx: click.Context, **options: Any) -> None:
    """Train a model and guide (the paper's, by default); writes a run directory.

    Training images of the built-in data sets are binarised afresh for every
    mini-batch (see --binarize); after each epoch the test bound at the
    training k is computed on the first --test-limit test points, and a
    checkpoint is written. One process at a time trains a run: another fit on
    it is refused and changes nothing.

    Under torchrun (`torchrun --nproc-per-node=N $(command -v pyro-iwae) fit
    ...`) the N processes train one run: --batch-size is the global batch,
    split evenly over them; rank 0 writes the run directory. With
    --max-restarts, pass --out: a restarted worker resumes the run this
    torchrun job started there, and no other.
    """
    # Before torch's thread pool starts, so that its workers flush too.
    flush_denormals_from_start()
    given = read_settings(options["config"]) if options["config"] else {}
    # A file's settings at their defaults (such as a printed config's) name none.
    defaults = RunConfig().to_dict()
    # Where the run goes and what fit shows belong to the command, not the run.
    commands = sorted(set(given) & set(ctx.params) - set(defaults))
    if commands:
        flags = ", ".join("--" + n.replace("_", "-") for n in commands)
        raise ConfigError(
            f"{', '.join(commands)} in {options['config']} are options of the "
            f"command, not settings of a run; give them on the command line ({flags})",
            literal=True,
        )
    named = [n for n, v in given.items() if defaults.get(n, v) != v]
    flags = {n: options[n] for n in _fields(RunConfig) if explicit(ctx, n)}
    if "dataset" in flags and flags["dataset"] != given.get("dataset"):
        # The file's x_dim is its own data set's (784 in a printed config of
        # mnist-mini): that of the data set given instead is learnt from it.
        given.pop("x_dim", None)
    # An error names a setting the file gave as the file's key, not as an option.
    where = f" (in {Path(options['config']).name})" if options["config"] else ""
    # Every key of the file, at its default too: a resume compares it with the run's.
    in_file = {n: n + where for n in given if n not in flags}
    given.update(flags)
    named += list(flags)
    # "device" comes from a settings file only (the option is --cuda).
    from_file = not options["cuda"] and given.get("device") == "cuda"
    asked_by = f'"device": "cuda"{where}' if from_file else "--cuda"
    device = device_of(options["cuda"] or from_file, asked_by)
    given["device"] = device
    distributed.init(device)
    try:
        run, config, resume = plan_fit(
            given,
            out=options["out"],
            runs_dir=options["runs_dir"],
            resume=options["resume"],
            restarted=restarted(),
            defaults=RunConfig.command_defaults(),
            make_folder=not options["print_config"],
            named=named,
        )
    except ValueError as e:
        if isinstance(e, PyroIwaeError) and not isinstance(e, ConfigError):
            raise
        raise _settings_error(e, in_file, where) from None
    if options["print_config"]:
        click.echo(json.dumps(config.to_dict(), indent=2))
        return
    try:
        _train(run, config, resume, options["quiet"], options["loggers"])
    except ConfigError as e:  # a data file's own test set, known once it is read
        raise _settings_error(e, in_file, where) from None


def _settings_error(
    e: ValueError, in_file: dict[str, str], where: str
) -> click.UsageError:
    """The usage error of ``e``, naming a setting read from the settings file
    (``in_file``: field -> its name there) as the file's key."""
    names = {**OPTION_NAMES, **in_file}
    message = e.render(names) if isinstance(e, ConfigError) else str(e)
    if in_file:  # said once: "(in f.json)" after every setting read as noise
        head, found, rest = message.partition(where)
        message = head + found + rest.replace(where, "")
    return click.UsageError(cli_text(message))


def _fields(cls: type) -> list[str]:
    return list(cls.__dataclass_fields__)


def resume_arguments(run_dir: Path, loggers: Sequence[str], device: str) -> str:
    """``fit``'s arguments to resume the run in ``run_dir`` as it ran: with its
    loggers and, as a resume may change the device, on ``device``'s kind."""
    out = shlex.quote(str(run_dir))  # a command to paste into a shell
    logging = "".join(f" --logger {name}" for name in dict.fromkeys(loggers))
    cuda = " --cuda" if torch.device(device).type == "cuda" else ""
    return f"fit --resume --out {out}{logging}{cuda}"


def _train(
    run: Run, config: RunConfig, resume: bool, quiet: bool, loggers: Sequence[str]
) -> None:
    """Trains ``run`` and reports, also to the trackers ``loggers``; Ctrl-C says
    how to go on."""
    unit = "img/s" if config.dataset in DATASETS else "points/s"
    progress = FitProgress(quiet or not distributed.is_main(), unit)
    _quiet_mlflow()
    untracked = [n for n in trackers_of(run.path) if n not in loggers] if resume else []
    if untracked and distributed.is_main():
        options = " ".join(f"--logger {name}" for name in untracked)
        click.echo(
            f"note: an earlier fit of this run logged to {', '.join(untracked)}; "
            f"add {options} to go on logging there",
            err=True,
        )
    try:
        trackers = make_trackers(loggers, run.path)
    except Exception:
        if not resume and run.path.is_dir() and not any(run.path.iterdir()):
            run.path.rmdir()  # the folder this call made for the run, still empty
        raise
    callback = CallbackList([progress, *trackers])
    start = time.perf_counter()
    try:
        history = run.train(config, resume=resume, callback=callback)
    except KeyboardInterrupt:
        progress.close()
        for tracker in trackers:
            tracker.interrupted()
        if not distributed.is_main():
            sys.exit(130)  # rank 0 says how to go on, once
        if run.has_checkpoint:
            advice = continue_with(resume_arguments(run.path, loggers, config.device))
        else:
            advice = (
                "no epoch had finished, so nothing was kept: run the same command "
                "again to start afresh"
            )
        click.echo(f"Interrupted; {advice}", err=True)
        sys.exit(130)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    click.echo(f"run: {run.path}")
    if resume and progress.epochs_run == 0:
        click.echo(
            "the run had finished its schedule: nothing left to train (more "
            "--epochs or --stages extend it)"
        )
    if history and progress.epochs_run:  # else nothing was trained to report
        last = history[-1]
        test = last["test_bound"]
        test_text = (
            "n/a"
            if test is None
            else f"{test:.2f} (on {last['test_points']} test points)"
        )
        click.echo(
            f"final bounds (k={last['k']}, nats per point): train "
            f"{last['train_bound']:.2f}, test {test_text}"
        )
        epochs = last["epoch"]
        this_call = history[len(history) - progress.epochs_run :]
        compiling = sum(m.get("compile_time", 0.0) for m in this_call)
        compiling = _compiling(compiling, last.get("compiled"), ", ", "")
        steps = "as compiled graphs" if last.get("compiled") else "eagerly"
        if last.get("compile_choice", "as asked") != "as asked":
            steps += f" ({last['compile_choice']})"
        click.echo(
            f"trained {epochs} epoch{'s' if epochs > 1 else ''} in "
            f"{last['elapsed']:.1f} s ({speed_text(last, unit)} in the last); "
            f"this call took {seconds:.1f} s{compiling}; the steps ran {steps}"
        )
    click.echo(f"next: pyro-iwae eval-nll {shlex.quote(str(run.path))} --k 5000")


@cli.command("eval-nll", context_settings={"show_default": True})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@settings_options(EvalSettings)
@_dataset_option(
    "evaluated, and named in the result and in its file's name "
    "(eval-test-k5000-on-NAME.json)"
)
@_run_data_dir_option
@runs_dir_option(
    "Folder searched for the latest trained run (one with a checkpoint) when "
    "RUN_DIR is omitted."
)
@cuda_option
@click.option(
    "--quiet",
    is_flag=True,
    help="No progress bar (it is also off when stderr is not a terminal).",
)
@_logger_option
@click.pass_context
@library_errors
def eval_nll(
    ctx: click.Context,
    run_dir: Path | None,
    dataset: str | None,
    data_dir: Path | None,
    runs_dir: Path,
    cuda: bool,
    quiet: bool,
    loggers: tuple[str, ...],
    **values: Any,
) -> None:
    """Estimate the negative log-likelihood of a trained run, in nats.

    RUN_DIR defaults to the latest run in --runs-dir. Prints the mean NLL with
    its standard error (std / sqrt(n)), how far to trust the estimates (per
    point: the effective sample size of the importance weights and their
    Pareto k-hat; above 0.7 an estimate is unreliable) and the active units per
    latent layer, and writes them to RUN_DIR/eval-<split>-k<k>.json (with
    --method ais: eval-<split>-ais<steps>x<chains>.json), beside the per-point
    estimates and diagnostics. An evaluation of other points, --seed or
    --batch-size is kept: the new one's names then spell its settings.

    The particles of each batch of --batch-size points come from a random
    stream seeded by (--seed, batch number), so the per-point estimates do not
    depend on how many processes share the work: under torchrun
    (`torchrun --nproc-per-node=N $(command -v pyro-iwae) eval-nll ...`) the
    batches are dealt to the N processes and rank 0 writes the same files.
    """
    settings = EvalSettings(**values)
    settings.validate([name for name in values if explicit(ctx, name)])
    device = device_of(cuda)
    distributed.init(device)
    run = distributed.from_main(lambda: Run.find(run_dir, runs_dir, trained=True))
    progress = EvalProgress(quiet or not distributed.is_main())
    try:
        evaluation = run.evaluate(
            settings,
            data_dir=data_dir,
            dataset=dataset,
            device=device,
            callback=progress,
        )
    except ParticleBroadcastError as e:
        # Its remedy is this command's option, which AIS lacks.
        remedy = (
            "or pass --sequential-particles to eval-nll to draw the particles one "
            "at a time"
            if settings.method == "iwae"
            else "AIS runs its chains in one batch and has no --sequential-particles;"
            " estimate with --method iwae --sequential-particles instead"
        )
        raise click.ClickException(particle_text(e, remedy)) from None
    finally:
        progress.close()
    # The result first: it is written, whatever logging it does.
    click.echo(f"run: {run.path}")
    place = checkpoint_place(run.path, evaluation.trained_steps)
    training = locks.held(run.path, locks.WRITER) is not None
    for line in _eval_report(evaluation, _checkpoint_line(evaluation, place, training)):
        click.echo(line)
    _quiet_mlflow()
    log_evaluation(loggers, run.path, evaluation)


def _compiling(seconds: float, compiled: bool | None, before: str, after: str) -> str:
    """The seconds of a call spent on graphs: compiling them, or tracing ones
    that fell back to the eager path (nothing where none)."""
    if not seconds:
        return ""
    spent = "compiling" if compiled else "tracing graphs that fell back to eager"
    return f"{before}{seconds:.1f} s of it {spent}{after}"


def _checkpoint_line(
    result: Evaluation, place: tuple[int, int] | None, training: bool
) -> str | None:
    """What eval-nll says of the checkpoint it scored, at ``place`` (see
    :func:`checkpoint_place`) of a run still ``training`` or not: nothing where it
    is the end of an epoch of a run no longer trained."""
    if place is None or not (place[1] or training):
        return None
    epochs, into = place
    where = f"{counted(into, 'step')} into epoch {epochs + 1}" if into else None
    where = where or (f"after epoch {epochs}" if epochs else "before epoch 1")
    line = f"scored the checkpoint at step {result.trained_steps} ({where})"
    if training:
        return line + " of a run still being trained"
    return line + ", where its fit stopped: fit --resume finishes the epoch"


def _eval_report(result: Evaluation, checkpoint: str | None = None) -> list[str]:
    """The lines eval-nll prints about ``result``, and the line ``checkpoint``
    on the checkpoint it scored (see :func:`_checkpoint_line`)."""
    if result.method == "iwae":
        how, samples = f"k={result.k}", counted(result.k, "sample")
    else:
        samples = counted(result.chains, "chain")
        how = f"AIS, {counted(result.ais_steps, 'step')} x {samples}"
    d = result.diagnostics
    if d["khat_above_0.7"] is None:
        tail = "Pareto k-hat needs more than 20 samples"
    else:
        # None where it is infinite: -inf where the weights of half the points
        # or more are flat (or in files written before khat_flat, where only
        # -inf was), +inf where most points' weight is on one particle.
        median, flat = d["khat_median"], d.get("khat_flat")
        if median is None:
            median = "-inf" if flat is None or flat >= 0.5 else "inf"
        else:
            median = f"{median:.2f}"
        tail = (
            f"Pareto k-hat median {median}, above 0.7 on "
            f"{100 * d['khat_above_0.7']:.0f}% of points"
        )
        if d.get("khat_flat"):  # absent from evaluations written before it
            tail += (
                f", -inf (flat weights, as for an exact guide) on "
                f"{100 * d['khat_flat']:.0f}%"
            )
    trust = f"median ESS {d['ess_median']:.1f} of {samples}; {tail}"
    if result.method == "ais":
        acceptance = d["acceptance_mean"]
        # NaN, or null in the JSON, where one step made no HMC move.
        if acceptance is None or math.isnan(acceptance):
            trust += "; no HMC moves with --ais-steps 1 (plain importance sampling)"
        else:
            trust += f"; mean HMC acceptance {acceptance:.2f}"
    elif (d["khat_above_0.7"] or 0) > 0:
        # Above 0.7 the samples needed grow too fast for more of them to help.
        trust += (
            " (unreliable there, and more samples help little: for continuous "
            "latents, try --method ais)"
        )
    where = f"{how}, {result.split} split, {counted(result.points, 'point')}"
    if result.stderr is None:  # one point: no spread to estimate
        lines = [f"NLL = {result.nll:.2f} nats ({where}: no standard error)"]
    else:
        lines = [
            f"NLL = {result.nll:.2f} ± {result.stderr:.2f} nats (mean ± standard "
            f"error; {where})"
        ]
    if checkpoint is not None:  # what the NLL is of
        lines.append(checkpoint)
    if result.bits_per_dim is not None:
        bits_error = result.bits_per_dim_stderr
        bits_error = "" if bits_error is None else f" ± {bits_error:.4f}"
        lines.append(
            f"bits/dim = {result.bits_per_dim:.4f}{bits_error} (of the values as given)"
        )
    units = ", ".join(
        f"{name} {count}/{result.latent_units[name]}"
        for name, count in result.active_units.items()
    )
    compiling = _compiling(result.compile_time, result.compiled, " (", ")")
    compiled = "compiled" if result.compiled else "eager"
    if result.compile_choice != "as asked":
        compiled += f" ({result.compile_choice})"
    return [
        *lines,
        f"diagnostics: {trust}",
        f"active units: {units}",
        f"time: {result.time:.1f} s{compiling}; {compiled}",
        f"wrote {Path(result.file).name}, {result.estimates_file} and "
        f"{result.diagnostics_file} in the run directory",
    ]


@cli.command(context_settings={"show_default": True})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=64,
    help="Number of samples (and of test images reconstructed).",
)
@path_option(
    "--out",
    "PNG of the samples; the reconstructions and training curves go next to it "
    "as <name>-reconstructions.png and <name>-curves.png.",
    folder=False,
    show_default="RUN_DIR/samples.png",
)
@_dataset_option("its test points are reconstructed")
@_run_data_dir_option
@runs_dir_option(
    "Folder searched for the latest trained run (one with a checkpoint) when "
    "RUN_DIR is omitted."
)
@click.option("--seed", type=int, default=0, help="Random seed of the samples.")
@cuda_option
@library_errors
def sample(
    run_dir: Path | None,
    n: int,
    out: Path | None,
    dataset: str | None,
    data_dir: Path | None,
    runs_dir: Path,
    seed: int,
    cuda: bool,
) -> None:
    """Draw images from a trained run, reconstruct test images, plot its curves.

    RUN_DIR defaults to the latest run in --runs-dir. Images show pixel
    probabilities of p(x|z): z from the prior for samples, z ~ q(z|x) for the
    reconstructions (each row of test images above its reconstructions), all
    drawn black to white over [0, 1], or over the training data's least to
    greatest value for data outside [0, 1].
    """
    # ".png" alone is a hidden file's name without a suffix: no PNG name either.
    if out is not None and out.suffix.lower() != ".png":
        raise click.BadParameter(
            f"{str(out)!r} is no file name ending in .png; the pictures are PNGs: "
            "give a path such as samples.png",
            param_hint="'--out'",
        )
    device = device_of(cuda)
    run = Run.find(run_dir, runs_dir, trained=True)
    config, model, guide = run.load(device)
    data = run.data(data_dir, dataset, config)
    out = run.path / "samples.png" if out is None else out
    torch.manual_seed(seed)
    paths = []
    shape = data.image_shape
    if shape is None:
        click.echo(f"{config.dataset} holds no pictures: only the curves are drawn")
    else:
        images = sample_images(model, n, config.x_dim)
        x = data.test[:n].to(device)
        if dataset is not None and not run.holds_own(data):
            click.echo(f"reconstructions of {data.name}, not the run's own data")
        if len(x) < n:
            there = (
                "the one test point there is"
                if len(x) == 1
                else f"the {len(x)} test points there are"
            )
            click.echo(f"reconstructions of {there}")
        # One scale for all, the data's: 0..255 or standardised data clipped
        # to [0, 1] drew as black and white.
        scale = image_range(data.train)
        paths += [
            save_image_grid(images, out, image_shape=shape, value_range=scale),
            save_reconstruction_grid(
                x,
                reconstruct(model, guide, x),
                out.with_name(f"{out.stem}-reconstructions.png"),
                image_shape=shape,
                value_range=scale,
            ),
        ]
    try:
        metrics = run.metrics()
    except RunError as e:  # the pictures need no metrics: draw them anyway
        warnings.warn(f"no curves drawn: {e}", stacklevel=1)
    else:
        curves = out.with_name(f"{out.stem}-curves.png")
        paths.append(save_curves(metrics, curves, title=f"{run.path.name}"))
    for path in paths:
        click.echo(f"wrote {path}")


def main() -> None:
    """The ``pyro-iwae`` console script: :func:`cli`, with freed memory kept for
    reuse and the interpreter's shutdown left without its last garbage
    collection."""
    # Each step frees what the next allocates again: kept in the heap, it is not
    # faulted in afresh (pyro_iwae.runs.allocator).
    keep_freed_memory()
    try:
        cli()
    finally:
        # Everything is written by now. Python's shutdown would walk every
        # object torch, dynamo and inductor made (0.4-0.8 s of a command's wall
        # here, bench/shutdown.py); frozen objects are left out of that walk
        # and are still freed by the operating system.
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    main()


# Registered last: it builds on the group and its helpers.
from .grid import reproduce  # noqa: E402

cli.add_command(reproduce)
from . import check_guide as check_guide  # noqa: E402  (registers check-guide)
