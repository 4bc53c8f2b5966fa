"""The hook through which a compiled path plugs into inference.

``IWELBO(compile=...)``, ``log_likelihood(..., compile=...)`` and the other
evaluations with a ``compile`` option ask the registered :class:`Compiler` for
their graphs. ``pyro_iwae.compiled`` registers one when imported (``import
pyro_iwae`` imports it), so that inference never imports the compiler: the
compiled path depends on the core, as Pyro's ``JitTrace_ELBO`` on
``Trace_ELBO``, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class Compiler(Protocol):
    """What inference asks of a compiled path."""

    def loss(
        self, elbo: Any, model: Callable, guide: Callable, backend: str | None
    ) -> Callable[..., torch.Tensor]:
        """``elbo.differentiable_loss(model, guide, *args, **kwargs)`` as a
        callable of ``(*args, **kwargs)`` that runs compiled graphs; it computes
        the eager loss with ``elbo.eager_loss``."""
        ...

    def step(
        self, elbo: Any, model: Callable, guide: Callable, backend: str | None
    ) -> Callable[..., torch.Tensor]:
        """A training step of ``elbo`` as a callable of ``(optimizer, *args,
        scale=, **kwargs)``: ``optimizer``'s step on ``scale`` times
        ``elbo.differentiable_loss(model, guide, *args, **kwargs)`` (zeroing
        the gradients first), which returns that scaled loss, detached."""
        ...

    def log_likelihood(
        self, model: Callable, guide: Callable, backend: str | None, plates: int
    ) -> Any:
        """An object whose ``chunks(*args, num_samples=, chunk_size=, **kwargs)``
        yields what ``pyro_iwae.infer.evaluation.log_weight_chunks`` yields (the
        log-weights of each chunk of particles), from compiled graphs
        (``plates``: the ``max_plate_nesting``), and whose ``fallback`` says
        why it fell back to the eager path for good (None: it has not). The
        same object for
        the same arguments, while ``guide`` lives."""
        ...

    def seconds(self) -> float:
        """Seconds this process has spent tracing and compiling graphs so far."""
        ...

    def fallback(self, elbo: Any, model: Callable, guide: Callable) -> str | None:
        """Why the compiled loss of ``(elbo, model, guide)`` gave way to the eager
        path for good (None: it did not, or none was made)."""
        ...


_compiler: Compiler | None = None


def register_compiler(compiler: Compiler | None) -> Compiler | None:
    """Makes ``compiler`` the one that ``compile`` options use (None: none);
    returns the one registered before."""
    global _compiler
    previous, _compiler = _compiler, compiler
    return previous


def compiler() -> Compiler:
    """The registered :class:`Compiler`.

    :raises RuntimeError: none is registered (``pyro_iwae.compiled`` not imported).
    """
    if _compiler is None:
        raise RuntimeError(
            "a compile option needs the compiled path, which is not loaded; "
            "import pyro_iwae (or pyro_iwae.compiled) first"
        )
    return _compiler


def compiles(compile: bool | str | None) -> bool:
    """Whether a ``compile`` option asks for compiled graphs now: not False, and
    not an ``"auto"`` still to be settled (:func:`pyro_iwae.fit` settles an
    objective's from the run's length; unsettled, it runs eagerly)."""
    return compile is not False and compile != "auto"


def backend_of(compile: bool | str | None) -> str | None:
    """The ``torch.compile`` backend a ``compile`` option names: True means
    inductor, a string a backend, None the traced graph uncompiled."""
    return "inductor" if compile is True else compile


def is_backend(name: Any) -> bool:
    """Whether ``name`` is the name of a ``torch.compile`` backend."""
    if not isinstance(name, str):
        return False
    # Imported only here: torch._dynamo takes seconds to import.
    from torch._dynamo import list_backends

    return name in list_backends(exclude_tags=())


def check_compile(compile: Any) -> None:
    """:raises ValueError: unless ``compile`` is a ``compile`` option: True,
    False, ``"auto"``, None, or a ``torch.compile`` backend (its name, or the
    backend itself)."""
    if compile is None or isinstance(compile, bool) or compile == "auto":
        return
    if callable(compile) or is_backend(compile):
        return
    raise ValueError(
        f"compile={compile!r} is not a compile option; pass True (inductor), "
        "False, 'auto', None (the traced graph uncompiled) or the name of a "
        "torch.compile backend, as torch._dynamo.list_backends() gives them"
    )
