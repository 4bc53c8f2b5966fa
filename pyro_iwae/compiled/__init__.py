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
the graph, where inductor draws them from its own generator: the loss's
first-call check then fails and it falls back to the eager path; the
log-likelihood stays compiled, a valid estimate from other draws than eager's.
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
traced and compiled anew: tens of seconds on a 2-core CPU, once per shape. Pyro's
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

and :func:`compiled_log_likelihood` for evaluation.

The module runs past 500 lines because the loss and the log-likelihood share
one tracing machinery (fake tensors, lifted random draws, the graph cache and
its fallbacks), which is most of it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import pyro
import torch
import torch._inductor
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import am_i_wrapped
from torch import fx

from ..infer.evaluation import (
    LogWeights,
    check_batch,
    check_count,
    combine_chunks,
    evaluating,
    log_weight_chunks,
    resolve_chunk_size,
)
from ..infer.traces import cuda_devices

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

#: Aten random ops whose draws are lifted out of the graph (all of their
#: arguments must be constants: shapes, dtypes, devices, numbers).
_RANDOM_OPS = {
    torch.ops.aten.randn.default,
    torch.ops.aten.rand.default,
    torch.ops.aten.normal.float_float,
    torch.ops.aten.randint.default,
    torch.ops.aten.randint.low,
}


#: Seconds this process has spent tracing and compiling graphs (all caches).
_compile_seconds = 0.0


def compile_seconds() -> float:
    """Seconds this process has spent tracing and compiling graphs so far: what
    ``fit`` and ``evaluate_run`` report as ``compile_time``."""
    return _compile_seconds


class CompileFallbackWarning(UserWarning):
    """The compiled path was given up for a program; the eager path runs instead."""


def _fallback(reason: str) -> None:
    warnings.warn(
        f"pyro_iwae.compiled: {reason}; falling back to the eager path",
        CompileFallbackWarning,
        stacklevel=3,
    )


class _Both(torch.nn.Module):
    """Model and guide as one module, so that one ``functional_call`` swaps both."""

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.guide = guide


def _named_tensors(both: _Both) -> dict[str, torch.Tensor]:
    named = dict(both.named_parameters(remove_duplicate=True))
    named.update(both.named_buffers(remove_duplicate=True))
    return named


def _lift_random_ops(gm: fx.GraphModule) -> list[tuple[Any, tuple, dict]]:
    """Turns each random op with constant arguments into a new trailing input.

    Returns the ops, in graph (execution) order, as ``(op, args, kwargs)`` to be
    called eagerly before each run of the graph.
    """
    graph = gm.graph
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    lifted = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _RANDOM_OPS:
            draw, drawn = (node.target, node.args, dict(node.kwargs)), [node]
        elif _fills_fresh_tensor(node):
            # torch.distributions' rsample: empty(shape).normal_(), as one draw.
            empty = node.args[0]
            fill = (empty.args, empty.kwargs, node.target, node.args[1:], node.kwargs)
            draw, drawn = (_filled, fill, {}), [node, empty]
        else:
            continue
        leaves = torch.utils._pytree.tree_leaves(draw[1:])
        if any(isinstance(a, fx.Node) for a in leaves):
            continue
        with graph.inserting_after(last_input):
            placeholder = graph.placeholder(f"noise_{len(lifted)}")
        last_input = placeholder
        placeholder.meta = dict(node.meta)
        node.replace_all_uses_with(placeholder)
        for dead in drawn:
            graph.erase_node(dead)
        lifted.append(draw)
    graph.lint()
    gm.recompile()
    return lifted


#: In-place random fills that a fresh ``aten.empty`` may take.
_RANDOM_FILLS = {torch.ops.aten.normal_.default, torch.ops.aten.uniform_.default}


def _fills_fresh_tensor(node: fx.Node) -> bool:
    """Whether ``node`` fills a tensor fresh from ``aten.empty`` that nothing else
    uses with random numbers, as ``torch.empty(shape).normal_()``."""
    if node.target not in _RANDOM_FILLS or not node.args:
        return False
    empty = node.args[0]
    return (
        isinstance(empty, fx.Node)
        and empty.target is torch.ops.aten.empty.memory_format
        and len(empty.users) == 1
    )


def _filled(
    empty_args: tuple,
    empty_kwargs: dict,
    fill: Callable,
    fill_args: tuple,
    fill_kwargs: dict,
) -> torch.Tensor:
    """A lifted fill: the same ``aten.empty`` and in-place random ``fill``, eagerly."""
    fresh = torch.ops.aten.empty.memory_format(*empty_args, **empty_kwargs)
    return fill(fresh, *fill_args, **fill_kwargs)


