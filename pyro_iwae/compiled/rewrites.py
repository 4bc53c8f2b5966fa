"""Rewrites of a traced graph: the same values to float rounding, computed with
fewer transcendental ops (:func:`fewer_transcendentals`).

Applied to the log-likelihood's graphs and to the training step's: a compiled
graph rounds differently from the eager ops anyway (inductor fuses and reorders
sums), these by a few float32 ulps more; the first call of a training graph is
checked against the eager loss, gradients and update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx


def fewer_transcendentals(gm: fx.GraphModule) -> None:
    """Both rewrites: :func:`group_bernoulli_sums`, then :func:`cheaper_tanh`."""
    group_bernoulli_sums(gm)
    cheaper_tanh(gm)


def bernoulli_log_prob_sum(
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


def group_bernoulli_sums(gm: fx.GraphModule) -> None:
    """Rewrites each ``sum(-1)`` of an elementwise ``binary_cross_entropy_with_logits``
    (the Bernoulli log-density of an image, summed over its pixels: the paper
    model's, or Pyro's ``Bernoulli(logits=...).to_event(1)``, with a ``neg`` and a
    same-shape ``view`` in between) as :func:`bernoulli_log_prob_sum`.

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
        if (
            found is None
            or not divisors
            or not _have_values(call["self"], call["target"])
        ):
            continue
        total, chain, negated = found
        # Whole vectors of 8 floats left after the products run fastest (784: 14).
        factors = next((f for f in divisors if size // f % 8 == 0), divisors[0])
        with gm.graph.inserting_before(total):
            grouped = _call_traced(
                gm,
                functools.partial(bernoulli_log_prob_sum, factors=factors),
                (call["self"], call["target"]),
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


def exp_tanh(x: torch.Tensor) -> torch.Tensor:
    """``tanh(x)`` as ``(1 - e) / (1 + e)`` with ``e = exp(-2 |x|)``, its sign
    restored: an ``exp`` and a division, where inductor's CPU kernels call
    Sleef's slower vector ``tanh``. Absolute error below 1e-7 in float32."""
    e = torch.exp(-2 * x.abs())
    return torch.copysign((1 - e) / (1 + e), x)


def cheaper_tanh(gm: fx.GraphModule) -> None:
    """Rewrites each CPU float ``tanh`` of ``gm`` as :func:`exp_tanh`."""
    for node in list(gm.graph.nodes):
        value = node.meta.get("val")
        if (
            node.target is not torch.ops.aten.tanh.default
            or value is None
            or value.device.type != "cpu"
            or value.dtype not in (torch.float32, torch.float64)
            or not _have_values(*node.args)
        ):
            continue
        with gm.graph.inserting_before(node):
            cheaper = _call_traced(gm, exp_tanh, node.args)
        cheaper.meta = dict(node.meta)
        node.replace_all_uses_with(cheaper)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _have_values(*args: object) -> bool:
    """Whether ``args`` are all nodes whose value (shape, dtype) tracing recorded."""
    return all(isinstance(a, fx.Node) and "val" in a.meta for a in args)


def _call_traced(gm: fx.GraphModule, fn: Callable, args: tuple) -> fx.Node:
    """``fn(*args)`` (``args``: nodes of ``gm``) as the aten ops it runs, added at
    ``gm``'s insertion point; returns the node of its value. A graph that calls
    only aten ops can be kept in AOT autograd's on-disk cache (a call of ``fn``
    itself made it bypass the cache: about 0.8 s more on each warm compile)."""
    examples = [
        torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
        for v in (a.meta["val"] for a in args)
    ]
    traced = make_fx(fn, tracing_mode="fake")(*examples)
    if any(n.op == "get_attr" for n in traced.graph.nodes):
        raise ValueError(f"{fn} holds tensor constants; write them as scalars")
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    return gm.graph.graph_copy(traced.graph, dict(zip(placeholders, args, strict=True)))
