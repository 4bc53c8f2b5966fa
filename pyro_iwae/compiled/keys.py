"""What a compiled graph fixes besides its inputs' signature, read at every call
as the graph's key: the settings of the objective and of the modules (the
Python values tracing bakes in), the Pyro handlers around the call, and the
plain tensor attributes a graph holds."""

from __future__ import annotations

import enum
import functools
import types
from typing import Any

import numpy as np
import torch
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.trace_messenger import TraceMessenger


class SameTensor:
    """A tensor in a graph's key: equal to another only for the same tensor at
    the same version (no in-place change since); kept alive, so that its ``id``
    is not another tensor's."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        # An inference tensor has no version counter (and cannot be changed in
        # place outside inference mode).
        self.version = None if tensor.is_inference() else tensor._version

    def __hash__(self) -> int:
        return id(self.tensor)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SameTensor)
            and other.tensor is self.tensor
            and other.version == self.version
        )


#: Types of the attributes that tracing bakes into a graph as constants.
_CONSTANT_TYPES = (bool, int, float, str, type(None))


def public_constants(obj: Any) -> tuple[tuple[str, Any], ...]:
    """``obj``'s public attributes (by name) whose values are Python numbers,
    strings or None: what tracing reads as constants. Private ones are caches
    (a transform's ``_inv``) and state, not settings."""
    # Names first, and no generator: a compiled step reads ~20 modules' ~17
    # attributes each: this order takes 26 us of the paper model's step, 48 before.
    return tuple(
        [
            (name, value)
            for name, value in vars(obj).items()
            if name[:1] != "_" and isinstance(value, _CONSTANT_TYPES)
        ]
    )


def objective_settings(elbo: Any) -> tuple[tuple[str, Any], ...]:
    """What a graph fixes of the objective ``elbo``: its :func:`public_constants`
    (particles, estimator, groups, ...) but ``compile`` (how it runs, not what it
    computes), sorted by name. A change of one gives another graph."""
    return tuple(sorted(c for c in public_constants(elbo) if c[0] != "compile"))


def module_constants(modules: list[tuple[str, torch.nn.Module]]) -> tuple:
    """What a graph fixes of ``modules`` (a :func:`~.capture.submodules` walk)
    besides their tensors: each module's class (a submodule swapped for one of
    another class) and :func:`module_settings`, its train or eval mode among
    them (dropout, batch norm), and such values as a KL weight that a schedule
    sets between steps or a fixed scale. A change gives another graph."""
    return tuple([(type(module), module_settings(module)) for _, module in modules])


#: ``nn.Module``'s own attributes (registries of tensors, submodules and hooks):
#: not settings of a model. ``training`` is one (the mode).
_MODULE_BOOKKEEPING = frozenset(vars(torch.nn.Module())) - {"training"}
#: Values tracing bakes in, keyed as they are: numbers (numpy's too), strings,
#: enum members, and functions and classes (by identity: ``self.act =
#: torch.tanh``).
_VALUES = (
    bool,
    int,
    float,
    str,
    np.generic,
    enum.Enum,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
    type,
)
_CONTAINERS = (dict, list, tuple, set, frozenset)
#: How deep :func:`_values_in` walks nested containers.
_MAX_DEPTH = 4


def module_settings(module: torch.nn.Module) -> tuple[tuple[str, Any], ...]:
    """What tracing reads of ``module`` as constants, by attribute name: the
    values of :data:`_VALUES` in its public and private attributes and in the
    dicts, lists, tuples and sets they hold (nested, as :func:`_values_in`
    gives them), and None in public ones (a private None is a cache's empty
    slot, as a transform's ``_inv``: it would give a second graph once filled);
    and the dtype, shape and device of each of its parameters and buffers. Not
    ``nn.Module``'s other bookkeeping."""
    # A loop over the attributes, no generator: a compiled step reads ~20
    # modules of ~20 attributes each (most of them bookkeeping).
    key = []
    for name, value in vars(module).items():
        if name in _MODULE_BOOKKEEPING:
            continue
        if isinstance(value, _VALUES) or (value is None and name[:1] != "_"):
            key.append((name, value))
        elif isinstance(value, _CONTAINERS):
            key.append((name, _values_in(value, 1)))
    # The graph is traced for its tensors' dtypes, shapes and devices (after
    # model.double(), the old graph failed on mixed dtypes).
    for members in (module._parameters, module._buffers):
        for name, t in members.items():
            key.append((name, t if t is None else (t.dtype, t.shape, t.device)))
    return tuple(key)


def _values_in(value: Any, depth: int) -> Any:
    """``value``'s :data:`_VALUES`, in its structure: a container (to
    :data:`_MAX_DEPTH` deep) as a tuple of its items' (a dict's as
    ``(key, item)`` pairs, a set's as a frozenset), anything else as ``...``
    (so that a tensor filling a cache's slot gives no new key)."""
    if isinstance(value, _VALUES):
        return value
    if depth > _MAX_DEPTH or not isinstance(value, _CONTAINERS):
        return ...
    if isinstance(value, dict):
        return tuple([(k, _values_in(v, depth + 1)) for k, v in value.items()])
    items = [_values_in(v, depth + 1) for v in value]
    return frozenset(items) if isinstance(value, set | frozenset) else tuple(items)


def handlers_key() -> tuple | None:
    """The Pyro handlers around a call, as a graph traced under them keeps them:
    SVI's trace of parameters, and scales by Python numbers (by value). None
    where another one is active (a condition's values, a mask, a tensor
    scale): a graph would keep what it did on the call that traced it, so the
    call runs eagerly."""
    key = []
    for handler in _PYRO_STACK:
        if type(handler) is TraceMessenger and handler.param_only:
            key.append("params")
        elif type(handler) is ScaleMessenger and isinstance(handler.scale, int | float):
            key.append(("scale", handler.scale))
        else:
            return None
    return tuple(key)
