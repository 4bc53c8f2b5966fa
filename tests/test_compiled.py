"""The compiled path gives the eager loss and gradients, and falls back cleanly.

Most tests run the traced aten graph without compiling it (``backend=None``): it
checks the tracing, the lifted noise and the gradients in well under a second.
The ones through inductor take tens of seconds each on a 2-core CPU and run only
with ``PYRO_IWAE_SLOW_TESTS=1``::

    PYRO_IWAE_SLOW_TESTS=1 python -m pytest tests/test_compiled.py
"""

from __future__ import annotations

import enum
import functools
import json
import math
import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from pyro_iwae import (
    CIWELBO,
    IWELBO,
    MIWELBO,
    PIWELBO,
    ParticleBroadcastError,
    fit,
    paper_architecture,
    sbn_architecture,
)
from pyro_iwae.compiled import (
    CompiledLogLikelihood,
    CompiledLoss,
    CompileFallbackWarning,
    cached_log_likelihood,
    compile_seconds,
    compiled_loss,
    seeded_ops,
)
from pyro_iwae.compiled.capture import call_signature, call_tensors, named_tensors
from pyro_iwae.compiled.rewrites import (
    bernoulli_log_prob_sum,
    cheaper_tanh,
    exp_tanh,
    group_bernoulli_sums,
)
from pyro_iwae.infer.diagnostics import log_likelihood_with_diagnostics
from pyro_iwae.infer.evaluation import log_likelihood
from pyro_iwae.runs.checkpoints import read_metrics
from pyro_iwae.runs.config import RunConfig
from pyro_iwae.runs.run import evaluate_run, read_estimates, train_run
from pyro_iwae.runs.schedules import ConfigError

X_DIM = 12
# A fallback to the eager path fails the test unless the test expects it (with
# pytest.warns): a compiled-against-eager comparison must compare the compiled
# path's numbers, not two eager runs whose random streams a fallback shifted.
pytestmark = pytest.mark.filterwarnings(
    "error::pyro_iwae.compiled.CompileFallbackWarning"
)
slow = pytest.mark.skipif(
    not os.environ.get("PYRO_IWAE_SLOW_TESTS"),
    reason="compiles with inductor (tens of seconds); set PYRO_IWAE_SLOW_TESTS=1",
)

OBJECTIVES = {
    "iwae": lambda: IWELBO(4, "iwae"),
    "stl": lambda: IWELBO(4, "stl"),
    "dreg": lambda: IWELBO(4, "dreg"),
    "miwae-dreg": lambda: MIWELBO(2, 2, estimator="dreg"),
    "piwae": lambda: PIWELBO(2, 2),
    "piwae-dreg": lambda: PIWELBO(2, 2, estimator="dreg"),
    "ciwae-dreg": lambda: CIWELBO(4, 0.3, estimator="dreg"),
}


def _data(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, X_DIM, generator=g) < 0.4).float()


def _loss_and_grads(fn, params, seed: int, *args):
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    loss = fn(*args)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def _assert_same(compiled, eager, params, x, rtol=1e-5, seed=3):
    loss_c, grads_c = _loss_and_grads(compiled, params, seed, x)
    loss_e, grads_e = _loss_and_grads(eager, params, seed, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=0)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def _assert_eager_estimates(ll, model, guide, x, num_samples, chunk_size, tol):
    """``ll`` gives ``log_likelihood``'s estimates from the same seed."""
    torch.manual_seed(7)
    ours = ll(x, num_samples=num_samples, chunk_size=chunk_size)
    torch.manual_seed(7)
    eager = log_likelihood(
        model, guide, x, num_samples=num_samples, chunk_size=chunk_size
    )
    torch.testing.assert_close(ours, eager, rtol=tol[0], atol=tol[1])
    return eager


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("layers", [1, 2])
def test_same_loss_and_gradients_as_eager(name, layers):
    if layers == 2 and name not in ("iwae", "dreg", "piwae-dreg"):
        pytest.skip("two layers: one case per path")
    torch.manual_seed(0)
    model, guide = paper_architecture(layers, x_dim=X_DIM)
    elbo = OBJECTIVES[name]()
    compiled = CompiledLoss(elbo, model, guide, backend=None)
    params = [*model.parameters(), *guide.parameters()]
    x = _data()
    # The first call traces and verifies; the second runs the graph alone.
    for seed in (3, 4):
        _assert_same(
            compiled,
            lambda x: elbo.differentiable_loss(model, guide, x),
            params,
            x,
            seed=seed,
        )
    assert compiled.compiled


def _assert_same_tensors(trained, reference, rtol=1e-5):
    """Each tensor of ``trained`` is its ``reference`` to rounding, in norm: the
    graph rounds otherwise than the eager ops (fused sums, the cheaper
    log-densities and tanh of :mod:`pyro_iwae.compiled.rewrites`), and after a
    few Adam steps a gradient near zero can carry that to one element's third
    digit; a wrong update or gradient moves the whole tensor."""
    assert len(trained) == len(reference)
    for a, b in zip(trained, reference, strict=True):
        assert a.shape == b.shape
        gap, size = (a - b).norm().item(), b.norm().item()
        assert gap <= rtol * size + 1e-7, (gap, size)


def _initial_states() -> list[dict]:
    """The state dicts of a seeded paper model and guide."""
    torch.manual_seed(0)
    return [m.state_dict() for m in paper_architecture(1, x_dim=X_DIM)]


def _paper_pair(init: list[dict]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The paper's model and guide with the state dicts ``init``."""
    pair = paper_architecture(1, x_dim=X_DIM)
    for module, state in zip(pair, init, strict=True):
        module.load_state_dict(state)
    return pair


def test_adam_steps_follow_the_eager_ones():
    init = _initial_states()
    x = _data(4)
    trained = []
    for use_compiled in (True, False):
        model, guide = _paper_pair(init)
        elbo = IWELBO(3, "dreg")
        compiled = CompiledLoss(elbo, model, guide, backend=None)
        loss_fn = compiled if use_compiled else compiled.eager
        optim = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-2)
        torch.manual_seed(5)
        for _ in range(3):
            optim.zero_grad(set_to_none=True)
            (loss_fn(x) / x.shape[0]).backward()
            optim.step()
        trained.append([*model.state_dict().values(), *guide.state_dict().values()])
        assert compiled.compiled
    _assert_same_tensors(*trained)


def _eager_step(elbo, model, guide, optim, x, scale):
    optim.zero_grad(set_to_none=True)
    loss = elbo.differentiable_loss(model, guide, x) * scale
    loss.backward()
    optim.step()
    return loss.detach()


OPTIMIZERS = {
    # The update inside the graph.
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-4),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-4, fused=True),
    # Stepped eagerly after the graph.
    "adam-decay": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_training_steps_follow_the_eager_ones(name):
    """CompiledLoss.step: the scaled loss, the gradients in .grad, the parameters
    and the optimiser's state after each step are the eager step's, also after
    the learning rate changes; Adam's update joins the graph where it can."""
    _assert_steps_follow_the_eager_ones(name, backend=None)


@slow
def test_inductor_training_steps_follow_the_eager_ones():
    _assert_steps_follow_the_eager_ones("adam-fused", backend="inductor")


def _assert_steps_follow_the_eager_ones(name, backend):
    init = _initial_states()
    x = _data(4)
    runs = []
    for use_compiled in (True, False):
        model, guide = _paper_pair(init)
        params = [*model.parameters(), *guide.parameters()]
        elbo = IWELBO(3, "dreg")
        compiled = CompiledLoss(elbo, model, guide, backend=backend)
        optim = OPTIMIZERS[name](params)
        torch.manual_seed(5)
        losses = []
        for step in range(4):
            if step == 2:  # a schedule's next stage
                optim.param_groups[0]["lr"] = 3e-3
            if use_compiled:
                losses.append(compiled.step(optim, x, scale=1 / 4))
            else:
                losses.append(_eager_step(elbo, model, guide, optim, x, 1 / 4))
        states = [t for s in optim.state.values() for t in s.values()]
        runs.append((torch.stack(losses), params, [p.grad for p in params], states))
        if use_compiled:
            assert compiled.compiled
            (graph,) = compiled._graphs.values()
            assert (graph.adam is not None) == (name in ("adam", "adam-fused"))
    start = [*init[0].values(), *init[1].values()]
    moved = [(p - s).abs().max() for p, s in zip(runs[1][1], start, strict=True)]
    assert min(moved) > 1e-4  # every parameter trained
    (loss_c, *compiled_run), (loss_e, *eager_run) = runs
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=0)
    for tensors_c, tensors_e in zip(compiled_run, eager_run, strict=True):
        _assert_same_tensors(tensors_c, tensors_e, rtol=1e-4)


def test_the_update_check_allows_for_the_rounding_of_large_parameters():
    """A step of 1e-3 on an output bias of logit(1e-3) ~ -6.9 is rounded to a few
    ulps of the bias, 5e-4 of the step: the first step's check of the graph's
    update must not mistake that for a wrong update (as it did for the paper
    model on MNIST) and must stay compiled."""
    torch.manual_seed(0)
    x_dim = 784
    model, guide = paper_architecture(1, x_dim=x_dim)
    model.set_output_bias(torch.full((x_dim,), 1e-4))
    compiled = CompiledLoss(IWELBO(3), model, guide, backend=None)
    params = [*model.parameters(), *guide.parameters()]
    optim = torch.optim.Adam(params, lr=1e-3, eps=1e-4, fused=True)
    bias = model.pixels[-1].bias
    before = bias.detach().clone()
    x = torch.rand(4, x_dim, generator=torch.Generator().manual_seed(1)) < 0.1
    for _ in range(3):
        compiled.step(optim, x.float(), scale=1 / 4)
    assert compiled.compiled
    assert (bias - before).abs().max() > 1e-3  # it trained


