"""The paper's architectures, their site names, and the registry."""

import pyro
import pytest
import torch
from pyro import poutine

from pyro_iwae import (
    DATA_PLATE,
    GUIDES,
    IWELBO,
    LATENT_SITES,
    MODELS,
    OBSERVED_SITE,
    build_guide,
    build_model,
    log_likelihood,
    paper_architecture,
    register_guide,
)


def linear_shapes(module):
    return [
        tuple(m.weight.shape[::-1]) for m in module.modules() if hasattr(m, "weight")
    ]


def test_one_layer_architecture_is_the_papers():
    model, guide = paper_architecture(1)
    # (in, out) of each linear map; Gaussian layers output mean and log std
    assert linear_shapes(guide) == [(784, 200), (200, 200), (200, 100)]
    assert linear_shapes(model) == [(50, 200), (200, 200), (200, 784)]
    assert all(isinstance(m, torch.nn.Tanh) for m in guide.layers[0].hidden[1::2])


def test_two_layer_architecture_is_the_papers():
    model, guide = paper_architecture(2)
    assert linear_shapes(guide) == [
        (784, 200),
        (200, 200),
        (200, 200),
        (100, 100),
        (100, 100),
        (100, 100),
    ]
    assert linear_shapes(model) == [
        (50, 100),
        (100, 100),
        (100, 200),
        (100, 200),
        (200, 200),
        (200, 784),
    ]


@pytest.mark.parametrize("layers", [1, 2])
def test_site_names_plate_and_shapes(layers):
    model, guide = paper_architecture(layers)
    x = (torch.rand(6, 784) < 0.5).float()
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    latents = LATENT_SITES[:layers]
    sizes = {"z1": 50} if layers == 1 else {"z1": 100, "z2": 50}
    for name in latents:
        assert guide_trace.nodes[name]["value"].shape == (6, sizes[name])
        frames = [f.name for f in model_trace.nodes[name]["cond_indep_stack"]]
        assert frames == [DATA_PLATE]
    assert model_trace.nodes[OBSERVED_SITE]["is_observed"]
    assert model_trace.nodes[OBSERVED_SITE]["fn"].event_shape == (784,)
    assert IWELBO(3).loss(model, guide, x) > 0


def test_output_bias_is_the_logit_of_the_data_mean():
    mean = torch.linspace(0, 1, 784)
    model, _ = paper_architecture(1, data_mean=mean)
    expected = torch.logit(mean.clamp(1e-3, 1 - 1e-3))
    assert torch.allclose(model.pixels[-1].bias, expected)


def test_two_instances_train_their_own_parameters_under_svi():
    x = (torch.rand(8, 784) < 0.3).float()
    first_model, first_guide = paper_architecture(1)
    model, guide = paper_architecture(1)
    before = [p.detach().clone() for p in (*first_model.parameters(),)]
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), IWELBO(2))
    start = svi.evaluate_loss(x)
    for _ in range(20):
        svi.step(x)
    assert svi.evaluate_loss(x) < start
    assert all(
        torch.equal(a, b) for a, b in zip(before, first_model.parameters(), strict=True)
    )


def test_registry_builds_by_name_and_rejects_unknown_names():
    assert "paper" in MODELS and "paper" in GUIDES
    model = build_model("paper", x_dim=20, stochastic_layers=2)
    guide = build_guide("paper", x_dim=20, stochastic_layers=2)
    x = (torch.rand(5, 20) < 0.5).float()
    assert log_likelihood(model, guide, x, num_samples=4).shape == (5,)
    with pytest.raises(
        ValueError,
        match="unknown guide 'nope'; choose one of: .*paper",
    ):
        build_guide("nope")
    with pytest.raises(ValueError, match="stochastic_layers must be 1 or 2"):
        build_model("paper", stochastic_layers=3)
    with pytest.raises(ValueError, match="registered already"):
        register_guide("paper")(lambda **config: None)


def test_networks_register_with_pyro_unless_parameters_are_module_local():
    model, guide = paper_architecture(1)
    x = torch.zeros(2, 784)
    trace = poutine.trace(guide).get_trace(x)
    assert sum(site["type"] == "param" for site in trace.nodes.values()) == 6
    with pyro.settings.context(module_local_params=True):
        trace = poutine.trace(guide).get_trace(x)
        loss = IWELBO(2)(model, guide)(x)
    assert not any(site["type"] == "param" for site in trace.nodes.values())
    loss.backward()
    assert all(p.grad is not None for p in guide.parameters())
