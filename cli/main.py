"""The ``pyro-iwae`` command: train, evaluate and sample IWAEs from the shell.

This module only parses options, calls :mod:`pyro_iwae` and reports; errors of
the library become one-line ``Error: ...`` messages with a non-zero exit code.

It runs past 500 lines because most of it is the declarations of the commands'
options and their help texts; the shared option makers and the error wrapper
are what a split into one module per command would have to import back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch

import pyro_iwae
from pyro_iwae import distributed
from pyro_iwae.callbacks import CallbackList, FitCallback
from pyro_iwae.checkpoints import CHECKPOINT_FILE, RunError, read_metrics
from pyro_iwae.config import RunConfig
from pyro_iwae.data import (
    BINARIZATIONS,
    DATASETS,
    FILE_SUFFIXES,
    DataError,
    is_data_file,
    load_file,
)
from pyro_iwae.grid_report import table_slot, write_report
from pyro_iwae.likelihoods import LIKELIHOODS
from pyro_iwae.networks import ACTIVATIONS
from pyro_iwae.objectives import ESTIMATORS
from pyro_iwae.plots import save_curves, save_image_grid, save_reconstruction_grid
from pyro_iwae.reproduction import Grid, run_grid
from pyro_iwae.runs import (
    EVAL_METHODS,
    evaluate_run,
    find_latest_run,
    load_run,
    new_run_dir,
    train_run,
)
from pyro_iwae.sampling import reconstruct, sample_images
from pyro_iwae.schedules import OBJECTIVES, SCHEDULES, ConfigError
from pyro_iwae.tracking import TRACKERS, TrackingError, log_evaluation, make_trackers
from pyro_iwae.training import TrainingDiverged

from .progress import EvalProgress, FitProgress

#: Epochs of the default ``fit``: about a minute on a 2-core laptop CPU.
DEFAULT_EPOCHS = 40
#: Points of the default ``eval-nll`` (the test bound's points during fit): about
#: 80 s at k = 5000 on such a CPU; --limit 0 evaluates all, as the paper does.
DEFAULT_EVAL_LIMIT = 1000
RUNS_ENV = "PYRO_IWAE_RUNS"
_DATA_DIR_DEFAULT = "$PYRO_IWAE_DATA, else ~/.cache/pyro-iwae"

# fit option -> RunConfig field, for options that a resumed run must keep.
_CONFIG_OPTIONS = {
    "dataset": "dataset",
    "binarize": "binarize",
    "test_fraction": "test_fraction",
    "likelihood": "likelihood",
    "sigma": "sigma",
    "hidden": "hidden",
    "activation": "activation",
    "latent_dim": "latent_dim",
    "model": "model",
    "guide": "guide",
    "layers": "stochastic_layers",
    "objective": "objective",
    "estimator": "estimator",
    "alpha": "alpha",
    "groups": "num_groups",
    "beta": "beta",
    "particles": "num_particles",
    "schedule": "schedule",
    "stages": "stages",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "seed": "seed",
    "train_limit": "train_limit",
    "test_limit": "test_limit",
    "compile": "compile",
    "checkpoint_every": "checkpoint_every",
}
#: RunConfig field -> its option, for the library's messages.
_OPTION_NAMES = {
    field: "--" + option.replace("_", "-") for option, field in _CONFIG_OPTIONS.items()
}


def _library_errors(command: Callable) -> Callable:
    """Turns the library's own errors into one-line Click errors, and every
    warning into one ``Warning: ...`` line on stderr.

    Under torchrun, ranks other than 0 print nothing on stdout and prefix their
    errors with their rank; the process group ends with the command.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # torch logs "No CUDA runtime is found" when --compile loads its C++
        # toolchain on a machine with a CUDA toolkit and no GPU: noise on the CPU.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        rank = _rank()
        silent = contextlib.redirect_stdout(io.StringIO())
        with warnings.catch_warnings(), silent if rank else contextlib.nullcontext():
            warnings.showwarning = _show_warning
            try:
                return command(*args, **kwargs)
            except (RunError, DataError, TrainingDiverged) as e:
                raise click.ClickException(_ranked(str(e), rank)) from None
            except NotImplementedError as e:
                # The objective refusing a model or guide (a discrete guide
                # without --estimator vimco): its message says what to use.
                raise click.ClickException(_ranked(str(e), rank)) from None
            except click.ClickException as e:
                if not rank:
                    raise
                message = _ranked(e.format_message(), rank)
                raise click.ClickException(message) from None
            finally:
                distributed.shutdown()

    return wrapper


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ["RANK"]) if distributed.launched() else 0


