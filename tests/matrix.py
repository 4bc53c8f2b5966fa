"""The verification matrix: its rows, shared by the ``test_matrix_*.py`` files.

A guide, estimator, objective or evaluator is verified by adding a row here:

- :data:`GUIDES`: every guide family the library is used with, each built on
  the linear-Gaussian model of ``linear_gaussian.py`` (float64) at its exact
  posterior where the family can hold it (``exact=True``), else at its default
  initialisation, and :func:`perturbed` away from it;
- :data:`ESTIMATORS` and :data:`OBJECTIVES`;
- :data:`LATENT_KINDS` for the evaluators (in ``test_matrix_evaluators.py``).

The discrete guides' rows (``vimco``, ``reinforce`` against the gradient of the
exact enumerated bound) are in ``test_vimco.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from linear_gaussian import LATENT_DIM, SIGMA, LinearGaussian, PriorSiteModel
from pyro.distributions import constraints
from pyro.infer import autoguide
from pyro.nn import PyroParam
from test_objectives import FlowGuide, LocNet, PyroLocNet, zoo_flow_at_posterior
from test_objectives_guides import setup as per_point_setup

from pyro_iwae import CIWELBO, IWELBO, MIWELBO, PIWELBO
from pyro_iwae.nn.guides import ZOO

#: The slower cells run only with ``PYRO_IWAE_SLOW_TESTS=1`` (``.ci/run`` does).
slow = pytest.mark.skipif(
    not os.environ.get("PYRO_IWAE_SLOW_TESTS"),
    reason="a slower matrix cell; set PYRO_IWAE_SLOW_TESTS=1",
)

#: Path-gradient estimators; the score-function ones give guides whose sites
#: all have rsample the plain gradient.
ESTIMATORS = ("iwae", "stl", "dreg")
SCORE_ESTIMATORS = ("vimco", "reinforce")

#: The objectives with ``k`` particles in all (in two groups for k > 1).
OBJECTIVES: dict[str, Callable[[int, str], IWELBO]] = {
    "IWELBO": lambda k, estimator: IWELBO(k, estimator),
    "MIWELBO": lambda k, estimator: MIWELBO(*_groups(k), estimator),
    "CIWELBO": lambda k, estimator: CIWELBO(k, 0.3, estimator),
    "PIWELBO": lambda k, estimator: PIWELBO(*_groups(k), estimator),
}


def _groups(k: int) -> tuple[int, int]:
    """(particles per group, groups): two groups of k/2, or one of 1."""
    return (k // 2, 2) if k > 1 else (1, 1)


class Setup(NamedTuple):
    """A model, a guide and the data they are called on (``model(x)``);
    ``log_marginal``: the exact log p(x) of each point."""

    model: Callable
    guide: Callable
    x: torch.Tensor
    log_marginal: torch.Tensor


class GuideRow(NamedTuple):
    """``build(points)`` makes the setup on ``points`` copies of one data point;
    ``exact``: it is then the exact posterior; ``module``: model and guide are
    ``nn.Module`` s (so the compiled loss can run them); ``joint``: one latent
    for all points, outside the data plate (points are few: its size grows)."""

    build: Callable[[int], Setup]
    exact: bool
    module: bool = False
    joint: bool = False


class LinearGaussianModel(torch.nn.Module):
    """``lg.model`` as an ``nn.Module``, its latent named ``site``, its weight a
    parameter (so that model gradients are compared too)."""

    def __init__(self, lg: LinearGaussian, site: str = "z") -> None:
        super().__init__()
        self.site = site
        self.W = torch.nn.Parameter(lg.W.clone())
        self.register_buffer("b", lg.b.clone())

    def forward(self, data: torch.Tensor) -> None:
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample(
                self.site, dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
            )
            pyro.sample(
                "x", dist.Normal(z @ self.W.T + self.b, SIGMA).to_event(1), obs=data
            )


def one_point(lg: LinearGaussian, points: int) -> torch.Tensor:
    return lg.sample_data(1).expand(points, -1).contiguous()


def _zoo(name: str) -> Callable[[int], Setup]:
    def build(points: int) -> Setup:
        x = one_point(LinearGaussian(diagonal_posterior=True), points)
        if name in ("iaf", "coupling"):
            lg, guide = zoo_flow_at_posterior(name, x)
        else:
            lg = LinearGaussian(diagonal_posterior=True)
            guide = ZOO[name](1, x.shape[-1], hidden=[4], latent_dim=LATENT_DIM)
            with torch.no_grad():
                # A constant encoder output: the posterior of x's single point.
                out = guide.layers[0].out
                out.weight.zero_()
                scale = lg.post_cov.diagonal().sqrt()
                out.bias.copy_(torch.cat([lg.post_loc(x[0]), scale.log()]))
                if name == "lowrank":
                    guide.factor.weight.zero_()
        guide.double()
        return Setup(LinearGaussianModel(lg, "z1"), guide, x, lg.log_marginal(x))

    return build


def _user_module(make: Callable[[LinearGaussian], torch.nn.Module]):
    def build(points: int) -> Setup:
        lg = LinearGaussian()
        x = one_point(lg, points)
        guide = make(lg).double()
        if isinstance(guide, FlowGuide):
            _traceable(guide)
        return Setup(LinearGaussianModel(lg), guide, x, lg.log_marginal(x))

    return build


def _traceable(guide: FlowGuide) -> None:
    """Gives a ``FlowGuide`` the posterior mean map as buffers: a compiled graph
    sees the module's parameters and buffers only, not ``guide.lg``'s tensors."""
    guide.register_buffer("A", guide.lg.A.clone())
    guide.register_buffer("b", guide.lg.b.clone())
    guide.lg = SimpleNamespace(post_loc=lambda data: (data - guide.b) @ guide.A.T)


def _per_point(kind: str) -> Callable[[int], Setup]:
    """The guides of ``test_objectives_guides.py``, one parameter set per point."""

    def build(points: int) -> Setup:
        s = per_point_setup(kind, points, exact=True)
        lg = LinearGaussian(diagonal_posterior=not kind.endswith("hierarchical"))
        return Setup(s.model, s.guide, s.x, lg.log_marginal(s.x))

    return build


def _joint(name: str) -> Callable[[int], Setup]:
    """Pyro's autoguides with one latent vector for all points; set to the exact
    (block-diagonal) posterior, but for AutoIAFNormal."""

    def build(points: int) -> Setup:
        lg = LinearGaussian(diagonal_posterior=name != "AutoMultivariateNormal")
        x = one_point(lg, points)
        cls = getattr(autoguide, name)
        guide = (
            cls(lg.model, hidden_dim=[8]) if name == "AutoIAFNormal" else cls(lg.model)
        )
        guide(x)
        loc = lg.post_loc(x).reshape(-1)
        cov = torch.block_diag(*[lg.post_cov] * points)
        tril = torch.linalg.cholesky(cov)
        scale = tril.diagonal()
        if name == "AutoMultivariateNormal":
            guide.loc = torch.nn.Parameter(loc.clone())
            guide.scale = PyroParam(scale.clone(), constraints.softplus_positive)
            guide.scale_tril = PyroParam(
                tril / scale.unsqueeze(-1), constraints.unit_lower_cholesky
            )
        elif name in ("AutoDiagonalNormal", "AutoLowRankMultivariateNormal"):
            guide.loc = torch.nn.Parameter(loc.clone())
            guide.scale = PyroParam(scale.clone(), constraints.softplus_positive)
            if name == "AutoLowRankMultivariateNormal":
                zero = torch.zeros_like(guide.cov_factor)
                guide.cov_factor = torch.nn.Parameter(zero)
        guide.double()
        return Setup(lg.model, guide, x, lg.log_marginal(x))

    return build


def _auto_normal(points: int) -> Setup:
    s = per_point_setup("AutoNormal", points, exact=True)
    lg = LinearGaussian(diagonal_posterior=True)
    return Setup(s.model, s.guide, s.x, lg.log_marginal(s.x))


GUIDES: dict[str, GuideRow] = {
    "zoo-paper": GuideRow(_zoo("paper"), exact=True, module=True),
    "zoo-lowrank": GuideRow(_zoo("lowrank"), exact=True, module=True),
    "zoo-iaf": GuideRow(_zoo("iaf"), exact=True, module=True),
    "zoo-coupling": GuideRow(_zoo("coupling"), exact=True, module=True),
    "AutoNormal": GuideRow(_auto_normal, exact=True),
    "AutoDiagonalNormal": GuideRow(_joint("AutoDiagonalNormal"), True, joint=True),
    "AutoMultivariateNormal": GuideRow(
        _joint("AutoMultivariateNormal"), True, joint=True
    ),
    "AutoLowRankMultivariateNormal": GuideRow(
        _joint("AutoLowRankMultivariateNormal"), True, joint=True
    ),
    "AutoIAFNormal": GuideRow(_joint("AutoIAFNormal"), exact=False, joint=True),
    "pyro.param-one-site": GuideRow(_per_point("one-site"), exact=True),
    "hierarchical": GuideRow(_per_point("hierarchical"), exact=True),
    # A function guide whose parameters are a module's, registered with
    # pyro.module: stl and dreg hold them constant through torch functions.
    "pyro.module-hierarchical": GuideRow(
        _per_point("pyro.module-hierarchical"), exact=True
    ),
    "aux-delta": GuideRow(_per_point("aux-delta"), exact=True),
    "user-nn.Module": GuideRow(_user_module(LocNet), exact=True, module=True),
    "user-PyroModule": GuideRow(_user_module(PyroLocNet), exact=True),
    "user-flow-coupling": GuideRow(
        _user_module(
            lambda lg: FlowGuide(lg, T.affine_coupling(LATENT_DIM, hidden_dims=[4]))
        ),
        exact=True,
        module=True,
    ),
    "user-flow-autoregressive": GuideRow(
        _user_module(
            lambda lg: FlowGuide(
                lg, T.affine_autoregressive(LATENT_DIM, hidden_dims=[4])
            )
        ),
        exact=True,
        module=True,
    ),
}


def build(name: str, points: int, perturb: bool = False) -> Setup:
    """The setup of guide row ``name`` (seeded), :func:`perturbed` if asked."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    setup = GUIDES[name].build(2 if GUIDES[name].joint else points)
    if perturb:
        perturbed(setup)
    return setup


