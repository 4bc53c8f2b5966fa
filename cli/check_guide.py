"""``pyro-iwae check-guide``: does an estimator keep the plain guide gradient's
mean on this guide? (:func:`pyro_iwae.check_run_guide`)"""

from __future__ import annotations

from pathlib import Path

import click

from pyro_iwae import RunConfig, check_run_guide
from pyro_iwae.errors import ConfigError, ParticleBroadcastError
from pyro_iwae.infer.objectives import ESTIMATORS

from .common import count_option, explicit, library_errors
from .main import cli
from .options import OPTION_NAMES, cli_text, run_option

# The RunConfig settings that pick the model, guide and objective checked.
_FIELDS = (
    "model",
    "guide",
    "stochastic_layers",
    "objective",
    "estimator",
    "num_particles",
    "dataset",
    "seed",
)
#: Those that RUN_DIR gives instead (its --dataset says where its data are now).
_RUN_FIELDS = ("model", "guide", "stochastic_layers")


@cli.command("check-guide", context_settings={"show_default": True})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@run_option(
    "guide",
    help="Guide to check, as for fit (a zoo name, mypackage.guides:build_guide, "
    "or an entry point); not with RUN_DIR, whose trained guide is checked.",
)
@run_option("model", help="Model, as for fit.")
@run_option("stochastic_layers", help="Stochastic layers, as for fit.")
@run_option(
    "objective",
    choices=("iwae", "miwae", "piwae", "ciwae"),
    help="The bound whose guide gradient is checked.",
)
@run_option(
    "estimator",
    choices=tuple(e for e in ESTIMATORS if e != "iwae"),
    command_default="dreg",
    help="Estimator checked against the plain one (iwae; reinforce for vimco, "
    "on a guide with sites without rsample).",
)
@run_option("num_particles", command_default=5, help="Particles, k.")
@run_option(
    "dataset",
    command_default="mnist-mini",
    help="Data set whose first test points form the batch (a built-in name or "
    "a data file); with RUN_DIR, where the run's data are now (a data file's new "
    "path), its own by default.",
)
@run_option(
    "data_dir",
    default_text="with RUN_DIR the folder the run's fit read, recorded in its "
    "config.json; for a run that recorded none, $PYRO_IWAE_DATA, else "
    "~/.cache/pyro-iwae",
)
@count_option("--batch-size", 8, "Points in the batch.")
@click.option(
    "--draws",
    type=click.IntRange(min=20),
    default=100,
    help="Paired draws of both gradients (each: two losses and backward passes).",
)
@run_option("seed", help="Initialisation and draws' seed.")
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=1e-3,
    help="Chance of flagging an unbiased estimator anywhere.",
)
@click.pass_context
@library_errors
def check_guide(
    ctx: click.Context,
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
    their variances, and a verdict. Checks RUN_DIR's trained model and guide,
    else freshly built ones (--model, --guide, --layers); the estimator,
    objective and k are the options'.

    Exit status: 0 if no mean differs; 1 if one does, or on an error; 2 for a
    usage error, a check that could not fail included (--estimator vimco on a
    guide whose sites all have rsample).
    """
    if run_dir is not None:
        # They were dropped without a word: the run's own are checked.
        for field in _RUN_FIELDS:
            if explicit(ctx, field):
                raise click.UsageError(
                    f"{OPTION_NAMES[field]} does not apply with RUN_DIR, whose own "
                    "model and guide are checked; drop it"
                )
    try:
        # merge: a data file's points set the width of the networks.
        settings = RunConfig.merge({field: options[field] for field in _FIELDS})
    except ConfigError as e:
        raise click.UsageError(cli_text(e.render(OPTION_NAMES))) from None
    except ValueError as e:  # estimator='vimco' with one particle, say
        raise click.UsageError(cli_text(str(e))) from None
    # With RUN_DIR, --dataset says where the run's data are now.
    moved = explicit(ctx, "dataset") and run_dir is not None
    try:
        result = check_run_guide(
            settings if run_dir is None else run_dir,
            settings=settings,
            batch_size=batch_size,
            num_draws=draws,
            alpha=alpha,
            seed=options["seed"],
            data_dir=data_dir,
            dataset=options["dataset"] if moved else None,
        )
    except (ConfigError, ParticleBroadcastError):
        # An estimator the check cannot test (a usage error), a guide that does
        # not broadcast: library_errors says them.
        raise
    except ValueError as e:
        # Pyro adds the trace's shapes on lines of their own: the first says it.
        raise click.ClickException(cli_text(str(e).split("\n", 1)[0])) from None
    click.echo(result.table(cli_text))
    if not result.passed:
        raise SystemExit(1)