def _stepping_pair(init):
    """IWELBO(3), a paper pair from ``init``, its uncompiled step graph and an
    Adam, and the random stream seeded: for a compiled and an eager run alike."""
    model, guide = _paper_pair(init)
    elbo = IWELBO(3)
    compiled = CompiledLoss(elbo, model, guide, backend=None)
    optim = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=1e-2)
    torch.manual_seed(5)
    return elbo, model, guide, compiled, optim


def test_a_wrong_update_in_the_graph_falls_back_to_the_eager_step(monkeypatch):
    """The first step of a graph checks its Adam update against torch's: one
    without the bias corrections (a step 1 / (1 - 0.9) times too small) is
    refused, and the step taken is torch's."""
    import pyro_iwae.compiled.loss as compiled_module
    from pyro_iwae.compiled.adam import adam_update

    def uncorrected(settings, lr, params, grads, state):
        adam_update(settings, lr * (1 - settings.beta1), params, grads, state)

    monkeypatch.setattr(compiled_module, "adam_update", uncorrected)
    init = _initial_states()
    x = _data(4)
    runs = []
    for use_compiled in (True, False):
        elbo, model, guide, compiled, optim = _stepping_pair(init)
        for step in range(2):
            if use_compiled and step == 0:
                with pytest.warns(CompileFallbackWarning, match="Adam update"):
                    compiled.step(optim, x, scale=1 / 4)
                assert not compiled.compiled
            elif use_compiled:
                compiled.step(optim, x, scale=1 / 4)  # eagerly now
            else:
                _eager_step(elbo, model, guide, optim, x, 1 / 4)
        runs.append([*model.state_dict().values(), *guide.state_dict().values()])
    # Adam's eps of 1e-8 lets the rounding of a near-zero gradient decide a
    # whole step of that element; an uncorrected update is off by tenths of a
    # tensor's norm.
    _assert_same_tensors(*runs, rtol=1e-4)


