"""Building blocks of the paper's networks: tanh MLPs and Gaussian layers."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

_instances = itertools.count()

#: Hidden units by name: tanh (the paper's) or relu.
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """Linear layers of ``sizes`` with an ``activation`` (:data:`ACTIVATIONS`)
    after each (tanh: the paper's hidden units)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of: "
            f"{', '.join(ACTIVATIONS)}"
        )
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class GaussianLayer(nn.Module):
    """``h -> (loc, log_scale)`` of a diagonal Gaussian: a tanh MLP, then one linear
    map to the mean and the log standard deviation.

    :param sizes: input size, then hidden sizes; ``out_dim`` is the Gaussian's size.
    :param activation: the hidden units (see :func:`mlp`).
    """

    def __init__(
        self, sizes: Sequence[int], out_dim: int, activation: str = "tanh"
    ) -> None:
        super().__init__()
        self.hidden = mlp(sizes, activation)
        self.out = nn.Linear(sizes[-1], 2 * out_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, log_scale = self.out(self.hidden(h)).chunk(2, dim=-1)
        return loc, log_scale


class PyroNetwork(nn.Module):
    """An ``nn.Module`` whose parameters a Pyro program registers with ``pyro.module``,
    so that :class:`pyro.infer.SVI` sees them; each instance has its own name, so
    that two instances never share the global parameter store's entries.

    Under ``pyro.settings.context(module_local_params=True)`` (Pyro's setting for
    training modules with a torch optimizer, as with an ``ELBOModule``) the
    parameters stay local to the module, as a ``PyroModule``'s do, and registering
    them (which costs a Pyro message per parameter and call) is skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pyro_name = f"{type(self).__name__}{next(_instances)}"

    def register_with_pyro(self) -> None:
        if not pyro.settings.get("module_local_params"):
            pyro.module(self._pyro_name, self)

    def check_images(self, x: torch.Tensor) -> None:
        """:raises ValueError: unless ``x`` is ``[batch, self.x_dim]`` (flattened
        images) of the parameters' dtype, saying what to pass instead of the
        error a layer would raise."""
        if x.dim() == 2 and x.shape[-1] == self.x_dim:
            param = next(self.parameters(), None)
            dtype = x.dtype if param is None else param.dtype
            if x.dtype != dtype:
                raise ValueError(
                    f"{type(self).__name__} takes x of its parameters' dtype "
                    f"{dtype}, got {x.dtype}; pass x.to({dtype}) (or convert the "
                    "model and guide with .to(x.dtype))"
                )
            return
        shape = list(x.shape)
        if x.dim() == 1 and shape[0] == self.x_dim:
            fix = "one point: x.unsqueeze(0)"
        elif x.dim() > 2 and math.prod(shape[1:]) == self.x_dim:
            fix = "flatten each image: x.reshape(len(x), -1)"
        else:
            fix = f"the networks were built for x_dim={self.x_dim}"
        raise ValueError(
            f"{type(self).__name__} takes x of shape [batch, {self.x_dim}], got "
            f"shape {shape}; {fix}"
        )


def prepare_pyro_modules(*fns: object) -> bool:
    """Lets the :class:`~pyro.nn.PyroModule` s among ``fns`` (and inside them) run
    under ``pyro.settings.context(module_local_params=True)``; returns whether
    there was one.

    A ``PyroModule`` made while that setting was off has no local parameter
    state, and Pyro fails with ``'_Context' object has no attribute
    'param_state'`` when it is called with the setting on (as :func:`pyro_iwae.fit`
    trains). Its parameters are the module's own either way: this gives it the
    empty state Pyro would have given it.
    """
    found = False
    for fn in fns:
        if not isinstance(fn, nn.Module):
            continue
        for module in fn.modules():
            if isinstance(module, PyroModule):
                found = True
                context = module._pyro_context
                if not hasattr(context, "param_state"):
                    context.param_state = {"params": {}, "constraints": {}}
    return found


def local_params(
    *fns: object, enabled: bool = True
) -> contextlib.AbstractContextManager:
    """``pyro.settings.context(module_local_params=enabled)``, once the
    ``PyroModule`` s among ``fns`` are ready for it (see
    :func:`prepare_pyro_modules`).

    With the setting on, a ``PyroModule`` 's parameters (``PyroParam`` s
    included) are its own, never those of a same-named entry of Pyro's global
    parameter store (a model and a guide that are both top-level ``PyroModule``
    s share their names there).
    """
    prepare_pyro_modules(*fns)
    return pyro.settings.context(module_local_params=enabled)
