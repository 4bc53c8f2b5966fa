"""``pyro-iwae check-guide``: does an estimator keep the plain guide gradient's
mean on this guide? (:func:`pyro_iwae.check_run_guide`)"""

from __future__ import annotations

from pathlib import Path

import click

from pyro_iwae import RunConfig, check_run_guide
from pyro_iwae.data import DATASETS
from pyro_iwae.objectives import ESTIMATORS
from pyro_iwae.schedules import ConfigError

from .main import (
    _count_option,
    _data_dir_option,
    _library_errors,
    cli,
)

# check-guide option -> RunConfig field.
_FIELDS = {
    "model": "model",
    "guide": "guide",
    "layers": "stochastic_layers",
    "objective": "objective",
    "estimator": "estimator",
    "particles": "num_particles",
    "dataset": "dataset",
    "seed": "seed",
}


@cli.command("check-guide", context_settings={"show_default": True})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option(
    "--guide",
    default="paper",
    metavar="NAME|MODULE:BUILDER",
    help="Guide to check, as for fit (a zoo name, mypackage.guides:build_guide, "
    "or an entry point); with RUN_DIR, the run's trained guide instead.",
)
@click.option(
    "--model", default="paper", metavar="NAME|MODULE:BUILDER", help="Model, as fit."
)
@_count_option("--layers", 1, "Stochastic layers, as fit.")
@click.option(
    "--objective",
    type=click.Choice(["iwae", "miwae", "piwae", "ciwae"]),
    default="iwae",
    help="The bound whose guide gradient is checked.",
)
@click.option(
    "--estimator",
    type=click.Choice([e for e in ESTIMATORS if e != "iwae"]),
    default="dreg",
    help="Estimator checked against the plain one (iwae; reinforce for vimco).",
)
@_count_option("--particles", 5, "Particles, k.")
@click.option(
    "--dataset",
    type=click.Choice(DATASETS),
    default="mnist-mini",
    help="Built-in data set whose first test points form the batch; with RUN_DIR "
    "the run's data set (a data file too).",
)
@_data_dir_option
@_count_option("--batch-size", 8, "Points in the batch.")
@click.option(
    "--draws",
    type=click.IntRange(min=20),
    default=100,
    help="Paired draws of both gradients (each: two losses and backward passes).",
)
@click.option("--seed", type=int, default=0, help="Initialisation and draws' seed.")
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=1e-3,
    help="Chance of flagging an unbiased estimator anywhere.",
)
@_library_errors
def check_guide(
    run_dir: Path | None,
    batch_size: int,
    draws: int,
    alpha: float,
    data_dir: Path | None,
    **options: object,
) -> None:
    """Check that an estimator's guide gradient has the plain one's mean.

    Draws the chosen estimator's guide gradient and the plain estimator's on
    the same noise --draws times, on a batch of test points, and prints per
    parameter the largest |t| of the difference of their means, the ratio of
    their variances, and a verdict; exits with status 1 if a mean differs.
    Checks RUN_DIR's trained model and guide, else freshly built ones (--model,
    --guide, --layers); the estimator, objective and k are the options'.
    """
    try:
        settings = RunConfig(
            **{field: options[option] for option, field in _FIELDS.items()}
        )
    except ConfigError as e:
        names = {field: f"--{option}" for option, field in _FIELDS.items()}
        raise click.UsageError(e.render(names)) from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        result = check_run_guide(
            settings if run_dir is None else run_dir,
            objective=settings.make_objective(),
            batch_size=batch_size,
            num_draws=draws,
            alpha=alpha,
            seed=options["seed"],
            data_dir=data_dir,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(result.table())
    if not result.passed:
        raise SystemExit(1)
