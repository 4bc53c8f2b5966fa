"""The compiled training loss: :class:`CompiledLoss`, the loss of an objective and
its gradients as one compiled graph per input signature."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import pyro
import torch

from ..infer.arguments import cuda_devices
from .adam import (
    STATE_KEYS,
    AdamSettings,
    adam_candidates,
    adam_state,
    adam_update,
    clear_grads,
    graph_adam,
    same_update,
)
from .backend import (
    GraphCache,
    RandomState,
    close_enough,
    compile_graph,
    describe,
    kept_buffers,
    mismatch,
)
from .capture import (
    INPUT_GRAD_MESSAGE,
    SEEDED_MESSAGE,
    CallArgs,
    ModelAndGuide,
    Unsupported,
    call_tensors,
    draw_noise,
    named_tensors,
    needs_grad,
    seeded_ops,
    submodules,
    trace_graph,
)
from .grads import PrecomputedGrad, announce_params, set_grads
from .keys import objective_settings
from .rewrites import fewer_transcendentals


class _LossGraph:
    """The compiled loss-and-gradients graph of one input signature; of a training
    step (:meth:`CompiledLoss.step`), with the loss scaled and, where ``adam`` is
    set, Adam's update of the parameters ``updated`` (indices) in place."""

    def __init__(
        self,
        fn: Callable,
        noise_ops: list,
        grad_mask: list[bool],
        scale: float | None = None,
    ) -> None:
        self.fn = fn
        self.noise_ops = noise_ops
        self.grad_mask = grad_mask
        self.scale = scale
        # Draws with tensor arguments left in the graph (backend None keeps them).
        self.seeded = False
        self.adam: AdamSettings | None = None
        # With adam: the parameters whose state the graph takes (indices), those
        # it updates (the ones of them that get a gradient), and zero stand-ins
        # for the state of the others.
        self.candidates: list[int] = []
        self.updated: list[int] = []
        self.spare: list[torch.Tensor] = []


