"""Settings declared once: each field of a settings dataclass (such as
:class:`~pyro_iwae.RunConfig`) names its command-line option, help, defaults and
allowed values in its metadata (:func:`setting`), from which the checks here and
the command line's options are made; and settings read from a file.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import numbers
import os
import re
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..data import DATASETS, is_data_file
from ..errors import ConfigError, literal, one_line
from ..infer.hooks import is_backend

__all__ = [
    "Setting",
    "absolute_paths",
    "check_applies",
    "check_held_out",
    "check_values",
    "normalize_switches",
    "declared",
    "held_out_error",
    "option_names",
    "own_test_set",
    "read_settings",
    "setting",
]

#: Marks a :class:`Setting` without a command default of its own.
NO_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a setting is given: ``help``, the option ``flag`` (``--field-name``
    if None) and a ``short`` one, the ``choices`` or the range ``low`` ..
    ``high`` (``open`` ends excluded) of its values, ``command_default``: the
    command line's default where it differs from the field's, ``default_text``
    to show for a default of None, ``metavar``, and ``kind``: ``"flag"`` (a
    switch), ``"switch"`` (``auto``, ``on`` or ``off``: ``"auto"``, True or
    False; the bare option is ``on``), ``"sizes"`` (a comma-separated list),
    ``"dataset"``, ``"folder"`` or None (a value of the field's type)."""

    help: str
    flag: str | None = None
    short: str | None = None
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    open: tuple[bool, bool] = (False, False)
    command_default: Any = NO_DEFAULT
    default_text: str | None = None
    metavar: str | None = None
    kind: str | None = None


def setting(default: Any, help: str, **options: Any) -> Any:
    """A dataclass field of ``default`` declared as a :class:`Setting`."""
    return dataclasses.field(
        default=default, metadata={"setting": Setting(help, **options)}
    )


def declared(cls: type) -> dict[str, tuple[dataclasses.Field, Setting]]:
    """The fields of dataclass ``cls`` declared with :func:`setting`, by name."""
    return {
        f.name: (f, f.metadata["setting"])
        for f in dataclasses.fields(cls)
        if "setting" in f.metadata
    }