def test_fit_with_a_compiled_objective_trains_as_the_eager_one():
    """fit's steps through CompiledLoss.step (the last mini-batch of another
    size gets its own graph) give the eager run's losses and parameters."""
    from pyro_iwae import fit

    init = _initial_states()
    data = _data(10)
    runs = []
    for compile in (None, False):
        model, guide = _paper_pair(init)
        elbo = IWELBO(3, compile=compile)
        history = fit(
            model, guide, data, elbo, schedule=[(2, 1e-2)], batch_size=4, test_size=0
        )
        if compile is not False:
            loss_fn = compiled_loss(elbo, model, guide)
            assert loss_fn.compiled and len(loss_fn._graphs) == 2
            assert all(g.adam is not None for g in loss_fn._graphs.values())
        losses = [epoch["train_bound"] for epoch in history]
        runs.append((losses, [*model.state_dict().values()]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*not registered in the param store")
def test_frozen_parameters_get_no_backward_pass_compiled_or_eager(monkeypatch):
    """With no parameter that needs a gradient, the compiled loss_and_grads
    returns the eager loss without a backward pass (as IWELBO's does), and
    keeps its compiled path for when the parameters thaw."""
    model, guide = paper_architecture(1, x_dim=X_DIM)
    params = [*model.parameters(), *guide.parameters()]
    for p in params:
        p.requires_grad_(False)
    x = _data()
    backward_calls = []
    backward = torch.Tensor.backward

    def counting_backward(self, *args, **kwargs):
        backward_calls.append(self)
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    torch.manual_seed(0)
    eager = IWELBO(4).loss_and_grads(model, guide, x)
    compiled = CompiledLoss(IWELBO(4), model, guide, backend=None)
    torch.manual_seed(0)
    assert compiled.loss_and_grads(x) == pytest.approx(eager, rel=1e-6)
    torch.manual_seed(0)
    option = IWELBO(4, compile=None).loss_and_grads(model, guide, x)
    assert option == pytest.approx(eager, rel=1e-6)
    assert backward_calls == [] and all(p.grad is None for p in params)
    assert compiled.compiled
    for p in params:
        p.requires_grad_(True)
    compiled.loss_and_grads(x)
    assert compiled.compiled and len(backward_calls) == 1


@pytest.mark.filterwarnings("ignore:.*not registered in the param store")
@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
def test_a_step_with_frozen_parameters_updates_nothing(optimizer):
    """With no parameter that needs a gradient, step returns the eager loss
    (scaled), without a fallback or an update, even of a stale .grad, and keeps
    its compiled path for when the parameters thaw."""
    model, guide = paper_architecture(1, x_dim=X_DIM)
    params = [*model.parameters(), *guide.parameters()]
    for p in params:
        p.requires_grad_(False)
    params[0].grad = torch.ones_like(params[0])  # left from before the freeze
    before = [p.clone() for p in params]
    optim = optimizer(params, lr=0.1)
    x = _data()
    torch.manual_seed(0)
    eager = IWELBO(4).loss(model, guide, x)
    compiled = CompiledLoss(IWELBO(4), model, guide, backend=None)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        loss = compiled.step(optim, x, scale=0.5)
    assert loss.item() == pytest.approx(0.5 * eager, rel=1e-6)
    assert not loss.requires_grad and compiled.compiled
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)
    for p in params:
        p.requires_grad_(True)
    compiled.step(optim, x)
    assert compiled.compiled and params[0].grad is not None


def test_pyro_svi_steps_with_the_compiled_loss_follow_the_eager_ones():
    # SVI optimises the parameters whose pyro.param sites it sees; the compiled
    # graph skips the program that makes them, so it must announce them.
    _svi_steps_follow_the_eager_ones(clear_after=None)


def test_pyro_svi_trains_on_after_the_param_store_is_cleared():
    # The graph skips the pyro.module calls that register the parameters: after
    # clear_param_store() nothing announced them, and SVI's compiled steps left
    # the parameters as they were, with plausible losses and no word.
    _svi_steps_follow_the_eager_ones(clear_after=1)  # a notebook's cell run again


def _svi_steps_follow_the_eager_ones(clear_after):
    """Four SVI steps with the compiled IWELBO and with the eager one, the param
    store cleared after step ``clear_after`` (None: never): the same parameters,
    moved by the steps after the clear."""
    init = _initial_states()
    x = _data(4)
    trained = []
    for compile in (None, False):
        pyro.clear_param_store()
        model, guide = _paper_pair(init)
        elbo = IWELBO(3, compile=compile)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        torch.manual_seed(5)
        for step in range(4):
            if step in (0, clear_after):
                pyro.clear_param_store()
                before = [t.clone() for t in _state(model, guide)]
            svi.step(x)
        if compile is not False and clear_after is None:
            assert compiled_loss(elbo, model, guide).compiled
        trained.append(_state(model, guide))
        moved = [(a - b).abs().max() for a, b in zip(trained[-1], before, strict=True)]
        assert max(moved) > 1e-3  # the steps (after the clear) did train
    _assert_same_tensors(*trained)
    pyro.clear_param_store()


def _state(model, guide):
    return [*model.state_dict().values(), *guide.state_dict().values()]


def test_a_pyro_optimiser_given_to_step_is_refused_in_one_line():
    # It failed on "'JointOptim' object has no attribute 'zero_grad'".
    from pyro_iwae.optim import Adam

    model, guide = paper_architecture(1, x_dim=X_DIM)
    compiled = CompiledLoss(IWELBO(2), model, guide, backend=None)
    with pytest.raises(TypeError) as refused:
        compiled.step(Adam({"lr": 0.01}), _data(2))
    assert str(refused.value) == (
        "step takes a torch.optim.Optimizer, got JointOptim; a Pyro optimiser "
        "(pyro.optim, JointOptim) is for pyro.infer.SVI"
    )


def test_each_input_shape_gets_its_own_graph_up_to_a_limit():
    model, guide = paper_architecture(1, x_dim=X_DIM)
    compiled = CompiledLoss(IWELBO(2), model, guide, backend=None, max_signatures=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(_data(3))
        compiled(_data(2))
        compiled(_data(3))
    with pytest.warns(CompileFallbackWarning, match="more than 2 input shapes"):
        loss = compiled(_data(4))
    assert loss.requires_grad and not compiled.compiled


class _BranchingGuide(torch.nn.Module):
    """Data-dependent control flow: cannot be one static graph."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = torch.nn.Linear(X_DIM, 2)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = self.loc(x)
            if loc.sum() > 0:
                loc = -loc
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


class _AlternatingGuide(_BranchingGuide):
    """Structure that changes from call to call with the same shapes."""

    calls = 0

    def forward(self, x):
        _AlternatingGuide.calls += 1
        with pyro.plate("data", x.shape[0]):
            scale = 1.0 if self.calls % 2 else 2.0
            pyro.sample("z", dist.Normal(self.loc(x), scale).to_event(1))


class _SmallModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(2, X_DIM)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.out(z)).to_event(1), obs=x)


def _param_guide(x):
    loc = pyro.param("loc", torch.zeros(2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


class _ParamGuide(torch.nn.Module):
    def forward(self, x):
        _param_guide(x)


class _TorchNormalGuide(torch.nn.Module):
    """A guide as Pyro users write it: torch's ``Normal``, whose ``rsample`` fills
    a fresh tensor in place (``empty(shape).normal_()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = torch.nn.Linear(X_DIM, 2)
        self.log_scale = torch.nn.Linear(X_DIM, 2)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            scale = self.log_scale(x).exp()
            pyro.sample("z", dist.Normal(self.loc(x), scale).to_event(1))


def test_every_random_draw_is_lifted_out_of_the_graph():
    """torch.distributions' in-place fills leave the graph as ``randn`` does, so a
    compiled backend cannot draw noise of its own: the compiled loss and
    log-likelihood see the eager draws."""
    torch.manual_seed(0)
    model, guide = _SmallModel(), _TorchNormalGuide()
    x = _data()
    elbo = IWELBO(3, "dreg")
    loss = CompiledLoss(elbo, model, guide, backend=None)
    params = [*model.parameters(), *guide.parameters()]
    _assert_same(loss, lambda x: elbo.differentiable_loss(model, guide, x), params, x)
    ll = CompiledLogLikelihood(model, guide, backend=None)
    torch.manual_seed(7)
    ours = ll(x, num_samples=8, chunk_size=4)
    torch.manual_seed(7)
    eager = log_likelihood(model, guide, x, num_samples=8, chunk_size=4)
    torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-5)
    graphs = [(g.fn.graph, g.noise_ops) for g in loss._graphs.values()]
    graphs += [(g.fn.graph, g.noise_ops) for g in ll._graphs.values()]
    assert len(graphs) == 2 and loss.compiled and ll.compiled
    for graph, noise_ops in graphs:
        assert not seeded_ops(graph) and len(noise_ops) == 1


def test_draws_from_computed_tensors_fall_back_before_compiling():
    """A Bernoulli guide (the SBN's, for VIMCO) draws from probabilities the graph
    computes: refused after tracing, with a warning that says why, and without
    spending the compile time."""
    model, guide = sbn_architecture(1, x_dim=X_DIM)
    compiled = CompiledLoss(IWELBO(3, estimator="vimco"), model, guide)
    before = compile_seconds()
    with pytest.warns(CompileFallbackWarning, match="with tensor arguments"):
        loss = compiled(_data())
    assert not compiled.compiled and loss.requires_grad
    assert compile_seconds() - before < 5  # traced (< 1 s), not compiled (> 10 s)


class _RegisteringGuide(_TorchNormalGuide):
    """Registers itself with pyro.module at every call, as Pyro's examples do."""

    def forward(self, x):
        pyro.module("guide", self)
        super().forward(x)


@pytest.mark.parametrize(
    "guide, message",
    [
        (_BranchingGuide(), "cannot trace the program as a static graph"),
        (_AlternatingGuide(), "differ from the eager ones"),
        (_ParamGuide(), "neither a parameter of the model or guide module"),
        (_param_guide, "must both be nn.Modules"),
        (_RegisteringGuide(), r"call pyro.module only where .*module_local_params"),
    ],
    ids=["data-dependent", "changing", "pyro.param", "function", "pyro.module"],
)
def test_programs_that_cannot_be_compiled_fall_back_with_a_warning(guide, message):
    model = _SmallModel()
    elbo = IWELBO(3)
    with pytest.warns(CompileFallbackWarning, match=message) as record:
        compiled = CompiledLoss(elbo, model, guide, backend=None)
        loss = compiled(_data())
    assert len(record) == 1
    assert not compiled.compiled
    loss.backward()  # the eager loss, differentiable as ever
    assert model.out.weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(_data())  # warns once only


@pytest.mark.parametrize("option", ["on", "inductr", 1])
def test_a_compile_option_that_names_no_backend_is_refused_in_one_line(option):
    """A typo (or the command line's "on") is not taken for a backend whose
    failure would read as a program that cannot be traced."""
    model, guide = _paper_pair(_initial_states())
    expected = rf"compile={option!r} is not a compile option; pass True"
    with pytest.raises(ValueError, match=expected):
        IWELBO(3, compile=option)
    with pytest.raises(ValueError, match=expected):
        log_likelihood(model, guide, _data(), num_samples=4, compile=option)
    for option in (True, False, None, "auto", "aot_eager", "inductor"):
        assert IWELBO(3, compile=option).compile == option


def test_log_likelihood_matches_eager_when_the_chunk_divides_k():
    torch.manual_seed(0)
    model, guide = paper_architecture(1, x_dim=X_DIM)
    x = _data(4)
    ll = CompiledLogLikelihood(model, guide, backend=None)
    for _ in range(2):
        eager = _assert_eager_estimates(ll, model, guide, x, 60, 20, (1e-6, 1e-5))
    # A partial last chunk is masked: a valid estimate from the same graph.
    partial = ll(x, num_samples=50, chunk_size=20)
    assert partial.shape == (4,) and torch.isfinite(partial).all()
    assert (partial - eager).abs().max() < 1.0
    assert len(ll._graphs) == 1 and ll.compiled


class _SettingModel(torch.nn.Module):
    """A latent whose size is a setting a user may change between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(3, X_DIM)
        self.latent_dim = 2

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
            )
            z = F.pad(z, (0, 3 - self.latent_dim))
            pyro.sample("x", dist.Bernoulli(logits=self.out(z)).to_event(1), obs=x)


class _SettingGuide(torch.nn.Module):
    def __init__(self, model: _SettingModel) -> None:
        super().__init__()
        self.loc = torch.nn.Linear(X_DIM, 3)
        self.setting = [model]  # not a submodule: its parameters are the model's

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = self.loc(x)[..., : self.setting[0].latent_dim]
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def test_log_likelihood_gets_a_graph_per_program_structure():
    """A latent's size changed between calls (same input shapes) gets a graph of
    its own: the estimate is the new program's, not the first graph's."""
    torch.manual_seed(0)
    model = _SettingModel()
    guide = _SettingGuide(model)
    x = _data(4)
    ll = CompiledLogLikelihood(model, guide, backend=None)
    for latent_dim in (2, 3, 2):
        model.latent_dim = latent_dim
        _assert_eager_estimates(ll, model, guide, x, 40, 20, (1e-6, 1e-5))
    assert len(ll._graphs) == 2 and ll.compiled


def test_log_likelihood_falls_back_when_the_structure_changes_within_a_call():
    """A program that differs from run to run (a scale that alternates) is caught
    by the first chunk's check against eager, as the compiled loss is."""
    model = _SmallModel()
    ll = CompiledLogLikelihood(model, _AlternatingGuide(), backend=None)
    with pytest.warns(CompileFallbackWarning, match="differ from the eager ones"):
        estimate = ll(_data(4), num_samples=40, chunk_size=20)
    assert not ll.compiled and estimate.shape == (4,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll(_data(4), num_samples=40, chunk_size=20)  # warns once only


def _fails_on_its_first_call(*args, **kwargs):
    """A compile_graph whose graph, compiled lazily, fails when first called."""

    def fn(*inputs):
        raise RuntimeError("C++ compile error: Python.h: No such file")

    return fn


def test_log_likelihood_falls_back_when_the_graph_does_not_compile(monkeypatch):
    """A graph compiled lazily (torch.compile with another backend or options)
    compiles on its first call: a failure there falls back to the eager
    estimates with one warning (inductor's direct compile fails when the graph
    is built, where the program's trace fails too)."""
    from pyro_iwae.compiled import log_likelihood as compiled_ll

    monkeypatch.setattr(compiled_ll, "compile_graph", _fails_on_its_first_call)
    model, guide = _SmallModel(), _TorchNormalGuide()
    ll = CompiledLogLikelihood(model, guide, backend=None)
    x = _data(4)
    with pytest.warns(CompileFallbackWarning, match="did not compile.*Python.h"):
        _assert_eager_estimates(ll, model, guide, x, 40, 20, (1e-12, 1e-12))
    assert not ll.compiled


def _never_close(*args, **kwargs):
    return False


def test_a_loss_that_falls_back_on_its_first_call_draws_the_eager_noise(monkeypatch):
    # The check's compiled run had drawn the noise, and the eager loss that
    # followed drew anew: another value than eager's from the same seed.
    import pyro_iwae.compiled.loss as compiled_module

    monkeypatch.setattr(compiled_module, "close_enough", _never_close)
    model, guide = _SmallModel(), _TorchNormalGuide()
    elbo = IWELBO(3)
    compiled = CompiledLoss(elbo, model, guide, backend=None)
    x = _data()
    runs = []
    for loss in (compiled, lambda x: elbo.differentiable_loss(model, guide, x)):
        torch.manual_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompileFallbackWarning)
            runs.append((loss(x).detach(), torch.rand(3)))  # and the stream after
    assert not compiled.compiled
    for ours, eager in zip(*runs, strict=True):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


def test_a_step_whose_graph_fails_on_its_first_call_draws_the_eager_noise(
    monkeypatch,
):
    # The graph's noise was drawn before it failed; the eager step drew anew.
    import pyro_iwae.compiled.loss as compiled_module

    monkeypatch.setattr(compiled_module, "compile_graph", _fails_on_its_first_call)
    init = _initial_states()
    x = _data(4)
    runs = []
    for use_compiled in (True, False):
        elbo, model, guide, compiled, optim = _stepping_pair(init)
        if use_compiled:
            with pytest.warns(CompileFallbackWarning, match="did not compile"):
                loss = compiled.step(optim, x, scale=1 / 4)
        else:
            loss = _eager_step(elbo, model, guide, optim, x, 1 / 4)
        runs.append([loss, *model.state_dict().values(), torch.rand(3)])
    for ours, eager in zip(*runs, strict=True):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


def test_log_likelihood_that_falls_back_on_a_mismatch_gives_the_eager_estimates(
    monkeypatch,
):
    # The first chunk's check drew its eager noise, and the eager estimates that
    # followed drew anew: other estimates than eager's from the same seed.
    from pyro_iwae.compiled import log_likelihood as compiled_ll

    monkeypatch.setattr(compiled_ll, "close_enough", _never_close)
    model, guide = _SmallModel(), _TorchNormalGuide()
    ll = CompiledLogLikelihood(model, guide, backend=None)
    with pytest.warns(CompileFallbackWarning, match="differ from the eager ones"):
        _assert_eager_estimates(ll, model, guide, _data(4), 40, 20, (0, 0))
    assert not ll.compiled


class _GuideOfThreeLatents(_TorchNormalGuide):
    """z of size 3 where the model's has size 2: the model's decoder fails."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = torch.nn.Linear(X_DIM, 3)
        self.log_scale = torch.nn.Linear(X_DIM, 3)


class _OneParticleModel(_SmallModel):
    """Runs with one particle only: it reshapes z to ``[batch, 2]``."""

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            logits = self.out(z.reshape(x.shape[0], 2))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def test_a_failing_program_prints_no_torch_internals(capfd):
    """A model and guide that do not fit raise their own error, as eagerly, with
    no log of torch's tracing before it (nor a fallback warning: the program is
    wrong, not the compiled path); one that fails only in the traced graph
    falls back with one warning, and raises eagerly, also without that log."""
    ll = CompiledLogLikelihood(_SmallModel(), _GuideOfThreeLatents(), backend=None)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        ll(_data(4), num_samples=10, chunk_size=5)
    ll = CompiledLogLikelihood(_OneParticleModel(), _TorchNormalGuide(), backend=None)
    with (
        pytest.warns(CompileFallbackWarning, match="cannot trace"),
        pytest.raises(ParticleBroadcastError, match=r"invalid for input of size 40\)"),
    ):
        ll(_data(4), num_samples=10, chunk_size=5)
    err = capfd.readouterr().err
    assert "fake_tensor" not in err and "Traceback" not in err


class _FlowGuide(_TorchNormalGuide):
    """A Gaussian, then an inverse autoregressive flow whose inverse (stl and dreg
    take log q through it) assigns by a tensor index: data-dependent."""

    def __init__(self) -> None:
        super().__init__()
        self.flow = dist.transforms.affine_autoregressive(2, [4], stable=True)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(self.loc(x), self.log_scale(x).exp())
            flowed = dist.TransformedDistribution(base.to_event(1), [self.flow])
            pyro.sample("z", flowed)


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_a_flow_whose_inverse_cannot_be_traced_falls_back_for_that_reason(estimator):
    # Was "fails under vectorize_particles=True but runs without it ... must
    # broadcast": the eager check behind that runs no inverse, and eagerly.
    model, guide = _SmallModel(), _FlowGuide()
    elbo = IWELBO(4, estimator, compile=True)
    x = _data(3)
    with pytest.warns(CompileFallbackWarning) as caught:
        torch.manual_seed(3)
        loss = elbo.differentiable_loss(model, guide, x)
    (message,) = [str(w.message) for w in caught]
    assert "cannot trace the program as a static graph: it takes a data-dependent" in (
        message
    )
    assert "GuardOnDataDependentSymNode: Could not" in message
    assert "broadcast" not in message and "vectorize_particles" not in message
    torch.manual_seed(3)
    eager = IWELBO(4, estimator).differentiable_loss(model, guide, x)
    torch.testing.assert_close(loss, eager, rtol=0, atol=0)


class _PyroModuleGuide(pyro.nn.PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.loc = pyro.nn.PyroModule[torch.nn.Linear](X_DIM, 2)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.loc(x), 1.0).to_event(1))


def test_a_pyro_module_falls_back_for_the_readmes_reason():
    model = _SmallModel()
    message = "PyroModule's parameters go through pyro.param"
    with pytest.warns(CompileFallbackWarning, match=message) as record:
        CompiledLoss(IWELBO(3), model, _PyroModuleGuide(), backend=None)(_data())
        ll = CompiledLogLikelihood(model, _PyroModuleGuide(), backend=None)
        ll(_data(), num_samples=4)
    assert len(record) == 2 and "Error" not in str(record[0].message)


def test_log_likelihood_and_diagnostics_take_the_compiled_path():
    torch.manual_seed(0)
    model, guide = paper_architecture(1, x_dim=X_DIM)
    x = _data(4)
    torch.manual_seed(7)
    eager = log_likelihood_with_diagnostics(model, guide, x, num_samples=60)
    torch.manual_seed(7)
    traced = log_likelihood_with_diagnostics(
        model, guide, x, num_samples=60, compile=None
    )
    for name, a, b in zip(eager._fields, traced, eager, strict=True):
        # k-hat, a fit to the largest weights, magnifies their float32 rounding.
        atol = 1e-4 if name == "khat" else 1e-5
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)
    ll = cached_log_likelihood(model, guide, None)
    assert list(ll._graphs) and ll.compiled  # it ran there
    torch.manual_seed(7)
    estimate = log_likelihood(model, guide, x, num_samples=60, compile=None)
    torch.testing.assert_close(estimate, eager.log_likelihood, rtol=1e-6, atol=1e-5)


def test_eval_run_compiled_gives_the_eager_estimates(tmp_path):
    config = RunConfig(
        train_limit=100, test_limit=20, batch_size=50, num_particles=2, epochs=1
    )
    train_run(config, tmp_path)
    options = dict(num_samples=40, chunk_size=20, limit=30, batch_size=20)
    eager = evaluate_run(tmp_path, **options)
    eager_estimates = read_estimates(tmp_path, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # no eager fallback
        traced = evaluate_run(tmp_path, compile=None, **options)
    torch.testing.assert_close(
        read_estimates(tmp_path, traced), eager_estimates, rtol=1e-6, atol=1e-4
    )
    assert traced["diagnostics"] == pytest.approx(eager["diagnostics"], rel=1e-4)
    # The time spent tracing (here; compiling with inductor) is reported apart.
    assert eager["compile_time"] == 0 < traced["compile_time"] < traced["time"]


@slow
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_inductor_gives_the_eager_loss_and_gradients(estimator):
    torch.manual_seed(0)
    model, guide = paper_architecture(1, x_dim=X_DIM)
    elbo = IWELBO(4, estimator)
    compiled = CompiledLoss(elbo, model, guide)
    params = [*model.parameters(), *guide.parameters()]
    for seed in (3, 4):
        _assert_same(
            compiled,
            lambda x: elbo.differentiable_loss(model, guide, x),
            params,
            _data(),
            rtol=1e-4,
            seed=seed,
        )
    assert compiled.compiled


@slow
def test_inductor_keeps_the_draws_of_a_torch_distributions_guide():
    torch.manual_seed(0)
    model, guide = _SmallModel(), _TorchNormalGuide()
    elbo = IWELBO(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        compiled = CompiledLoss(elbo, model, guide)
        params = [*model.parameters(), *guide.parameters()]
        eager = lambda x: elbo.differentiable_loss(model, guide, x)  # noqa: E731
        _assert_same(compiled, eager, params, _data(), rtol=1e-4)
    assert compiled.compiled


@slow
def test_a_second_compile_of_the_same_graph_hits_inductors_cache():
    """The graphs carry a shape environment, so inductor's on-disk FX graph cache
    serves a later process (or object) the same compiled code; and they hold only
    aten ops (the rewrites inlined), so AOT autograd's cache serves them too."""
    from torch._dynamo.utils import counters

    bypassed = counters["inductor"]["fxgraph_cache_bypass"]
    aot_bypassed = counters["aot_autograd"]["autograd_cache_bypass"]
    for seed in (0, 1):  # other weights, the same graph
        torch.manual_seed(seed)
        model, guide = paper_architecture(1, x_dim=X_DIM)
        hits = counters["inductor"]["fxgraph_cache_hit"]
        aot_hits = counters["aot_autograd"]["autograd_cache_hit"]
        compiled = CompiledLoss(IWELBO(2), model, guide)
        compiled(_data())
        assert compiled.compiled
    assert counters["inductor"]["fxgraph_cache_hit"] > hits
    assert counters["inductor"]["fxgraph_cache_bypass"] == bypassed
    assert counters["aot_autograd"]["autograd_cache_hit"] > aot_hits
    assert counters["aot_autograd"]["autograd_cache_bypass"] == aot_bypassed


def test_the_isa_shortcut_leaves_a_chosen_isa_to_inductor(monkeypatch):
    """Where a user chose the vector ISA (inductor's config or torch's
    environment variable), inductor's own probes decide, not the shortcut."""
    from torch._inductor import config

    from pyro_iwae.compiled.backend import vec_isa_options

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with config.patch({"cpp.simdlen": 256}):
        assert vec_isa_options() == {}
    with config.patch({"cpp.vec_isa_ok": False}):
        assert vec_isa_options() == {}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert vec_isa_options() == {}


_PICK_ISA = """
import json, sys
from torch._inductor import config, cpu_vec_isa
from pyro_iwae.compiled.backend import vec_isa_options

probed = []
check_build = cpu_vec_isa.VecISA.check_build
def counted(isa, code):
    probed.append((str(isa), isa.build_arch_flags(), code))
    return check_build(isa, code)
cpu_vec_isa.VecISA.check_build = counted
options = vec_isa_options() if sys.argv[1] == "shortcut" else {}
with config.patch(options):
    isa = cpu_vec_isa.pick_vec_isa()
picked = [str(isa), isa.build_arch_flags() if isa else ""]
print(json.dumps({"options": options, "picked": picked, "probes": len(set(probed))}))
"""


def test_the_isa_shortcut_picks_the_isa_inductor_picks():
    """Under vec_isa_options inductor picks the vector ISA it picks after all its
    probes, with the same compiler flags (so the kernels are the same), with
    fewer probe builds, some of them run side by side in threads. In fresh
    processes: inductor keeps its ISA list for the life of a process."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    runs = {}
    for mode in ("shortcut", "all"):
        out = subprocess.run(
            [sys.executable, "-c", _PICK_ISA, mode],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    shortcut, probe_all = runs["shortcut"], runs["all"]
    assert shortcut["picked"] == probe_all["picked"]
    assert shortcut["options"] in ({}, {"cpp.vec_isa_ok": True})
    if shortcut["options"] and probe_all["probes"] > 1:
        assert shortcut["probes"] < probe_all["probes"]
    else:
        assert shortcut["probes"] == probe_all["probes"]


_BASE_FAILS = """
import json
from torch._inductor import cpu_vec_isa
from pyro_iwae.compiled.backend import vec_isa_options

base = cpu_vec_isa.VecISA._avx_code
check_build = cpu_vec_isa.VecISA.check_build
# A compiler that builds the extensions' probes but not the base code.
cpu_vec_isa.VecISA.check_build = lambda isa, code: (
    False if code == base else check_build(isa, code)
)
options = vec_isa_options()
print(json.dumps({"options": options, "valid": len(cpu_vec_isa.valid_vec_isa_list())}))
"""


def test_the_isa_shortcut_forgets_its_checks_where_the_base_probe_fails():
    """The extension checks run next to the base probe, trusting the base code;
    where the base probe then fails, inductor probes as usual and finds no ISA
    (none of its checks is kept from the trusting run)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the shortcut is for x86-64")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run(
        [sys.executable, "-c", _BASE_FAILS],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"options": {}, "valid": 0}