class CompiledLoss(GraphCache):
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
        loss and gradients (same noise); on a mismatch warn and fall back. Else
        an eager run checks the program (its particle dims) before a new graph runs.
    :param rtol: the relative tolerance of that check.
    :param max_signatures: at most this many input signatures (with the modules'
        settings and the objective's) get a graph, each a compilation: one more
        gives the compiled path up, with a warning, as any fallback does.

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
        # The last learning rate of step(), as a float and as a graph input.
        self._lr: tuple[float, torch.Tensor] | None = None
        self._announced: set[int] = set()  # ids of the parameters SVI was told of
        if not (
            isinstance(model, torch.nn.Module) and isinstance(guide, torch.nn.Module)
        ):
            self._disable("model and guide must both be nn.Modules")
        else:
            self._both = ModelAndGuide(model, guide)

    def eager(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The eager loss, ``elbo.differentiable_loss(model, guide, *args)``.

        For an :class:`~pyro_iwae.IWELBO` this calls its
        :meth:`~pyro_iwae.IWELBO.eager_loss`, so that an objective whose
        ``differentiable_loss`` routes through a ``CompiledLoss`` (as with a
        ``compile`` option) does not recurse.
        """
        eager = getattr(self.elbo, "eager_loss", None)
        if eager is not None:
            return eager(self.model, self.guide, *args, **kwargs)
        return self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disabled is None and needs_grad(args, kwargs):
            self._disable(INPUT_GRAD_MESSAGE)
        if self._disabled is not None or not torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        modules = submodules(self._both)  # each call: a user may swap tensors
        named = named_tensors(self._both, modules)
        if not any(t.requires_grad for t in named.values()):
            # No gradient to compute: the eager loss, as the eager objective's
            # loss_and_grads takes it (no graph built, the compiled path kept).
            return self.eager(*args, **kwargs)
        graph, loss = self._graph(named, modules, args, kwargs)
        if graph is None:
            return self.eager(*args, **kwargs)
        if not announce_params(named.values(), self._announced):
            return self.eager(*args, **kwargs)  # a cleared store: registered again
        if loss is not None:
            return loss
        return self._run(graph, list(named.values()), args, kwargs)

    def loss_and_grads(self, *args: Any, **kwargs: Any) -> float:
        """Accumulates the gradient of the loss in ``.grad``; returns the loss.

        Where no parameter of the model or guide needs a gradient, no backward
        pass runs (as in :meth:`~pyro_iwae.IWELBO.loss_and_grads`)."""
        loss = self(*args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        *args: Any,
        scale: float = 1.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One step of ``optimizer`` on ``scale`` times the loss of ``args``.

        The gradients go into the parameters' ``.grad`` as
        ``optimizer.zero_grad(set_to_none=True)``, ``backward`` and
        ``optimizer.step()`` leave them, from one compiled graph per input
        signature that computes them already scaled. Where ``optimizer`` is a
        plain ``torch.optim.Adam`` on the CPU (see
        :func:`~pyro_iwae.compiled.adam.graph_adam`) the graph also makes its
        update, in the optimiser's own state tensors; else ``optimizer.step()``
        follows the graph. With ``verify``, the first call of a signature checks
        the loss, the gradients and the update against the eager ones. Where no
        parameter of the model or guide needs a gradient (or grad mode is off),
        the loss is the eager one and the optimiser makes no step.

        :returns: the loss times ``scale``, detached.
        :raises TypeError: if ``optimizer`` is no ``torch.optim.Optimizer``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"step takes a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "a Pyro optimiser (pyro.optim, JointOptim) is for pyro.infer.SVI"
            )
        named: dict[str, torch.Tensor] = {}
        if self._disabled is None and needs_grad(args, kwargs):
            self._disable(INPUT_GRAD_MESSAGE)
        if self._disabled is None and torch.is_grad_enabled():
            modules = submodules(self._both)
            named = named_tensors(self._both, modules)
        # Where no parameter needs a gradient, the eager loss and no update below
        # (no graph built, the compiled path kept).
        if any(t.requires_grad for t in named.values()):
            params = list(named.values())
            adam = graph_adam(optimizer, params)
            members = None
            if adam is not None:
                ids = {id(p) for p in optimizer.param_groups[0]["params"]}
                members = [id(p) in ids for p in params]
            wanted = tuple(p.requires_grad for p in params)
            settings = objective_settings(self.elbo)
            graph, fresh = self._lookup(
                (settings, wanted, scale, adam, members and tuple(members)),
                args,
                kwargs,
                lambda: self._build(named, args, kwargs, scale, adam, members),
                modules,
            )
            if graph is not None:
                clear_grads(optimizer)
                if fresh:
                    loss = self._first(
                        self._verified_step if self.verify else self._graph_step,
                        graph,
                        optimizer,
                        params,
                        args,
                        kwargs,
                    )
                    if loss is not None:
                        return loss
                else:
                    return self._graph_step(graph, optimizer, params, args, kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss = self.eager(*args, **kwargs) * scale
        if loss.requires_grad:
            loss.backward()
            optimizer.step()
        return loss.detach()

    # -- internals ---------------------------------------------------------------

    def _graph_step(
        self, graph: _LossGraph, optimizer: torch.optim.Optimizer, *call: Any
    ) -> torch.Tensor:
        """A step of ``graph`` alone; ``call`` is ``(params, args, kwargs)``."""
        params, args, kwargs = call
        loss, grads = self._run_graph(graph, params, args, kwargs, optimizer)
        set_grads(params, grads)
        if graph.adam is None:
            optimizer.step()
        return loss

    def _first(self, call: Callable, *args: Any) -> torch.Tensor | None:
        """``call(*args)``, the first call of a new graph; None, with the compiled
        path given up, where it fails: a graph compiled lazily (another
        ``torch.compile`` backend, or options) compiles on its first call
        (inductor's direct compile fails earlier, in ``_lookup``). Where it
        fails or returns None (the check found a mismatch), the random state is
        put back: the eager run that follows draws what the eager path would.
        Without ``verify``, an eager run checks the program first."""
        state = RandomState()
        if not self.verify:  # a program's error is its own, not the compiler's
            self.check_eagerly(self.eager, *args[-2:])
        try:
            result = call(*args)
        except Exception as error:  # noqa: BLE001
            state.restore()
            self._disable(f"the graph did not compile ({describe(error)})")
            return None
        if result is None:
            state.restore()
        return result

    def _graph(
        self,
        named: dict[str, torch.Tensor],
        modules: list[tuple[str, torch.nn.Module]],
        args: tuple,
        kwargs: dict,
    ) -> tuple[_LossGraph | None, torch.Tensor | None]:
        """The graph for this call's signature (None: run eagerly) and, on the call
        that built and verified it, the compiled loss of this call."""
        wanted = tuple(t.requires_grad for t in named.values())
        graph, fresh = self._lookup(
            (objective_settings(self.elbo), wanted),
            args,
            kwargs,
            lambda: self._build(named, args, kwargs),
            modules,
        )
        if not fresh:
            return graph, None
        if not self.verify:
            loss = self._first(self._run, graph, list(named.values()), args, kwargs)
            return (graph, loss) if loss is not None else (None, None)
        loss = self._first(self._verified, graph, list(named.values()), args, kwargs)
        if loss is None:
            if self._disabled is None:
                self._disable(mismatch(graph.seeded, "loss or gradients"))
            return None, None
        return graph, loss

    def _build(
        self,
        named: dict,
        args: tuple,
        kwargs: dict,
        scale: float | None = None,
        adam: AdamSettings | None = None,
        members: list[bool] | None = None,
    ) -> _LossGraph:
        """Traces and compiles the graph: of the loss and its gradients, or with
        ``scale`` of a training step's (the loss times ``scale``) and, with
        ``adam``, Adam's update of the parameters flagged in ``members`` that
        get a gradient. Its inputs: the parameters, the call's tensors, then for
        a step with Adam the learning rate and the state of each flagged
        parameter (see :func:`~.adam.adam_state`), then the lifted noise."""
        names = list(named)
        tensors = list(named.values())
        wanted = [t.requires_grad for t in tensors]
        call = CallArgs(args, kwargs)
        n, c = len(tensors), len(call.tensors)
        candidates = [] if adam is None else adam_candidates(wanted, members)
        grad_mask: list[bool] = []

        def loss_and_grads(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            params = [
                t.detach().requires_grad_(w)
                for t, w in zip(flat[:n], wanted, strict=True)
            ]
            call_args, call_kwargs = call.rebuild(flat[n : n + c])
            state = dict(zip(names, params, strict=True))
            with (
                pyro.settings.context(module_local_params=True),
                torch.nn.utils.stateless._reparametrize_module(self._both, state),
            ):
                loss = self.eager(*call_args, **call_kwargs)
            if scale is not None:
                loss = loss * scale
            trainable = [p for p, w in zip(params, wanted, strict=True) if w]
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            grad_mask[:] = [g is not None for g in grads]
            if adam is not None:
                by_param = dict(zip(_trainable_indices(wanted), grads, strict=True))
                lr, adam_inputs = flat[n + c], flat[n + c + 1 :]
                moved = [j for j, i in enumerate(candidates) if by_param[i] is not None]
                adam_update(
                    adam,
                    lr,
                    [flat[candidates[j]] for j in moved],
                    [by_param[candidates[j]] for j in moved],
                    [t for j in moved for t in adam_inputs[3 * j : 3 * j + 3]],
                )
            return (loss.detach(), *(g for g in grads if g is not None))

        inputs = [t.detach() for t in tensors] + call.tensors
        spare: list[torch.Tensor] = []
        if adam is not None:
            # Stand-ins of the learning rate and of the state, for tracing (and for
            # the state of a parameter that turns out to get no gradient).
            inputs.append(torch.zeros((), device=tensors[0].device))
            for i in candidates:
                spare += [torch.zeros((), device=tensors[i].device)]
                spare += [torch.zeros_like(tensors[i]) for _ in range(2)]
            inputs += spare
        with torch.enable_grad():
            gm, noise_ops = trace_graph(loss_and_grads, inputs)
        seeded = bool(seeded_ops(gm.graph))
        if self.backend is not None and seeded:
            raise Unsupported(SEEDED_MESSAGE)
        # The image log-densities and the tanh layers: ~5% of a small CPU step.
        fewer_transcendentals(gm)
        full_mask = iter(grad_mask)
        mask = [w and next(full_mask) for w in wanted]
        fn = compile_graph(gm, self.backend, self.compile_options, inputs, noise_ops)
        graph = _LossGraph(fn, noise_ops, mask, scale)
        graph.seeded = seeded
        if adam is not None:
            graph.adam, graph.candidates, graph.spare = adam, candidates, spare
            graph.updated = [i for i in candidates if mask[i]]
        return graph

    def _run(
        self, graph: _LossGraph, params: list[torch.Tensor], args: tuple, kwargs: dict
    ) -> torch.Tensor:
        loss, grads = self._run_graph(graph, params, args, kwargs)
        return PrecomputedGrad.apply(loss, grads, *params)

    def _run_graph(
        self,
        graph: _LossGraph,
        params: list[torch.Tensor],
        args: tuple,
        kwargs: dict,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The graph's loss and the gradient of each parameter (None: none);
        with Adam in the graph, ``optimizer``'s update done."""
        noise = draw_noise(graph.noise_ops)
        extra = (
            [] if graph.adam is None else self._adam_inputs(graph, optimizer, params)
        )
        with torch.no_grad():
            out = graph.fn(
                *[p.detach() for p in params],
                *call_tensors(args, kwargs),
                *extra,
                *noise,
            )
        loss, computed = out[0], iter(out[1:])
        return loss, [next(computed) if m else None for m in graph.grad_mask]

    def _adam_inputs(
        self,
        graph: _LossGraph,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """The learning rate and Adam state ``graph`` takes (see :meth:`_build`)."""
        lr = optimizer.param_groups[0]["lr"]
        # The graph takes it as a float32 scalar tensor, whatever the group holds
        # (a float, or a tensor of any dtype): a new value needs no new graph.
        lr = float(lr)
        if self._lr is None or self._lr[0] != lr:
            self._lr = (lr, torch.tensor(lr, dtype=torch.float32))
        state = iter(adam_state(optimizer, [params[i] for i in graph.updated]))
        inputs = [self._lr[1]]
        for j, i in enumerate(graph.candidates):
            if graph.grad_mask[i]:
                inputs += [next(state) for _ in STATE_KEYS]
            else:
                inputs += graph.spare[3 * j : 3 * j + 3]
        return inputs

    def _verified(
        self, graph: _LossGraph, params: list[torch.Tensor], args: tuple, kwargs: dict
    ) -> torch.Tensor | None:
        """The compiled loss of this call if it and its gradients are the eager
        ones, from the same noise (CPU and GPU random states); else None."""
        trainable = [p for p, m in zip(params, graph.grad_mask, strict=True) if m]
        devices = cuda_devices((*params, *call_tensors(args, kwargs)), {})
        with (
            torch.random.fork_rng(devices=devices),
            kept_buffers(self.model, self.guide),
        ):
            eager = self.eager(*args, **kwargs)
            eager_grads = torch.autograd.grad(eager, trainable, allow_unused=True)
        compiled = self._run(graph, params, args, kwargs)
        compiled_grads = [g for g in compiled.grad_fn.grads if g is not None]
        ok = close_enough(compiled.detach(), eager.detach(), self.rtol)
        for e, c in zip(eager_grads, compiled_grads, strict=True):
            ok = ok and e is not None and close_enough(c, e, self.rtol)
        return compiled if ok else None

    def _verified_step(
        self,
        graph: _LossGraph,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        args: tuple,
        kwargs: dict,
    ) -> torch.Tensor:
        """A step as :meth:`step` makes it, checked against the eager loss and
        gradients from the same noise, and the graph's Adam update against
        ``optimizer.step()`` from the same gradients; on a mismatch it warns and
        gives up the compiled path. The step taken is the graph's where the
        check passes, else the eager optimiser's from the eager gradients."""
        trainable = [p for p, m in zip(params, graph.grad_mask, strict=True) if m]
        devices = cuda_devices((*params, *call_tensors(args, kwargs)), {})
        with (
            torch.random.fork_rng(devices=devices),
            kept_buffers(self.model, self.guide),
        ):
            eager = self.eager(*args, **kwargs) * graph.scale
            eager_grads = torch.autograd.grad(eager, trainable, allow_unused=True)
        moved = [params[i] for i in graph.updated]
        if graph.adam is not None:
            # The graph updates these in place: keep where they started.
            tensors = [*moved, *adam_state(optimizer, moved)]
            start = [t.detach().clone() for t in tensors]
        loss, grads = self._run_graph(graph, params, args, kwargs, optimizer)
        computed = [g for g in grads if g is not None]
        ok = close_enough(loss, eager.detach(), self.rtol)
        for e, c in zip(eager_grads, computed, strict=True):
            ok = ok and e is not None and close_enough(c, e, self.rtol)
        if graph.adam is not None:
            stepped = [t.detach().clone() for t in tensors]
            with torch.no_grad():
                torch._foreach_copy_(tensors, start)
        if not ok:
            by_param = iter(eager_grads)
            grads = [next(by_param) if m else None for m in graph.grad_mask]
            loss = eager.detach()
        set_grads(params, grads)
        optimizer.step()
        if ok and graph.adam is not None:
            for j, (s0, s1, t) in enumerate(zip(start, stepped, tensors, strict=True)):
                if j < len(moved):
                    ok = ok and same_update(s0, s1, t.detach(), self.rtol)
                else:
                    ok = ok and close_enough(s1, t.detach(), self.rtol)
            if ok:
                # Keep the graph's update, as every later step will: a run then
                # does not depend on the step at which a graph was made (a
                # resumed one is the same as one never stopped).
                with torch.no_grad():
                    torch._foreach_copy_(tensors, stepped)
        if not ok:
            self._disable(mismatch(graph.seeded, "loss, gradients or Adam update"))
        return loss


def _trainable_indices(wanted: list[bool]) -> list[int]:
    return [i for i, w in enumerate(wanted) if w]


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


def loss_fallback(elbo: Any, model: Any, guide: Any) -> str | None:
    """Why the cached :class:`CompiledLoss` of ``(elbo, model, guide)`` gave way
    to the eager path for good (None: it did not, or none was made)."""
    entry = _LOSS_CACHE.get(elbo, {}).get((id(model), id(guide)))
    if entry is None or entry.model is not model or entry.guide is not guide:
        return None
    return entry.fallback
