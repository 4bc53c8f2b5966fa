"""Graph capture: a Pyro program's tensor ops as one aten graph, traced with fake
tensors by ``make_fx``, its random draws lifted out as inputs.

The draws with constant arguments (``randn``, ``rand``, and the in-place fills
of fresh tensors with which ``torch.distributions`` reparameterise, as
``Normal.rsample``) become trailing inputs of the graph, drawn eagerly before
each run in the same order and with the same calls, so that a graph sees the
noise the eager program would under the same seed. Draws with tensor arguments
stay in the graph (:func:`seeded_ops`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import fx

#: Aten random ops whose draws are lifted out of the graph (all of their
#: arguments must be constants: shapes, dtypes, devices, numbers).
_RANDOM_OPS = {
    torch.ops.aten.randn.default,
    torch.ops.aten.rand.default,
    torch.ops.aten.normal.float_float,
    torch.ops.aten.randint.default,
    torch.ops.aten.randint.low,
}


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


def draw_noise(noise_ops: Sequence[tuple[Any, tuple, dict]]) -> list[torch.Tensor]:
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
    # validates, the graph does not. Non-fake inputs: the tensors the program
    # reads from elsewhere (a module's plain tensor attributes) become constants
    # of the graph, checked below, where fake tensors alone would refuse any of
    # more than 0 dims with torch's assertion.
    with pyro.validation_enabled(False), _NoParamStore():
        gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
    constants = [
        (node, getattr(gm, node.target))
        for node in gm.graph.nodes
        if node.op == "get_attr"
    ]
    if any(isinstance(c, torch.Tensor) and c.requires_grad for _, c in constants):
        raise Unsupported(_PARAM_MESSAGE)
    attributes = _ATTRIBUTES.get()
    if attributes is not None:
        for node, c in constants:
            if not isinstance(c, torch.Tensor) or _literal(node):
                continue
            if id(c) not in attributes:
                raise Unsupported(CAPTURED_MESSAGE)
            if attributes.changed(c):
                raise Unsupported(CHANGED_MESSAGE.format(".".join(attributes[id(c)])))
            attributes.read.add(attributes[id(c)])
    return gm, _lift_random_ops(gm)


def _literal(node: fx.Node) -> bool:
    """Whether the constant ``node`` is a tensor the program makes from Python
    values (``torch.tensor(1.0)``, as ``torch.distributions`` makes of a number):
    the same at every call, unlike a tensor it reads from elsewhere."""
    return bool(node.users) and all(
        user.target is torch.ops.aten.lift_fresh_copy.default for user in node.users
    )


class ModelAndGuide(torch.nn.Module):
    """Model and guide as one module, so that one ``functional_call`` swaps both."""

    def __init__(self, model: torch.nn.Module, guide: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.guide = guide


class TensorAttributes(dict):
    """The plain tensor attributes of a program's modules (neither parameters
    nor buffers), as ``{id(tensor): (module name, attribute)}``; ``read``: those
    a graph traced under :func:`watching` holds as constants."""

    def __init__(self, modules: Sequence[tuple[str, torch.nn.Module]]) -> None:
        tensors = [
            (prefix, name, value)
            for prefix, module in modules
            for name, value in vars(module).items()
            if isinstance(value, torch.Tensor)
        ]
        super().__init__((id(t), (prefix, name)) for prefix, name, t in tensors)
        self._versions = {id(t): _version(t) for _, _, t in tensors}
        self.read: set[tuple[str, str]] = set()

    def changed(self, tensor: torch.Tensor) -> bool:
        """Whether the attribute ``tensor`` was changed in place since (by the
        program, while it was traced: a graph would change it at every run)."""
        return _version(tensor) != self._versions[id(tensor)]


def _version(t: torch.Tensor) -> int | None:
    # An inference tensor has no version counter (nor changes outside inference).
    return None if t.is_inference() else t._version


_ATTRIBUTES: contextvars.ContextVar[TensorAttributes | None] = contextvars.ContextVar(
    "pyro_iwae_tensor_attributes", default=None
)


@contextlib.contextmanager
def watching(attributes: TensorAttributes) -> Iterator[TensorAttributes]:
    """Within: :func:`trace_graph` notes in ``attributes.read`` the tensor
    attributes a graph holds as constants, and refuses (:class:`Unsupported`) a
    graph that holds any other tensor read from outside the program's inputs
    (one in a container or a global): its key could not see it change."""
    token = _ATTRIBUTES.set(attributes)
    try:
        yield attributes
    finally:
        _ATTRIBUTES.reset(token)


class Unsupported(Exception):
    pass


CAPTURED_MESSAGE = (
    "the program reads a tensor that is neither a parameter or buffer of the model "
    "or guide, nor an input, nor a module's own attribute (one in a container, a "
    "global, a closure's): a graph would keep its first value; register it as a "
    "buffer (module.register_buffer) or pass it as an input"
)


CHANGED_MESSAGE = (
    "the program changes the plain tensor attribute {} in place, which a graph "
    "would do again at every run; register it as a buffer (module.register_buffer)"
)


_PARAM_MESSAGE = (
    "the program uses a trainable tensor that is neither a parameter of the model "
    "or guide module nor an input (pyro.param, or pyro.module inside a function)"
)


#: What ``pyro.module`` puts between the module's name and a parameter's.
_MODULE_DIVIDER = "$$$"

MODULE_MESSAGE = (
    "the program registers a module with pyro.module, through the parameter "
    "store a graph cannot take; call pyro.module only where "
    "pyro.settings.get('module_local_params') is False (the compiled path traces "
    "with it on and takes the model's and guide's own parameters directly)"
)


PYRO_MODULE_MESSAGE = (
    "a PyroModule's parameters go through pyro.param, outside the nn.Module "
    "parameters a graph takes as inputs; build model and guide from plain "
    "nn.Modules to compile them"
)


def pyro_modules(*fns: Any) -> bool:
    """Whether a ``PyroModule`` is among ``fns`` or their submodules."""
    return any(
        isinstance(module, pyro.nn.PyroModule)
        for fn in fns
        if isinstance(fn, torch.nn.Module)
        for module in fn.modules()
    )


SEEDED_MESSAGE = (
    "the program draws random numbers with tensor arguments (as "
    "torch.bernoulli(probs), torch.randn_like(x), or dropout in train mode), "
    "which a graph does not draw as the eager path does"
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
        if _MODULE_DIVIDER in msg["name"]:
            raise Unsupported(MODULE_MESSAGE)
        raise Unsupported(_PARAM_MESSAGE)


def call_signature(args: tuple, kwargs: dict) -> tuple | None:
    """A hashable key of the call: tensor shapes, strides, dtypes and devices,
    other values themselves; None if some value is not hashable. (A compiled
    graph is only valid for the memory layout it was compiled for.)"""
    if _plain(args, kwargs):
        return ("tensors", tuple(_tensor_key(a) for a in args))
    leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(_tensor_key(leaf))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append(leaf)
    return (str(spec), tuple(key))


def submodules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``module`` and its submodules, each once, by name, in ``named_modules()``'s
    order. Read straight from the modules' own dictionaries: a compiled call
    walks them every time, and torch's generators took ~0.1 ms of a ~2 ms step
    for the paper's model."""
    modules: list[tuple[str, torch.nn.Module]] = []
    seen: set[int] = set()
    stack = [("", module)]  # depth first, children in order: named_modules' order
    while stack:
        prefix, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        modules.append((prefix, m))
        stack.extend(
            (f"{prefix}.{name}" if prefix else name, child)
            for name, child in reversed(m._modules.items())
            if child is not None
        )
    return modules


