"""What a model and guide are called with: the CUDA devices and tensors among the
arguments, checked before a run, and a trial run on them that leaves no trace."""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "check_batch",
    "check_not_empty",
    "check_tensor",
    "cuda_devices",
    "tensor_arguments",
    "trial_run",
]


def cuda_devices(args: tuple, kwargs: dict) -> list[int]:
    """Indices of the CUDA devices of the tensors among ``args`` and ``kwargs``."""
    tensors = [
        t
        for t in (*args, *kwargs.values())
        if isinstance(t, torch.Tensor) and t.is_cuda
    ]
    return sorted({t.device.index for t in tensors})


def _named(args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """The arguments of a call, each with its name for an error message."""
    named = [(f"argument {i + 1}", a) for i, a in enumerate(args)]
    return named + [(f"argument {k}", a) for k, a in kwargs.items()]


def tensor_arguments(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """The tensor arguments of a call, each with its name for an error message."""
    return [
        (name, a) for name, a in _named(args, kwargs) if isinstance(a, torch.Tensor)
    ]


def check_not_empty(args: tuple, kwargs: dict, caller: str = "log_likelihood") -> None:
    """:raises ValueError: if a tensor argument is an empty batch."""
    for name, value in tensor_arguments(args, kwargs):
        if value.dim() and not value.shape[0]:
            raise ValueError(
                f"{caller} got an empty batch ({name} has shape "
                f"{list(value.shape)}); pass at least one data point"
            )


@contextmanager
def trial_run(args: tuple, kwargs: dict) -> Iterator[None]:
    """A run of a program on ``args`` and ``kwargs`` that leaves no trace: on a
    forked random stream, its warnings and Pyro's log messages silenced."""
    pyro_log = logging.getLogger("pyro")
    level = pyro_log.level
    # No "Guessed max_plate_nesting" line; a level set higher (or inherited:
    # 0, NOTSET) stays as it is.
    pyro_log.setLevel(max(pyro_log.getEffectiveLevel(), logging.WARNING))
    try:
        with torch.random.fork_rng(devices=cuda_devices(args, kwargs)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
    finally:
        pyro_log.setLevel(level)


def check_tensor(name: str, value: Any) -> None:
    """:raises TypeError: if ``value``, the data, is not a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} is a {type(value).__name__}, not a tensor; pass a tensor of "
            "shape [N, ...] (torch.as_tensor(data) or torch.stack(rows))"
        )


def check_batch(args: tuple, kwargs: dict, caller: str = "log_likelihood") -> None:
    """:raises TypeError: if an argument is an array but not a tensor (a NumPy
        array), which the networks would fail on deep inside.
    :raises ValueError: if a tensor argument is an empty batch or holds NaN
        (which would come out as the guide's or the model's invalid parameters).
    """
    for name, value in _named(args, kwargs):
        if hasattr(value, "__array__") and not isinstance(value, numbers.Number):
            check_tensor(name, value)
    check_not_empty(args, kwargs, caller)
    for name, value in tensor_arguments(args, kwargs):
        if value.is_floating_point() and value.isnan().any():
            rows = (
                value.isnan().reshape(value.shape[0], -1).any(-1)
                if value.dim()
                else value.isnan().reshape(1)
            )
            raise ValueError(
                f"the data hold NaN ({name}: {int(rows.sum())} of {rows.numel()} "
                "points); drop those points or fill in their missing values"
            )