_CPU_KEY = """
from pyro_iwae.compiled.backend import cpu_isa_key, cpu_key_options
(custom,) = cpu_key_options().values()
assert custom.uuid() == cpu_isa_key()
print(cpu_isa_key())
"""


def _above_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() not in ("AVX2", "DEFAULT")


def _last_line(code: str, **env: str) -> str:
    """The last line ``code`` prints, run by a fresh Python with ``env`` added."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not _above_avx2(), reason="needs a CPU above AVX2")
def test_a_process_held_to_avx2_has_another_cache_key():
    """Inductor's on-disk key holds no CPU ISA; the compiled path's options put
    one in, which ATEN_CPU_CAPABILITY (or another machine) changes."""
    keys = {
        capability: _last_line(_CPU_KEY, ATEN_CPU_CAPABILITY=capability)
        for capability in ("", "avx2")
    }
    assert keys[""] != keys["avx2"]
    assert "AVX2" in keys["avx2"].split()


_COMPILE_IN_SHARED_CACHE = f"""
import json, warnings
import torch
from pyro_iwae import IWELBO, paper_architecture
from pyro_iwae.compiled import CompiledLoss, backend

# Each process as on a machine of its own ISA, whose shortcut trusts its CPU.
backend.vec_isa_options = lambda: {{"cpp.vec_isa_ok": True}}
torch.manual_seed(0)
model, guide = paper_architecture(1, x_dim={X_DIM})
x = (torch.rand(3, {X_DIM}, generator=torch.Generator().manual_seed(1)) < 0.4).float()
elbo = IWELBO(2)
with torch.random.fork_rng():
    eager = elbo.differentiable_loss(model, guide, x).item()