def _ranked(message: str, rank: int) -> str:
    return f"rank {rank}: {message}" if rank else message


def _restarted() -> bool:
    """Whether torchrun restarted this worker after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    click.echo(f"Warning: {message}", err=True)


def _device(cuda: bool) -> str:
    if not cuda:
        return "cpu"
    if not torch.cuda.is_available():
        raise click.UsageError(
            "--cuda: CUDA is not available on this machine (no GPU, or torch was "
            "built without CUDA); drop --cuda to run on the CPU"
        )
    return "cuda"


def _explicit(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line or in the environment."""
    source = ctx.get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def _trackers(
    names: Sequence[str], run_dir: Path, result: dict[str, Any] | None = None
) -> list[FitCallback]:
    """The trackers ``names`` of the run (none off rank 0); with ``result``, logs
    that evaluation to them instead."""
    # MLflow logs at INFO when it creates its database: noise on a terminal.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        if result is not None:
            log_evaluation(names, run_dir, result)
            return []
        return make_trackers(names, run_dir)
    except TrackingError as e:
        raise click.ClickException(str(e)) from None


def _run_dir_or_latest(run_dir: Path | None, runs_dir: Path) -> Path:
    return run_dir if run_dir is not None else find_latest_run(runs_dir)


def _data_dir_option(command: Callable) -> Callable:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        show_default=_DATA_DIR_DEFAULT,
        help="Folder holding the data (MNIST/raw, FashionMNIST/raw or "
        "chardata.mat); mnist-mini is embedded and needs none.",
    )(command)


def _runs_dir_option(help: str) -> Callable:
    return click.option(
        "--runs-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("runs"),
        envvar=RUNS_ENV,
        show_envvar=True,
        help=help,
    )


