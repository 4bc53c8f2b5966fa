"""STL and DReG for every guide structure, against exact answers (float64, seeded).

At the exact posterior log w is constant in z, so the STL and DReG guide gradients
must be exactly zero; away from it DReG must keep the IWAE gradient's mean with a
lower variance. Guides: one latent site, a two-level hierarchical guide, an
auxiliary site feeding a ``Delta`` site (how Pyro's autoguides are built), and
Pyro's ``AutoNormal`` and ``AutoDiagonalNormal``.
"""

import math
import warnings
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from linear_gaussian import LATENT_DIM, SIGMA, LinearGaussian
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroParam

from pyro_iwae import CIWELBO, IWELBO, MIWELBO, PIWELBO
from pyro_iwae.infer import support

KINDS = ("one-site", "hierarchical", "aux-delta", "AutoNormal")
SHIFT, INFLATE = 0.3, 1.2


def make_objective(name, estimator, k=5):
    """The objective ``name`` with about k particles in all."""
    if name == "iwae":
        return IWELBO(k, estimator)
    if name == "miwae":
        return MIWELBO(k, 2, estimator)
    if name == "piwae":
        return PIWELBO(k, 2, estimator)
    return CIWELBO(2 * k, 0.3, estimator)


def mean_field_setup(kind, replicas, exact):
    """Model and per-replica guide with a diagonal exact posterior."""
    lg = LinearGaussian(diagonal_posterior=True)
    x = lg.sample_data(1).expand(replicas, -1)
    loc = lg.post_loc(x)
    scale = lg.post_cov.diagonal().sqrt().expand(replicas, -1)
    if not exact:
        loc, scale = loc + SHIFT, scale * INFLATE
    if kind == "AutoNormal":
        guide = AutoNormal(lg.model)
        guide(x)
        guide.locs.z = PyroParam(loc.clone(), constraints.real, event_dim=1)
        guide.scales.z = PyroParam(scale.clone(), constraints.positive, event_dim=1)
        return SimpleNamespace(
            model=lg.model, guide=guide, x=x, params=lambda: list(guide.parameters())
        )

    def guide(data):
        loc_ = pyro.param("loc", loc.clone())
        scale_ = pyro.param("log_scale", scale.log()).exp()
        with pyro.plate("data", data.shape[0]):
            if kind == "one-site":
                pyro.sample("z", dist.Normal(loc_, scale_).to_event(1))
            else:
                aux = pyro.sample(
                    "z_aux",
                    dist.Normal(loc_, scale_).to_event(1),
                    infer={"is_auxiliary": True},
                )
                pyro.sample("z", dist.Delta(aux, event_dim=1))

    store = pyro.get_param_store()
    guide(x)
    return SimpleNamespace(
        model=lg.model,
        guide=guide,
        x=x,
        params=lambda: [store["loc"], store["log_scale"]],
    )


def hierarchical_setup(replicas, exact, as_module=False):
    """z split into sites za, zb; guide q(za|x) q(zb|za, x), the exact posterior
    factored by the chain rule (correlated), or a shifted and inflated one;
    ``as_module``: its parameters those of an ``nn.Module`` that the guide, a
    function, registers with ``pyro.module``."""
    lg = LinearGaussian()
    x = lg.sample_data(1).expand(replicas, -1)
    m, s = lg.post_loc(x), lg.post_cov
    coef = s[0, 1] / s[0, 0]
    scale_a, scale_b = s[0, 0].sqrt(), (s[1, 1] - s[0, 1] ** 2 / s[0, 0]).sqrt()
    init = {
        "loc_a": m[:, 0],
        "loc_b": m[:, 1],
        "coef": coef.expand(replicas),
        "log_scale_a": scale_a.log().expand(replicas),
        "log_scale_b": scale_b.log().expand(replicas),
    }
    if not exact:
        for name in ("loc_a", "loc_b"):
            init[name] = init[name] + SHIFT
        for name in ("log_scale_a", "log_scale_b"):
            init[name] = init[name] + math.log(INFLATE)

    def model(data):
        with pyro.plate("data", data.shape[0]):
            za = pyro.sample("za", dist.Normal(data.new_zeros(()), 1.0))
            zb = pyro.sample("zb", dist.Normal(data.new_zeros(()), 1.0))
            z = torch.stack([za, zb], -1)
            pyro.sample(
                "x", dist.Normal(z @ lg.W.T + lg.b, SIGMA).to_event(1), obs=data
            )

    net = torch.nn.Module()
    for name, value in init.items():
        setattr(net, name, torch.nn.Parameter(value.clone()))

    def guide(data):
        if as_module:
            pyro.module("net", net)
            p = dict(net.named_parameters())
        else:
            p = {name: pyro.param(name, value.clone()) for name, value in init.items()}
        with pyro.plate("data", data.shape[0]):
            za = pyro.sample("za", dist.Normal(p["loc_a"], p["log_scale_a"].exp()))
            loc_b = p["loc_b"] + p["coef"] * (za - m[:, 0])
            pyro.sample("zb", dist.Normal(loc_b, p["log_scale_b"].exp()))

    store = pyro.get_param_store()
    guide(x)
    if as_module:
        return SimpleNamespace(
            model=model, guide=guide, x=x, params=lambda: list(net.parameters())
        )
    return SimpleNamespace(
        model=model, guide=guide, x=x, params=lambda: [store[n] for n in init]
    )