with warnings.catch_warnings(record=True):
    warnings.simplefilter("always")
    compiled = CompiledLoss(elbo, model, guide, verify=False)
    loss = compiled(x).item()
print(json.dumps({{"eager": eager, "compiled": loss,
                  "capability": torch.backends.cpu.get_cpu_capability()}}))
"""


@slow
@pytest.mark.skipif(not _above_avx2(), reason="needs a CPU above AVX2")
def test_a_cache_folder_shared_with_a_process_at_another_isa(tmp_path):
    """A process held to AVX2 (as on an AVX2 machine) that shares a cache folder
    with an AVX-512 process computes the loss right. Without the ISA in the key
    it was handed that process's graph, its kernels rebuilt for other vector
    widths, and the loss was wrong (unverified here; else the first call's
    check falls back to eager)."""
    results = [
        json.loads(
            _last_line(
                _COMPILE_IN_SHARED_CACHE,
                ATEN_CPU_CAPABILITY=capability,
                TORCHINDUCTOR_CACHE_DIR=str(tmp_path),
            )
        )
        for capability in ("", "avx2")
    ]
    assert results[1]["capability"] == "AVX2"
    for result in results:
        assert result["compiled"] == pytest.approx(result["eager"], rel=1e-4)


@slow
def test_inputs_of_another_memory_layout_get_their_own_graph():
    """A graph asserts the strides it was compiled for: the same values in
    column-major order get a graph of their own, not a failed assertion."""
    torch.manual_seed(0)
    model, guide = paper_architecture(1, x_dim=X_DIM)
    x = _data(4)
    columns = x.t().contiguous().t()
    ll = CompiledLogLikelihood(model, guide)
    for data in (x, columns):
        _assert_eager_estimates(ll, model, guide, data, 20, 10, (1e-5, 1e-4))
    assert len(ll._graphs) == 2 and ll.compiled


@slow
def test_compiling_a_zoo_guide_says_nothing_a_user_cannot_act_on():
    """The low-rank guide's lowering makes torch warn of its own deprecated
    helper; the compiled path keeps that from the user (and stays compiled)."""
    from pyro_iwae.nn.guides import LowRankGuide

    torch.manual_seed(0)
    model, _ = paper_architecture(1, x_dim=X_DIM)
    guide = LowRankGuide(1, X_DIM)
    ll = CompiledLogLikelihood(model, guide)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ll(_data(4), num_samples=20, chunk_size=10)
    assert ll.compiled
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


@slow
def test_inductor_log_likelihood_matches_eager():
    torch.manual_seed(0)
    model, guide = paper_architecture(1, x_dim=X_DIM)
    x = _data(4)
    ll = CompiledLogLikelihood(model, guide)
    _assert_eager_estimates(ll, model, guide, x, 60, 20, (1e-5, 1e-4))
    assert ll.compiled


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_iwelbo_compile_option_gives_the_eager_loss_and_gradients(estimator):
    """IWELBO(compile=...) routes differentiable_loss, ELBOModule and
    loss_and_grads through the compiled graph (here traced, not compiled)."""
    torch.manual_seed(0)
    model, guide = paper_architecture(1, x_dim=X_DIM)
    eager, traced = IWELBO(4, estimator), IWELBO(4, estimator, compile=None)
    params = [*model.parameters(), *guide.parameters()]
    x = _data()
    _assert_same(traced(model, guide), eager(model, guide), params, x)
    loss_fn = compiled_loss(traced, model, guide)
    assert list(loss_fn._graphs) and loss_fn.compiled  # a graph was made, and ran
    for p in params:
        p.grad = None
    torch.manual_seed(5)
    value = traced.loss_and_grads(model, guide, x)
    grads = [p.grad.clone() for p in params]
    loss, expected = _loss_and_grads(eager(model, guide), params, 5, x)
    assert value == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_compile_is_a_run_setting_of_the_weighted_objectives():
    assert RunConfig(compile=True).make_objective().compile is True
    with pytest.raises(ConfigError, match="compile.*objective"):
        RunConfig(objective="vae", compile=True)


@slow
def test_fit_compile_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from pyro_iwae_cli.main import cli

    args = ["fit", "--train-limit", "200", "--test-limit", "50", "--batch-size"]
    args += ["50", "--particles", "2", "--epochs", "1", "--quiet", "--compile"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output  # compiled, no fallback
    assert RunConfig.load(tmp_path / "run").compile is True
    (metrics,) = read_metrics(tmp_path / "run")
    assert 0 < metrics["compile_time"] < metrics["time"]
    assert "of it compiling" in result.output


@slow
def test_eval_nll_compile_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from pyro_iwae_cli.main import cli

    run = tmp_path / "run"
    args = ["fit", "--train-limit", "200", "--test-limit", "50", "--batch-size"]
    args += ["50", "--particles", "2", "--epochs", "1", "--quiet", "--out", str(run)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    evaluate = ["eval-nll", str(run), "--k", "200", "--chunk-size", "50"]
    evaluate += ["--limit", "60", "--batch-size", "30", "--quiet"]
    eager = CliRunner().invoke(cli, evaluate)
    assert eager.exit_code == 0, eager.output
    evaluation = {"estimates_file": "estimates-test-k200.txt"}
    estimates = read_estimates(run, evaluation)
    result = CliRunner().invoke(cli, [*evaluate, "--compile"])
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output  # compiled, no fallback
    compiled = read_estimates(run, evaluation)
    torch.testing.assert_close(compiled, estimates, rtol=1e-5, atol=1e-3)


def _bce_sum(logits, target):
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_bernoulli_sum_is_the_log_density(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 784, generator=g) * 6
    logits[0, :10] = torch.tensor([-1e4, 1e4, -90, 90, -20, 20, 0, 1e-8, -1e-8, 40])
    binary = (torch.rand(50, 784, generator=g) < 0.3).double()
    grey = torch.rand(50, 784, generator=g).double()
    for target in (binary, grey):
        exact = _bce_sum(logits.double(), target)
        grouped = bernoulli_log_prob_sum(logits.to(dtype), target.to(dtype), 14)
        per_element = _bce_sum(logits.to(dtype), target.to(dtype))
        if dtype == torch.float64:
            torch.testing.assert_close(grouped, exact, rtol=1e-12, atol=1e-9)
        else:  # float32 rounding: a few ulps, as the per-element sum's
            error = (grouped.double() - exact).abs()
            assert (error / exact).max() <= 4 * torch.finfo(torch.float32).eps
            assert error.mean() <= 2 * (per_element.double() - exact).abs().mean()


def test_the_evaluation_graph_takes_the_grouped_bernoulli_sum():
    from torch.fx.experimental.proxy_tensor import make_fx

    logits = torch.randn(3, 5, 784)
    target = (torch.rand(784) < 0.5).float().expand(3, 5, 784)

    def program(logits, target, size):
        logits, pixels = logits[..., :size], target[..., :size]
        rewritten = [  # ours; Pyro's (neg, then a same-shape view, then sum)
            _bce_sum(logits, pixels),
            dist.Bernoulli(logits=logits).to_event(1).log_prob(pixels),
        ]
        kept = [  # summed over another dim, weighted, reduced: not the pattern
            F.binary_cross_entropy_with_logits(logits, pixels, reduction="none")
            .sum(0)
            .sum(),
            F.binary_cross_entropy_with_logits(logits, pixels, weight=pixels),
            F.binary_cross_entropy_with_logits(logits, pixels),
        ]
        return *rewritten, *kept

    aten = torch.ops.aten
    bce = aten.binary_cross_entropy_with_logits.default
    for size, factors in [(784, 14), (12, 12), (17, None)]:
        with pyro.validation_enabled(False):  # validation reads values
            gm = make_fx(functools.partial(program, size=size))(logits, target)
        group_bernoulli_sums(gm)
        # Inlined as aten ops (AOT autograd caches only such graphs): one
        # product over the groups of ``factors`` pixels for each rewritten sum.
        products = [n for n in gm.graph.nodes if n.target is aten.prod.dim_int]
        grouped = [p.args[0].meta["val"].shape[-2] for p in products]
        assert grouped == ([factors] * 2 if factors else [])
        assert sum(n.target is bce for n in gm.graph.nodes) == 5 - len(products)
        assert _only_aten_ops(gm)
        for a, b in zip(gm(logits, target), program(logits, target, size), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cheaper_tanh_is_tanh(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g, dtype=torch.float64) * 4
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-4, 20.0, -20.0, 1e4, math.inf, -math.inf]
    x = torch.cat([x, torch.tensor(special, dtype=torch.float64)])
    ours = exp_tanh(x.to(dtype))
    error = (ours.double() - torch.tanh(x)).abs().max()
    assert error <= 2 * torch.finfo(dtype).eps
    assert torch.equal(ours.signbit(), x.signbit())  # -0.0 stays -0.0
    assert torch.isnan(exp_tanh(torch.tensor([math.nan], dtype=dtype))).all()


def _only_aten_ops(gm) -> bool:
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return all(isinstance(t, torch._ops.OpOverload) for t in calls)


def test_the_rewrites_leave_ops_whose_inputs_have_no_recorded_value():
    """A rewrite traces its replacement from its inputs' recorded values; where
    one is missing (a graph built by hand) it leaves the op as it is."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def program(logits, target):
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return bce.sum(-1), torch.tanh(logits)

    logits, target = torch.randn(3, 12), torch.rand(3, 12).round()
    gm = make_fx(program)(logits, target)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            del node.meta["val"]
    before = [n.target for n in gm.graph.nodes]
    group_bernoulli_sums(gm)
    cheaper_tanh(gm)
    assert [n.target for n in gm.graph.nodes] == before
    for a, b in zip(gm(logits, target), program(logits, target), strict=True):
        torch.testing.assert_close(a, b)


