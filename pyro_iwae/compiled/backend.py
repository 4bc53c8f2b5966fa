"""The compiler behind the graphs: inductor (as CUDA-graph trees where every input
is on a GPU) or another ``torch.compile`` backend, and :class:`GraphCache`, the
compiled graphs of a program by input signature with the fallback to the eager
path once they fail.

Inductor is imported on the first compilation, not with the package.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import fx

from ..infer.arguments import cuda_devices
from ..infer.broadcast import data_dependent
from .capture import (
    PYRO_MODULE_MESSAGE,
    SEEDED_MESSAGE,
    TensorAttributes,
    Unsupported,
    call_signature,
    draw_noise,
    pyro_modules,
    submodules,
    watching,
)
from .keys import SameTensor, handlers_key, module_constants

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


def compile_graph(
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
        # Here, not at the top: importing inductor takes seconds.
        import torch._inductor as inductor

        with torch.random.fork_rng(devices=cuda_devices(tuple(inputs), {})):
            noise = draw_noise(noise_ops)
        examples = _static_fakes([*inputs, *noise])
        if {t.device.type for t in inputs} != {"cuda"}:
            options = {**vec_isa_options(), **cpu_key_options()}
            return inductor.compile(gm, examples, options=options)
        # One replay a call instead of a launch a kernel; shapes are static (a
        # graph per input signature) and the noise is an input, drawn eagerly.
        replay = inductor.compile(gm, examples, options={"triton.cudagraphs": True})
        return lambda *args: _own(replay(*args))
    return torch.compile(gm, backend=backend, fullgraph=True, dynamic=False, **options)


def vec_isa_options() -> dict[str, Any]:
    """Inductor options that spare it most probes of the CPU's vector ISAs, and
    its other probes, run side by side.

    To pick the ISA of its C++ kernels, inductor builds and loads a probe
    library for the base code of every ISA the CPU reports and for each one's
    extensions (on an AMX Xeon: AMX, AVX-512 VNNI, AVX-512, AVX2; ten g++ runs
    and library loads one after the other, about 7 s of a cold compile on 2
    cores), then takes the first that works. This builds the base probe of that
    first ISA and, where it works, returns ``{"cpp.vec_isa_ok": True}``, under
    which inductor takes the CPU's word for the base code of every ISA; it also
    runs each ISA's extension checks (still needed: they set the ISA's compiler
    flags) now, in a thread per ISA next to the base probe's, where inductor
    would run them one by one (seven runs here, in about half the time).
    Inductor keeps their results for the life of the process; where the base
    probe fails, they are forgotten. The ISA picked, and so the kernels, are the
    same. Elsewhere (a failing first ISA, not x86-64, a chosen ``cpp.simdlen``,
    ``cpp.vec_isa_ok`` or ``ATEN_CPU_CAPABILITY``) it returns ``{}`` and inductor
    probes as usual. The probes' results stay in inductor's cache folder, so a
    warm cache skips them either way.
    """
    from torch._inductor import config, cpu_vec_isa

    base_code = getattr(cpu_vec_isa.VecISA, "_avx_code", None)
    if (
        platform.machine() not in ("x86_64", "AMD64")
        or config.cpp.vec_isa_ok is not None
        or config.cpp.simdlen is not None
        or os.environ.get("ATEN_CPU_CAPABILITY")
        or base_code is None
    ):
        return {}
    reported = cpu_vec_isa.x86_isa_checker()
    candidates = [
        isa
        for isa in cpu_vec_isa.supported_vec_isa_list
        if all(flag in reported for flag in str(isa).split())
    ]
    if not candidates:
        return {}
    options = {"cpp.vec_isa_ok": True}

    def check(isa: Any) -> bool:
        # Inductor's config patches are per thread.
        with config.patch(options):
            return bool(isa)

    # The base probe of the first ISA and each ISA's checks side by side; an
    # ISA's checks stay in one thread (they change its flags while they run),
    # and the base probe has an instance of its own, with the flags inductor's
    # own base probe builds with. The threads wait on g++ and the loading
    # subprocess, not the GIL.
    with ThreadPoolExecutor(len(candidates) + 1) as pool:
        base = pool.submit(type(candidates[0])().check_build, base_code)
        list(pool.map(check, candidates))
        if base.result():
            return options
    # The checks above took the CPU's word for base code that does not build:
    # forget them, and let inductor probe as usual.
    for cls in {c for isa in candidates for c in type(isa).__mro__}:
        cache_clear = getattr(cls.__dict__.get("__bool__"), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
    return {}


@functools.cache
def cpu_isa_key() -> str:
    """What decides the vector code of inductor's C++ kernels on this machine: the
    architecture, the CPU's vector extensions and the capability torch runs at
    (``ATEN_CPU_CAPABILITY`` can hold it below the CPU's)."""
    flags: list[str] = []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = line.partition(":")[2].split()
                    break
    vector = sorted(f for f in flags if f.startswith(_VECTOR_FLAGS))
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()} {capability} {' '.join(vector)}"