_cuda_option = click.option(
    "--cuda", is_flag=True, help="Run on the GPU (fails if CUDA is unavailable)."
)
_logger_option = click.option(
    "--logger",
    "loggers",
    type=click.Choice(TRACKERS),
    multiple=True,
    help="Also log to this tracker, in the run directory (repeat for several; "
    "mlflow uses $MLFLOW_TRACKING_URI when set).",
)
_quiet_option = click.option(
    "--quiet",
    is_flag=True,
    help="No progress bar or per-epoch lines (the bar is also off when stderr "
    "is not a terminal).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(pyro_iwae.__version__, prog_name="pyro-iwae")
def cli() -> None:
    """Importance weighted autoencoders (Burda et al. 2016) with Pyro.

    Train with `pyro-iwae fit`, then `pyro-iwae eval-nll --k 5000` estimates
    the test negative log-likelihood of the latest run.
    """


def _choice(
    name: str, choices: Any, default: str | None, help: str, **kwargs: Any
) -> Callable:
    """An option whose value is one of ``choices``."""
    return click.option(
        name, type=click.Choice(choices), default=default, help=help, **kwargs
    )


def _count_option(name: str, default: int, help: str) -> Callable:
    """An option of a positive integer."""
    return click.option(name, type=click.IntRange(min=1), default=default, help=help)


def _optional_size(name: str, help: str, default_text: str) -> Callable:
    """An option of a positive integer, None when not given."""
    return click.option(
        name,
        type=click.IntRange(min=1),
        default=None,
        help=help,
        show_default=default_text,
    )


def _parse_hidden(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[int] | None:
    """``"200,200"`` -> ``[200, 200]``; ``""`` -> ``[]`` (no hidden layer)."""
    if value is None:
        return None
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        sizes = [0]
    if any(size < 1 for size in sizes):
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of positive sizes, such as "
            "200,200",
            ctx,
            param,
        )
    return sizes


def _check_dataset(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A built-in name as it is; a data file's path made absolute."""
    if value in DATASETS:
        return value
    if not is_data_file(value):
        raise click.BadParameter(
            f"unknown data set {value!r}; choose one of: {', '.join(DATASETS)}, or "
            f"pass the path of a {', '.join(FILE_SUFFIXES)} file",
            ctx,
            param,
        )
    return str(Path(value).expanduser().resolve())


@cli.command(context_settings={"show_default": True})
@click.option(
    "--dataset",
    default="mnist-mini",
    callback=_check_dataset,
    metavar="NAME|PATH",
    help=f"Data set: {', '.join(DATASETS)} (mnist-mini, 10,000 / 2,000 MNIST "
    "images, ships with the package), or the path of your own .npy, .npz (arrays "
    "train and optionally test) or .pt file of shape [N, ...], used as given.",
)
@_data_dir_option
@click.option(
    "--test-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    help="Share of the points of a --dataset file without a test set held out "
    "(at random, seed 0) as its test set.",
)
@_choice(
    "--binarize",
    BINARIZATIONS,
    None,
    "dynamic: training values in [0, 1] binarised afresh for every mini-batch, "
    "test values once (seed 0); static: all once; none: as given.",
    show_default="dynamic for the built-in image sets with --likelihood "
    "bernoulli, none otherwise",
)
@_choice(
    "--likelihood",
    LIKELIHOODS,
    "bernoulli",
    "p(x|z): bernoulli (0/1 values), gaussian (real values; --sigma), or "
    "continuous-bernoulli (values in [0, 1]); all normalised densities in nats.",
)
@click.option(
    "--sigma",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_default="learned, one per dimension",
    help="Fixed standard deviation of --likelihood gaussian.",
)
@click.option(
    "--hidden",
    default=None,
    callback=_parse_hidden,
    metavar="SIZES",
    show_default="the paper's: 200,200",
    help="Hidden layer sizes between x and z1, in encoder and decoder, such as "
    "200,200 or 500; '' for none.",
)
@_choice("--activation", list(ACTIVATIONS), "tanh", "Hidden units of the networks.")
@_optional_size(
    "--latent-dim",
    "Size of the top latent layer (z1; z2 with --layers 2).",
    "the paper's: 50",
)
@click.option(
    "--model",
    default="paper",
    metavar="NAME|MODULE:BUILDER",
    help="Model: paper, sbn (sigmoid belief network: --layers layers of 200 "
    "binary units), an import path such as mypackage.models:build_model, or an "
    "entry point of group pyro_iwae.models.",
)
@click.option(
    "--guide",
    default="paper",
    metavar="NAME|MODULE:BUILDER",
    help="Guide: paper (diagonal Gaussian), lowrank (low-rank-plus-diagonal "
    "Gaussian), iaf (inverse autoregressive flows), coupling (affine coupling "
    "flows), sbn (binary units; needs --estimator vimco), an import path such "
    "as mypackage.guides:build_guide, or an entry point of group "
    "pyro_iwae.guides.",
)
@_count_option(
    "--layers",
    1,
    "Stochastic layers: of the paper's architecture 1 (latent 50) or 2 "
    "(latents 100 and 50); of --model sbn any number of 200 binary units each "
    "(3: the VIMCO paper's 200-200-200).",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default="iwae",
    help="iwae: the importance-weighted bound; vae: the ELBO averaged over k "
    "samples (the paper's 'VAE, k'); renyi: Pyro's RenyiELBO of order --alpha; "
    "miwae, piwae: Rainforth et al.'s bounds on --groups M groups of k particles; "
    "ciwae: --beta ELBO + (1 - --beta) IWAE.",
)
@click.option(
    "--estimator",
    type=click.Choice(ESTIMATORS),
    default="iwae",
    help="Guide gradient of --objective iwae, miwae, piwae or ciwae: iwae "
    "(plain), stl (sticking the landing), dreg (doubly reparameterised), vimco "
    "(score-function gradient with leave-one-out baselines for discrete guide "
    "sites, k >= 2) or reinforce (the same without baselines: a variance "
    "reference only).",
)
@click.option(
    "--alpha",
    type=float,
    default=0.0,
    help="Order of --objective renyi (not 1); 0 is the IWAE bound.",
)
@click.option(
    "--groups",
    type=click.IntRange(min=1),
    default=1,
    help="M, groups of k particles of --objective miwae or piwae.",
)
@click.option(
    "--beta",
    type=click.FloatRange(0, 1),
    default=0.5,
    help="Weight of the ELBO in --objective ciwae.",
)
@click.option(
    "--particles",
    "-k",
    type=click.IntRange(min=1),
    default=5,
    help="k, importance samples per data point.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=DEFAULT_EPOCHS,
    help="Epochs of --schedule constant.",
)
@click.option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default="constant",
    help="constant: --epochs at --lr; paper: stage i = 0..7 runs 3^i epochs at "
    "lr * 10^(-i/7) (3,280 epochs in all).",
)
@click.option(
    "--stages",
    type=click.IntRange(1, 8),
    default=8,
    help="Run only the first N stages of --schedule paper.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=100,
    help="Points per mini-batch (the paper uses 20; 100 runs faster on a CPU).",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=1e-3,
    help="Learning rate of Adam (the first stage's, for --schedule paper).",
)
@click.option("--seed", type=int, default=0, help="Random seed.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="a new folder in --runs-dir named <time>-<dataset>-<objective>-k<k>",
    help="Run directory for config.json, metrics.jsonl and checkpoint.pt.",
)
@_runs_dir_option("Folder for new run directories (and --resume without --out).")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out (default: the latest run in --runs-dir) from "
    "its last checkpoint, with its own settings.",
)
@click.option(
    "--train-limit",
    type=click.IntRange(min=1),
    default=None,
    help="Train on the first N training points only (default: all).",
)
@click.option(
    "--test-limit",
    type=click.IntRange(min=0),
    default=1000,
    help="Test points for the test bound after each epoch (0: none).",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="Also write a checkpoint every N steps (default: after each epoch only).",
)
@click.option(
    "--compile",
    is_flag=True,
    help="Run each training step's loss and gradients as one graph compiled by "
    "torch's inductor (tens of seconds to compile per batch shape; the same "
    "numbers to float tolerance). Programs it cannot capture fall back to the "
    "eager path with a warning.",
)
@_cuda_option
@_quiet_option
@_logger_option
@click.pass_context
@_library_errors
def fit(ctx: click.Context, **options: Any) -> None:
    """Train a model and guide (the paper's, by default); writes a run directory.

    Training images of the built-in data sets are binarised afresh for every
    mini-batch (see --binarize); after each epoch the test bound at the
    training k is computed on the first --test-limit test points, and a
    checkpoint is written.

    Under torchrun (`torchrun --nproc-per-node=N $(command -v pyro-iwae) fit
    ...`) the N processes train one run: --batch-size is the global batch,
    split evenly over them; rank 0 writes the run directory. With
    --max-restarts, pass --out: a restarted worker resumes that run.
    """
    device = _device(options["cuda"])
    distributed.init(device)
    given = [option for option in _CONFIG_OPTIONS if _explicit(ctx, option)]
    data_dir = options["data_dir"]
    extra = {}
    if is_data_file(options["dataset"]) and not options["resume"]:
        train, _, _ = load_file(options["dataset"], options["test_fraction"])
        extra["x_dim"] = train.shape[1]
    try:
        config = RunConfig(
            **{_CONFIG_OPTIONS[option]: options[option] for option in given},
            data_dir=None if data_dir is None else str(data_dir.resolve()),
            device=device,
            **extra,
        )
        config.validate(_CONFIG_OPTIONS[option] for option in given)
        # This command's own defaults (such as its 40 epochs), where they apply.
        unused = config.unused_settings()
        defaults = {
            field: options[option]
            for option, field in _CONFIG_OPTIONS.items()
            if option not in given and field not in unused
        }
        config = dataclasses.replace(config, **defaults)
        world = distributed.current().world if distributed.current() else 1
        distributed.check_batch_size(config.batch_size, world)
    except ConfigError as e:
        raise click.UsageError(e.render(_OPTION_NAMES)) from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    created = False
    out = options["out"]
    if _restarted() and out is not None and not options["resume"]:
        # torchrun restarted the workers: continue the run they had begun.
        options["resume"] = distributed.from_main((out / CHECKPOINT_FILE).is_file)
    if options["resume"]:
        run_dir = distributed.from_main(
            lambda: _run_dir_or_latest(out, options["runs_dir"])
        )
        saved = distributed.from_main(lambda: RunConfig.load(run_dir))
        for option in given:
            field = _CONFIG_OPTIONS[option]
            if getattr(saved, field) != getattr(config, field):
                flag = _OPTION_NAMES[field]
                raise click.UsageError(
                    f"{flag} {options[option]} differs from the run's "
                    f"{getattr(saved, field)}; drop {flag} to resume {run_dir}, "
                    "or start a new run"
                )
        config = dataclasses.replace(saved, device=device)
    elif out is None:
        run_dir = distributed.from_main(
            lambda: new_run_dir(options["runs_dir"], config)
        )
        created = distributed.is_main()
    else:
        run_dir = out
        if distributed.from_main((run_dir / CHECKPOINT_FILE).exists):
            raise click.UsageError(
                f"{run_dir} holds a run already; pass --resume to continue it, "
                "or choose another --out"
            )

    progress = FitProgress(options["quiet"] or not distributed.is_main())
    start = time.perf_counter()
    try:
        history = train_run(
            config,
            run_dir,
            resume=options["resume"],
            data_dir=data_dir,
            callback=CallbackList(
                [
                    progress if distributed.is_main() else None,
                    *_trackers(options["loggers"], run_dir),
                ]
            ),
        )
    except Exception as e:
        # A run refused before it was written leaves no empty folder behind.
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
        if isinstance(e, ConfigError):
            raise click.UsageError(e.render(_OPTION_NAMES)) from None
        raise
    except KeyboardInterrupt:
        progress.close()
        click.echo(
            f"Interrupted; continue with: pyro-iwae fit --resume --out {run_dir}",
            err=True,
        )
        sys.exit(130)
    finally:
        progress.close()
    seconds = time.perf_counter() - start

    click.echo(f"run: {run_dir}")
    if options["resume"] and progress.epochs_run == 0:
        click.echo("the run had finished its schedule: nothing left to train")
    if history:
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
        compiling = sum(m.get("compile_time", 0.0) for m in history)
        compiling = f", {compiling:.1f} s of it compiling" if compiling else ""
        click.echo(
            f"trained {epochs} epoch{'s' if epochs > 1 else ''} in "
            f"{last['elapsed']:.1f} s ({last['images_per_s']:.0f} img/s in the "
            f"last); this call took {seconds:.1f} s{compiling}"
        )
    click.echo(f"next: pyro-iwae eval-nll {run_dir} --k 5000")


