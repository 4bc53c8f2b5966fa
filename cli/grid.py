"""``pyro-iwae reproduce``: a grid of runs trained, evaluated and reported."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pyro_iwae.errors import ParticleBroadcastError, PyroIwaeError
from pyro_iwae.runs import distributed
from pyro_iwae.runs.denormals import flush_denormals_from_start
from pyro_iwae.runs.grid_report import check_runs_present, table_slot, write_report
from pyro_iwae.runs.reproduction import Grid, run_grid

from .common import (
    count_option,
    cuda_option,
    device_of,
    library_errors,
    path_option,
    quiet_option,
)
from .options import cli_text, run_option
from .progress import EvalProgress, FitProgress

T = TypeVar("T")


#: A grid sets its runs by its keys, the settings' own names, not by fit's
#: options: its errors name them so (a run's folder is one of --runs-dir).
GRID_NAMES = {"out": "--runs-dir", "run_dir": "--runs-dir", "runs_dir": "--runs-dir"}

#: The settings that reproduce takes as options too, where a library message
#: spells them as Python arguments ("pass data_dir=FOLDER").
GRID_OPTIONS = {"data_dir": "--data-dir"}


def _grid_errors(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, its errors rendered in :data:`GRID_NAMES`."""
    try:
        return call(*args, **kwargs)
    except ParticleBroadcastError:
        raise  # said with its own remedy
    except PyroIwaeError as e:
        message = cli_text(e.render(GRID_NAMES), GRID_OPTIONS)
        raise click.ClickException(message) from None


@click.command(context_settings={"show_default": True})
@click.argument("grid", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@path_option(
    "--runs-dir",
    "Folder of the grid's run directories, one per run name.",
    show_default="runs/ beside GRID; NAME/runs/ for GRID NAME.json, not grid.json",
)
@path_option(
    "--out-dir",
    "Folder for table.json, table.md and the plots.",
    show_default="the folder of GRID; NAME/ beside it for NAME.json, not grid.json",
)
@click.option(
    "--only",
    multiple=True,
    help="Run only this run of the grid (repeatable); the report covers all.",
)
@click.option(
    "--report-only", is_flag=True, help="Write the table and plots; train nothing."
)
@count_option(
    "--jobs",
    1,
    "Runs trained at once, in separate processes that share the CPU cores "
    "(no progress bars then). With few particles, 2 jobs of 1 thread train more "
    "images per second than 1 job of 2 threads. Fewer threads round the sums "
    "otherwise: a run's numbers depend on --jobs too.",
)
@path_option(
    "--readme",
    "Also put the table into this Markdown file, between the lines "
    "<!-- grid-table:start --> and <!-- grid-table:end -->.",
    folder=False,
)
@run_option("data_dir")
@cuda_option
@quiet_option
@library_errors
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
    # Before torch's thread pool starts, so that its workers flush too.
    flush_denormals_from_start()
    spec = Grid.load(grid)
    # A grid's "device": "cuda" is checked as fit checks a settings file's (a
    # report reads the runs on the CPU).
    asked = not report_only and any(
        spec.config(name).device.startswith("cuda") for name in spec.runs
    )
    asked_by = f'"device": "cuda" (in {grid.name})' if asked and not cuda else "--cuda"
    device = device_of(cuda or asked, asked_by)
    distributed.init(device)
    main = distributed.is_main()
    # grid.json keeps its runs and report in its folder; another grid file in
    # that folder (NAME.json) in a folder of its own, NAME/: the two shared
    # runs/ and their reports overwrote each other.
    home = grid.parent if grid.stem == "grid" else grid.parent / grid.stem
    runs_dir = runs_dir or home / "runs"
    if report_only:
        _grid_errors(check_runs_present, spec, runs_dir)  # a mistyped --runs-dir
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
            _grid_errors(
                run_grid,
                spec,
                runs_dir,
                only=list(only) or None,
                data_dir=data_dir,
                device=device if cuda else None,  # None: each run's own
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
    report = write_report(spec, runs_dir, out_dir or home, readme)
    for path in report.values():
        click.echo(f"wrote {path}")