def test_the_evaluation_graph_takes_the_cheaper_tanh():
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(5, 7)
    gm = make_fx(lambda x: torch.tanh(torch.tanh(x) * 2))(x)
    cheaper_tanh(gm)
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.tanh.default not in targets and _only_aten_ops(gm)
    assert targets.count(torch.ops.aten.copysign.Tensor) == 2  # exp_tanh's, inlined
    torch.testing.assert_close(gm(x), torch.tanh(torch.tanh(x) * 2))


@slow
def test_compiling_with_inductor_prints_nothing_a_user_cannot_act_on():
    """On a machine with a CUDA toolkit and no GPU, torch logs "No CUDA runtime is
    found" when inductor first loads its C++ toolchain: the library keeps it
    from the user, not only the command line (a fresh process: the line comes
    once, at that first load)."""
    script = """
import torch
from pyro_iwae import log_likelihood, paper_architecture
model, guide = paper_architecture(1, x_dim=12)
x = (torch.rand(3, 12) < 0.4).float()
log_likelihood(model, guide, x, num_samples=8, chunk_size=4, compile=True)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "No CUDA runtime" not in result.stderr
    assert "Warning" not in result.stderr  # compiled, no fallback


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("how", ["step", "loss"])
def test_a_loss_graph_that_fails_on_its_first_call_falls_back(monkeypatch, verify, how):
    """As the log-likelihood's: a graph compiled lazily that fails on its first
    call gives the eager loss (or step), with one warning, and runs eagerly on."""
    from pyro_iwae.compiled import loss as compiled_loss

    monkeypatch.setattr(compiled_loss, "compile_graph", _fails_on_its_first_call)
    model, guide = _SmallModel(), _TorchNormalGuide()
    compiled = CompiledLoss(IWELBO(3), model, guide, backend=None, verify=verify)
    x = _data(4)
    params = [*model.parameters(), *guide.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    with pytest.warns(CompileFallbackWarning, match="did not compile.*Python.h"):
        if how == "step":
            compiled.step(optimizer, x, scale=0.25)
        else:
            compiled(x).backward()
    assert all(p.grad is not None for p in params)
    assert not compiled.compiled
    pyro.set_rng_seed(3)
    again = compiled(x)
    pyro.set_rng_seed(3)
    assert torch.equal(again, IWELBO(3).differentiable_loss(model, guide, x))


class _Tied(torch.nn.Module):
    """A tree with what torch's own walk takes care of: a submodule reached twice,
    a weight shared by two layers, a parameter slot holding None, buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(3, 3, bias=False)
        self.second = torch.nn.Linear(3, 3)
        self.second.weight = self.first.weight
        self.again = self.first
        self.nested = torch.nn.ModuleDict(
            {"norm": torch.nn.BatchNorm1d(3), "empty": torch.nn.Sequential()}
        )
        self.register_buffer("counts", torch.zeros(2))


def test_named_tensors_are_torchs_parameters_then_buffers():
    for module in (_Tied(), paper_architecture(2, x_dim=X_DIM)[1]):
        ours = named_tensors(module)
        theirs = dict(module.named_parameters())
        theirs.update(module.named_buffers())
        assert list(ours) == list(theirs)
        assert all(ours[name] is theirs[name] for name in theirs)


def test_call_signature_and_tensors_of_a_plain_and_a_nested_call():
    x, y = torch.zeros(2, 3), torch.zeros(2, 3)
    plain = call_signature((x, y), {})
    assert plain == call_signature((y, x), {})  # same layout: the same graph
    assert plain != call_signature((x, y.t().contiguous().t()), {})  # strides
    assert plain != call_signature((x, y.double()), {})
    assert plain != call_signature((x,), {"y": y})  # another structure
    assert call_signature((x, {1, 2}), {}) is None  # an unhashable leaf
    assert call_tensors((x, y), {}) == [x, y]
    assert call_tensors((x, 2.0), {"y": [y]}) == [x, y]


def _traced_pair(model, guide):
    """An IWELBO(3), its traced loss and log-likelihood of ``model`` and
    ``guide`` (no compiler), their parameters, and the eager loss."""
    elbo = IWELBO(3)
    compiled = CompiledLoss(elbo, model, guide, backend=None)
    estimate = CompiledLogLikelihood(model, guide, backend=None)
    params = [*model.parameters(), *guide.parameters()]

    def eager(x):
        return elbo.differentiable_loss(model, guide, x)

    return elbo, compiled, estimate, params, eager


class _DropoutModel(_SmallModel):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            logits = self.out(self.drop(z))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def test_a_graph_fixes_the_modules_modes_and_the_objectives_settings():
    """A change of k, or of a module's train or eval mode, after the first graph
    is another graph (or the eager path), never the old graph's numbers."""
    model, guide = _DropoutModel(), _TorchNormalGuide()
    elbo, compiled, _, params, eager = _traced_pair(model, guide)

    model.eval()
    _assert_same(compiled, eager, params, _data())
    elbo.num_particles = 6
    _assert_same(compiled, eager, params, _data())
    assert len(compiled._graphs) == 2
    model.train()
    with warnings.catch_warnings():
        # Dropout's draws are lifted, or, where a backend keeps them in the
        # graph, the eager path runs: the numbers are dropout's either way.
        warnings.simplefilter("ignore", CompileFallbackWarning)
        _assert_same(compiled, eager, params, _data())
    model.eval()
    _assert_same(compiled, eager, params, _data())


class _DropoutGuide(_TorchNormalGuide):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return super().forward(self.drop(x))


@pytest.mark.parametrize("how", ["loss", "step"])
def test_a_traced_graph_that_keeps_its_draws_says_so_when_it_falls_back(how):
    # With backend=None, the draws of dropout on the data stay in the graph and
    # its first call differs from the eager one: the warning blamed a changing
    # structure.
    model, guide = _SmallModel(), _DropoutGuide()
    compiled = CompiledLoss(IWELBO(3), model, guide, backend=None)
    optim = torch.optim.SGD([*model.parameters(), *guide.parameters()], lr=0.0)
    with pytest.warns(CompileFallbackWarning, match="dropout in train mode"):
        compiled.step(optim, _data()) if how == "step" else compiled(_data())