#: /proc/cpuinfo flags that name vector extensions inductor's kernels may use.
_VECTOR_FLAGS = ("avx", "amx", "fma", "f16c", "sse", "ssse")


def cpu_key_options() -> dict[str, Any]:
    """Inductor options that put :func:`cpu_isa_key` into its on-disk cache key.

    Inductor's key for a compiled graph holds no CPU ISA (torch 2.14): a process
    at another ISA (another machine sharing the cache folder, or
    ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine) was handed the graph of
    the first, its kernels rebuilt from code written for other vector widths;
    the paper model's loss came out twice its value (the first call's check
    caught it and fell back to the eager path). A post-grad pass that changes
    nothing carries the key (its ``uuid`` is part of inductor's key). Where a
    user has a pass of their own there, it is left alone.
    """
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    if config.post_grad_custom_post_pass is not None:
        return {}

    class CpuIsaKey(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            return None

        def uuid(self) -> str:
            return cpu_isa_key()

    return {"post_grad_custom_post_pass": CpuIsaKey()}


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


class GraphCache:
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
        # The plain tensor attributes (module name, attribute) that a graph has
        # held as constants: part of every later key (see _tensor_key).
        self._watched: tuple[tuple[str, str], ...] = ()

    @property
    def compiled(self) -> bool:
        """False once the compiled path has been given up for good."""
        return self._disabled is None

    @property
    def fallback(self) -> str | None:
        """Why the compiled path was given up for good (None: it was not)."""
        return self._disabled

    def _disable(self, reason: str) -> None:
        self._disabled = reason
        _fallback(reason)

    def check_eagerly(
        self, eager: Callable[..., Any], args: tuple, kwargs: dict
    ) -> None:
        """``eager(*args, **kwargs)``, an eager run of the program for its checks
        alone: off the random stream, its modules' buffers kept. The checks the
        eager path makes once per program (the particle dims, see
        :class:`~pyro_iwae.infer.particle_dims.ParticleDims`) are skipped while a
        graph is traced: a graph no eager run verifies needs this one. Where it
        raises, the error is the program's: raised as it is, the compiled path
        given up without a word of the compiler (later calls run eagerly)."""
        devices = cuda_devices(args, kwargs)
        try:
            with (
                torch.random.fork_rng(devices=devices),
                kept_buffers(self.model, self.guide),
            ):
                eager(*args, **kwargs)
        except Exception as error:
            self._disabled = f"the program failed its eager check ({describe(error)})"
            raise

    def modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The model's and then the guide's modules (of those that are
        ``nn.Module`` s), as :func:`~.capture.submodules` walks each."""
        return [
            (f"{root}.{name}" if name else root, module)
            for root, fn in (("model", self.model), ("guide", self.guide))
            if isinstance(fn, torch.nn.Module)
            for name, module in submodules(fn)
        ]

    def _lookup(
        self,
        key: Any,
        args: tuple,
        kwargs: dict,
        build: Callable[[], Any],
        modules: list[tuple[str, torch.nn.Module]] | None = None,
    ) -> tuple[Any, bool]:
        """The graph of ``(key, signature of args, module_constants(modules))``,
        built if new: ``(graph, fresh)``, with ``graph`` None where the eager
        path must run. ``modules``: :meth:`modules`, where the caller has it."""
        if self._disabled is not None:
            return None, False
        signature = call_signature(args, kwargs)
        if signature is None:
            self._disable("an argument is neither a tensor nor hashable")
            return None, False
        handlers = handlers_key()
        if handlers is None:
            return None, False  # this call alone runs eagerly
        if modules is None:
            modules = self.modules()
        tensors = self._tensor_key(modules)
        key = (key, signature, module_constants(modules), handlers, tensors)
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
            if pyro_modules(self.model, self.guide):
                raise Unsupported(PYRO_MODULE_MESSAGE)
            with warnings.catch_warnings(), _quiet_torch_logs():
                # Raised inside inductor's own lowerings: nothing a user can act on.
                warnings.filterwarnings(
                    "ignore", "`torch._prims_common.check` is deprecated", FutureWarning
                )
                with watching(TensorAttributes(modules)) as attributes:
                    graph = build()
        except Unsupported as error:
            self._disable(str(error))
            return None, False
        except Exception as error:  # tracing fails on dynamic structure
            self._disable(untraceable(error))
            return None, False
        finally:
            _compile_seconds += time.perf_counter() - start
        read = sorted(attributes.read - set(self._watched))
        if read:
            # The graph holds these as constants: from now on they are keyed.
            self._watched += tuple(read)
            key = (*key[:-1], self._tensor_key(modules))
        self._graphs[key] = graph
        return graph, True

    def _tensor_key(self, modules: list[tuple[str, torch.nn.Module]]) -> tuple:
        """The plain tensor attributes that graphs of the program hold as
        constants (:attr:`_watched`), each as the same tensor object unchanged
        since (its version counter): a new tensor, or one changed in place, is
        another graph. Empty for most programs, and then free."""
        if not self._watched:
            return ()
        by_name = dict(modules)
        key = []
        for prefix, name in self._watched:
            value = vars(by_name[prefix]).get(name) if prefix in by_name else None
            key.append(SameTensor(value) if isinstance(value, torch.Tensor) else ...)
        return tuple(key)


def describe(error: BaseException) -> str:
    """The error's type and the first line of its message, or of the message of
    the error it was raised from where its own is empty (as torch's guards)."""
    lines = str(error).strip().splitlines()
    cause = error.__cause__ or error.__context__
    if not lines and cause is not None:
        lines = str(cause).strip().splitlines()
    return type(error).__name__ + (f": {lines[0][:200]}" if lines else "")


def untraceable(error: BaseException) -> str:
    """Why tracing the program failed with ``error``, for the fallback warning."""
    if data_dependent(error):
        return (
            "cannot trace the program as a static graph: it takes a data-dependent "
            "operation (indexing or a branch by a tensor's values, as a flow's "
            f"inverse may) ({describe(error)})"
        )
    return f"cannot trace the program as a static graph ({describe(error)})"


def mismatch(seeded: bool, what: str) -> str:
    """Why a graph's first call gave other ``what`` than the eager path: where
    it kept draws with tensor arguments (``seeded``, as only ``backend=None``
    does), those draws; else, presumably, a structure that changes between
    calls."""
    if seeded:
        return SEEDED_MESSAGE
    return (
        f"the compiled {what} differ from the eager ones (does the program's "
        "structure change between calls?)"
    )


def close_enough(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = b.abs().max().clamp_min(1e-6)
    return bool(((a - b).abs().max() <= rtol * scale).item())


class RandomState:
    """The random state of the CPU and of every CUDA device in use, to put back
    where a new graph's first call fails: the eager path that follows must draw
    the noise the eager path would have, not the noise after the graph's (or
    the check's) draws."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_initialized()
        self.devices = list(range(torch.cuda.device_count())) if cuda else []
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def kept_buffers(*modules: Any) -> Iterator[None]:
    """Puts the buffers of the ``nn.Module`` s among ``modules`` (batch norm's
    running statistics) back as they were on exit: the eager run that checks a
    new graph must not move them a second time."""
    buffers = [
        b for m in modules if isinstance(m, torch.nn.Module) for b in m.buffers()
    ]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)
