"""Adam's update inside a compiled training graph: which optimisers and
parameters qualify, their state, the update as traceable tensor code, and the
check of a graph's update against torch's.

The graph reads and writes the optimiser's own state tensors (``step``,
``exp_avg``, ``exp_avg_sq``), so ``optimizer.state_dict()``, checkpoints, and a
later eager ``optimizer.step()`` see exactly what an eager Adam step leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

#: The keys of an Adam parameter's state, in the order the graph takes them.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


@dataclasses.dataclass(frozen=True)
class AdamSettings:
    """The constants of an Adam update that a graph bakes in."""

    beta1: float
    beta2: float
    eps: float


def graph_adam(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> AdamSettings | None:
    """The settings of ``optimizer`` where a graph can take its update: a plain
    ``torch.optim.Adam`` of one parameter group without weight decay, AMSGrad,
    ``maximize`` or a differentiable or tensor ``betas``, all of whose
    ``params`` are float32 on the CPU; else None (the optimiser steps eagerly)."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    (group,) = optimizer.param_groups
    beta1, beta2 = group["betas"]
    plain = (
        group["weight_decay"] == 0
        and not group["amsgrad"]
        and not group["maximize"]
        and not group["differentiable"]
        and not group.get("decoupled_weight_decay", False)
        and not isinstance(beta1, torch.Tensor)
        and not isinstance(beta2, torch.Tensor)
    )
    # On a GPU the graph is a CUDA graph, which takes no input mutations.
    on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    if not (plain and on_cpu):
        return None
    return AdamSettings(float(beta1), float(beta2), float(group["eps"]))


def adam_state(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The state tensors of ``params`` in ``STATE_KEYS`` order, param by param,
    made as ``torch.optim.Adam`` makes them on its first step where missing."""
    (group,) = optimizer.param_groups
    tensors = []
    for p in params:
        state = optimizer.state[p]
        if not state:
            from torch.optim.optimizer import _get_scalar_dtype

            dtype = _get_scalar_dtype(is_fused=group["fused"])
            state["step"] = torch.zeros((), dtype=dtype, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(
                p, memory_format=torch.preserve_format
            )
        tensors.extend(state[key] for key in STATE_KEYS)
    return tensors


def adam_update(
    settings: AdamSettings,
    lr: torch.Tensor,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: Sequence[torch.Tensor],
) -> None:
    """Adam's step on ``params`` in place, with their ``state`` (as
    :func:`adam_state` lists it) updated in place: torch's Adam, written
    out so that a traced graph holds it (and inductor fuses it with the
    gradients' last kernels)."""
    b1, b2, eps = settings.beta1, settings.beta2, settings.eps
    if not params:
        return
    t = torch.stack(list(state[0::3])) + 1
    # The bias corrections of all parameters, (step size, 1 / sqrt(1 - b2^t)):
    # left as scalars, inductor inlines them into each update's vector loop (two
    # pow calls every 16 elements, ~0.15 ms a step for the paper model); the mean
    # of two copies is a reduction, which it computes once into a buffer.
    coefficients = torch.stack(
        [lr / (1 - torch.pow(b1, t)), torch.rsqrt(1 - torch.pow(b2, t))]
    )
    step_size, denom_scale = torch.stack([coefficients, coefficients]).mean(0)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        step, m, v = state[3 * i : 3 * i + 3]
        m_new = m * b1 + g * (1 - b1)
        v_new = v * b2 + g * g * (1 - b2)
        denom = v_new.sqrt() * denom_scale[i] + eps
        p.copy_(p - step_size[i] * m_new / denom)
        m.copy_(m_new)
        v.copy_(v_new)
        step.copy_(t[i])


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``; for a plain torch Adam, what it
    does without its profiler record and dynamo guard (~0.03 ms a step)."""
    if type(optimizer) is not torch.optim.Adam:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def adam_candidates(
    wanted: Sequence[bool], members: Sequence[bool] | None
) -> list[int]:
    """The parameters (indices) whose Adam state a step graph takes: those that
    are ``wanted`` (trainable) and ``members`` of the optimiser."""
    assert members is not None
    return [i for i, (w, m) in enumerate(zip(wanted, members, strict=True)) if w and m]


def same_update(
    start: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor, rtol: float
) -> bool:
    """Whether two updates of the parameter ``start`` agree: their changes within
    ``rtol`` of the largest change, give or take the rounding of the parameter
    itself (a few of its ulps: a step of 1e-3 on a bias of -5 is rounded to
    5e-4 of itself)."""
    change = theirs - start
    rounding = 4 * torch.finfo(start.dtype).eps * start.abs().max()
    limit = rtol * change.abs().max() + rounding
    return bool(((ours - theirs).abs().max() <= limit).item())