def absolute_paths(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (field -> value) of settings of ``cls``, each ``"folder"`` and
    each ``"dataset"`` that names a data file made absolute (from the working
    directory), so that a config saved with them finds them from any other."""
    paths = dict(values)
    for name, (_, s) in declared(cls).items():
        value = paths.get(name)
        # Another type is left as it is, for loading the data to refuse.
        if isinstance(value, str | os.PathLike) and (
            s.kind == "folder" or (s.kind == "dataset" and is_data_file(value))
        ):
            paths[name] = str(Path(value).expanduser().resolve())
    return paths


def option_names(cls: type) -> dict[str, str]:
    """Field -> its command-line option (``--particles``), for messages."""
    return {
        name: s.flag or "--" + name.replace("_", "-")
        for name, (_, s) in declared(cls).items()
    }


#: A switch setting's words (on the command line, in settings files) and the
#: values they give.
SWITCH = {"auto": "auto", "on": True, "off": False}


def normalize_switches(obj: Any) -> None:
    """Gives the switch settings of ``obj`` given as words (``"on"``, ``"off"``)
    their values (True, False)."""
    for name, (_, s) in declared(type(obj)).items():
        value = getattr(obj, name)
        if s.kind == "switch" and isinstance(value, str) and value in SWITCH:
            setattr(obj, name, SWITCH[value])


def check_values(obj: Any) -> None:
    """Checks each declared setting of ``obj`` against its choices and range.

    :raises ConfigError: naming the setting as ``{field}``.
    """
    number_fields = _number_fields(type(obj))
    optional = _optional_fields(type(obj))
    for name, (_, s) in declared(type(obj)).items():
        value = getattr(obj, name)
        if value is None and name not in optional:
            # A settings file's null: a traceback, or training's failure later.
            raise ConfigError(
                f"{{{name}}} takes no null (None); drop it for its default"
            )
        if value is not None and name in number_fields:
            _check_number(name, value, number_fields[name])
        # A file's "200,200", or a number or a mapping (a traceback).
        if s.kind == "sizes" and value is not None and not isinstance(value, list):
            raise ConfigError(
                f"{{{name}}} takes a list of sizes, such as [200, 200] in a "
                f"settings file, got {literal(repr(value))}"
            )
        if value is None or s.kind in ("flag", "sizes", "dataset", "folder"):
            continue
        if s.kind == "switch":
            _check_switch(name, value)
            continue
        if s.choices is not None and value not in s.choices:
            raise ConfigError(
                f"{{{name}}} {literal(repr(value))} is unknown; choose one of: "
                f"{literal(', '.join(s.choices))}"
            )
        if s.low is not None or s.high is not None:
            _check_range(name, value, s)


@functools.cache
def _optional_fields(cls: type) -> set[str]:
    """The fields of ``cls`` that may be None (annotated ``X | None``)."""
    hints = typing.get_type_hints(cls)
    return {
        name
        for name, hint in hints.items()
        if hint is type(None) or type(None) in typing.get_args(hint)
    }


@functools.cache
def _number_fields(cls: type) -> dict[str, type]:
    """The fields of ``cls`` annotated as integers or floats (or None)."""
    hints = typing.get_type_hints(cls)
    return {
        name: kind
        for name, hint in hints.items()
        for kind in (int, float)
        if hint in (kind, kind | None)
    }


def _check_number(name: str, value: Any, kind: type) -> None:
    """An integer field takes an integer; a float field any finite real number
    (an infinite learning rate or weight passes every range, then diverges)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
    ):
        what = "an integer" if kind is int else "a finite number"
        raise ConfigError(f"{{{name}}} must be {what}, got {literal(repr(value))}")
    if kind is int and not isinstance(value, numbers.Integral):
        raise ConfigError(f"{{{name}}} must be an integer, got {value!r}")


def _check_switch(name: str, value: Any) -> None:
    """A switch is True, False, ``"auto"`` or (from Python) a ``torch.compile``
    backend's name."""
    if value is True or value is False or value == "auto" or is_backend(value):
        return
    raise ConfigError(
        f"{{{name}}} {literal(repr(value))} is unknown; choose one of: "
        f"{literal(', '.join(SWITCH))}"
    )


def _check_range(name: str, value: Any, s: Setting) -> None:
    low = -math.inf if s.low is None else s.low
    high = math.inf if s.high is None else s.high
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    inside = number and (
        (low < value if s.open[0] else low <= value)
        and (value < high if s.open[1] else value <= high)
    )
    if not inside:
        bounds = [
            f"{'>' if s.open[0] else '>='} {s.low:g}" if s.low is not None else "",
            f"{'<' if s.open[1] else '<='} {s.high:g}" if s.high is not None else "",
        ]
        raise ConfigError(
            f"{{{name}}} must be {' and '.join(filter(None, bounds))}, got "
            f"{literal(repr(value))}"
        )


#: Values that say what happens anyway where their setting takes no effect
#: (nothing is compiled without an importance-weighted objective or method):
#: accepted there, so that a script or a grid may pin them for every run.
INERT_VALUES: dict[str, tuple[Any, ...]] = {"compile": (False, "off")}


def check_applies(
    values: Mapping[str, Any],
    defaults: Mapping[str, Any],
    given: Iterable[str],
    applies_with: Mapping[str, tuple[str, tuple[Any, ...], str]],
) -> None:
    """Checks that each setting of ``applies_with`` (field -> (that setting,
    those values, what to do instead)) that takes no effect with ``values``
    keeps its default, and is not among the settings ``given`` at all.

    :raises ConfigError: naming the settings as ``{field}``.
    """
    given = set(given)
    for field in unused(values, applies_with):
        if field in INERT_VALUES and values[field] in INERT_VALUES[field]:
            continue
        if field in given or values[field] != defaults[field]:
            setting_, applies, instead = applies_with[field]
            raise ConfigError(
                f"{{{field}}} applies to {{{setting_}}} {_or(applies)}; {instead}"
            )