def _bernoulli_log_prob_sum(
    logits: torch.Tensor, target: torch.Tensor, factors: int
) -> torch.Tensor:
    """``binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)``
    with one ``log`` per ``factors`` elements instead of an ``exp`` and a
    ``log1p`` per element.

    Elementwise the loss is ``(1 - t) l + max(-l, 0) + log1p(exp(-|l|))``; the
    last terms' sum is the log of a product of factors in (1, 2], which cannot
    overflow in groups of at most 16. The rounding error is the same order as
    the per-element form's (a few float32 ulps of each group's log).
    """
    linear = ((1 - target) * logits + (-logits).clamp_min(0)).sum(-1)
    products = (1 + torch.exp(-logits.abs())).unflatten(-1, (factors, -1)).prod(-2)
    return linear + products.log().sum(-1)


def _group_bernoulli_sums(gm: fx.GraphModule) -> None:
    """Rewrites each ``sum(-1)`` of an elementwise ``binary_cross_entropy_with_logits``
    (the Bernoulli log-density of an image, summed over its pixels: the paper
    model's, or Pyro's ``Bernoulli(logits=...).to_event(1)``, with a ``neg`` and a
    same-shape ``view`` in between) as :func:`_bernoulli_log_prob_sum`.

    In the compiled evaluation the per-pixel ``exp`` and ``log1p`` took 40% of
    the time; with one ``log`` per 14 pixels (784 = 14 x 56) that kernel runs
    in about 60% of the time (see results/benchmarks.md).
    """
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.target is not aten.binary_cross_entropy_with_logits.default:
            continue
        names = ("self", "target", "weight", "pos_weight", "reduction")
        call = dict(zip(names, node.args, strict=False)) | node.kwargs
        value = node.meta.get("val")
        if (
            call.get("weight") is not None
            or call.get("pos_weight") is not None
            or call.get("reduction", 1) != 0
            or value is None
            or value.dtype not in (torch.float32, torch.float64)
        ):
            continue
        found = _pixel_sum(node, value.shape)
        size = value.shape[-1]
        divisors = [f for f in range(16, 3, -1) if size % f == 0]
        if found is None or not divisors:
            continue
        total, chain, negated = found
        # Whole vectors of 8 floats left after the products run fastest (784: 14).
        factors = next((f for f in divisors if size // f % 8 == 0), divisors[0])
        with gm.graph.inserting_before(total):
            grouped = gm.graph.call_function(
                _bernoulli_log_prob_sum, (call["self"], call["target"], factors)
            )
            if negated:
                grouped = gm.graph.call_function(aten.neg.default, (grouped,))
        grouped.meta = dict(total.meta)
        total.replace_all_uses_with(grouped)
        for dead in [total, *reversed(chain)]:
            gm.graph.erase_node(dead)
    gm.graph.lint()
    gm.recompile()


def _pixel_sum(node: fx.Node, shape: torch.Size) -> tuple | None:
    """``(sum, chain, negated)`` where ``node`` feeds nothing but ``sum(-1)``
    through the single-use ``chain`` (``node`` first) of ``neg`` and same-shape
    ``view`` nodes, ``negated`` if it holds an odd number of ``neg``; else None."""
    aten = torch.ops.aten
    chain, negated = [node], False
    while len(chain[-1].users) == 1:
        (user,) = chain[-1].users
        value = user.meta.get("val")
        if user.target is aten.neg.default:
            negated = not negated
        elif not (
            user.target in (aten.view.default, aten.reshape.default)
            and value is not None
            and value.shape == shape
        ):
            break
        chain.append(user)
    if len(chain[-1].users) != 1:
        return None
    (total,) = chain[-1].users
    if (
        total.target is not aten.sum.dim_IntList
        or total.args[0] is not chain[-1]
        or list(total.args[1]) not in ([-1], [len(shape) - 1])
        or total.args[2:] not in ((), (False,))
        or total.kwargs.get("dtype") is not None
    ):
        return None
    return total, chain, negated


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """``tanh(x)`` as ``(1 - e) / (1 + e)`` with ``e = exp(-2 |x|)``, its sign
    restored: an ``exp`` and a division, where inductor's CPU kernels call
    Sleef's slower vector ``tanh``. Absolute error below 1e-7 in float32."""
    e = torch.exp(-2 * x.abs())
    return torch.copysign((1 - e) / (1 + e), x)


def _cheaper_tanh(gm: fx.GraphModule) -> None:
    """Rewrites each CPU float ``tanh`` of ``gm`` as :func:`_tanh`."""
    for node in list(gm.graph.nodes):
        value = node.meta.get("val")
        if (
            node.target is not torch.ops.aten.tanh.default
            or value is None
            or value.device.type != "cpu"
            or value.dtype not in (torch.float32, torch.float64)
        ):
            continue
        with gm.graph.inserting_before(node):
            cheaper = gm.graph.call_function(_tanh, node.args)
        cheaper.meta = dict(node.meta)
        node.replace_all_uses_with(cheaper)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _draw(noise_ops: Sequence[tuple[Any, tuple, dict]]) -> list[torch.Tensor]:
    return [op(*args, **kwargs) for op, args, kwargs in noise_ops]


def trace_graph(
    fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor]
) -> tuple[fx.GraphModule, list[tuple[Any, tuple, dict]]]:
    """``fn(*inputs)`` as an aten graph (fake-tensor tracing) with its random
    draws lifted out as trailing inputs; see :func:`_lift_random_ops`.

    Raises whatever tracing raises: data-dependent control flow among others.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    # Validation reads values (data-dependent): the eager check of the first call
    # validates, the graph does not.
    with pyro.validation_enabled(False), _NoParamStore():
        gm = make_fx(fn, tracing_mode="fake")(*inputs)
    constants = [
        getattr(gm, node.target) for node in gm.graph.nodes if node.op == "get_attr"
    ]
    if any(isinstance(c, torch.Tensor) and c.requires_grad for c in constants):
        raise _Unsupported(_PARAM_MESSAGE)
    return gm, _lift_random_ops(gm)


class _Unsupported(Exception):
    pass


_PARAM_MESSAGE = (
    "the program uses a trainable tensor that is neither a parameter of the model "
    "or guide module nor an input (pyro.param, or pyro.module inside a function)"
)


_PYRO_MODULE_MESSAGE = (
    "a PyroModule's parameters go through pyro.param, outside the nn.Module "
    "parameters a graph takes as inputs; build model and guide from plain "
    "nn.Modules to compile them"
)


def _pyro_modules(*fns: Any) -> bool:
    """Whether a ``PyroModule`` is among ``fns`` or their submodules."""
    return any(
        isinstance(module, pyro.nn.PyroModule)
        for fn in fns
        if isinstance(fn, torch.nn.Module)
        for module in fn.modules()
    )


#: Torch's loggers that report, while a program is traced or compiled, what a
#: user cannot act on: a fake-tensor kernel's failure (with its traceback; the
#: eager path then raises the program's own error, or the fallback warning says
#: why), and "No CUDA runtime is found" when inductor loads its C++ toolchain on
#: a machine with a CUDA toolkit and no GPU.
_NOISY_LOGGERS = ("torch._subclasses.fake_tensor", "torch.utils.cpp_extension")


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


_SEEDED_MESSAGE = (
    "the program draws random numbers with tensor arguments (as "
    "torch.bernoulli(probs) or torch.randn_like(x)); compiled, they would come "
    "from another generator than the eager path's"
)


def seeded_ops(graph: fx.Graph) -> list[fx.Node]:
    """The random ops left in ``graph`` (those whose draws could not be lifted)."""
    return [
        node
        for node in graph.nodes
        if isinstance(node.target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in node.target.tags
    ]


class _NoParamStore(Messenger):
    """Refuses ``pyro.param`` while tracing, before the param store is touched (it
    would store a fake tensor)."""

    def _pyro_param(self, msg: dict) -> None:
        raise _Unsupported(_PARAM_MESSAGE)


def _compile(
    gm: fx.GraphModule,
    backend: str | None,
    options: dict,
    inputs: Sequence[torch.Tensor],
    noise_ops: Sequence[tuple[Any, tuple, dict]],
) -> Callable:
    """``gm`` compiled: with inductor and no options, by inductor directly (no
    TorchDynamo guards to check at every call: about 0.3 ms of a 7 ms step), as a
    CUDA graph where every input is on a GPU; else by ``torch.compile``;
    ``backend=None`` leaves it as it is."""
    if backend is None:
        return gm
    if backend == "inductor" and not options:
        with torch.random.fork_rng(devices=cuda_devices(tuple(inputs), {})):
            noise = _draw(noise_ops)
        examples = _static_fakes([*inputs, *noise])
        if {t.device.type for t in inputs} != {"cuda"}:
            return torch._inductor.compile(gm, examples)
        # One replay a call instead of a launch a kernel; shapes are static (a
        # graph per input signature) and the noise is an input, drawn eagerly.
        replay = torch._inductor.compile(
            gm, examples, options={"triton.cudagraphs": True}
        )
        return lambda *args: _own(replay(*args))
    return torch.compile(gm, backend=backend, fullgraph=True, dynamic=False, **options)


def _static_fakes(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fake copies of ``tensors`` with static shapes, in a fake mode with a shape
    environment: inductor's on-disk graph cache needs one (with real example
    inputs it makes a fake mode without, and compiles every graph anew in every
    process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    return [mode.from_tensor(t, static_shapes=True) for t in tensors]


def _own(outputs: Any) -> Any:
    """The graph's outputs copied out of its CUDA-graph memory pool, which the next
    replay overwrites (a caller may keep a chunk's log-weights, or call the loss
    twice before ``backward``)."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, outputs)


def _signature(args: tuple, kwargs: dict) -> tuple | None:
    """A hashable key of the call: tensor shapes, strides, dtypes and devices,
    other values themselves; None if some value is not hashable. (A compiled
    graph is only valid for the memory layout it was compiled for.)"""
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("T", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append(leaf)
    return (str(spec), tuple(key))


class _LossGraph:
    """The compiled loss-and-gradients graph of one input signature."""

    def __init__(self, fn: Callable, noise_ops: list, grad_mask: list[bool]) -> None:
        self.fn = fn
        self.noise_ops = noise_ops
        self.grad_mask = grad_mask


class _PrecomputedGrad(torch.autograd.Function):
    """Returns ``loss``; its backward hands each parameter its precomputed gradient
    times the incoming one."""

    @staticmethod
    def forward(ctx, loss, grads, *params):  # noqa: ARG004
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        # One multi-tensor op: the per-tensor Python loop cost ~0.2 ms a step.
        present = [g for g in ctx.grads if g is not None]
        scaled = iter(torch._foreach_mul(present, grad_output) if present else ())
        grads = [None if g is None else next(scaled) for g in ctx.grads]
        return (None, None, *grads)


class _GraphCache:
    """Compiled graphs by input signature, and the fallback once they fail."""

    def __init__(
        self,
        model: Any,
        guide: Any,
        backend: str | None,
        compile_options: dict | None,
        max_signatures: int,
    ) -> None:
        self.model = model
        self.guide = guide
        self.backend = backend
        self.compile_options = compile_options or {}
        self.max_signatures = max_signatures
        self._graphs: dict[tuple, Any] = {}
        self._disabled: str | None = None

    @property
    def compiled(self) -> bool:
        """False once the compiled path has been given up for good."""
        return self._disabled is None

    def _disable(self, reason: str) -> None:
        self._disabled = reason
        _fallback(reason)

    def _lookup(
        self, key: Any, args: tuple, kwargs: dict, build: Callable[[], Any]
    ) -> tuple[Any, bool]:
        """The graph of ``(key, signature of args)``, built if new: ``(graph,
        fresh)``, with ``graph`` None where the eager path must run."""
        if self._disabled is not None:
            return None, False
        signature = _signature(args, kwargs)
        if signature is None:
            self._disable("an argument is neither a tensor nor hashable")
            return None, False
        key = (key, signature)
        if key in self._graphs:
            return self._graphs[key], False
        if len(self._graphs) >= self.max_signatures:
            self._disable(
                f"more than {self.max_signatures} input shapes (each one compiles a "
                "new graph)"
            )
            return None, False
        global _compile_seconds
        start = time.perf_counter()
        try:
            if _pyro_modules(self.model, self.guide):
                raise _Unsupported(_PYRO_MODULE_MESSAGE)
            with warnings.catch_warnings(), _quiet_torch_logs():
                # Raised inside inductor's own lowerings: nothing a user can act on.
                warnings.filterwarnings(
                    "ignore", "`torch._prims_common.check` is deprecated", FutureWarning
                )
                graph = build()
        except _Unsupported as error:
            self._disable(str(error))
            return None, False
        except Exception as error:  # tracing fails on dynamic structure
            self._disable(
                f"cannot trace the program as a static graph ({_describe(error)})"
            )
            return None, False
        finally:
            _compile_seconds += time.perf_counter() - start
        self._graphs[key] = graph
        return graph, True


class CompiledLoss(_GraphCache):
    """``elbo.differentiable_loss(model, guide, *args)`` as one compiled graph of the
    loss and its gradients.

    :param elbo: an :class:`~pyro_iwae.IWELBO` (or subclass), or any Pyro ELBO with
        ``differentiable_loss``.
    :param model: the model, an ``nn.Module`` (its parameters, and the guide's,
        become the graph's inputs).
    :param guide: the guide, an ``nn.Module``.
    :param backend: ``torch.compile`` backend; ``None`` runs the traced aten graph
        without compiling it (no compile time, still no Pyro overhead).
    :param compile_options: more ``torch.compile`` keyword arguments (``mode``,
        ``options``).
    :param verify: check the first call of each input signature against the eager
        loss and gradients (same noise); on a mismatch warn and fall back.
    :param rtol: the relative tolerance of that check.
    :param max_signatures: at most this many input signatures get a graph; later
        ones run eagerly (with a warning), since each costs a compilation.

    Calling the object returns the loss with a ``grad_fn``: its backward puts the
    precomputed gradients (times the incoming gradient) into the parameters'
    ``.grad``, so it replaces ``differentiable_loss`` in a training loop. The
    gradients are computed in the forward call, whether or not backward follows.
    """

    def __init__(
        self,
        elbo: Any,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        *,
        backend: str | None = "inductor",
        compile_options: dict | None = None,
        max_signatures: int = 4,
        verify: bool = True,
        rtol: float = 1e-4,
    ) -> None:
        super().__init__(model, guide, backend, compile_options, max_signatures)
        self.elbo = elbo
        self.verify = verify
        self.rtol = rtol
        if not (
            isinstance(model, torch.nn.Module) and isinstance(guide, torch.nn.Module)
        ):
            self._disable("model and guide must both be nn.Modules")
        else:
            self._both = _Both(model, guide)

    def eager(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The eager loss, ``elbo.differentiable_loss(model, guide, *args)``.

        For an :class:`~pyro_iwae.IWELBO` this calls its ``_weighted_loss``, the
        eager computation behind ``differentiable_loss``, so that an objective
        whose ``differentiable_loss`` routes through a ``CompiledLoss`` (as with a
        ``compile`` option) does not recurse.
        """
        weighted = getattr(self.elbo, "_weighted_loss", None)
        if weighted is not None:
            return weighted(self.model, self.guide, args, kwargs)[0]
        return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disabled is not None or not torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        # Looked up once a call: walking the modules costs ~0.15 ms each time.
        named = _named_tensors(self._both)
        graph, loss = self._graph(named, args, kwargs)
        if graph is None:
            return self.eager(*args, **kwargs)
        _announce_params(named.values())
        if loss is not None:
            return loss
        return self._run(graph, list(named.values()), args, kwargs)

    def loss_and_grads(self, *args: Any, **kwargs: Any) -> float:
        """Accumulates the gradient of the loss in ``.grad``; returns the loss."""
        loss = self(*args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    # -- internals ---------------------------------------------------------------

    def _graph(
        self, named: dict[str, torch.Tensor], args: tuple, kwargs: dict
    ) -> tuple[_LossGraph | None, torch.Tensor | None]:
        """The graph for this call's signature (None: run eagerly) and, on the call
        that built and verified it, the compiled loss of this call."""
        graph, fresh = self._lookup(
            tuple(t.requires_grad for t in named.values()),
            args,
            kwargs,
            lambda: self._build(named, args, kwargs),
        )
        if not fresh:
            return graph, None
        if not self.verify:
            return graph, None
        loss = self._verified(graph, list(named.values()), args, kwargs)
        if loss is None:
            self._disable(
                "the compiled loss or gradients differ from the eager ones (does the "
                "program's structure change between calls?)"
            )
            return None, None
        return graph, loss

    def _build(self, named: dict, args: tuple, kwargs: dict) -> _LossGraph:
        names = list(named)
        tensors = list(named.values())
        wanted = [t.requires_grad for t in tensors]
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        positions = [
            i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)
        ]
        n = len(tensors)
        grad_mask: list[bool] = []

        def loss_and_grads(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            params = [
                t.detach().requires_grad_(w)
                for t, w in zip(flat[:n], wanted, strict=True)
            ]
            call_leaves = list(leaves)
            for i, t in zip(positions, flat[n:], strict=True):
                call_leaves[i] = t
            call_args, call_kwargs = torch.utils._pytree.tree_unflatten(
                call_leaves, spec
            )
            state = dict(zip(names, params, strict=True))
            with (
                pyro.settings.context(module_local_params=True),
                torch.nn.utils.stateless._reparametrize_module(self._both, state),
            ):
                loss = self.eager(*call_args, **call_kwargs)
            trainable = [p for p, w in zip(params, wanted, strict=True) if w]
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            grad_mask[:] = [g is not None for g in grads]
            return (loss.detach(), *(g for g in grads if g is not None))

        inputs = [t.detach() for t in tensors] + [leaves[i] for i in positions]
        with torch.enable_grad():
            gm, noise_ops = trace_graph(loss_and_grads, inputs)
        if self.backend is not None and seeded_ops(gm.graph):
            raise _Unsupported(_SEEDED_MESSAGE)
        full_mask = iter(grad_mask)
        mask = [w and next(full_mask) for w in wanted]
        fn = _compile(gm, self.backend, self.compile_options, inputs, noise_ops)
        return _LossGraph(fn, noise_ops, mask)

    def _inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def _run(
        self, graph: _LossGraph, params: list[torch.Tensor], args: tuple, kwargs: dict
    ) -> torch.Tensor:
        noise = _draw(graph.noise_ops)
        with torch.no_grad():
            out = graph.fn(
                *[p.detach() for p in params], *self._inputs(args, kwargs), *noise
            )
        loss, computed = out[0], iter(out[1:])
        grads = [next(computed) if m else None for m in graph.grad_mask]
        return _PrecomputedGrad.apply(loss, grads, *params)

    def _verified(
        self, graph: _LossGraph, params: list[torch.Tensor], args: tuple, kwargs: dict
    ) -> torch.Tensor | None:
        """The compiled loss of this call if it and its gradients are the eager
        ones, from the same noise (CPU and GPU random states); else None."""
        trainable = [p for p, m in zip(params, graph.grad_mask, strict=True) if m]
        devices = cuda_devices((*params, *self._inputs(args, kwargs)), {})
        with torch.random.fork_rng(devices=devices):
            eager = self.eager(*args, **kwargs)
            eager_grads = torch.autograd.grad(eager, trainable, allow_unused=True)
        compiled = self._run(graph, params, args, kwargs)
        compiled_grads = [g for g in compiled.grad_fn.grads if g is not None]
        ok = _close(compiled.detach(), eager.detach(), self.rtol)
        for e, c in zip(eager_grads, compiled_grads, strict=True):
            ok = ok and e is not None and _close(c, e, self.rtol)
        return compiled if ok else None


def _announce_params(params: Iterable[torch.Tensor]) -> None:
    """Under Pyro's global parameter store (``SVI``), the parameters that the
    eager program registered there, as ``pyro.param`` sites: the compiled graph
    skips the program, and ``SVI.step`` optimises only the parameters whose
    sites it sees."""
    if pyro.settings.get("module_local_params") or not am_i_wrapped():
        return
    store = pyro.get_param_store()
    for p in params:
        name = store.param_name(p)
        if name is not None:
            pyro.param(name)


def _describe(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return type(error).__name__ + (f": {lines[0][:200]}" if lines else "")


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = b.abs().max().clamp_min(1e-6)
    return bool(((a - b).abs().max() <= rtol * scale).item())


class CompiledLogLikelihood(_GraphCache):
    """:func:`pyro_iwae.log_likelihood` with each chunk's log-weights (guide,
    model and their log-densities for ``chunk`` particles) as one compiled graph.

    One graph serves every chunk of a call: the last, partial chunk is drawn in
    full and its surplus particles dropped (so it draws more noise than the
    eager path; with ``chunk_size`` dividing ``num_samples`` the draws are the
    eager ones, and the estimates too, to float rounding). The chunks are
    combined eagerly
    (:func:`~pyro_iwae.infer.evaluation.combine_chunks`, or the diagnostics of
    :func:`~pyro_iwae.log_likelihood_with_diagnostics`): a few small ops per
    chunk. Falls back to the eager path, with a warning, as
    :class:`CompiledLoss` does.

    Two rewrites of the traced graph make it cheaper than the eager ops it
    records, with the same values to float rounding: a Bernoulli log-density
    summed over pixels takes one ``log`` per 14 pixels
    (:func:`_bernoulli_log_prob_sum`), and ``tanh`` on the CPU is computed from
    ``exp`` (:func:`_tanh`).
    """

    def __init__(
        self,
        model: Any,
        guide: Any,
        *,
        max_plate_nesting: int = 1,
        backend: str | None = "inductor",
        compile_options: dict | None = None,
        max_signatures: int = 4,
    ) -> None:
        super().__init__(model, guide, backend, compile_options, max_signatures)
        self.max_plate_nesting = max_plate_nesting

    def __call__(
        self,
        *args: Any,
        num_samples: int = 5000,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The estimate per point of the data plate, ``[batch]``, in nats."""
        chunks = self.chunks(
            *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
        )
        return combine_chunks(chunks, num_samples)

    def chunks(
        self,
        *args: Any,
        num_samples: int = 5000,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> Iterator[LogWeights]:
        """The log-weights of ``num_samples`` particles, ``chunk_size`` at a time
        (None: :func:`~pyro_iwae.infer.evaluation.default_chunk_size`), each chunk from
        one call of the compiled graph (see :func:`log_weight_chunks`).

        Each call first runs model and guide once, eagerly, with one particle (a
        few milliseconds, on a forked random stream): a program whose sites
        (names, distributions, shapes) differ from those a graph was traced with
        gets a graph of its own, as a new input shape does. The first chunk of
        each new graph is checked against the eager log-weights from the same
        noise; where they differ (a structure that changes from run to run), it
        warns and falls back to the eager path for good.
        """
        check_count("num_samples", num_samples)
        check_batch(args, kwargs)
        try:
            chunk_size = resolve_chunk_size(
                self.model, self.guide, args, kwargs, chunk_size, self.max_plate_nesting
            )
        except (ValueError, RuntimeError):
            # A program that fails eagerly: the eager path says why, in one line
            # where it can.
            yield from self._eager(args, kwargs, num_samples, chunk_size)
            return
        chunk_size = min(chunk_size, num_samples)
        graph, fresh = self._graph(chunk_size, args, kwargs)
        # Without a data plate the eager path runs: its plate checks say what is
        # wrong with the program.
        if graph is None or not graph.local_dims:
            yield from self._eager(args, kwargs, num_samples, chunk_size)
            return
        tensors = [
            leaf
            for leaf in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor)
        ]
        params = list(self._named().values())
        with evaluating(self.model, self.guide):
            for start in range(0, num_samples, chunk_size):
                if fresh:
                    log_w = self._verified(
                        graph, chunk_size, params, tensors, args, kwargs
                    )
                    fresh = False
                    if log_w is None:
                        self._disable(
                            "the compiled log-weights differ from the eager ones "
                            "(does the program's structure change between calls?)"
                        )
                        yield from self._eager(args, kwargs, num_samples, chunk_size)
                        return
                else:
                    # A partial last chunk is drawn in full, its surplus dropped.
                    log_w = graph.fn(*params, *tensors, *_draw(graph.noise_ops))
                yield LogWeights(log_w[: num_samples - start], graph.local_dims)

    def _eager(
        self, args: tuple, kwargs: dict, num_samples: int, chunk_size: int
    ) -> Iterator[LogWeights]:
        return log_weight_chunks(
            self.model,
            self.guide,
            *args,
            num_samples=num_samples,
            chunk_size=chunk_size,
            max_plate_nesting=self.max_plate_nesting,
            **kwargs,
        )

    def _verified(
        self,
        graph: _LogWeightsGraph,
        chunk: int,
        params: list[torch.Tensor],
        tensors: list[torch.Tensor],
        args: tuple,
        kwargs: dict,
    ) -> torch.Tensor | None:
        """The compiled log-weights of a chunk if they are the eager ones from the
        same noise (or, where the graph draws some noise of its own, if they have
        their shape and finite entries); else None."""
        from ..infer.objectives import IWELBO

        with torch.random.fork_rng(devices=cuda_devices(args, kwargs)):
            compiled = graph.fn(*params, *tensors, *_draw(graph.noise_ops))
        elbo = IWELBO(num_particles=chunk, max_plate_nesting=self.max_plate_nesting)
        eager = elbo.particles(self.model, self.guide, *args, **kwargs).log_weights
        if compiled.shape != eager.shape:
            return None
        finite = eager.isfinite()
        if graph.own_draws:
            return compiled if torch.equal(finite, compiled.isfinite()) else None
        same = torch.equal(finite, compiled.isfinite()) and torch.equal(
            compiled[~finite], eager[~finite]
        )
        if same and finite.any():
            same = _close(compiled[finite], eager[finite], _VERIFY_RTOL)
        return compiled if same else None

    def _named(self) -> dict[str, torch.Tensor]:
        named = {}
        for prefix, fn in (("model.", self.model), ("guide.", self.guide)):
            if isinstance(fn, torch.nn.Module):
                named.update((prefix + k, v) for k, v in _named_tensors_of(fn).items())
        return named

    def _graph(
        self, chunk: int, args: tuple, kwargs: dict
    ) -> tuple[_LogWeightsGraph | None, bool]:
        """The graph of this call (None: run eagerly), and whether it is new."""
        if not self.compiled:
            return None, False
        structure = self._structure(args, kwargs)
        if structure is None:
            return None, False
        build = lambda: self._build(chunk, args, kwargs)  # noqa: E731
        return self._lookup((chunk, structure), args, kwargs, build)

    def _structure(self, args: tuple, kwargs: dict) -> tuple | None:
        """What a graph bakes in beyond the input signature, from one eager run of
        model and guide with one particle: each sample site's name, distribution
        types, shapes, and scale and mask where they are Python values. None if
        the run fails (the eager path then says why)."""
        from ..infer.objectives import IWELBO

        elbo = IWELBO(num_particles=1, max_plate_nesting=self.max_plate_nesting)
        try:
            with (
                torch.random.fork_rng(devices=cuda_devices(args, kwargs)),
                evaluating(self.model, self.guide),
            ):
                traces = elbo.particles(self.model, self.guide, *args, **kwargs).traces
        except Exception:  # noqa: BLE001 - the eager path raises it again, in full
            return None
        return tuple(
            (
                name,
                site["is_observed"],
                _distribution_types(site["fn"]),
                tuple(site["fn"].batch_shape),
                tuple(site["fn"].event_shape),
                tuple(site["value"].shape),
                site["value"].dtype,
                *(
                    value
                    for value in (site["scale"], site["mask"])
                    if not isinstance(value, torch.Tensor)
                ),
            )
            for trace in traces[0]
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
        )

    def _build(self, chunk: int, args: tuple, kwargs: dict) -> _LogWeightsGraph:
        from ..infer.objectives import IWELBO

        named = self._named()
        names = list(named)
        modules = {
            prefix: fn
            for prefix, fn in (("model.", self.model), ("guide.", self.guide))
            if isinstance(fn, torch.nn.Module)
        }
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        positions = [
            i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)
        ]
        n = len(names)
        found: dict[str, Any] = {}
        elbo = IWELBO(num_particles=chunk, max_plate_nesting=self.max_plate_nesting)

        def step(*flat):
            call_leaves = list(leaves)
            for i, t in zip(positions, flat[n:], strict=True):
                call_leaves[i] = t
            call_args, call_kwargs = torch.utils._pytree.tree_unflatten(
                call_leaves, spec
            )
            states = {
                prefix: {
                    name[len(prefix) :]: t
                    for name, t in zip(names, flat[:n], strict=True)
                    if name.startswith(prefix)
                }
                for prefix in modules
            }
            with contextlib.ExitStack() as stack:
                stack.enter_context(pyro.settings.context(module_local_params=True))
                for prefix, module in modules.items():
                    stack.enter_context(
                        torch.nn.utils.stateless._reparametrize_module(
                            module, states[prefix]
                        )
                    )
                particles = elbo.particles(
                    self.model, self.guide, *call_args, **call_kwargs
                )
            found["local_dims"] = particles.local_dims
            return particles.log_weights

        with evaluating(self.model, self.guide):
            inputs = [*(t.detach() for t in named.values())]
            inputs += [leaves[i] for i in positions]
            gm, noise_ops = trace_graph(step, inputs)
            # Not in the training graph: there the loss is checked against the
            # eager one, and Adam would magnify the different rounding.
            _group_bernoulli_sums(gm)
            _cheaper_tanh(gm)
            # Left in the graph, a compiler draws these from its own generator.
            own_draws = self.backend is not None and bool(seeded_ops(gm.graph))
            fn = _compile(gm, self.backend, self.compile_options, inputs, noise_ops)
        return _LogWeightsGraph(fn, noise_ops, found["local_dims"], own_draws)


class _LogWeightsGraph(NamedTuple):
    """The compiled log-weights graph of one input signature and structure; with
    ``own_draws``, some of its random draws are the compiler's, not eager's."""

    fn: Callable
    noise_ops: list
    local_dims: tuple[int, ...]
    own_draws: bool


#: Relative tolerance of the first-chunk check of the compiled log-weights.
_VERIFY_RTOL = 1e-4


def _distribution_types(fn: Any) -> tuple[type, ...]:
    """The types of ``fn`` and of the distributions it wraps (``base_dist``)."""
    types = []
    while fn is not None:
        types.append(type(fn))
        fn = getattr(fn, "base_dist", None)
    return tuple(types)


def _named_tensors_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters(remove_duplicate=True))
    named.update(module.named_buffers(remove_duplicate=True))
    return named