def named_tensors(
    module: torch.nn.Module,
    modules: list[tuple[str, torch.nn.Module]] | None = None,
) -> dict[str, torch.Tensor]:
    """``module``'s parameters, then its buffers, by name: what
    ``named_parameters()`` and ``named_buffers()`` give, each tensor once.
    ``modules``: ``submodules(module)`` where the caller has it already (a
    compiled call walks the modules once for its tensors and its graph key)."""
    if modules is None:
        modules = submodules(module)
    named: dict[str, torch.Tensor] = {}
    for members in ("_parameters", "_buffers"):
        taken: set[int] = set()
        for prefix, m in modules:
            for name, t in getattr(m, members).items():
                if t is not None and id(t) not in taken:
                    taken.add(id(t))
                    named[f"{prefix}.{name}" if prefix else name] = t
    return named


def _plain(args: tuple, kwargs: dict) -> bool:
    """Whether the call is tensors alone, positionally (the training step's): it
    is spared the pytree walk, a few per cent of a small compiled step."""
    return not kwargs and all(isinstance(a, torch.Tensor) for a in args)


def _tensor_key(t: torch.Tensor) -> tuple:
    return ("T", tuple(t.shape), t.stride(), t.dtype, t.device)


def call_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among ``(args, kwargs)``, in :class:`CallArgs` order."""
    if _plain(args, kwargs):
        return list(args)
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


INPUT_GRAD_MESSAGE = (
    "an input of the call needs a gradient (as the output of a network before "
    "the model), and a graph gives only the parameters'"
)


def needs_grad(args: tuple, kwargs: dict) -> bool:
    """Whether, in grad mode, a tensor among ``(args, kwargs)`` needs a gradient:
    a graph would give it none (nor what made it)."""
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in call_tensors(args, kwargs)
    )


class CallArgs:
    """A call's ``(args, kwargs)`` with its tensors as a flat list: a graph takes
    them as inputs, and :meth:`rebuild` puts the traced ones in their places."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.leaves, self.spec = torch.utils._pytree.tree_flatten((args, kwargs))
        self.positions = [
            i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)
        ]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.positions]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with ``tensors`` in place of the call's tensors."""
        leaves = list(self.leaves)
        for i, t in zip(self.positions, tensors, strict=True):
            leaves[i] = t
        return torch.utils._pytree.tree_unflatten(leaves, self.spec)
