"""Models and guides by name, so that a front end can choose them with a string.

A name is one of:

- a name registered with :func:`register_model` / :func:`register_guide`
  (``"paper"``; the guides ``"lowrank"``, ``"iaf"``, ``"coupling"``);
- an import path ``"package.module:builder"``, looked up among the installed
  packages and then, as ``python -m`` would, in the current folder (after the
  installed packages, so that a file there never shadows one of theirs): so
  ``--guide mymod:build`` finds ``./mymod.py``;
- the name of an entry point in the group ``pyro_iwae.nn.models`` /
  ``pyro_iwae.nn.guides`` of an installed package (a registered name comes
  first: building it warns of an entry point of that name, which goes unused).

A builder is called with keyword arguments: ``x_dim`` and ``stochastic_layers``
always, ``data_mean`` always for models, and the architecture settings that
differ from their defaults (``likelihood``, ``sigma``, ``hidden``,
``activation``, ``latent_dim``); one it does not take is an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch

from ..errors import BuilderError, PyroIwaeError, one_line

Builder = Callable[..., torch.nn.Module]

MODELS: dict[str, Builder] = {}
GUIDES: dict[str, Builder] = {}

#: The keyword arguments a run gives every model or guide builder (see the
#: module); a builder that lacks one cannot do without it by a setting.
ALWAYS_GIVEN = {
    "model": ("x_dim", "stochastic_layers", "data_mean"),
    "guide": ("x_dim", "stochastic_layers"),
}

#: Entry-point groups searched for models and guides by name.
ENTRY_POINT_GROUPS = {"model": "pyro_iwae.nn.models", "guide": "pyro_iwae.nn.guides"}


def _register(
    table: dict[str, Builder], kind: str, name: str, replace: bool
) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        old = table.get(name)
        if old is not None and not replace and _where(old) != _where(builder):
            raise BuilderError(
                f"a {kind} named {name!r} is registered already ({_where(old)}); "
                f"give register_{kind} replace=True to replace it, or choose "
                "another name"
            )
        table[name] = builder
        return builder

    return decorate


def _where(builder: Builder) -> str:
    """``module.qualname`` of ``builder``, and for a lambda or a nested
    function the file and line its code starts at: the same for a function
    defined anew by running its notebook cell or module again (edited, too: a
    module-level name is one builder); another for each lambda (all
    ``<lambda>``) and each nested function of one name (``f.<locals>.build``)
    defined elsewhere."""
    module = getattr(builder, "__module__", None)
    qualname = getattr(builder, "__qualname__", None)
    if not (module and qualname):
        return repr(builder)
    # Unwrapped: a decorator's wrapper has the same code for every builder.
    code = getattr(inspect.unwrap(builder), "__code__", None)
    if code is None or "<" not in qualname:  # a class, or a module-level name
        return f"{module}.{qualname}"
    return f"{module}.{qualname}, {code.co_filename} line {code.co_firstlineno}"


def register_model(name: str, *, replace: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: registers a model builder as ``name``, for :func:`build_model`
    and a run's ``model`` setting.

    The builder takes keyword arguments (see the module): ``x_dim``,
    ``stochastic_layers`` and ``data_mean`` always, and returns a
    ``torch.nn.Module``. The name is known to this Python process only: the
    command line finds a builder by an entry point or an import path.

    A builder of the same module and name as the registered one (the same
    function, or one defined again by running its notebook cell or module
    again, edited or not; a lambda or nested function: of the same file and line
    too) replaces it; another needs ``replace=True``.

    :raises BuilderError: for a name registered already to another builder.
    """
    return _register(MODELS, "model", name, replace)


def register_guide(name: str, *, replace: bool = False) -> Callable[[Builder], Builder]:
    """Decorator: registers a guide builder as ``name``, for :func:`build_guide`
    and a run's ``guide`` setting.

    The builder takes keyword arguments (see the module): ``x_dim`` and
    ``stochastic_layers`` always, and returns a ``torch.nn.Module``. The name is
    known to this Python process only: the command line finds a builder by an
    entry point or an import path.

    A builder of the same module and name as the registered one (the same
    function, or one defined again by running its notebook cell or module
    again, edited or not; a lambda or nested function: of the same file and line
    too) replaces it; another needs ``replace=True``.

    :raises BuilderError: for a name registered already to another builder.
    """
    return _register(GUIDES, "guide", name, replace)


