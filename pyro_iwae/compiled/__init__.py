"""Compiled training and evaluation for Pyro programs of static structure.

Pyro's messengers cost a fixed Python overhead at every step, and eager PyTorch
runs each small tensor op on its own. :class:`CompiledLoss` removes both: the
first call for an input shape runs the Pyro program once under
:func:`torch.fx.experimental.proxy_tensor.make_fx` (with fake tensors), which
records the aten ops of the loss *and of its backward pass*, with the model's and
guide's parameters as inputs and Pyro's machinery left out. The random draws of
the program (``randn``, ``rand``, and the in-place fills of fresh tensors with
which ``torch.distributions`` reparameterise, as ``Normal.rsample``) are lifted
out of that graph and made eagerly, in the same order and with the same calls, so
the compiled loss sees exactly the noise the eager loss would under the same
seed. Draws whose arguments are tensors, as ``torch.bernoulli(probs)``, stay in
the graph, where inductor draws them from its own generator (and the traced
graph uncompiled, ``backend=None``, after the lifted draws): the loss and the
log-likelihood fall back to the eager path for them, with a warning.
The rest is compiled once (``torch.compile``, inductor by default) and later
calls run the compiled graph alone.

The graph bakes in the program's Python control flow, so it is only valid for
programs whose structure depends on the shapes of their inputs alone. Tracing
with fake tensors fails on data-dependent control flow, and the first call for
each input shape is checked against the eager loss and gradients; in either case,
and for parameters the graph cannot see (a network registered with
``pyro.module`` inside a function, ``pyro.param``, a ``PyroModule``, whose
parameters go through ``pyro.param``), the objective warns once and falls back
to the eager path. Model and guide must be ``nn.Module`` s (such as the paper's
``PaperModel`` and ``PaperGuide``).

Each new input signature (shapes, dtypes, devices of the tensor arguments) is
traced and compiled anew: about 12 s on a 2-core CPU (2-3 s from inductor's
on-disk cache), once per shape. Pyro's
validation runs in the eager check of the first call, not in the graph.

On a GPU the compiled graph is replayed as a CUDA graph (inductor's CUDA-graph
trees): one launch a step, and nothing read back to the host but what the
caller asks for (``loss.item()``). Its outputs are copied out of the graph's
memory pool, so they stay valid after the next call.

Usage, as a drop-in for ``elbo.differentiable_loss``::

    loss_fn = CompiledLoss(IWELBO(num_particles=5), model, guide)
    optimizer.zero_grad()
    loss = loss_fn(x) / x.shape[0]   # differentiable: the gradient is precomputed
    loss.backward()
    optimizer.step()

or, as ``fit --compile`` trains, a whole step as one graph (the loss scaled, its
gradients, and Adam's update where the optimiser is a plain ``torch.optim.Adam``
on the CPU)::

    loss = loss_fn.step(optimizer, x, scale=1 / x.shape[0])

and :func:`compiled_log_likelihood` for evaluation.

The package is a layer on :mod:`pyro_iwae.infer`, which never imports it:
importing it registers the compiled path with
:func:`pyro_iwae.infer.hooks.register_compiler`, which the ``compile`` options
of the objectives and evaluations use. Its modules: :mod:`.capture` (tracing,
lifted random draws), :mod:`.rewrites` (evaluation-only graph rewrites),
:mod:`.backend` (inductor, CUDA graphs, the graph cache and its fallbacks),
:mod:`.loss` (:class:`CompiledLoss`), :mod:`.adam` (Adam's update in a training
graph) and :mod:`.log_likelihood`
(:class:`CompiledLogLikelihood`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..infer.hooks import register_compiler
from .backend import CompileFallbackWarning, compile_seconds
from .capture import seeded_ops, trace_graph
from .log_likelihood import (
    CompiledLogLikelihood,
    cached_log_likelihood,
    compiled_log_likelihood,
)
from .loss import CompiledLoss, compiled_loss, loss_fallback

__all__ = [
    "CompiledLogLikelihood",
    "CompiledLoss",
    "CompileFallbackWarning",
    "cached_log_likelihood",
    "compile_seconds",
    "compiled_loss",
    "compiled_log_likelihood",
    "seeded_ops",
    "trace_graph",
]


class _CompiledPath:
    """This package as the :class:`~pyro_iwae.infer.hooks.Compiler` of the
    ``compile`` options: graphs cached on the objective or the guide."""

    def loss(
        self, elbo: Any, model: Callable, guide: Callable, backend: str | None
    ) -> Callable[..., torch.Tensor]:
        return compiled_loss(elbo, model, guide, backend=backend)

    def step(
        self, elbo: Any, model: Callable, guide: Callable, backend: str | None
    ) -> Callable[..., torch.Tensor]:
        return compiled_loss(elbo, model, guide, backend=backend).step

    def log_likelihood(
        self, model: Callable, guide: Callable, backend: str | None, plates: int
    ) -> CompiledLogLikelihood:
        return cached_log_likelihood(model, guide, backend, plates)

    def seconds(self) -> float:
        return compile_seconds()

    def fallback(self, elbo: Any, model: Callable, guide: Callable) -> str | None:
        return loss_fallback(elbo, model, guide)


register_compiler(_CompiledPath())
