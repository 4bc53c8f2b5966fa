"""The ``pyro-iwae`` command: train, evaluate and sample IWAEs from the shell.

This module only parses options, calls :mod:`pyro_iwae` and reports; errors of
the library become one-line ``Error: ...`` messages with a non-zero exit code.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

import pyro_iwae
from pyro_iwae.checkpoints import CHECKPOINT_FILE, RunError, read_metrics
from pyro_iwae.config import RunConfig
from pyro_iwae.data import DATASETS, DataError
from pyro_iwae.objectives import ESTIMATORS
from pyro_iwae.plots import save_curves, save_image_grid, save_reconstruction_grid
from pyro_iwae.registry import GUIDES, MODELS
from pyro_iwae.reproduction import Grid, run_grid, table_slot, write_report
from pyro_iwae.runs import (
    evaluate_run,
    find_latest_run,
    load_run,
    new_run_dir,
    train_run,
)
from pyro_iwae.sampling import reconstruct, sample_images
from pyro_iwae.schedules import OBJECTIVES, SCHEDULES, ConfigError
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
    "layers": "stochastic_layers",
    "model": "model",
    "guide": "guide",
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
    "checkpoint_every": "checkpoint_every",
}
#: RunConfig field -> its option, for the library's messages.
_OPTION_NAMES = {
    field: "--" + option.replace("_", "-") for option, field in _CONFIG_OPTIONS.items()
}


def _library_errors(command: Callable) -> Callable:
    """Turns the library's own errors into one-line Click errors, and every
    warning into one ``Warning: ...`` line on stderr."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return command(*args, **kwargs)
            except (RunError, DataError, TrainingDiverged) as e:
                raise click.ClickException(str(e)) from None
            except NotImplementedError as e:
                # The objective refusing a model or guide (a discrete guide
                # without --estimator vimco): its message says what to use.
                raise click.ClickException(str(e)) from None

    return wrapper


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


def _registered_option(table: dict, name: str, help: str) -> Callable:
    """``name``: a choice of ``table``'s registered names, ``paper`` by default."""
    return click.option(
        name, type=click.Choice(sorted(table)), default="paper", help=help
    )


_cuda_option = click.option(
    "--cuda", is_flag=True, help="Run on the GPU (fails if CUDA is unavailable)."
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


@cli.command(context_settings={"show_default": True})
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    default="mnist-mini",
    help="Data set; mnist-mini (10,000 / 2,000 MNIST images) ships with the package.",
)
@_data_dir_option
@click.option(
    "--layers",
    type=click.Choice(["1", "2"]),
    default="1",
    help="Stochastic layers of the paper's architecture (1: latent 50; 2: "
    "latents 100 and 50).",
)
@_registered_option(
    MODELS,
    "--model",
    "Model by registered name: paper (Gaussian latents), sbn (sigmoid belief "
    "network: --layers layers of 200 binary units).",
)
@_registered_option(
    GUIDES, "--guide", "Guide by registered name; sbn's needs --estimator vimco."
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
@_cuda_option
@_quiet_option
@click.pass_context
@_library_errors
def fit(ctx: click.Context, **options: Any) -> None:
    """Train a model and guide of the paper; writes a run directory.

    Training images are binarised afresh for every mini-batch; after each
    epoch the test bound at the training k is computed on the first
    --test-limit test points, and a checkpoint is written.
    """
    device = _device(options["cuda"])
    options["layers"] = int(options["layers"])
    given = [option for option in _CONFIG_OPTIONS if _explicit(ctx, option)]
    data_dir = options["data_dir"]
    try:
        config = RunConfig(
            **{_CONFIG_OPTIONS[option]: options[option] for option in given},
            data_dir=None if data_dir is None else str(data_dir.resolve()),
            device=device,
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
    except ConfigError as e:
        raise click.UsageError(e.render(_OPTION_NAMES)) from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    created = False
    if options["resume"]:
        run_dir = _run_dir_or_latest(options["out"], options["runs_dir"])
        saved = RunConfig.load(run_dir)
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
    elif options["out"] is None:
        run_dir = new_run_dir(options["runs_dir"], config)
        created = True
    else:
        run_dir = options["out"]
        if (run_dir / CHECKPOINT_FILE).exists():
            raise click.UsageError(
                f"{run_dir} holds a run already; pass --resume to continue it, "
                "or choose another --out"
            )

    progress = FitProgress(options["quiet"])
    start = time.perf_counter()
    try:
        history = train_run(
            config,
            run_dir,
            resume=options["resume"],
            data_dir=data_dir,
            callback=progress,
        )
    except DataError:
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
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
        click.echo(
            f"trained {epochs} epoch{'s' if epochs > 1 else ''} in "
            f"{last['elapsed']:.1f} s ({last['images_per_s']:.0f} img/s in the "
            f"last); this call took {seconds:.1f} s"
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
@_cuda_option
@_quiet_option
@_library_errors
def eval_nll(
    run_dir: Path | None,
    k: int,
    split: str,
    limit: int,
    chunk_size: int | None,
    batch_size: int,
    data_dir: Path | None,
    runs_dir: Path,
    seed: int,
    cuda: bool,
    quiet: bool,
) -> None:
    """Estimate the negative log-likelihood -L_k of a trained run, in nats.

    RUN_DIR defaults to the latest run in --runs-dir. Prints the mean NLL with
    its standard error (std / sqrt(n)) and the active units per latent layer,
    and writes them to RUN_DIR/eval-<split>-k<k>.json.
    """
    device = _device(cuda)
    run_dir = _run_dir_or_latest(run_dir, runs_dir)
    progress = EvalProgress(quiet)
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
        )
    finally:
        progress.close()
    stderr = result["stderr"]
    error = "" if stderr is None else f" ± {stderr:.2f}"
    click.echo(f"run: {run_dir}")
    click.echo(
        f"NLL = {result['nll']:.2f}{error} nats (mean ± standard error; "
        f"k={result['k']}, {result['split']} split, {result['points']} points)"
    )
    units = ", ".join(
        f"{name} {count}/{result['latent_units'][name]}"
        for name, count in result["active_units"].items()
    )
    click.echo(f"active units: {units}")
    click.echo(f"time: {result['time']:.1f} s")
    estimates = Path(result["file"]).with_name(result["estimates_file"])
    click.echo(f"wrote {result['file']} and the per-point estimates {estimates}")


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
    images = sample_images(model, n, config.x_dim)
    x = data.test[:n].to(device)
    paths = [
        save_image_grid(images, out),
        save_reconstruction_grid(
            x,
            reconstruct(model, guide, x),
            out.with_name(f"{out.stem}-reconstructions.png"),
        ),
        save_curves(
            read_metrics(run_dir),
            out.with_name(f"{out.stem}-curves.png"),
            title=f"{run_dir.name}",
        ),
    ]
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
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs trained at once, in separate processes that share the CPU cores "
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
    that another pyro-iwae process is working on is left to it.
    """
    device = _device(cuda)
    spec = Grid.load(grid)
    runs_dir = runs_dir or grid.parent / "runs"
    if readme is not None:
        table_slot(readme)  # fail before training, not after
    if not report_only:
        fit_progress = FitProgress(quiet or jobs > 1)
        eval_progress = EvalProgress(quiet or jobs > 1)

        def on_run(name: str, what: str) -> None:
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
                fit_callback=fit_progress,
                eval_callback=eval_progress,
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
    report = write_report(spec, runs_dir, out_dir or grid.parent, readme)
    for path in report.values():
        click.echo(f"wrote {path}")