class _WeightedModel(torch.nn.Module):
    """A KL weight and a logit scale held as plain Python floats."""

    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(2, X_DIM)
        self.beta, self.sharpness = 1.0, 1.0

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            with pyro.poutine.scale(scale=self.beta):
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            logits = self.sharpness * self.out(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def test_a_graph_fixes_the_modules_python_numbers():
    """A module attribute that the program reads as a number (a KL weight a
    schedule sets, a scale) changed between calls gives another graph: the first
    graph kept the first values, for the loss and for the log-likelihood."""
    model, guide = _WeightedModel(), _TorchNormalGuide()
    elbo, compiled, estimate, params, eager = _traced_pair(model, guide)

    for beta, sharpness in [(1.0, 1.0), (0.1, 1.0), (0.1, 3.0)]:
        model.beta, model.sharpness = beta, sharpness
        _assert_same(compiled, eager, params, _data())
    model.beta = 1.0
    for sharpness in (1.0, 3.0):
        model.sharpness = sharpness
        _assert_eager_estimates(estimate, model, guide, _data(), 6, 3, (1e-5, 1e-5))


class _HiddenWeightModel(_SmallModel):
    """The prior's scale times a weight held privately, in a dict and in a list."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.log_s = torch.nn.Parameter(torch.zeros(()))
        self._beta, self.cfg, self.betas = 1.0, {"beta": 1.0}, [1.0]
        # A cache slot filled on the first call: not a setting, no new graph.
        self._cache = (None, None)

    def forward(self, x):
        weight = {"private": self._beta, "dict": self.cfg["beta"]}.get(
            self.where, self.betas[0]
        )
        self._cache = (x, x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(2), self.log_s.exp() * weight).to_event(1)
            )
            pyro.sample("x", dist.Bernoulli(logits=self.out(z)).to_event(1), obs=x)


@pytest.mark.parametrize("where", ["private", "dict", "list"])
def test_a_graph_fixes_private_numbers_and_numbers_in_containers(where):
    # Only public numbers were in the graph's key: after m._beta = 2.0 (or
    # m.cfg["beta"], m.betas[0]) the old graph's numbers came back, silently.
    model, guide = _HiddenWeightModel(where), _TorchNormalGuide()
    elbo, compiled, _, params, eager = _traced_pair(model, guide)

    for weight in (1.0, 2.0, 1.0):
        model._beta = model.cfg["beta"] = model.betas[0] = weight
        _assert_same(compiled, eager, params, _data())
    assert len(compiled._graphs) == 2


class _TensorScaleModel(_SmallModel):
    """The prior's log-scale, a plain tensor attribute (not a buffer), or one held
    in a list."""

    def __init__(self, where: str = "attribute") -> None:
        super().__init__()
        self.where = where
        self.log_scale, self.log_scales = torch.tensor(0.0), [torch.tensor(0.0)]

    def forward(self, x):
        log_scale = self.log_scale if self.where == "attribute" else self.log_scales[0]
        scale = log_scale.exp()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), scale).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.out(z)).to_event(1), obs=x)


def test_a_graph_fixes_the_modules_plain_tensor_attributes():
    # The tensor was baked into the first graph: after m.log_scale = tensor(-1.0)
    # (or an in-place change) the loss and estimates kept the old scale, silently.
    model, guide = _TensorScaleModel(), _TorchNormalGuide()
    elbo, compiled, estimate, params, eager = _traced_pair(model, guide)

    for change in (None, "new", "in place", None):
        if change == "new":
            model.log_scale = torch.tensor(-1.0)
        elif change == "in place":
            model.log_scale.fill_(0.5)
        _assert_same(compiled, eager, params, _data())
        _assert_eager_estimates(estimate, model, guide, _data(), 6, 3, (1e-5, 1e-5))
    assert len(compiled._graphs) == 3


def test_a_tensor_the_graph_key_cannot_see_falls_back():
    # A tensor in a module's list was baked into the graph as well, unkeyed.
    model, guide = _TensorScaleModel("list"), _TorchNormalGuide()
    elbo = IWELBO(3)
    compiled = CompiledLoss(elbo, model, guide, backend=None)
    params = [*model.parameters(), *guide.parameters()]
    with pytest.warns(CompileFallbackWarning, match="register it as a buffer"):
        compiled(_data())
    model.log_scales[0] = torch.tensor(-1.0)
    _assert_same(
        compiled, lambda x: elbo.differentiable_loss(model, guide, x), params, _data()
    )


class _TensorWeightModel(torch.nn.Module):
    """The decoder's weight and shift as plain tensor attributes of more than
    zero dims (neither parameters nor buffers), and a 0-dim scale met by a
    tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.W = torch.randn(X_DIM, 2, generator=g)
        self.shift = torch.randn(X_DIM, generator=g)
        self.scale = torch.tensor(0.8)

    def forward(self, x, beta=None):
        scale = self.scale if beta is None else self.scale * beta
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), scale).to_event(1))
            logits = z @ self.W.T + self.shift
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class _BetaGuide(_TorchNormalGuide):
    def forward(self, x, beta=None):
        return super().forward(x)


def test_plain_tensor_attributes_of_more_than_zero_dims_compile_and_are_keyed():
    # Tracing refused them with torch's "Please convert all Tensors to
    # FakeTensors first" and the program always fell back to the eager path.
    model, guide = _TensorWeightModel(), _TorchNormalGuide()
    elbo, compiled, estimate, params, eager = _traced_pair(model, guide)

    for change in (None, "in place", "new", "shift in place", None):
        if change == "in place":
            model.W.mul_(-2.0)
        elif change == "new":
            model.W = torch.ones(X_DIM, 2)
        elif change == "shift in place":
            model.shift[0] = 3.0
        _assert_same(compiled, eager, params, _data())
        _assert_eager_estimates(estimate, model, guide, _data(), 6, 3, (1e-5, 1e-5))
    assert compiled.compiled and estimate.compiled
    assert len(compiled._graphs) == 4


def test_a_0_dim_plain_tensor_attribute_compiles_with_a_tensor_argument():
    # scale * beta (beta a tensor argument) fell back with torch's "Please
    # convert all Tensors to FakeTensors first".
    model, guide = _TensorWeightModel(), _BetaGuide()
    elbo, compiled, _, params, _ = _traced_pair(model, guide)
    beta = torch.tensor(1.5)

    def eager(x):
        return elbo.differentiable_loss(model, guide, x, beta)

    _assert_same(lambda x: compiled(x, beta), eager, params, _data())
    model.scale = torch.tensor(0.4)
    _assert_same(lambda x: compiled(x, beta), eager, params, _data())
    assert compiled.compiled


class _GlobalShiftModel(_SmallModel):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            logits = self.out(z) + _GLOBAL_SHIFT
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


_GLOBAL_SHIFT = torch.linspace(-1.0, 1.0, X_DIM)


def test_a_global_tensor_of_more_than_zero_dims_falls_back_with_the_advice():
    # The fallback's reason was torch's "Please convert all Tensors to
    # FakeTensors first", not what to do.
    model, guide = _GlobalShiftModel(), _TorchNormalGuide()
    elbo, compiled, _, params, eager = _traced_pair(model, guide)
    with pytest.warns(CompileFallbackWarning, match="register it as a buffer"):
        _assert_same(compiled, eager, params, _data())
    assert not compiled.compiled


class _CountingModel(_SmallModel):
    """Counts its calls in a plain tensor attribute, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = torch.zeros(())

    def forward(self, x):
        self.calls.add_(1)
        return super().forward(x)


def test_a_plain_tensor_attribute_the_program_changes_in_place_falls_back():
    # Traced as a constant, it would be changed again at every run of the graph
    # (before, it fell back with torch's fake-tensor assertion as the reason).
    model, guide = _CountingModel(), _TorchNormalGuide()
    _, compiled, _, _, _ = _traced_pair(model, guide)
    with pytest.warns(CompileFallbackWarning, match="attribute model.calls in place"):
        compiled(_data())
    assert not compiled.compiled


@pytest.mark.parametrize("how", ["loss", "step"])
def test_an_input_that_needs_a_gradient_gets_it_on_the_eager_path(how):
    # The graph gave the parameters' gradients alone: a network before the model
    # (or x.requires_grad_()) got no gradient, silently, and stopped training.
    model, guide = _SmallModel(), _TorchNormalGuide()
    # A trainable input weight (1: the data stay in the Bernoulli's support).
    weight = torch.nn.Parameter(torch.ones(()))
    elbo = IWELBO(3)
    compiled = CompiledLoss(elbo, model, guide, backend=None)
    params = [*model.parameters(), *guide.parameters(), weight]
    optim = torch.optim.SGD(params, lr=0.0)

    torch.manual_seed(3)
    elbo.differentiable_loss(model, guide, _data() * weight).backward()
    eager = [p.grad.clone() for p in params]
    optim.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with pytest.warns(CompileFallbackWarning, match="input of the call needs a grad"):
        if how == "step":
            compiled.step(optim, _data() * weight)
        else:
            compiled(_data() * weight).backward()
    for a, b in zip([p.grad for p in params], eager, strict=True):
        torch.testing.assert_close(a, b)


class _Width(enum.Enum):
    WIDE = 1.0
    NARROW = 0.5


class _AttributeModel(_SmallModel):
    """Settings of other types than numbers: a numpy scalar, an enum member, a
    set, a function and a submodule's class."""

    def __init__(self) -> None:
        super().__init__()
        self.np_scale, self.width, self.options = np.float32(1.0), _Width.WIDE, set()
        self.act, self.squash = torch.tanh, torch.nn.Tanh()

    def forward(self, x):
        scale = float(self.np_scale) * self.width.value
        scale *= 0.3 if "narrow" in self.options else 1.0
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), scale).to_event(1))
            logits = self.out(self.squash(self.act(z)))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "np_scale", np.float32(0.3)),
        lambda m: setattr(m, "width", _Width.NARROW),
        lambda m: m.options.add("narrow"),
        lambda m: setattr(m, "act", torch.sigmoid),
        lambda m: setattr(m, "squash", torch.nn.Sigmoid()),
    ],
    ids=["numpy scalar", "enum", "set", "function", "submodule"],
)
def test_a_graph_fixes_settings_of_other_types(change):
    # None of these was in the graph's key: the old graph's numbers came back.
    model, guide = _AttributeModel(), _TorchNormalGuide()
    elbo, compiled, _, params, eager = _traced_pair(model, guide)

    _assert_same(compiled, eager, params, _data())
    change(model)
    _assert_same(compiled, eager, params, _data())
    assert len(compiled._graphs) == 2


class _CastingModel(_SmallModel):
    def forward(self, x):
        return super().forward(x.to(self.out.weight.dtype))


class _CastingGuide(_TorchNormalGuide):
    def forward(self, x):
        return super().forward(x.to(self.loc.weight.dtype))


