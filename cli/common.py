"""What the commands share: the error wrapper that turns the library's errors
into one-line messages, and common options."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch

from pyro_iwae.errors import (
    ConfigError,
    ParticleBroadcastError,
    PlateNestingError,
    PyroIwaeError,
    one_line,
)
from pyro_iwae.runs import distributed

from .options import OPTION_NAMES, cli_text

RUNS_ENV = "PYRO_IWAE_RUNS"
#: In place of the library's advice for plates nested deeper than
#: ``max_plate_nesting``, which no option sets: a run finds the nesting on one
#: data point.
_RUN_NESTING = (
    "a run finds how deep they nest from one data point: make the model and "
    "guide run on one point with the plates they use on a batch"
)


def library_errors(command: Callable) -> Callable:
    """Turns the library's own errors, and those of paths that cannot be made
    or written, into one-line Click errors, in the options' spelling, and every
    warning into one ``Warning: ...`` line on stderr.

    Ctrl-C ends the command with exit code 130 and one line. Under torchrun,
    ranks other than 0 print nothing on stdout and prefix their errors with
    their rank; the process group ends with the command.
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
            except ConfigError as e:
                message = _ranked(cli_text(e.render(OPTION_NAMES)), rank)
                raise click.UsageError(message) from None
            except ParticleBroadcastError as e:
                # Its vectorize_particles=False is no option of this command (one
                # that has one, eval-nll, offers it itself): the fix is the model's.
                message = _ranked(particle_text(e), rank)
                raise click.ClickException(message) from None
            except PlateNestingError as e:
                # Its max_plate_nesting= is no option either.
                message = _ranked(cli_text(str(e.with_remedy(_RUN_NESTING))), rank)
                raise click.ClickException(message) from None
            except PyroIwaeError as e:
                message = _ranked(cli_text(e.render(OPTION_NAMES)), rank)
                raise click.ClickException(message) from None
            except NotImplementedError as e:
                # The objective refusing a model or guide (a discrete guide
                # without --estimator vimco): its message says what to use.
                raise click.ClickException(_ranked(cli_text(str(e)), rank)) from None
            except OSError as e:
                # A path the user chose that cannot be made or written (a
                # read-only folder, a file where a folder should be); other
                # OSErrors name no file and keep their traceback.
                if e.filename is None:
                    raise
                path = os.fsdecode(e.filename)  # TensorBoard's are bytes
                message = (
                    f"cannot use {path} ({e.strerror or one_line(e)}); "
                    "check the path, or choose one in a folder you can write to"
                )
                raise click.ClickException(_ranked(message, rank)) from None
            except click.ClickException as e:
                if not rank:
                    raise
                message = _ranked(e.format_message(), rank)
                raise click.ClickException(message) from None
            except KeyboardInterrupt:
                # Click would print "Aborted!" and exit 1; a command that keeps
                # something to go on from (fit, reproduce) says so itself.
                click.echo("Interrupted; run the same command again", err=True)
                sys.exit(130)
            finally:
                distributed.shutdown()

    return wrapper


def particle_text(e: ParticleBroadcastError, remedy: str = "") -> str:
    """The message of ``e`` in the options' spelling, offering ``remedy`` (empty:
    nothing) instead of the library's ``vectorize_particles=False``, and for
    plates nested too deep what a run's user can do."""
    return cli_text(e.with_remedy(remedy, _RUN_NESTING).render(OPTION_NAMES))


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ["RANK"]) if distributed.launched() else 0


def _ranked(message: str, rank: int) -> str:
    return f"rank {rank}: {message}" if rank else message


def restarted() -> bool:
    """Whether torchrun restarted this worker after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def continue_with(arguments: str) -> str:
    """Advice to go on with ``pyro-iwae ARGUMENTS``; under torchrun, with as many
    processes (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` a machine): a resume is exact
    only with as many as wrote the checkpoint."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return f"continue with: pyro-iwae {arguments}"
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:  # one machine
        return (
            f"continue with: torchrun --standalone --nproc-per-node={world} "
            f"$(command -v pyro-iwae) {arguments}"
        )
    return (
        f"continue with the same {world} processes (torchrun on each machine, as "
        f"before) running: pyro-iwae {arguments}"
    )


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    click.echo(f"Warning: {cli_text(one_line(message))}", err=True)


def device_of(cuda: bool, asked_by: str = "--cuda") -> str:
    """``"cuda"`` where ``cuda`` asks for it and there is one, else ``"cpu"``;
    ``asked_by`` names what asked, for the error."""
    if not cuda:
        return "cpu"
    if not torch.cuda.is_available():
        raise click.UsageError(
            f"{asked_by}: CUDA is not available on this machine (no GPU, or torch "
            f"was built without CUDA); drop {asked_by} to run on the CPU"
        )
    return "cuda"


def explicit(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line or in the environment."""
    source = ctx.get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def path_option(
    name: str, help: str, *, folder: bool = True, **kwargs: Any
) -> Callable:
    """An option of a folder (or with ``folder=False`` a file; ``exists``: that
    must exist), None by default."""
    kwargs = {"default": None, **kwargs}
    exists = kwargs.pop("exists", False)
    kind = click.Path(
        exists=exists, file_okay=not folder, dir_okay=folder, path_type=Path
    )
    return click.option(name, type=kind, help=help, **kwargs)


def runs_dir_option(help: str) -> Callable:
    return path_option(
        "--runs-dir", help, default=Path("runs"), envvar=RUNS_ENV, show_envvar=True
    )


cuda_option = click.option(
    "--cuda", is_flag=True, help="Run on the GPU (fails if CUDA is unavailable)."
)
quiet_option = click.option(
    "--quiet",
    is_flag=True,
    help="No progress bars or per-epoch lines; a line per run still says what "
    "is done with it (the bars are also off when stderr is not a terminal).",
)


def count_option(name: str, default: int, help: str) -> Callable:
    """An option of a positive integer."""
    return click.option(name, type=click.IntRange(min=1), default=default, help=help)
