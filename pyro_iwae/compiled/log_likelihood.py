"""The compiled log-likelihood: :class:`CompiledLogLikelihood`, the log-weights of
each chunk of particles as one compiled graph, with the evaluation-only
rewrites of :mod:`pyro_iwae.compiled.rewrites`."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pyro
import torch

from ..infer.arguments import check_batch, cuda_devices
from ..infer.estimable import checked_particles
from ..infer.evaluation import (
    LogWeights,
    check_count,
    combine_chunks,
    evaluating,
    log_weight_chunks,
    resolve_chunk_size,
)
from ..infer.objectives import IWELBO
from .backend import (
    GraphCache,
    RandomState,
    close_enough,
    compile_graph,
    describe,
)
from .capture import (
    SEEDED_MESSAGE,
    CallArgs,
    Unsupported,
    call_tensors,
    draw_noise,
    named_tensors,
    seeded_ops,
    trace_graph,
)
from .rewrites import fewer_transcendentals


class CompiledLogLikelihood(GraphCache):
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
    (:func:`bernoulli_log_prob_sum`), and ``tanh`` on the CPU is computed from
    ``exp`` (:func:`exp_tanh`).
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
        tensors = call_tensors(args, kwargs)
        params = list(self._named().values())
        with evaluating(self.model, self.guide):
            for start in range(0, num_samples, chunk_size):
                if fresh:
                    reason = (
                        "the compiled log-weights differ from the eager ones (does "
                        "the program's structure change between calls?)"
                    )
                    # Put back on a fallback: the eager estimates that follow
                    # draw what the eager path would, not what the check did.
                    state = RandomState()
                    try:
                        log_w = self._verified(
                            graph, chunk_size, params, tensors, args, kwargs
                        )
                    except Exception as error:  # noqa: BLE001
                        # A graph compiled lazily (torch.compile: another backend,
                        # or compile options) compiles on its first call; inductor's
                        # direct compile fails earlier, in _lookup.
                        log_w = None
                        reason = f"the graph did not compile ({describe(error)})"
                    fresh = False
                    if log_w is None:
                        state.restore()
                        self._disable(reason)
                        yield from self._eager(args, kwargs, num_samples, chunk_size)
                        return
                else:
                    # A partial last chunk is drawn in full, its surplus dropped.
                    log_w = graph.fn(*params, *tensors, *draw_noise(graph.noise_ops))
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
        same noise; else None."""

        with torch.random.fork_rng(devices=cuda_devices(args, kwargs)):
            compiled = graph.fn(*params, *tensors, *draw_noise(graph.noise_ops))
        elbo = IWELBO(num_particles=chunk, max_plate_nesting=self.max_plate_nesting)
        eager = elbo.particles(self.model, self.guide, *args, **kwargs).log_weights
        if compiled.shape != eager.shape:
            return None
        finite = eager.isfinite()
        same = torch.equal(finite, compiled.isfinite()) and torch.equal(
            compiled[~finite], eager[~finite]
        )
        if same and finite.any():
            same = close_enough(compiled[finite], eager[finite], _VERIFY_RTOL)
        return compiled if same else None

    def _named(self) -> dict[str, torch.Tensor]:
        named = {}
        for prefix, fn in (("model.", self.model), ("guide.", self.guide)):
            if isinstance(fn, torch.nn.Module):
                named.update((prefix + k, v) for k, v in named_tensors(fn).items())
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

        elbo = IWELBO(num_particles=1, max_plate_nesting=self.max_plate_nesting)
        try:
            with (
                torch.random.fork_rng(devices=cuda_devices(args, kwargs)),
                evaluating(self.model, self.guide),
            ):
                # A program no estimate per point can come from runs eagerly,
                # whose checks say why.
                traces = checked_particles(
                    lambda: elbo.particles(self.model, self.guide, *args, **kwargs)
                ).traces
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
        named = self._named()
        names = list(named)
        modules = {
            prefix: fn
            for prefix, fn in (("model.", self.model), ("guide.", self.guide))
            if isinstance(fn, torch.nn.Module)
        }
        call = CallArgs(args, kwargs)
        n = len(names)
        found: dict[str, Any] = {}
        elbo = IWELBO(num_particles=chunk, max_plate_nesting=self.max_plate_nesting)

        def step(*flat):
            call_args, call_kwargs = call.rebuild(flat[n:])
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
            inputs = [t.detach() for t in named.values()] + call.tensors
            gm, noise_ops = trace_graph(step, inputs)
            # Left in the graph, a compiler draws these from its own generator,
            # and uncompiled (backend None) the graph draws them after the lifted
            # draws, not among them: either way another estimate than the eager
            # path's from the same seed, which the check cannot tell from a valid
            # one. Refused, as the compiled loss refuses them.
            if seeded_ops(gm.graph):
                raise Unsupported(SEEDED_MESSAGE)
            fewer_transcendentals(gm)
            fn = compile_graph(
                gm, self.backend, self.compile_options, inputs, noise_ops
            )
        return _LogWeightsGraph(fn, noise_ops, found["local_dims"])


class _LogWeightsGraph(NamedTuple):
    """The compiled log-weights graph of one input signature and structure."""

    fn: Callable
    noise_ops: list
    local_dims: tuple[int, ...]


#: Relative tolerance of the first-chunk check of the compiled log-weights.
_VERIFY_RTOL = 1e-4


def _distribution_types(fn: Any) -> tuple[type, ...]:
    """The types of ``fn`` and of the distributions it wraps (``base_dist``)."""
    types = []
    while fn is not None:
        types.append(type(fn))
        fn = getattr(fn, "base_dist", None)
    return tuple(types)


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