def test_a_graph_fixes_the_dtypes_of_the_parameters():
    # After model.double(), guide.double() the float32 graph ran on float64
    # parameters: "mat1 and mat2 must have the same dtype".
    model, guide = _CastingModel(), _CastingGuide()
    elbo, compiled, estimate, _, eager = _traced_pair(model, guide)

    for dtype in (torch.float32, torch.float64):
        model.to(dtype), guide.to(dtype)
        params = [*model.parameters(), *guide.parameters()]
        _assert_same(compiled, eager, params, _data())
        _assert_eager_estimates(estimate, model, guide, _data(), 6, 3, (1e-5, 1e-5))
    assert len(compiled._graphs) == 2


@pytest.mark.parametrize(
    "handlers, graphs",
    [
        # Scales by number are part of the graph's key: one graph each.
        (
            [
                lambda: pyro.poutine.scale(scale=1.0),
                lambda: pyro.poutine.scale(scale=0.02),
            ],
            2,
        ),
        # Others run eagerly: a graph would keep what the first call did.
        ([lambda: pyro.poutine.scale(scale=torch.tensor(0.02))], 0),
        ([lambda: pyro.poutine.mask(mask=torch.tensor([True, False, True]))], 0),
    ],
)
def test_a_graph_fixes_the_pyro_handlers_around_the_call(handlers, graphs):
    # DDP's loss ran under poutine.scale(world / batch): the graph traced by the
    # first call, at scale 1, gave losses and gradients 50 times too large.
    model, guide = _SmallModel(), _TorchNormalGuide()
    elbo = IWELBO(3)
    compiled = CompiledLoss(elbo, model, guide, backend=None)
    params = [*model.parameters(), *guide.parameters()]

    def under(handler, fn):
        def call(x):
            with handler():
                return fn(x)

        return call

    for handler in handlers * 2:
        eager = under(handler, lambda x: elbo.differentiable_loss(model, guide, x))
        _assert_same(under(handler, compiled), eager, params, _data())
    assert len(compiled._graphs) == graphs and compiled.compiled


class _PyroModuleModel(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.out = torch.nn.Linear(2, X_DIM)

    forward = _SmallModel.forward


def test_a_run_that_fell_back_to_the_eager_path_says_so():
    # It was recorded, and reported, as compiled.
    with pytest.warns(CompileFallbackWarning, match="PyroModule"):
        history = fit(
            _PyroModuleModel(),
            _TorchNormalGuide(),
            _data(8),
            IWELBO(2, compile=True),
            batch_size=4,
        )
    assert history[-1]["compiled"] is False
    assert history[-1]["compile_choice"].startswith("as asked; then eager: a Pyro")


def test_an_evaluation_drawing_from_computed_tensors_falls_back_as_training_does():
    """The SBN's guide draws Bernoulli latents from probabilities the graph
    computes: compiled, the draws were the compiler's own, and --compile on gave
    another estimate than --compile off from the same seed, without a word."""
    model, guide = sbn_architecture(1, x_dim=X_DIM)
    x = _data()
    with pytest.warns(CompileFallbackWarning, match="with tensor arguments"):
        torch.manual_seed(7)
        compiled = log_likelihood(model, guide, x, num_samples=6, compile=True)
    torch.manual_seed(7)
    eager = log_likelihood(model, guide, x, num_samples=6)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


class _BatchNormGuide(_TorchNormalGuide):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(X_DIM)

    def forward(self, x):
        super().forward(self.norm(x))


def test_the_check_of_a_new_graph_moves_no_running_statistics():
    """The eager run that checks a new graph put batch norm's running mean
    forward a second time: the first compiled call moved it twice as far."""
    x = _data(4)
    moves = []
    for path in ("eager", "compiled"):
        guide = _BatchNormGuide()
        model = _SmallModel()
        torch.manual_seed(3)
        if path == "eager":
            IWELBO(2).differentiable_loss(model, guide, x)
        else:
            CompiledLoss(IWELBO(2), model, guide, backend=None)(x)
        moves.append(guide.norm.running_mean.clone())
    torch.testing.assert_close(moves[1], moves[0])
    assert moves[0].abs().sum() > 0


class _MixedDrawsModel(_SmallModel):
    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            u = pyro.sample("u", dist.Bernoulli(x.new_tensor(0.5)))
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            logits = self.out(z) + u.unsqueeze(-1)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class _MixedDrawsGuide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.u = torch.nn.Linear(X_DIM, 1)
        self.z = torch.nn.Linear(X_DIM, 2)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("u", dist.Bernoulli(logits=self.u(x).squeeze(-1)))
            pyro.sample("z", dist.Normal(self.z(x), 1.0).to_event(1))


def test_an_uncompiled_graph_drawing_from_computed_tensors_falls_back_too():
    """A guide drawing Bernoulli latents from computed probabilities, then
    reparameterised ones: compile=None kept the traced graph, which drew the
    Bernoulli noise after the lifted draws, and gave another estimate than eager
    from the same seed (0.88 nats a point), without a word."""
    torch.manual_seed(0)
    model, guide, x = _MixedDrawsModel(), _MixedDrawsGuide(), _data(4)
    with pytest.warns(CompileFallbackWarning, match="with tensor arguments"):
        torch.manual_seed(7)
        compiled = log_likelihood(model, guide, x, num_samples=20, compile=None)
    torch.manual_seed(7)
    eager = log_likelihood(model, guide, x, num_samples=20)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["iwae", "dreg", "miwae-dreg"])
def test_an_objective_copies_and_pickles_after_its_compiled_calls(name):
    """The particle plate, cached on the objective, was first entered while the
    graph was traced and kept a fake tensor: after the first compiled call the
    objective could be neither deep-copied nor pickled."""
    import copy
    import io
    import pickle

    # Plain modules: pyro.module (as the paper's modules call) leaves weak
    # references on the parameters, which no pickle takes, compiled or not.
    torch.manual_seed(0)
    model, guide, x = _SmallModel(), _TorchNormalGuide(), _data(4)
    elbo = OBJECTIVES[name]()
    elbo.compile = None
    loss_module = elbo(model, guide)
    loss_module(x)
    torch.manual_seed(5)
    expected = OBJECTIVES[name]().differentiable_loss(model, guide, x)
    buffer = io.BytesIO()
    torch.save(loss_module, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(loss_module), torch.load(buffer, weights_only=False)]
    copies.append(pickle.loads(pickle.dumps(elbo))(model, guide))
    for each in [loss_module, *copies]:
        torch.manual_seed(5)
        torch.testing.assert_close(each(x), expected, rtol=1e-5, atol=0)


def test_an_evaluation_that_fell_back_to_the_eager_path_says_so(tmp_path):
    # Its record and eval-nll's report said "as asked", where fit says why.
    config = RunConfig(
        model="sbn",
        guide="sbn",
        estimator="vimco",
        stochastic_layers=1,
        train_limit=10,
        test_limit=5,
        batch_size=10,
        num_particles=2,
        epochs=1,
    )
    train_run(config, tmp_path)
    with pytest.warns(CompileFallbackWarning, match="with tensor arguments"):
        result = evaluate_run(tmp_path, num_samples=2, limit=2, compile=None)
    assert result.compiled is False
    assert result.compile_choice.startswith("as asked; then eager: ")
    assert "with tensor arguments" in result.compile_choice
    recorded = json.loads(open(result.file).read())
    assert recorded["compile_choice"] == result.compile_choice


class _RowsModel(torch.nn.Module):
    """x | z ~ N(1.5 z + b, 0.7), z ~ N(0, 1), for x ``[K, N]``: K values per
    point, their dim in no plate (or, with ``event``, each point's event)."""

    def __init__(self, event: bool = False) -> None:
        super().__init__()
        self.event = event
        self.b = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x):
        with pyro.plate("data", x.shape[-1]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            if self.event:
                loc = (1.5 * z + self.b).unsqueeze(-1).expand(z.shape + x.shape[:1])
                pyro.sample("x", dist.Normal(loc, 0.7).to_event(1), obs=x.T)
            else:
                pyro.sample("x", dist.Normal(1.5 * z + self.b, 0.7), obs=x)


class _RowsGuide(torch.nn.Module):
    """The exact posterior of each point's z given its K values."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def forward(self, x):
        var = 1 / (1 + x.shape[0] * 1.5**2 / 0.7**2)
        loc = var * 1.5 * (x - 0.3).sum(0) / 0.7**2 + self.shift
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("z", dist.Normal(loc, math.sqrt(var)))


def test_an_unverified_compiled_loss_checks_the_particle_dims():
    # Traced, the program skipped the particle-dims check, and no eager run
    # verified the graph: a leading dim as long as the particles was taken for
    # theirs, and the loss came out 8.35 where -log p(x) is 32.37, without a word.
    from pyro_iwae.errors import ProgramError

    k = 5
    x = torch.randn(
        k, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    cov = 1.5**2 * torch.ones(k, k) + 0.7**2 * torch.eye(k)
    exact = dist.MultivariateNormal(torch.full((k,), 0.3), cov).log_prob(x.T).sum()
    # Each point's K values as its event: exact, compiled.
    model, guide = _RowsModel(event=True), _RowsGuide()
    valid = CompiledLoss(IWELBO(k), model, guide, backend=None, verify=False)
    assert valid(x).item() == pytest.approx(-exact.item(), rel=1e-6)
    assert valid.compiled and len(valid._graphs) == 1
    for step in (False, True):
        model, guide = _RowsModel(), _RowsGuide()
        compiled = CompiledLoss(IWELBO(k), model, guide, backend=None, verify=False)
        optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()])
        # The program's error, raised as such: no warning blames the compiler.
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)
            with pytest.raises(ProgramError, match=r"dim -2 \(size 5\) does not fo"):
                compiled.step(optimizer, x) if step else compiled(x)
        assert not compiled.compiled
