"""One torch optimiser for every parameter Pyro's :class:`~pyro.infer.SVI` steps.

:class:`pyro.optim.PyroOptim` builds a torch optimiser per parameter tensor and
steps them one by one: twelve Adam steps of a few dozen microseconds each for the
paper's model, most of a millisecond a step. :class:`JointOptim` keeps a single
optimiser whose parameter groups gather every tensor seen so far, so one (fused)
update steps them all, with the same arithmetic per tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pyro
import torch
from pyro.optim import PyroOptim
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Adam", "JointOptim"]


class JointOptim(PyroOptim):
    """A :class:`~pyro.optim.PyroOptim` that steps all parameters with one optimiser.

    A drop-in replacement for ``pyro.optim.<Name>(optim_args, clip_args)`` under
    :class:`~pyro.infer.SVI`: each call steps the parameters it is given (a
    tensor seen before but absent from a call keeps its value and state, as
    under Pyro's per-tensor optimisers), gradients are clipped per tensor as
    ``clip_args`` say, and :meth:`get_state` / ``set_state`` use Pyro's
    per-parameter format, so saved states move between the two either way.
    After a step the stepped tensors' gradients are None (Pyro's leave zeros),
    so ``SVI.step``'s ``zero_grads`` has nothing to do.
    Tensors whose arguments are equal (all of them, when ``optim_args`` is a
    dict) share a parameter group, which a fused or ``foreach`` optimiser
    updates in one call. The torch optimiser is ``self.optimizer`` from the first
    step on (None before); a ``torch.optim.lr_scheduler`` built on it then sets
    the learning rate of every tensor.

    :param optim_constructor: A :class:`torch.optim.Optimizer` class, e.g.
        ``torch.optim.Adam``; not a learning-rate scheduler.
    :param optim_args: Its keyword arguments, or a callable from a parameter's
        name to them (as :class:`~pyro.optim.PyroOptim` takes).
    :param clip_args: ``clip_norm`` and/or ``clip_value``, or a callable giving
        them, as :class:`~pyro.optim.PyroOptim` takes.
    """

    def __init__(
        self,
        optim_constructor: type[Optimizer],
        optim_args: dict[str, Any] | Callable[..., dict[str, Any]],
        clip_args: dict[str, float] | Callable[..., dict[str, float]] | None = None,
    ) -> None:
        if not (
            isinstance(optim_constructor, type)
            and issubclass(optim_constructor, Optimizer)
        ):
            raise TypeError(
                "JointOptim takes a torch.optim.Optimizer class such as "
                f"torch.optim.Adam, got {optim_constructor!r}; for a learning-rate "
                "schedule use pyro.optim's schedulers"
            )
        super().__init__(optim_constructor, optim_args, clip_args)
        self.optimizer: Optimizer | None = None

    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        """One step of the given parameters (``*args``, ``**kwargs`` go to the
        optimiser's ``step``); tensors not seen before join the optimiser."""
        params = list(params)
        for p in params:
            if p not in self.grad_clip:
                self._add(p)
            clip = self.grad_clip[p]
            if clip is not None:
                clip(p)
        if self.optimizer is None:
            return
        # Pyro steps only the tensors a step used: hide the others' gradients
        # (Pyro leaves them zero, not None) so the optimiser skips them.
        active = set(params)
        hidden = []
        if len(active) < len(self.grad_clip):
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p not in active and p.grad is not None:
                        hidden.append((p, p.grad))
                        p.grad = None
        try:
            self.optimizer.step(*args, **kwargs)
        finally:
            for p, grad in hidden:
                p.grad = grad
        # Released, as torch's ``zero_grad()`` leaves them, where Pyro's
        # ``zero_grads`` would put new zero tensors that the next backward adds
        # to: a step of the paper's model spares 24 small operations.
        for p in params:
            p.grad = None

    def _add(self, p: Tensor) -> None:
        self.grad_clip[p] = self._get_grad_clip(p)
        # The optimiser Pyro would give p alone: its settings (the constructor's
        # defaults filled in) say which group p joins, and torch's own loader
        # casts a saved state to p's device and dtype.
        single = self.pt_optim_constructor([p], **self._get_optim_args(p))
        name = pyro.get_param_store().param_name(p)
        waiting = self._state_waiting_to_be_consumed.pop(name, None)
        if waiting is not None:
            single.load_state_dict(waiting)
        arguments = _group_arguments(single.param_groups[0])
        if self.optimizer is None:
            self.optimizer = single
            return
        for group in self.optimizer.param_groups:
            if _group_arguments(group) == arguments:
                group["params"].append(p)
                break
        else:
            self.optimizer.add_param_group({"params": [p], **arguments})
        if p in single.state:
            self.optimizer.state[p] = single.state[p]

    def get_state(self) -> dict[str, dict[str, Any]]:
        """Per parameter name, the state dict of a one-tensor optimiser (Pyro's
        format)."""
        states = {}
        if self.optimizer is None:
            return states
        store = pyro.get_param_store()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p)
                states[store.param_name(p)] = {
                    "state": {} if state is None else {0: dict(state)},
                    "param_groups": [{**_group_arguments(group), "params": [0]}],
                }
        return states


def Adam(
    optim_args: dict[str, Any] | Callable[..., dict[str, Any]],
    clip_args: dict[str, float] | Callable[..., dict[str, float]] | None = None,
) -> JointOptim:
    """:class:`torch.optim.Adam` over all parameters in one fused update.

    As ``pyro.optim.Adam(optim_args, clip_args)``, with ``fused=True`` unless
    ``optim_args`` says otherwise (a callable's dicts are passed as they are).
    """
    if isinstance(optim_args, dict):
        optim_args = {"fused": True, **optim_args}
    return JointOptim(torch.optim.Adam, optim_args, clip_args)


def _group_arguments(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"}
