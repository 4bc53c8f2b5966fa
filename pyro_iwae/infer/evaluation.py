"""Importance-sampled log-likelihood of trained models."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import pyro
import torch

from ..errors import ParticleBroadcastError, ProgramError, check_count
from ..nn.networks import prepare_pyro_modules
from .arguments import check_batch, check_tensor, cuda_devices
from .estimable import check_plates, checked_particles, innermost, traced_pair
from .hooks import backend_of, check_compile, compiler, compiles
from .log_weights import Particles
from .objectives import IWELBO

#: Bytes of memory one chunk of particles may take, by default.
DEFAULT_MEMORY_BUDGET = 256 * 2**20
# Intermediate tensors per element of the sites' distributions (hidden layers,
# elementwise log-probs, autograd-free temporaries), measured on the paper's models.
_BYTES_PER_ELEMENT = 4 * 6
#: Largest tensor one chunk should allocate, in bytes: glibc serves larger blocks
#: with fresh mmap'd pages, which the kernel zeroes at every chunk (bench/
#: log_likelihood.py: about twice the page faults and up to 20% more time).
LARGEST_TENSOR = 32 * 2**20


@contextmanager
def evaluating(*fns: Callable) -> Iterator[None]:
    """Puts the modules among ``fns`` in eval mode without gradients, then restores.

    ``PyroModule`` s run with their own parameters (Pyro's module-local
    parameters, see :func:`~pyro_iwae.nn.networks.local_params`).
    """
    modes = [
        (module, module.training)
        for fn in fns
        if isinstance(fn, torch.nn.Module)
        for module in fn.modules()
    ]
    local = prepare_pyro_modules(*fns) or pyro.settings.get("module_local_params")
    try:
        for module, _ in modes:
            module.training = False
        with torch.no_grad(), pyro.settings.context(module_local_params=local):
            yield
    finally:
        for module, training in modes:
            module.training = training


def default_chunk_size(
    model: Callable,
    guide: Callable,
    *args: Any,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> int:
    """Particles per chunk so that one chunk fits in ``memory_budget`` bytes and
    no site's per-chunk tensor exceeds :data:`LARGEST_TENSOR` bytes.

    Runs model and guide once with one particle, without shifting the random
    stream, and counts the elements of every sample site's distribution (batch
    and event shape), the tensors that grow with the number of particles.
    """
    elbo = IWELBO(num_particles=1, max_plate_nesting=max_plate_nesting)
    # Plates left of the nesting are said by the draws of the chunks, under the
    # particle plate as its error.
    elbo._checks_plate_dims = False
    # On a forked random stream: a seed gives the same estimate with the chunk
    # size chosen here as with it given.
    with (
        torch.random.fork_rng(devices=cuda_devices(args, kwargs)),
        evaluating(model, guide),
    ):
        traces = elbo.particles(model, guide, *args, **kwargs).traces
    sizes = [
        (math.prod(site["fn"].shape()), torch.as_tensor(site["value"]).element_size())
        for trace in traces[0]
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    elements = sum(n for n, _ in sizes)
    largest = max((n * size for n, size in sizes), default=1)
    by_budget = memory_budget // (_BYTES_PER_ELEMENT * max(elements, 1))
    return max(1, min(by_budget, LARGEST_TENSOR // max(largest, 1)))


def log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    max_plate_nesting: int = 1,
    compile: bool | str | None = False,
    vectorize_particles: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    r"""Importance-sampled :math:`\log p(x)` for each point of the data plate.

    :math:`\log \frac{1}{K} \sum_{i=1}^K p(x, z_i) / q(z_i|x)`, :math:`z_i \sim q`,
    with ``K = num_samples``: the bound :math:`L_K` of :class:`IWELBO`, unscaled.
    Particles are drawn ``chunk_size`` at a time and combined by a running
    logsumexp, so memory does not grow with ``num_samples``; by default the chunk
    size is chosen by :func:`default_chunk_size`. Runs without gradients, with
    modules in eval mode. ``compile`` (True, or a ``torch.compile`` backend)
    computes each chunk's log-weights in one compiled graph (see
    :func:`log_weight_chunks`).

    ``vectorize_particles=False`` draws each chunk's particles one at a time, as
    ``IWELBO(vectorize_particles=False)`` does: for a model or guide whose
    networks do not broadcast over a leading particle dimension (slower; the same
    estimator). It runs eagerly: ``compile`` must then be False.

    :returns: a tensor of shape ``[batch]`` (the data plate's size), in nats.
    :raises ParticleBroadcastError: if the programs do not broadcast over the
        particles (pass ``vectorize_particles=False``).
    """
    chunks = log_weight_chunks(
        model,
        guide,
        *args,
        num_samples=num_samples,
        chunk_size=chunk_size,
        max_plate_nesting=max_plate_nesting,
        compile=compile,
        vectorize_particles=vectorize_particles,
        **kwargs,
    )
    return combine_chunks(chunks, num_samples)


class LogWeights(NamedTuple):
    """A chunk of log importance weights, ``(chunk,) + plate_shape``, one per
    particle (see :attr:`Particles.particle_log_weights
    <pyro_iwae.infer.log_weights.Particles.particle_log_weights>`), and the data
    plate dims."""

    log_weights: torch.Tensor
    local_dims: tuple[int, ...]


def log_weight_chunks(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int,
    chunk_size: int | None = None,
    max_plate_nesting: int = 1,
    compile: bool | str | None = False,
    vectorize_particles: bool = True,
    caller: str = "log_likelihood",
    **kwargs: Any,
) -> Iterator[LogWeights]:
    """The log-weights of :func:`particle_chunks` for ``model(*args, **kwargs)``;
    with ``compile`` (True for inductor, a ``torch.compile`` backend name, or None
    for the traced graph uncompiled), those of a
    :class:`~pyro_iwae.compiled.CompiledLogLikelihood` cached on the guide, which
    falls back to these with a warning for programs it cannot compile.
    ``vectorize_particles`` and ``caller`` as :func:`particle_chunks`.
    """
    check_compile(compile)
    if compiles(compile) and not vectorize_particles:
        raise ValueError(
            f"{caller} compiles the vectorized particles, but vectorize_particles="
            "False draws them one at a time, eagerly; pass compile=False"
        )
    if compiles(compile):
        backend = backend_of(compile)
        estimator = compiler().log_likelihood(model, guide, backend, max_plate_nesting)
        yield from estimator.chunks(
            *args, num_samples=num_samples, chunk_size=chunk_size, **kwargs
        )
        return
    for particles in particle_chunks(
        model,
        guide,
        args,
        kwargs,
        num_samples,
        chunk_size,
        max_plate_nesting,
        vectorize_particles,
        caller,
    ):
        yield LogWeights(particles.particle_log_weights, particles.local_dims)


def compile_seconds(compile: bool | str | None) -> float:
    """:func:`pyro_iwae.compiled.compile_seconds` where ``compile`` (an objective's
    or an evaluation's option) asks for compiled graphs; 0 where it is False."""
    if not compiles(compile):
        return 0.0
    return compiler().seconds()


def combine_chunks(chunks: Iterable[LogWeights], num_samples: int) -> torch.Tensor:
    """``log (1/K) sum_i w_i`` per point over the chunks of ``num_samples = K``
    particles, by a running logsumexp: ``[batch]`` (the data plate's shape).

    With values enumerated in the guide, a particle's weight is the mean of its
    weights per value (see :class:`LogWeights`): the mean runs over all of them.
    """
    total, count = None, 0
    for chunk in chunks:
        part = chunk.log_weights.logsumexp(0)
        total = part if total is None else torch.logaddexp(total, part)
        count += chunk.log_weights.shape[0]
    return local_shape(chunk.local_dims, total - math.log(max(count, num_samples)))


def particle_chunks(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    chunk_size: int | None,
    max_plate_nesting: int,
    vectorize_particles: bool = True,
    caller: str = "log_likelihood",
) -> Iterator[Particles]:
    """:meth:`IWELBO.particles` of ``num_samples`` particles, ``chunk_size`` at a
    time (None: :func:`default_chunk_size`), with the modules in eval mode and no
    gradients: what :func:`log_likelihood` and the diagnostics combine. With
    ``vectorize_particles=False`` each chunk's particles are drawn one at a time
    (``IWELBO(vectorize_particles=False)``).

    :raises ValueError: for an empty batch, NaN in the data, or plates that give
        no estimate per
        point (shape errors from deep inside Pyro become one sentence on what is
        wrong with the plates).
    :raises ParticleBroadcastError: for programs that do not broadcast over the
        particles, offering ``caller``'s ``vectorize_particles=False``.
    """
    check_count("num_samples", num_samples)
    check_batch(args, kwargs, caller)
    try:
        chunk_size = resolve_chunk_size(
            model, guide, args, kwargs, chunk_size, max_plate_nesting
        )
        with evaluating(model, guide):
            for index, size in enumerate(chunk_sizes(num_samples, chunk_size)):
                elbo = IWELBO(
                    num_particles=size,
                    max_plate_nesting=max_plate_nesting,
                    vectorize_particles=vectorize_particles,
                )
                if index:  # the first chunk's checks cover the program
                    elbo._dims_check = None
                draw = functools.partial(elbo.particles, model, guide, *args, **kwargs)
                yield checked_particles(draw) if index == 0 else draw()
    except (ValueError, RuntimeError) as e:
        # A program whose plates give no estimate per point can fail as one that
        # does not broadcast: the plates are what to fix.
        problem = _plate_problem(model, guide, args, kwargs)
        if problem is not None:
            raise problem from e
        if isinstance(e, ParticleBroadcastError):
            raise e.for_evaluator(caller) from None
        raise


def resolve_chunk_size(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    chunk_size: int | None,
    max_plate_nesting: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """``chunk_size``, or :func:`default_chunk_size` for ``memory_budget`` if None."""
    if chunk_size is None:
        chunk_size = default_chunk_size(
            model,
            guide,
            *args,
            memory_budget=memory_budget,
            max_plate_nesting=max_plate_nesting,
            **kwargs,
        )
    check_count("chunk_size", chunk_size)
    return chunk_size


def chunk_sizes(total: int, chunk_size: int) -> Iterator[int]:
    """Chunks of ``chunk_size`` (the last may be smaller) that add up to ``total``."""
    for start in range(0, total, chunk_size):
        yield min(chunk_size, total - start)


def local_shape(local_dims: tuple[int, ...], tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, of a plate shape with data plate dims ``local_dims`` and size 1
    elsewhere, reshaped to the data plate's shape; an error without a data plate."""
    if not local_dims:
        raise ValueError(
            "per-point estimates need a data plate that encloses every sample site "
            "of model and guide"
        )
    return tensor.reshape([tensor.shape[d] for d in local_dims])


def _plate_problem(
    model: Callable, guide: Callable, args: tuple, kwargs: dict
) -> ValueError | None:
    """What :func:`check_plates` finds in one run of guide and model (without
    particle plates), as the error to raise (a :class:`ProgramError` as it is:
    a plain ``ValueError`` of its message showed a traceback from the command
    line), or None (also when they do not run)."""
    try:
        with evaluating(model, guide):
            check_plates(*traced_pair(model, guide, *args, **kwargs))
    except ProgramError as e:
        return e
    except ValueError as e:
        return ValueError(str(innermost(e)))
    except Exception:  # noqa: BLE001 - the original error is the one to raise
        return None
    return None


def dataset_log_likelihood(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    num_samples: int = 5000,
    batch_size: int = 100,
    chunk_size: int | None = None,
    callback: Callable[[torch.Tensor], None] | None = None,
    max_plate_nesting: int = 1,
    vectorize_particles: bool = True,
) -> torch.Tensor:
    """:func:`log_likelihood` of every row of ``data`` ([N, ...]), batch by batch.

    ``model`` and ``guide`` are called as ``model(batch)``; ``callback(estimates)``
    is called after each batch with its estimates (``[batch]``, nats);
    ``vectorize_particles`` as :func:`log_likelihood`. Returns a
    tensor of shape ``[N]``; warns (:class:`EstimateWarning`) when
    :func:`estimate_problem` finds something wrong with the estimates.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_tensor("data", data)
    if not data.dim() or not data.shape[0]:
        raise ValueError(
            f"data has shape {list(data.shape)}, no data points; pass a tensor of "
            "shape [N, ...] with N >= 1"
        )
    estimates = []
    for start in range(0, data.shape[0], batch_size):
        batch = data[start : start + batch_size]
        chunks = log_weight_chunks(
            model,
            guide,
            batch,
            num_samples=num_samples,
            chunk_size=chunk_size,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            caller="dataset_log_likelihood",
        )
        try:
            estimates.append(combine_chunks(chunks, num_samples))
        except (ValueError, RuntimeError) as e:
            # One point without its batch dimension ([784]) was cut into [100]
            # pieces, which the programs refuse as the wrong width: what they
            # say of the whole of it is log_likelihood's advice (unsqueeze(0)).
            if start == 0 and data.dim() == 1 and len(batch) < len(data):
                problem = _plate_problem(model, guide, (data,), {})
                if problem is not None:
                    raise problem from e
            raise
        if callback is not None:
            callback(estimates[-1])
    estimates = torch.cat(estimates)
    warn_of_problems(estimates, stacklevel=3)
    return estimates


def warn_of_problems(estimates: torch.Tensor, stacklevel: int = 2) -> None:
    """Warns (:class:`EstimateWarning`) when :func:`estimate_problem` finds
    something wrong with per-point estimates ``[N]``."""
    problem = estimate_problem(estimates)
    if problem is not None:
        warnings.warn(problem, EstimateWarning, stacklevel=stacklevel)


class EstimateWarning(UserWarning):
    """Per-point log-likelihood estimates that should not be trusted as they are."""


#: Estimates more than this many interquartile ranges above the upper quartile
#: are far from the rest (Tukey's "far out" fence is 3; this flags only gross
#: failures, not the spread between easy and hard data points).
OUTLIER_FENCE = 10.0


def estimate_problem(estimates: torch.Tensor) -> str | None:
    """One sentence on what is wrong with per-point estimates ``[N]`` (nats), or
    None: estimates that are not finite, or far above every other point's (a few
    huge importance weights, or a likelihood that is not a normalised density)."""
    finite = estimates.isfinite()
    n = estimates.numel()
    if not finite.all():
        bad = n - int(finite.sum())
        return (
            f"{bad} of {n} log-likelihood estimates are not finite (nan or inf): "
            "the model or guide gives invalid log-densities for those points; "
            "check the data against the likelihood's support"
        )
    if n < 4:
        return None
    q1, median, q3 = torch.quantile(
        estimates.double(), estimates.new_tensor([0.25, 0.5, 0.75]).double()
    ).tolist()
    fence = q3 + OUTLIER_FENCE * max(q3 - q1, 1.0)
    far = estimates > fence
    if not far.any():
        return None
    return (
        f"{int(far.sum())} of {n} log-likelihood estimates lie far above the rest "
        f"(largest {estimates.max().item():.1f} nats, median {median:.1f}): a few "
        "importance weights dominate, or the likelihood is not a normalised "
        "density; check the model, or raise the number of samples"
    )