def setup(kind, replicas, exact):
    pyro.clear_param_store()
    if kind in ("hierarchical", "pyro.module-hierarchical"):
        return hierarchical_setup(replicas, exact, kind != "hierarchical")
    return mean_field_setup(kind, replicas, exact)


def guide_gradients(kind, elbo, replicas, exact=False):
    """Per-replica guide gradients, shape [replicas, number of guide parameters]."""
    s = setup(kind, replicas, exact)
    pyro.set_rng_seed(0)
    loss = elbo.differentiable_loss(s.model, s.guide, s.x)
    grads = torch.autograd.grad(loss, s.params())
    return torch.cat([g.reshape(replicas, -1) for g in grads], -1)


def assert_same_mean_lower_variance(plain, dreg):
    m_p, m_d = plain.mean(0), dreg.mean(0)
    se = (plain.var(0) / plain.shape[0] + dreg.var(0) / dreg.shape[0]).sqrt()
    z = (m_p - m_d) / se
    assert (z.abs() < 4).all(), z
    assert (dreg.var(0) < plain.var(0)).all(), (dreg.var(0), plain.var(0))


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("kind", KINDS)
def test_stl_and_dreg_guide_gradients_are_zero_at_the_exact_posterior(kind, k):
    plain = guide_gradients(kind, IWELBO(k, "iwae"), 4, exact=True)
    assert plain.abs().max() > 1e-2  # the check below can fail
    for estimator in ("stl", "dreg"):
        grads = guide_gradients(kind, IWELBO(k, estimator), 4, exact=True)
        assert grads.abs().max() < 1e-9, (estimator, grads)


@pytest.mark.parametrize("objective", ["miwae", "ciwae", "piwae"])
@pytest.mark.parametrize("kind", KINDS)
def test_rainforth_dreg_guide_gradients_are_zero_at_the_exact_posterior(
    kind, objective
):
    grads = guide_gradients(kind, make_objective(objective, "dreg"), 4, exact=True)
    assert grads.abs().max() < 1e-9, grads


@pytest.mark.parametrize("k", [1, 5, 50])
@pytest.mark.parametrize("kind", KINDS)
def test_dreg_keeps_the_iwae_gradient_mean_with_lower_variance(kind, k):
    plain = guide_gradients(kind, IWELBO(k, "iwae"), 2000)
    dreg = guide_gradients(kind, IWELBO(k, "dreg"), 2000)
    assert_same_mean_lower_variance(plain, dreg)


@pytest.mark.parametrize("objective", ["miwae", "ciwae", "piwae"])
@pytest.mark.parametrize("kind", KINDS)
def test_rainforth_dreg_keeps_the_gradient_mean_with_lower_variance(kind, objective):
    plain = guide_gradients(kind, make_objective(objective, "iwae"), 2000)
    dreg = guide_gradients(kind, make_objective(objective, "dreg"), 2000)
    assert_same_mean_lower_variance(plain, dreg)


def joint_guide_gradients(elbo, draws, exact=False, points=2):
    """AutoDiagonalNormal has one latent outside the data plate, so the bound is
    joint and each call gives one gradient: [draws, number of guide parameters]."""
    pyro.clear_param_store()
    lg = LinearGaussian(diagonal_posterior=True)
    x = lg.sample_data(points)
    guide = AutoDiagonalNormal(lg.model)
    guide(x)
    loc = lg.post_loc(x).reshape(-1)
    scale = lg.post_cov.diagonal().sqrt().repeat(points)
    if not exact:
        loc, scale = loc + SHIFT, scale * INFLATE
    guide.loc = PyroParam(loc.clone(), constraints.real)
    guide.scale = PyroParam(scale.clone(), constraints.softplus_positive)
    params = list(guide.parameters())
    pyro.set_rng_seed(0)
    return torch.stack(
        [
            torch.cat(
                torch.autograd.grad(
                    elbo.differentiable_loss(lg.model, guide, x), params
                )
            )
            for _ in range(draws)
        ]
    )