#: The size of the perturbation of every guide parameter (unconstrained).
PERTURBATION = 0.1


def perturbed(setup: Setup) -> None:
    """Moves every guide parameter by ``PERTURBATION`` times a seeded N(0, 1)
    draw: off the exact posterior, and with every flow layer active."""
    from pyro_iwae.infer.gradient_check import guide_parameters

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in guide_parameters(setup.guide, (setup.x,), {}).items():
            noise = PERTURBATION * torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("tril"):
                # A LowerCholeskyAffine maps forward with every entry of its
                # matrix, but inverts (log q) with the lower triangle alone: an
                # upper entry would make q sample one density and score another
                # (check_guide_gradients flags it).
                noise = noise.tril()
            p.add_(noise)


def exact_total(setup: Setup) -> float:
    """log p(x) of all points together."""
    return float(setup.log_marginal.sum())


#: Latent kinds for the evaluators: where each latent site is sampled.
LATENT_KINDS = ("guide-only", "model-only-discrete", "model-only-continuous", "mixed")


class EvaluatorSetup(NamedTuple):
    """A model and guide of ``nn.Module`` s (so compiled evaluation runs),
    data, the exact log p(x) and posterior mean of the guide's latent ``z`` for
    it; ``log_marginal_of``: the exact log p(x) of any data."""

    model: torch.nn.Module
    guide: torch.nn.Module
    x: torch.Tensor
    log_marginal: torch.Tensor
    post_mean: torch.Tensor
    log_marginal_of: Callable[[torch.Tensor], torch.Tensor]