@cli.command("eval-nll", context_settings={"show_default": True})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=5000,
    help="Importance samples per point (the paper's NLL uses 5000).",
)
@click.option(
    "--split",
    type=click.Choice(["test", "train"]),
    default="test",
    help="Data to evaluate: the binarised test set, or the training set "
    "binarised once with --seed.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=DEFAULT_EVAL_LIMIT,
    help="Evaluate the first N points only; 0 for all (the paper's protocol).",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=None,
    show_default="as many as fit in 256 MiB, no tensor over 32 MiB",
    help="Particles drawn at once (memory grows with it).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=100,
    help="Data points per batch.",
)
@_data_dir_option
@_runs_dir_option("Folder searched for the latest run when RUN_DIR is omitted.")
@click.option(
    "--seed", type=int, default=0, help="Random seed of the importance samples."
)
@_choice(
    "--method",
    EVAL_METHODS,
    "iwae",
    "iwae: the IWAE bound -L_k (the paper's NLL); ais: annealed importance "
    "sampling from the guide to the posterior with HMC, tighter and slower.",
)
@_count_option(
    "--ais-steps",
    1000,
    "With --method ais: annealing steps (one HMC move of 10 leapfrog steps "
    "each); double it until the NLL stops moving.",
)
@_count_option("--chains", 16, "With --method ais: independent chains per point.")
@click.option(
    "--compile",
    is_flag=True,
    help="With --method iwae: compute each chunk's log-weights in one graph "
    "compiled by torch's inductor (tens of seconds to compile per batch shape; "
    "the same estimates to float tolerance where --chunk-size divides --k). "
    "Programs it cannot capture fall back to the eager path with a warning.",
)
@_cuda_option
@_quiet_option
@_logger_option
@click.pass_context
@_library_errors
def eval_nll(
    ctx: click.Context,
    run_dir: Path | None,
    k: int,
    split: str,
    limit: int,
    chunk_size: int | None,
    batch_size: int,
    data_dir: Path | None,
    runs_dir: Path,
    seed: int,
    method: str,
    ais_steps: int,
    chains: int,
    compile: bool,
    cuda: bool,
    quiet: bool,
    loggers: tuple[str, ...],
) -> None:
    """Estimate the negative log-likelihood of a trained run, in nats.

    RUN_DIR defaults to the latest run in --runs-dir. Prints the mean NLL with
    its standard error (std / sqrt(n)), how far to trust the estimates (per
    point: the effective sample size of the importance weights and their
    Pareto k-hat; above 0.7 an estimate is unreliable) and the active units per
    latent layer, and writes them to RUN_DIR/eval-<split>-k<k>.json (with
    --method ais: eval-<split>-ais<steps>x<chains>.json), beside the per-point
    estimates and diagnostics.

    The particles of each batch of --batch-size points come from a random
    stream seeded by (--seed, batch number), so the per-point estimates do not
    depend on how many processes share the work: under torchrun
    (`torchrun --nproc-per-node=N $(command -v pyro-iwae) eval-nll ...`) the
    batches are dealt to the N processes and rank 0 writes the same files.
    """
    unused = ["--ais-steps", "--chains"] if method == "iwae" else ["--k", "--compile"]
    for option in unused:
        if _explicit(ctx, option[2:].replace("-", "_")):
            raise click.UsageError(
                f"{option} does not apply to --method {method}; drop it or choose "
                f"--method {'ais' if method == 'iwae' else 'iwae'}"
            )
    device = _device(cuda)
    distributed.init(device)
    run_dir = distributed.from_main(lambda: _run_dir_or_latest(run_dir, runs_dir))
    progress = EvalProgress(quiet or not distributed.is_main())
    try:
        result = evaluate_run(
            run_dir,
            num_samples=k,
            split=split,
            limit=limit or None,
            batch_size=batch_size,
            chunk_size=chunk_size,
            data_dir=data_dir,
            seed=seed,
            device=device,
            callback=progress,
            method=method,
            ais_steps=ais_steps,
            num_chains=chains,
            compile=compile,
        )
    finally:
        progress.close()
    _trackers(loggers, run_dir, result)
    stderr = result["stderr"]
    error = "" if stderr is None else f" ± {stderr:.2f}"
    if method == "iwae":
        how, samples = f"k={result['k']}", f"{result['k']} samples"
    else:
        how = f"AIS, {ais_steps} steps x {chains} chains"
        samples = f"{chains} chains"
    d = result["diagnostics"]
    if d["khat_median"] is None:
        tail = "Pareto k-hat needs more than 20 samples"
    else:
        tail = (
            f"Pareto k-hat median {d['khat_median']:.2f}, above 0.7 on "
            f"{100 * d['khat_above_0.7']:.0f}% of points"
        )
    trust = f"median ESS {d['ess_median']:.1f} of {samples}; {tail}"
    if method == "ais":
        trust += f"; mean HMC acceptance {d['acceptance_mean']:.2f}"
    elif d["khat_above_0.7"] > 0:
        trust += " (unreliable there: try more samples or --method ais)"
    click.echo(f"run: {run_dir}")
    click.echo(
        f"NLL = {result['nll']:.2f}{error} nats (mean ± standard error; "
        f"{how}, {result['split']} split, {result['points']} points)"
    )
    bits = result.get("bits_per_dim")
    if bits is not None:
        bits_error = result["bits_per_dim_stderr"]
        bits_error = "" if bits_error is None else f" ± {bits_error:.4f}"
        click.echo(f"bits/dim = {bits:.4f}{bits_error} (of the values as given)")
    click.echo(f"diagnostics: {trust}")
    units = ", ".join(
        f"{name} {count}/{result['latent_units'][name]}"
        for name, count in result["active_units"].items()
    )
    click.echo(f"active units: {units}")
    compiling = result["compile_time"]
    compiling = f" ({compiling:.1f} s of it compiling)" if compiling else ""
    click.echo(f"time: {result['time']:.1f} s{compiling}")
    folder = Path(result["file"]).parent
    click.echo(
        f"wrote {result['file']}, the per-point estimates "
        f"{folder / result['estimates_file']} and diagnostics "
        f"{folder / result['diagnostics_file']}"
    )