@pytest.mark.parametrize("k", [1, 5, 50])
def test_auto_diagonal_normal_dreg_is_zero_at_the_posterior_and_unbiased(k):
    for estimator in ("stl", "dreg"):
        grads = joint_guide_gradients(IWELBO(k, estimator), 3, exact=True)
        assert grads.abs().max() < 1e-9, (estimator, grads)
    assert joint_guide_gradients(IWELBO(k), 3, exact=True).abs().max() > 1e-2
    plain = joint_guide_gradients(IWELBO(k, "iwae"), 300)
    dreg = joint_guide_gradients(IWELBO(k, "dreg"), 300)
    assert_same_mean_lower_variance(plain, dreg)


def test_mean_field_setups_are_the_exact_posterior():
    """The guides above really are the exact posterior: L_k = log p(x)."""
    lg = LinearGaussian(diagonal_posterior=True)
    assert torch.allclose(lg.post_cov, torch.diag(lg.post_cov.diagonal()))
    for kind in KINDS:
        s = setup(kind, 3, exact=True)
        lg = LinearGaussian(diagonal_posterior=kind != "hierarchical")
        log_w = IWELBO(7).particles(s.model, s.guide, s.x).log_weights
        assert torch.allclose(log_w, lg.log_marginal(s.x).expand_as(log_w)), kind
    assert LATENT_DIM == 2  # the hierarchical setup splits z in two sites


class _LossyShift(torch.distributions.transforms.Transform):
    """z = x + shift, whose inverse is a quarter off: as a flow's numerical
    inverse can be (an IAF's, at some draws)."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True

    def __init__(self, shift, error=0.25):
        super().__init__(cache_size=1)
        self.shift, self.error = shift, error

    def _call(self, x):
        return x + self.shift

    def _inverse(self, y):
        return y - self.shift + self.error

    def log_abs_det_jacobian(self, x, y):
        return torch.zeros_like(x)


def _flow_guide(error):
    def guide(data):
        shift = pyro.param("shift", lambda: torch.full((LATENT_DIM,), 0.2).double())
        base = dist.Normal(data.new_zeros(LATENT_DIM), 1.0)
        flow = dist.TransformedDistribution(base, [_LossyShift(shift, error)])
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", flow.to_event(1))

    return guide


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
@pytest.mark.parametrize("error", [0.0, 0.25])
def test_stopped_estimators_keep_the_draws_own_log_q(estimator, error, monkeypatch):
    """stl and dreg re-evaluate log q at new tensors, which a flow inverts: an
    inaccurate inverse must change neither the bound's value (the same draw's
    iwae value) nor pass unnoticed."""
    monkeypatch.setattr(support, "_WARNED", set())
    lg = LinearGaussian()
    x = lg.sample_data(4)
    guide = _flow_guide(error)
    values = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("iwae", estimator):
            pyro.clear_param_store()
            pyro.set_rng_seed(3)
            values[name] = IWELBO(5, name).differentiable_loss(lg.model, guide, x)
    assert values[estimator].item() == pytest.approx(values["iwae"].item(), rel=1e-12)
    warned = [w for w in caught if w.category is support.InaccurateInverseWarning]
    assert len(warned) == (1 if error else 0)
    if error:
        assert f"{estimator!r} estimator re-evaluated log q of site 'z'" in str(
            warned[0].message
        )
    # The gradient still reaches the guide's parameter through z.
    values[estimator].backward()
    assert pyro.param("shift").grad is not None


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
@pytest.mark.parametrize(
    "make, name",
    [
        (lambda d: T.planar(d).double(), "Planar"),
        (lambda d: T.radial(d).double(), "Radial"),
        (lambda d: T.sylvester(d).double(), "Sylvester"),
        # Composed with an invertible one, and without any inverse at all.
        (
            lambda d: T.ComposeTransform(
                [T.Permute(torch.arange(d)), T.planar(d).double()]
            ),
            "Planar",
        ),
        (
            lambda d: T.neural_autoregressive(d, hidden_dims=[4]).double(),
            "NeuralAutoregressive",
        ),
    ],
)
def test_a_flow_without_an_inverse_is_refused_under_stl_and_dreg(estimator, make, name):
    # Pyro's KeyError ("ConditionedPlanar object expected to find key in
    # intermediates cache but didn't") came out of the first gradient step.
    lg = LinearGaussian()
    x = lg.sample_data(4)
    flow = make(LATENT_DIM)

    def guide(data):
        base = dist.Normal(data.new_zeros(LATENT_DIM), 1.0).to_event(1)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(base, [flow]))

    pyro.set_rng_seed(0)
    objective = IWELBO(3, estimator)
    words = rf"site 'z''s transforms, but {name} has none.*use estimator='iwae'"
    for check in (
        lambda: objective.check_guide(guide, x),
        lambda: objective.differentiable_loss(lg.model, guide, x),
    ):
        with pytest.raises(NotImplementedError, match=words):
            check()
    IWELBO(3, "iwae").differentiable_loss(lg.model, guide, x).backward()
