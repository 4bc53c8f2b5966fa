"""``compile="auto"``: whether an evaluation compiles its log-weights, or a run its
training step, chosen from how much work there is to do, and why.

Compiling costs a fixed time, then each unit of work runs faster than eagerly;
``"auto"`` compiles where the work is large enough for the saving to repay the
cost. Measured on a 2-core AVX-512 Xeon (results/benchmarks.md):

- evaluation: 11 s to compile the paper model's log-weights cold (8 s since the
  ISA-probe cut), 2.3 s from inductor's cache, then each particle-point about
  2.5 times as fast (``eval-nll --k 5000`` on 1,000 MNIST test points: 33.3 s
  eagerly, 24.4 s compiled of which 11.1 s compiling; 4 microseconds saved per
  particle-point); it pays from about 3 million particle-points (points times
  ``num_samples``) per graph to compile (one per batch shape), 600,000 per graph
  in the cache.
- training: 12 s to compile the paper model's step cold (16 s before the
  compiled path cut inductor's ISA probes; 13-15 s on a slower day, with the
  probes side by side), 2.7 s from inductor's on-disk cache
  (batch 20, k 5), then 1.4-6 ms saved per step (batch 20 to 100, k 5 to 50: the
  compiled step against ``fit``'s eager one); it pays from about 8,000 steps per
  graph to compile, 2,000 per graph in the cache, at batch 20 and k = 5. Larger
  steps save more (about 1.3 ms a step and 1.75 microseconds a particle-point,
  batch size times ``num_particles``: 1.45 ms at batch 20, k = 5, 10 ms at batch
  100, k = 50), so the steps from which compiling pays fall as the step grows
  (about 1,200 per graph to compile at batch 100, k = 50). A run compiles one graph per
  batch shape (two where the last batch is smaller), and notes each graph it
  compiled in ``pyro-iwae-graphs.json`` in inductor's cache folder: that is how
  a later run knows the cache holds it.

Inductor's C++ kernels include a header it precompiles once per machine (and
compiler, flags and torch version), about 5.5 s more on the first compile there
(kept in the temporary folder, whatever ``TORCHINDUCTOR_CACHE_DIR`` says): until
it is built, a graph to compile pays from about 1.5 million more particle-points,
or 4,000 more steps.

Inductor compiles C++ on the CPU: without a C++ compiler on the path the choice is
eager; so it is on other devices, where the compiled path has not been verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..compiled.backend import cpu_isa_key
from ..infer.evaluation import compile_seconds
from ..infer.hooks import backend_of, compiler, compiles
from .checkpoints import write_json

__all__ = [
    "FitCompile",
    "AUTO_COMPILE_STEPS",
    "AUTO_COMPILE_STEPS_CACHED",
    "AUTO_COMPILE_WORK",
    "AUTO_COMPILE_WORK_CACHED",
    "AUTO_COMPILE_STEPS_HEADER",
    "AUTO_COMPILE_WORK_HEADER",
    "STEP_POINTS",
    "STEP_SAVING_MS",
    "batch_shapes",
    "cached_graphs",
    "choose_compile",
    "choose_fit_compile",
    "compile_outcome",
    "graph_keys",
    "header_built",
    "remember_graphs",
    "step_graph_keys",
]

#: The ``compile`` that ``"auto"`` settles on where compiling pays: inductor.
AUTO_COMPILE: bool | str | None = True
#: Particle-points (points x num_samples) from which compiling an evaluation's
#: graph pays, cold and from the cache.
AUTO_COMPILE_WORK = 3_000_000
AUTO_COMPILE_WORK_CACHED = 600_000
#: Training steps from which compiling a step graph pays, cold and from the cache.
AUTO_COMPILE_STEPS = 8_000
AUTO_COMPILE_STEPS_CACHED = 2_000
#: What a compiled training step saves against fit's eager one, in ms: a part
#: per step and a part per particle-point of the step (batch size times
#: num_particles); the paper model on 2 cores (results/benchmarks.md, session 19:
#: fit's eager step less its compiled one, 1.45 ms at batch 20, k 5; 2.2 ms at
#: batch 100, k 5; 2.7 ms at batch 20, k 50; 10.1 ms at batch 100, k 50).
STEP_SAVING_MS = (1.3, 0.00175)
#: The particle-points of a step at which the AUTO_COMPILE_STEPS thresholds hold
#: (batch 20, k 5); other steps scale them by the saving.
STEP_POINTS = 100
#: What a first compile on the machine adds, building inductor's precompiled header.
AUTO_COMPILE_WORK_HEADER = 1_500_000
AUTO_COMPILE_STEPS_HEADER = 4_000
#: The file, in inductor's cache folder, of the graphs runs have compiled.
GRAPHS_FILE = "pyro-iwae-graphs.json"
#: Part of each graph key: changed with the options the compiled path gives
#: inductor (they are part of inductor's own keys) and with the graphs it traces
#: (4: the training graph's rewrites), so that older notes miss.
GRAPH_OPTIONS_VERSION = 4


def choose_compile(
    setting: bool | str | None,
    points: int,
    num_samples: int,
    device: torch.device,
    graphs: int = 1,
    cached: int = 0,
) -> tuple[bool | str | None, str]:
    """The ``compile`` an evaluation of ``points`` points with ``num_samples``
    particles each runs with, and a few words on why: ``setting`` itself unless
    it is ``"auto"``, which compiles where the ``graphs`` to compile (``cached``
    of them in inductor's cache) pay."""
    threshold = (graphs - cached) * AUTO_COMPILE_WORK
    threshold += cached * AUTO_COMPILE_WORK_CACHED
    header = _header_to_build(setting, graphs, cached, device)
    threshold += header * AUTO_COMPILE_WORK_HEADER
    unit = _unit("particle-points", graphs, cached, header)
    return _choose(setting, points * num_samples, threshold, unit, device)


def compile_outcome(
    compile: bool | str | None, why: str, fallback: str | None
) -> tuple[bool, str]:
    """Whether graphs compiled as ``compile`` (settled, not ``"auto"``) ran, and
    why: ``why``, the choice, and the ``fallback`` to the eager path since
    (its reason; None: none came), as training and evaluations record it."""
    if not compiles(compile):
        return False, why
    if fallback is None:
        return True, why
    return False, f"{why}; then eager: {fallback}"


def choose_fit_compile(
    setting: bool | str | None,
    steps: int,
    device: torch.device,
    single_process: bool = True,
    graphs: int = 1,
    cached: int = 0,
    particle_points: int | None = None,
) -> tuple[bool | str | None, str]:
    """The ``compile`` a run of ``steps`` optimisation steps trains with, and a few
    words on why: ``setting`` itself unless it is ``"auto"``, which compiles where
    the ``graphs`` to compile (``cached`` of them in inductor's cache) pay, and
    stays eager unless ``single_process`` (the one-graph step does not run under
    torchrun). ``particle_points``: a step's batch size times ``num_particles``
    (None: ``STEP_POINTS``); larger steps save more a step, and pay sooner."""
    if setting == "auto" and not single_process:
        return False, "auto: under torchrun the step runs eagerly"
    threshold = (graphs - cached) * AUTO_COMPILE_STEPS
    threshold += cached * AUTO_COMPILE_STEPS_CACHED
    header = _header_to_build(setting, graphs, cached, device)
    threshold += header * AUTO_COMPILE_STEPS_HEADER
    notes = []
    if particle_points is not None:
        threshold = math.ceil(
            threshold * _step_saving(STEP_POINTS) / _step_saving(particle_points)
        )
        notes.append(_count(particle_points, "particle-points a step"))
    unit = _unit("steps", graphs, cached, header, notes)
    return _choose(setting, steps, threshold, unit, device)


def _step_saving(particle_points: int) -> float:
    per_step, per_point = STEP_SAVING_MS
    return per_step + per_point * particle_points


def _unit(
    unit: str, graphs: int, cached: int, header: bool, notes: Sequence[str] = ()
) -> str:
    notes = [*notes, f"{cached} of {graphs} graphs cached"] if cached else [*notes]
    if header:
        notes.append("inductor's precompiled header to build first")
    return f"{unit} ({'; '.join(notes)})" if notes else unit


def _header_to_build(
    setting: bool | str | None, graphs: int, cached: int, device: torch.device
) -> bool:
    return (
        setting == "auto"
        and graphs > cached
        and device.type == "cpu"
        and not header_built()
    )


def header_built() -> bool:
    """Whether inductor has built its precompiled C++ header on this machine (in
    the temporary folder; any compiler, flags or torch version)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = Path(default_cache_dir()) / "precompiled_headers"
    return any(folder.glob("*.gch")) if folder.is_dir() else False


def batch_shapes(data_shape: Sequence[int], batch_size: int) -> list[tuple[int, ...]]:
    """The shapes of the batches of ``batch_size`` of data of ``data_shape``:
    one, or two where the last batch is smaller."""
    num_points = data_shape[0]
    sizes = {min(batch_size, num_points), num_points % batch_size or batch_size}
    return [(size, *data_shape[1:]) for size in sorted(sizes)]


@dataclasses.dataclass
class FitCompile:
    """How :func:`~pyro_iwae.fit` runs an objective's steps: its ``setting``, the
    ``compile`` it settles on, why, and the keys of the step graphs."""

    objective: Any
    setting: bool | str | None
    compile: bool | str | None
    why: str
    graph_keys: list[str]
    #: Seconds of tracing and compiling graphs when last asked.
    seconds: float = 0.0

    @classmethod
    def choose(
        cls,
        objective: Any,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        data_shape: Sequence[int],
        batch_size: int,
        steps: int,
        device: torch.device,
        single_process: bool,
    ) -> FitCompile:
        """The choice for ``steps`` steps of ``batch_size`` of data of
        ``data_shape`` (see :func:`choose_fit_compile`)."""
        setting = getattr(objective, "compile", False)
        keys = []
        if setting == "auto" or compiles(setting):
            shapes = batch_shapes(data_shape, batch_size)
            keys = step_graph_keys(setting, objective, model, guide, shapes, device)
        points = min(batch_size, data_shape[0]) * getattr(objective, "num_particles", 1)
        compile, why = choose_fit_compile(
            setting,
            steps,
            device,
            single_process,
            len(keys),
            cached_graphs(keys),
            points,
        )
        return cls(objective, setting, compile, why, keys, compile_seconds(compile))

    @contextmanager
    def settled(self) -> Iterator[None]:
        """The objective's ``compile`` as chosen, while the call trains."""
        if self.setting != "auto":
            yield
            return
        self.objective.compile = self.compile
        try:
            yield
        finally:
            self.objective.compile = self.setting

    def seconds_spent(self) -> float:
        """Seconds spent tracing and compiling graphs since the last call (or
        the choice); 0 on the eager path."""
        now = compile_seconds(self.compile)
        spent, self.seconds = now - self.seconds, now
        return spent

    def resumed(self, compiled: bool | None) -> None:
        """A resumed run's ``"auto"`` takes what its steps ran as when it began
        (``compiled``, from its checkpoint; None: not recorded, the new choice
        stands): inductor's cache may have changed since, and a run switching
        paths half-way would not end where an unbroken run does."""
        if self.setting != "auto" or compiled is None:
            return
        if compiled != compiles(self.compile):
            self.compile = AUTO_COMPILE if compiled else False
            path = "compiled" if compiled else "eager"
            self.why = f"auto: {path}, as when the run began (its checkpoint)"
            self.seconds = compile_seconds(self.compile)

    def outcome(
        self, model: torch.nn.Module, guide: torch.nn.Module
    ) -> tuple[bool, str]:
        """Whether the steps run as compiled graphs, and why: the choice, and
        a fallback to the eager path since (which a warning told of)."""
        reason = None
        if compiles(self.compile):
            reason = compiler().fallback(self.objective, model, guide)
        return compile_outcome(self.compile, self.why, reason)

    def note_compiled(self) -> None:
        """After graphs were compiled: inductor's cache holds them (for a later
        run's ``"auto"``)."""
        if compiles(self.compile):
            remember_graphs(self.graph_keys)


def step_graph_keys(
    compile: bool | str | None,
    objective: Any,
    model: torch.nn.Module,
    guide: torch.nn.Module,
    batch_shapes: Iterable[Sequence[int]],
    device: torch.device,
) -> list[str]:
    """A key for each training step graph of ``objective`` on ``model`` and
    ``guide`` compiled as ``compile`` says (``"auto"``: as it settles where it
    compiles), one per batch shape: what the graph depends on but the values."""
    settings = {
        name: getattr(objective, name, None)
        for name in (
            "num_particles",
            "estimator",
            "vectorize_particles",
            "max_plate_nesting",
            "num_groups",
            "beta",
        )
    }
    settings["objective"] = type(objective).__qualname__
    return graph_keys(compile, settings, model, guide, batch_shapes, device)


def graph_keys(
    compile: bool | str | None,
    settings: dict[str, Any],
    model: torch.nn.Module,
    guide: torch.nn.Module,
    batch_shapes: Iterable[Sequence[int]],
    device: torch.device,
) -> list[str]:
    """A key for each graph of ``model`` and ``guide`` that ``settings`` (what
    else the graph depends on: an objective's, an evaluation's) make, compiled
    as ``compile`` says (``"auto"``: as it settles where it compiles), one per
    batch shape."""
    if compile == "auto":
        compile = AUTO_COMPILE
    common = {
        "torch": torch.__version__,
        "options": GRAPH_OPTIONS_VERSION,
        "backend": backend_of(compile),
        "settings": repr(sorted(settings.items())),
        "device": device.type,
        # A cache folder may be shared by machines of other ISAs (see
        # pyro_iwae.compiled.backend.cpu_key_options).
        "cpu": cpu_isa_key() if device.type == "cpu" else None,
        "modules": [_module_signature(module) for module in (model, guide)],
    }
    keys = []
    for shape in batch_shapes:
        text = json.dumps({**common, "batch": list(shape)}, sort_keys=True)
        keys.append(hashlib.sha256(text.encode()).hexdigest()[:32])
    return keys


def cached_graphs(keys: Sequence[str]) -> int:
    """How many of the graphs ``keys`` runs have compiled into inductor's cache."""
    return sum(key in _remembered() for key in keys)


def remember_graphs(keys: Sequence[str]) -> None:
    """Notes that inductor's cache holds the graphs ``keys``."""
    known = _remembered()
    if set(keys) <= known:
        return
    try:
        write_json(_graphs_file(), sorted(known | set(keys)))
    except OSError:
        pass  # a read-only cache: later runs take the cold threshold


def _graphs_file() -> Path:
    # As inductor's cache_dir() finds it, without making it.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    return Path(folder) / GRAPHS_FILE


def _remembered() -> set[str]:
    try:
        keys = json.loads(_graphs_file().read_text())
    except (OSError, ValueError):
        return set()
    return set(keys) if isinstance(keys, list) else set()


def _module_signature(module: torch.nn.Module) -> list:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [type(module).__qualname__] + [
        [name, list(t.shape), str(t.dtype)] for name, t in tensors
    ]


def _choose(
    setting: bool | str | None,
    work: int,
    threshold: int,
    unit: str,
    device: torch.device,
) -> tuple[bool | str | None, str]:
    if setting != "auto":
        return setting, "as asked"
    if work < threshold:
        return False, (
            f"auto: {_count(work, unit)}, under the {threshold:,} from which "
            "compiling pays"
        )
    if device.type != "cpu":
        # The compiled path's CUDA graphs have not run on a GPU yet (see the
        # documentation's "What was verified where").
        return (
            False,
            f"auto: compiled graphs are verified on the CPU only, not {device.type}",
        )
    if _cpp_compiler() is None:
        return False, "auto: no C++ compiler found for inductor"
    return AUTO_COMPILE, (
        f"auto: {_count(work, unit)}, at least the {threshold:,} from which "
        "compiling pays"
    )


def _count(number: int, unit: str) -> str:
    """``"1 step"``, ``"2 steps"``: the unit's first word singular for one."""
    if number == 1:
        first, _, rest = unit.partition(" ")
        unit = " ".join(filter(None, (first.removesuffix("s"), rest)))
    return f"{number:,} {unit}"


def _cpp_compiler() -> str | None:
    names = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    return next((path for name in names if name and (path := shutil.which(name))), None)