@cli.command(context_settings={"show_default": True})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=64,
    help="Number of samples (and of test images reconstructed).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="RUN_DIR/samples.png",
    help="PNG of the samples; the reconstructions and training curves go next "
    "to it as <name>-reconstructions.png and <name>-curves.png.",
)
@_data_dir_option
@_runs_dir_option("Folder searched for the latest run when RUN_DIR is omitted.")
@click.option("--seed", type=int, default=0, help="Random seed of the samples.")
@_cuda_option
@_library_errors
def sample(
    run_dir: Path | None,
    n: int,
    out: Path | None,
    data_dir: Path | None,
    runs_dir: Path,
    seed: int,
    cuda: bool,
) -> None:
    """Draw images from a trained run, reconstruct test images, plot its curves.

    RUN_DIR defaults to the latest run in --runs-dir. Images show pixel
    probabilities of p(x|z): z from the prior for samples, z ~ q(z|x) for the
    reconstructions (each row of test images above its reconstructions).
    """
    device = _device(cuda)
    run_dir = _run_dir_or_latest(run_dir, runs_dir)
    config, model, guide = load_run(run_dir, device)
    data = config.load_data(data_dir)
    out = run_dir / "samples.png" if out is None else out
    torch.manual_seed(seed)
    paths = []
    shape = data.image_shape
    if shape is None:
        click.echo(f"{config.dataset} holds no pictures: only the curves are drawn")
    else:
        images = sample_images(model, n, config.x_dim)
        x = data.test[:n].to(device)
        paths += [
            save_image_grid(images, out, image_shape=shape),
            save_reconstruction_grid(
                x,
                reconstruct(model, guide, x),
                out.with_name(f"{out.stem}-reconstructions.png"),
                image_shape=shape,
            ),
        ]
    paths.append(
        save_curves(
            read_metrics(run_dir),
            out.with_name(f"{out.stem}-curves.png"),
            title=f"{run_dir.name}",
        )
    )
    for path in paths:
        click.echo(f"wrote {path}")


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()