class PriorSiteModule(torch.nn.Module):
    """:class:`PriorSiteModel` as an ``nn.Module`` whose tensors are buffers (a
    compiled graph sees only those)."""

    def __init__(self, m: PriorSiteModel) -> None:
        super().__init__()
        self.m = m
        self.register_buffer("W", m.lg.W.clone())
        self.register_buffer("b", m.lg.b.clone())
        self.register_buffer("c", m.c.clone())

    def forward(self, data: torch.Tensor) -> None:
        lg, held = self.m.lg, (self.m.lg.W, self.m.lg.b, self.m.c)
        lg.W, lg.b, self.m.c = self.W, self.b, self.c
        try:
            self.m.model(data)
        finally:
            lg.W, lg.b, self.m.c = held


class EvaluatorGuide(torch.nn.Module):
    """q(z|x) the wide mean-field guide of ``lg.diagonal_guide`` (shifted by
    ``shift``); with ``m`` (the mixed kind) it first samples ``u`` from its exact
    posterior p(u|x), then z given u."""

    def __init__(self, m: PriorSiteModel | None, lg: LinearGaussian, shift: float):
        super().__init__()
        self.mixed, self.shift = m is not None, shift
        self.register_buffer("A", lg.A.clone())
        self.register_buffer("b", lg.b.clone())
        self.register_buffer("scale", 1.5 * lg.post_cov.diagonal().sqrt())
        self.register_buffer("cov", marginal_cov(lg))
        self.register_buffer("c", (m.c if m is not None else lg.b).clone())

    def forward(self, data: torch.Tensor) -> None:
        with pyro.plate("data", data.shape[0]):
            offset = 0.0
            if self.mixed:
                logits = u_logits(self.b, self.c, self.cov, data)
                u = pyro.sample("u", dist.Bernoulli(logits=logits))
                offset = u.unsqueeze(-1) * self.c
            loc = (data - offset - self.b) @ self.A.T + self.shift
            pyro.sample("z", dist.Normal(loc, self.scale).to_event(1))


