"""JointOptim steps Pyro's parameters as pyro.optim's per-tensor optimisers do."""

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from pyro_iwae import IWELBO
from pyro_iwae.optim import Adam, JointOptim

DATA = torch.tensor([0.5, -1.0, 2.0])


def model(x, step):
    w = pyro.param("w", torch.tensor(0.3))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(w * z, 1.0), obs=x)


def guide(x, step):
    a = pyro.param("a", torch.tensor(0.1))
    b = pyro.param("b", torch.zeros(len(x)))
    scale = pyro.param(
        "scale", torch.ones(len(x)), constraint=dist.constraints.positive
    )
    loc = a * x + b
    if step % 3 == 0:
        # A parameter only some steps use: the others must leave it and its
        # optimiser state alone, as Pyro's per-tensor optimisers do.
        loc = loc + pyro.param("shift", torch.tensor(0.2))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, scale))


def train(optim, steps, start=0, state=None):
    """Parameters and optimiser state after ``steps`` SVI steps from a seeded
    start (or from ``state``: parameters and optimiser state saved earlier)."""
    pyro.clear_param_store()
    if state is not None:
        pyro.get_param_store().set_state(state[0])
        optim.set_state(state[1])
    svi = SVI(model, guide, optim, loss=IWELBO(num_particles=4))
    for step in range(start, start + steps):
        pyro.set_rng_seed(step)  # the same draws whether resumed or not
        svi.step(DATA, step)
    store = pyro.get_param_store()
    values = {name: store[name].detach().clone() for name in store.keys()}
    return values, (store.get_state(), optim.get_state())


def assert_same(ours, theirs, exact=True):
    assert ours.keys() == theirs.keys()
    for name in ours:
        if exact:
            assert torch.equal(ours[name], theirs[name]), name
        else:
            assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize(
    "args",
    [
        {"lr": 0.05},
        {"lr": 0.05, "betas": (0.8, 0.9), "weight_decay": 0.1},
        # Per-parameter settings: two groups in the one optimiser.
        lambda name: {"lr": 0.2 if name == "b" else 0.05},
    ],
)
def test_the_same_parameters_as_pyros_per_tensor_adam(args):
    theirs, _ = train(pyro.optim.Adam(args), 7)
    joint = JointOptim(torch.optim.Adam, args)
    ours, _ = train(joint, 7)
    assert_same(ours, theirs)
    assert theirs["shift"] != 0.2  # stepped on steps 0, 3, 6
    groups = joint.optimizer.param_groups
    assert len(groups) == (1 if isinstance(args, dict) else 2)
    assert sum(len(g["params"]) for g in groups) == 5


def test_clipping_as_pyro_clips():
    args, clip = {"lr": 0.05}, {"clip_norm": 0.01}
    theirs, _ = train(pyro.optim.Adam(args, clip), 5)
    ours, _ = train(JointOptim(torch.optim.Adam, args, clip), 5)
    unclipped, _ = train(pyro.optim.Adam(args), 5)
    assert_same(ours, theirs)
    assert not torch.equal(ours["b"], unclipped["b"])


def test_fused_adam_agrees_to_rounding():
    theirs, _ = train(pyro.optim.Adam({"lr": 0.05}), 7)
    joint = Adam({"lr": 0.05})
    ours, _ = train(joint, 7)
    assert joint.optimizer.defaults["fused"] is True
    assert_same(ours, theirs, exact=False)


@pytest.mark.parametrize("first, second", [("pyro", "joint"), ("joint", "pyro")])
def test_a_saved_state_moves_between_pyros_optimiser_and_ours(first, second):
    def make(kind):
        args = {"lr": 0.05, "betas": (0.7, 0.9)}
        return (
            pyro.optim.Adam(args)
            if kind == "pyro"
            else JointOptim(torch.optim.Adam, args)
        )

    straight, _ = train(make("pyro"), 8)
    _, saved = train(make(first), 4)
    resumed, _ = train(make(second), 4, start=4, state=saved)
    assert_same(resumed, straight)
    # Not a start from scratch: Adam's moments and step counts came across.
    fresh, _ = train(make(second), 4, start=4, state=(saved[0], {}))
    assert not torch.equal(fresh["b"], straight["b"])


def test_refuses_what_is_not_an_optimiser_class():
    with pytest.raises(TypeError, match="torch.optim.Optimizer class"):
        JointOptim(torch.optim.lr_scheduler.StepLR, {"step_size": 1})
    with pytest.raises(TypeError, match="torch.optim.Optimizer class"):
        JointOptim(lambda params: torch.optim.SGD(params, lr=0.1), {})


def test_a_torch_scheduler_drives_the_joint_optimiser():
    joint = JointOptim(torch.optim.Adam, {"lr": 0.05})
    pyro.clear_param_store()
    svi = SVI(model, guide, joint, loss=IWELBO(num_particles=2))
    assert joint.optimizer is None
    svi.step(DATA, 1)
    scheduler = torch.optim.lr_scheduler.StepLR(joint.optimizer, 1, gamma=0.5)
    svi.step(DATA, 1)
    scheduler.step()
    before = {n: pyro.param(n).detach().clone() for n in ("a", "b")}
    svi.step(DATA, 1)
    assert joint.optimizer.param_groups[0]["lr"] == 0.025
    for name, value in before.items():
        assert not torch.equal(pyro.param(name).detach(), value)


def test_an_autoguides_parameters_as_under_pyros_adam():
    """AutoNormal makes its (constrained) parameters on the first step."""
    from pyro.infer.autoguide import AutoNormal

    def plain_model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    finals = []
    for optim in (
        pyro.optim.Adam({"lr": 0.05}),
        JointOptim(torch.optim.Adam, {"lr": 0.05}),
    ):
        pyro.clear_param_store()
        guide = AutoNormal(plain_model)
        svi = SVI(plain_model, guide, optim, loss=IWELBO(num_particles=3))
        for step in range(5):
            pyro.set_rng_seed(step)
            svi.step(DATA)
        finals.append({k: v.detach().clone() for k, v in guide.named_parameters()})
    assert finals[0].keys() == finals[1].keys() and len(finals[0]) == 2
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


def test_a_step_releases_the_gradients_it_used():
    """None after a step, where Pyro's zero_grads leaves zeros: the next backward
    then hands its gradients over instead of adding them to zeros."""
    joint = JointOptim(torch.optim.Adam, {"lr": 0.05})
    pyro.clear_param_store()
    svi = SVI(model, guide, joint, loss=IWELBO(num_particles=2))
    svi.step(DATA, 0)  # uses "shift"
    store = pyro.get_param_store()
    assert all(store[name].unconstrained().grad is None for name in store.keys())
    shift = store["shift"].unconstrained()
    shift.grad = torch.tensor(3.0)  # a gradient from elsewhere, not this step's
    svi.step(DATA, 1)  # does not use "shift": its gradient stays
    assert shift.grad == 3.0
    assert store["a"].unconstrained().grad is None