def resolve(kind: str, name: str) -> Builder:
    """The builder of the ``kind`` (``"model"`` or ``"guide"``) named ``name``.

    :raises BuilderError: if it is not registered, cannot be imported, or is
        not callable.
    """
    table = MODELS if kind == "model" else GUIDES
    if name in table:
        return table[name]
    group = ENTRY_POINT_GROUPS[kind]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            builder = _import(module_name)
            for part in attribute.split("."):
                builder = getattr(builder, part)
        except Exception as e:  # noqa: BLE001 - any import failure is the user's
            raise BuilderError(
                f"cannot import {kind} {name!r} ({type(e).__name__}: "
                f"{' '.join(str(e).split())}); check the path (package.module:"
                "builder) and that its package is installed or its module is in "
                "the current folder"
            ) from e
    else:
        points = [
            p for p in importlib.metadata.entry_points(group=group) if p.name == name
        ]
        if not points:
            known = sorted(
                {
                    *table,
                    *(p.name for p in importlib.metadata.entry_points(group=group)),
                }
            )
            raise BuilderError(
                f"unknown {kind} {name!r}; choose one of: {', '.join(known)}, an "
                f"import path package.module:builder, or an entry point of group "
                f"{group} (a name given to register_{kind} in Python is known to "
                "that process only: a command line needs one of the other two)"
            )
        if len({p.value for p in points}) > 1:
            raise BuilderError(
                f"{kind} {name!r} is an entry point of group {group} in several "
                f"packages ({_providers(points)}); uninstall all but one, or name "
                "the builder by its import path package.module:builder"
            )
        try:
            builder = points[0].load()
        except Exception as e:  # noqa: BLE001
            raise BuilderError(
                f"cannot load {kind} {name!r} of entry point group {group} "
                f"({type(e).__name__}: {' '.join(str(e).split())}); reinstall the "
                "package that provides it"
            ) from e
    if not callable(builder):
        raise BuilderError(f"{kind} {name!r} is not callable; point at a builder")
    return builder


def _warn_shadowed(kind: str, name: str) -> None:
    """Warns of the entry points named ``name`` that the builder registered
    under that name (which comes first) keeps from being used."""
    # Said where a builder is built, not where names resolve (each config
    # checks its two): a scan of the entry points takes milliseconds.
    group = ENTRY_POINT_GROUPS[kind]
    points = [p for p in importlib.metadata.entry_points(group=group) if p.name == name]
    if points:
        # An entry point named paper ran the built-in paper model, without a word.
        warnings.warn(
            f"the entry point {name!r} of group {group} ({_providers(points)}) is "
            f"not used: the {kind} registered as {name!r} comes first; rename the "
            "entry point, or name its builder by its import path "
            f"({points[0].value})",
            stacklevel=4,
        )


def _providers(points: list[importlib.metadata.EntryPoint]) -> str:
    """``dist: module:builder`` of each entry point, for a message."""
    names = []
    for point in points:
        dist = getattr(point, "dist", None)
        names.append(f"{dist.name if dist else '?'}: {point.value}")
    return ", ".join(sorted(names))