def marginal_cov(lg: LinearGaussian) -> torch.Tensor:
    """Cov(x) given z's prior: W W^T + sigma^2 I."""
    return lg.W @ lg.W.T + SIGMA**2 * torch.eye(lg.W.shape[0], dtype=lg.W.dtype)


def u_logits(b, c, cov, x: torch.Tensor) -> torch.Tensor:
    """log p(u=1|x) - log p(u=0|x) for the Bernoulli prior site (prior 1/2)."""
    return dist.MultivariateNormal(b + c, cov).log_prob(x) - dist.MultivariateNormal(
        b, cov
    ).log_prob(x)


def evaluator_setup(kind: str, points: int = 4) -> EvaluatorSetup:
    """The linear-Gaussian model with (``model-only-*``) a latent u the guide
    leaves to the prior, or (``mixed``) one the guide samples too."""
    lg = LinearGaussian()
    x = lg.sample_data(points, seed=4)
    if kind == "guide-only":
        model = LinearGaussianModel(lg)
        guide = EvaluatorGuide(None, lg, 0.2)
        return EvaluatorSetup(
            model, guide, x, lg.log_marginal(x), lg.post_loc(x), lg.log_marginal
        )
    m = PriorSiteModel(lg, "normal" if kind == "model-only-continuous" else "bernoulli")
    guide = EvaluatorGuide(m if kind == "mixed" else None, lg, 0.0)
    if m.kind == "normal":
        # z and u jointly Gaussian a priori: E[z|x] = W^T Cov(x)^-1 (x - b).
        cov = marginal_cov(lg) + torch.outer(m.c, m.c)
        post_mean = (x - lg.b) @ torch.linalg.solve(cov, lg.W)
    else:
        p1 = torch.sigmoid(u_logits(lg.b, m.c, marginal_cov(lg), x)).unsqueeze(-1)
        post_mean = (1 - p1) * lg.post_loc(x) + p1 * lg.post_loc(x - m.c)
    return EvaluatorSetup(
        PriorSiteModule(m), guide, x, m.log_marginal(x), post_mean, m.log_marginal
    )


def standard_errors(log_weights: torch.Tensor) -> torch.Tensor:
    """The delta-method standard error of log(mean weight) per point, from
    log-weights ``[K, ...]``."""
    k = log_weights.shape[0]
    w = (log_weights - log_weights.logsumexp(0)).exp().reshape(k, -1) * k
    return w.std(0) / math.sqrt(k)