@cli.command(context_settings={"show_default": True})
@click.argument("grid", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="runs/ beside GRID",
    help="Folder of the grid's run directories, one per run name.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    show_default="the folder of GRID",
    help="Folder for table.json, table.md and the plots.",
)
@click.option(
    "--only",
    multiple=True,
    help="Run only this run of the grid (repeatable); the report covers all.",
)
@click.option(
    "--report-only", is_flag=True, help="Write the table and plots; train nothing."
)
@_count_option(
    "--jobs",
    1,
    "Runs trained at once, in separate processes that share the CPU cores "
    "(no progress bars then). With few particles, 2 jobs of 1 thread train more "
    "images per second than 1 job of 2 threads.",
)
@click.option(
    "--readme",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also put the table into this Markdown file, between the lines "
    "<!-- grid-table:start --> and <!-- grid-table:end -->.",
)
@_data_dir_option
@_cuda_option
@_quiet_option
@_library_errors
def reproduce(
    grid: Path,
    runs_dir: Path | None,
    out_dir: Path | None,
    only: tuple[str, ...],
    report_only: bool,
    jobs: int,
    readme: Path | None,
    data_dir: Path | None,
    cuda: bool,
    quiet: bool,
) -> None:
    """Train and evaluate every run of the GRID file (JSON), then write its table.

    Runs already evaluated are skipped and interrupted ones resume from their
    checkpoints, so the command can be stopped at any moment and run again. A run
    that another pyro-iwae process is working on is left to it, also one of
    another machine that shares --runs-dir (it holds runs/.RUN.claim). Under
    torchrun the processes train and evaluate each run together.
    """
    device = _device(cuda)
    distributed.init(device)
    main = distributed.is_main()
    spec = Grid.load(grid)
    runs_dir = runs_dir or grid.parent / "runs"
    if readme is not None:
        table_slot(readme)  # fail before training, not after
    if not report_only:
        fit_progress = FitProgress(quiet or jobs > 1 or not main)
        eval_progress = EvalProgress(quiet or jobs > 1 or not main)

        def on_run(name: str, what: str) -> None:
            if main:
                click.echo(f"{name}: {what}", err=True)
            if what == "evaluate":
                eval_progress.reset()

        try:
            run_grid(
                spec,
                runs_dir,
                only=list(only) or None,
                data_dir=data_dir,
                device=device,
                jobs=jobs,
                on_run=on_run,
                fit_callback=fit_progress if main else None,
                eval_callback=eval_progress if main else None,
            )
        except KeyboardInterrupt:
            fit_progress.close()
            eval_progress.close()
            click.echo(
                "Interrupted; run the same command again to continue (evaluated "
                "runs are skipped, interrupted ones resume from their checkpoints)",
                err=True,
            )
            sys.exit(130)
        finally:
            fit_progress.close()
            eval_progress.close()
    if not main:
        return
    report = write_report(spec, runs_dir, out_dir or grid.parent, readme)
    for path in report.values():
        click.echo(f"wrote {path}")
