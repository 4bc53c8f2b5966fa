"""Click options made from the settings the library declares (see
:mod:`pyro_iwae.runs.settings`), and the library's messages in the command line's
spelling."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from pyro_iwae.data import DATASETS, FILE_SUFFIXES, is_data_file
from pyro_iwae.runs.config import RunConfig
from pyro_iwae.runs.eval_results import EvalSettings
from pyro_iwae.runs.settings import (
    NO_DEFAULT,
    SWITCH,
    Setting,
    declared,
    option_names,
)

#: Setting -> its option, for the library's messages (fit's and eval-nll's,
#: and the arguments of a run that messages name).
OPTION_NAMES = {
    **option_names(EvalSettings),
    **option_names(RunConfig),
    "resume": "--resume",
    "out": "--out",
    "run_dir": "--out",  # train_run's folder, named {run_dir} in its messages
    "runs_dir": "--runs-dir",  # the folder find_latest_run looks in
    "jobs": "--jobs",  # reproduce's
}


def cli_text(message: str, names: Mapping[str, str] = OPTION_NAMES) -> str:
    """``message`` with settings spelled as Python arguments (``estimator='vimco'``,
    ``resume=True``) spelled as options (``--estimator vimco``, ``--resume``), of
    those ``names`` maps (setting -> option) only."""

    def option(match: re.Match) -> str:
        name, value = match.group(1), match.group(3)
        flag = names.get(name)
        if flag is None:
            return match.group(0)
        return flag if value == "True" else f"{flag} {value}"

    return re.sub(r"\b([a-z_]+)=(['\"]?)([\w.,:/~-]+)\2", option, message)


def settings_options(cls: type, skip: tuple[str, ...] = ()) -> Callable:
    """Decorates a command with an option for each declared setting of ``cls``
    (but those in ``skip``), passed to it by field name."""

    def decorate(command: Callable) -> Callable:
        for name, (field, s) in reversed(declared(cls).items()):
            if name not in skip:
                command = setting_option(name, field, s)(command)
        return command

    return decorate


def setting_option(name: str, field: Any, s: Setting) -> Callable:
    """The option of setting ``name`` (the dataclass ``field``, declared as ``s``)."""
    default = field.default if s.command_default is NO_DEFAULT else s.command_default
    declarations = [s.flag or "--" + name.replace("_", "-"), *filter(None, [s.short])]
    kwargs: dict[str, Any] = {
        "default": default,
        "help": s.help.format_map(OPTION_NAMES),
        "metavar": s.metavar,
    }
    if s.default_text is not None:
        kwargs["show_default"] = s.default_text.format_map(OPTION_NAMES)
    if s.kind == "flag":
        kwargs.update(is_flag=True, default=False)
        del kwargs["metavar"]
    elif s.kind == "switch":
        kwargs.update(
            type=click.Choice(list(SWITCH)),
            is_flag=False,
            flag_value="on",
            default={True: "on", False: "off"}.get(default, default),
            callback=lambda ctx, param, value: SWITCH[value],
        )
    elif s.kind == "sizes":
        kwargs["callback"] = _parse_sizes
    elif s.kind == "dataset":
        kwargs["callback"] = check_dataset
    elif s.kind == "folder":
        kwargs["type"] = click.Path(file_okay=False, path_type=Path)
    else:
        kwargs["type"] = _type(field, s)
    return click.option(*declarations, name, **kwargs)


def _type(field: Any, s: Setting) -> Any:
    """The Click type of a setting: its choices, its range, or its Python type."""
    if s.choices is not None:
        return click.Choice(s.choices)
    kind = str(field.type)
    number = float if "float" in kind else int if "int" in kind else str
    if number is str or (s.low is None and s.high is None):
        return number
    ranged = click.FloatRange if number is float else click.IntRange
    return ranged(s.low, s.high, min_open=s.open[0], max_open=s.open[1])


def _parse_sizes(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[int] | None:
    """``"200,200"`` -> ``[200, 200]``; ``""`` -> ``[]`` (no hidden layer)."""
    if value is None:
        return None
    if not value.strip():
        return []
    try:
        # An empty item is refused: '20,,3' was read as [20, 3], ',' as [].
        sizes = [int(part) for part in value.split(",")]
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


def check_dataset(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    """A built-in name as it is; a data file's path made absolute."""
    if value is None or value in DATASETS:
        return value
    if not is_data_file(value):
        raise click.BadParameter(
            f"unknown data set {value!r}; choose one of: {', '.join(DATASETS)}, or "
            f"pass the path of a {', '.join(FILE_SUFFIXES)} file",
            ctx,
            param,
        )
    return str(Path(value).expanduser().resolve())


def run_option(name: str, **overrides: Any) -> Callable:
    """The option of :class:`~pyro_iwae.RunConfig` setting ``name``, for a
    command other than fit (``overrides``: its keyword arguments changed)."""
    field, s = declared(RunConfig)[name]
    return setting_option(name, field, dataclasses.replace(s, **overrides))