def compiled_log_likelihood(
    model: Any,
    guide: Any,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    backend: str | None = "inductor",
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`pyro_iwae.log_likelihood` through a :class:`CompiledLogLikelihood`
    cached on the guide (so that later calls with the same shapes reuse its
    graphs)."""
    estimator = cached_log_likelihood(model, guide, backend)
    return estimator(*args, num_samples=num_samples, chunk_size=chunk_size, **kwargs)


def cached_log_likelihood(
    model: Any, guide: Any, backend: str | None, max_plate_nesting: int = 1
) -> CompiledLogLikelihood:
    """The :class:`CompiledLogLikelihood` of ``(model, guide)``, made on first use
    and then cached on the guide (weakly), so that later calls with the same
    shapes reuse its graphs."""
    cache = _LL_CACHE.setdefault(guide, {})
    key = (id(model), backend, max_plate_nesting)
    entry = cache.get(key)
    if entry is None or entry.model is not model:
        entry = cache[key] = CompiledLogLikelihood(
            model, guide, backend=backend, max_plate_nesting=max_plate_nesting
        )
    return entry


_LL_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_LOSS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_loss(elbo: Any, model: Any, guide: Any, **options: Any) -> CompiledLoss:
    """The :class:`CompiledLoss` of ``(elbo, model, guide)``, made on first use and
    then cached on ``elbo`` (weakly): what ``IWELBO(..., compile=True)`` needs in
    ``differentiable_loss``, ``compiled_loss(self, model, guide)(*args)``.
    ``options`` go to :class:`CompiledLoss` on first use."""
    cache = _LOSS_CACHE.setdefault(elbo, {})
    key = (id(model), id(guide))
    entry = cache.get(key)
    if entry is None or entry.model is not model or entry.guide is not guide:
        entry = cache[key] = CompiledLoss(elbo, model, guide, **options)
    return entry
