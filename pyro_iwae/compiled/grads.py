"""How a compiled graph's gradients reach the parameters: through ``backward``
(:class:`PrecomputedGrad`), or set directly (:func:`set_grads`); and the
``pyro.param`` sites a compiled call shows Pyro's ``SVI`` in place of the
program it skipped (:func:`announce_params`)."""

from __future__ import annotations

from collections.abc import Iterable

import pyro
import torch
from pyro.poutine.runtime import am_i_wrapped


class PrecomputedGrad(torch.autograd.Function):
    """Returns ``loss``; its backward hands each parameter its precomputed gradient
    times the incoming one."""

    @staticmethod
    def forward(ctx, loss, grads, *params):  # noqa: ARG004
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if (
            grad_output.device.type == "cpu"
            and not grad_output.requires_grad
            and bool(grad_output == 1)
        ):
            # ``loss.backward()``: the gradients as they are, a multiply spared;
            # dropped here unless the graph is kept, so that the engine takes
            # them as ``.grad`` rather than copying them.
            grads = ctx.grads
            if not _keeps_graph():
                ctx.grads = None
            return (None, None, *grads)
        # One multi-tensor op: the per-tensor Python loop cost ~0.2 ms a step.
        present = [g for g in ctx.grads if g is not None]
        scaled = iter(torch._foreach_mul(present, grad_output) if present else ())
        grads = [None if g is None else next(scaled) for g in ctx.grads]
        return (None, None, *grads)


def _keeps_graph() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph``);
    True where torch cannot say."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keeps is None else keeps()


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Accumulates ``grads`` into ``.grad`` as ``backward`` would."""
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def announce_params(params: Iterable[torch.Tensor], announced: set[int]) -> bool:
    """Under Pyro's global parameter store (``SVI``), the parameters that the
    eager program registered there, as ``pyro.param`` sites: the compiled graph
    skips the program, and ``SVI.step`` optimises only the parameters whose
    sites it sees. ``announced`` keeps the ids of those announced before.

    :returns: False where one announced before is no longer in the store (it
        was cleared): only the eager program registers it again.
    """
    if pyro.settings.get("module_local_params") or not am_i_wrapped():
        return True
    store = pyro.get_param_store()
    for p in params:
        name = store.param_name(p)
        if name is not None:
            pyro.param(name)
            announced.add(id(p))
        elif id(p) in announced:
            announced.clear()
            return False
    return True