def own_test_set(values: Mapping[str, Any]) -> list[str]:
    """``["test_fraction"]`` where ``values`` name a built-in data set, which
    holds its own test set, else ``[]``: whether a data file holds one is known
    only once it is read."""
    return ["test_fraction"] if values["dataset"] in DATASETS else []


def check_held_out(
    values: Mapping[str, Any], defaults: Mapping[str, Any], given: Iterable[str]
) -> None:
    """Checks, as :func:`check_applies` does, that a built-in data set's
    ``test_fraction`` keeps its default and is not among the settings ``given``.

    :raises ConfigError: naming the settings as ``{field}``.
    """
    # Before any data are read: a built-in set's own test set is the test set,
    # and downloading it first would answer with a network error instead.
    if own_test_set(values) and (
        "test_fraction" in given or values["test_fraction"] != defaults["test_fraction"]
    ):
        raise held_out_error(values["dataset"])


def held_out_error(dataset: str) -> ConfigError:
    """The error for a ``test_fraction`` of a ``dataset`` with its own test set."""
    return ConfigError(
        "{test_fraction} applies to data without a test set; {dataset} "
        f"{literal(dataset)} has its own: drop it"
    )


def unused(
    values: Mapping[str, Any],
    applies_with: Mapping[str, tuple[str, tuple[Any, ...], str]],
) -> list[str]:
    """The fields of ``applies_with`` that take no effect with ``values``."""
    return [
        field
        for field, (setting_, applies, _) in applies_with.items()
        if values[setting_] not in applies
    ]


def _or(values: tuple[Any, ...]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    values = tuple(str(v) for v in values)
    return " or ".join(filter(None, (", ".join(values[:-1]), values[-1])))


def anchored(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``values`` with a relative data file (``dataset``) or ``data_dir`` made
    absolute from ``folder``, that of the file that gives them: the file reads
    the same data from any working directory."""
    paths = {}
    for key in ("dataset", "data_dir"):
        value = values.get(key)
        if not isinstance(value, str) or (key == "dataset" and not is_data_file(value)):
            continue
        path = Path(value).expanduser()
        if not path.is_absolute():
            paths[key] = str((folder / path).resolve())
    return {**values, **paths}


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a file: a JSON object, a TOML table, or (with PyYAML
    installed) a YAML mapping, by the file's suffix; keys as in ``config.json``,
    relative paths read from the file's folder (:func:`anchored`). In YAML, an
    unquoted number in exponent form without a point (``lr: 1e-3``) is a
    number, as YAML 1.2 and JSON have it (a string to YAML 1.1, which PyYAML
    reads); a quoted one stays a string.

    :raises ConfigError: if the file cannot be read or holds no such mapping.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml") and importlib.util.find_spec("yaml") is None:
        raise ConfigError(
            f"reading {path} needs PyYAML: pip install pyyaml, or write the "
            "settings as JSON or TOML",
            literal=True,
        )
    try:
        text = path.read_text()
        if suffix == ".toml":
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.load(text, Loader=_loader())
        else:
            values = json.loads(text)
    except Exception as e:  # the parsers raise their own error types
        raise ConfigError(
            f"cannot read settings file {path} ({one_line(e)}); fix the file",
            literal=True,
        ) from e
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path} holds no mapping of settings; write them as in a run's "
            "config.json",
            literal=True,
        )
    return anchored(values, path.parent)


def _loader() -> type:
    """PyYAML's safe loader, also resolving YAML 1.2's floats without a point."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", exponent, list("-+0123456789")
    )
    return Loader