def _import(module_name: str) -> ModuleType:
    """``importlib.import_module(module_name)``, retried with the current folder
    at the end of ``sys.path`` when its top-level package is not found (the
    ``pyro-iwae`` command's path holds its own folder, not the current one)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        on_path = {os.path.abspath(entry or ".") for entry in sys.path}
        if e.name != module_name.partition(".")[0] or here in on_path:
            raise
    sys.path.append(here)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name.partition(".")[0]:
            sys.path.remove(here)  # not there either: leave the path as it was
        raise


def takes(kind: str, name: str, setting: str) -> bool:
    """Whether the ``kind`` builder ``name`` takes the keyword argument
    ``setting`` (by name or ``**kwargs``; true for a builder without a
    signature to tell).

    :raises BuilderError: see :func:`resolve`.
    """
    parameters = _parameters(kind, name)
    return parameters is None or any(
        p.kind is p.VAR_KEYWORD
        or (p.name == setting and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        for p in parameters.values()
    )


def own_default(kind: str, name: str, setting: str) -> Any:
    """The default the ``kind`` builder ``name`` gives its keyword argument
    ``setting``; ``inspect.Parameter.empty`` where it gives none (or has no
    signature to tell).

    :raises BuilderError: see :func:`resolve`.
    """
    parameter = (_parameters(kind, name) or {}).get(setting)
    return inspect.Parameter.empty if parameter is None else parameter.default


def _parameters(kind: str, name: str) -> Mapping[str, inspect.Parameter] | None:
    """The parameters of the ``kind`` builder ``name``; None where it has no
    signature to tell."""
    try:
        return inspect.signature(resolve(kind, name)).parameters
    except (TypeError, ValueError):
        return None


def _build(kind: str, name: str, **config) -> torch.nn.Module:
    builder = resolve(kind, name)
    table = MODELS if kind == "model" else GUIDES
    if table.get(name) is builder:
        _warn_shadowed(kind, name)
    try:
        parameters = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):
        parameters = None
    if parameters is not None:
        _check_call(kind, name, builder, parameters, config)
    module = _called(kind, name, builder, config, checked=parameters is not None)
    if not isinstance(module, torch.nn.Module):
        raise BuilderError(
            f"{kind} {name!r} built a {type(module).__name__}, not a torch.nn.Module "
            "(such as a PyroModule); return a module"
        )
    return module


def _called(
    kind: str, name: str, builder: Builder, config: dict, checked: bool
) -> object:
    """``builder(**config)``; ``checked``: whether its signature was checked
    against ``config``.

    :raises BuilderError: where the builder fails: its own error, in one line.
    """
    try:
        return builder(**config)
    except PyroIwaeError:
        raise  # one line already
    except Exception as e:  # noqa: BLE001 - any failure of a builder is its own
        if isinstance(e, TypeError) and not checked:
            # A built-in without a signature to check: its refusal is a TypeError.
            raise BuilderError(
                f"{kind} {name!r} cannot be called as a builder ({one_line(e)}); "
                "give a function or class that takes keyword settings and returns "
                "a torch.nn.Module"
            ) from e
        raise BuilderError(
            f"{kind} {name!r} failed to build ({type(e).__name__}: {one_line(e)}); "
            "fix its builder, or check the settings it was given"
        ) from e


def _check_call(
    kind: str,
    name: str,
    builder: Builder,
    parameters: list[inspect.Parameter],
    config: dict,
) -> None:
    """:raises BuilderError: where ``builder``, of ``parameters``, cannot take
    ``config`` as keyword arguments."""
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        extra = [key for key in config if key not in {p.name for p in parameters}]
        given = [key for key in extra if key in ALWAYS_GIVEN[kind]]
        if given:
            # No setting leaves these out: the builder has to take them.
            raise BuilderError(
                f"{kind} {name!r} takes no {', '.join(given)}, which a run gives "
                f"every {kind} builder; give its builder "
                f"{'that keyword argument' if len(given) == 1 else 'those'} "
                "(or **kwargs)"
            )
        if extra:
            # A built-in's builder is not the user's to change.
            module = getattr(builder, "__module__", None) or ""
            builtin = module.startswith("pyro_iwae.")
            change = (
                ""
                if builtin
                else ", or give its builder keyword arguments of those names"
            )
            raise BuilderError(
                f"{kind} {name!r} takes no {', '.join(extra)}; drop "
                f"{'that setting' if len(extra) == 1 else 'those settings'}{change}"
            )
    missing = [
        p.name
        for p in parameters
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in config
    ]
    if missing:
        raise BuilderError(
            f"{kind} {name!r} needs {', '.join(missing)}, which no setting gives; "
            "give those arguments of its builder defaults"
        )


def build_model(name: str, **config) -> torch.nn.Module:
    """Builds the model ``name`` (see :func:`resolve`) with keyword ``config``."""
    return _build("model", name, **config)


def build_guide(name: str, **config) -> torch.nn.Module:
    """Builds the guide ``name`` (see :func:`resolve`) with keyword ``config``."""
    return _build("guide", name, **config)
