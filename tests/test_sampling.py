"""Samples, reconstructions and the PNG figures."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib.image import imread

from pyro_iwae import ProgramError, paper_architecture
from pyro_iwae.data import load_dataset
from pyro_iwae.infer.sampling import reconstruct, sample_images
from pyro_iwae.runs.plots import save_curves, save_image_grid, save_reconstruction_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def test_images():
    return load_dataset("mnist-mini").test[:10]


@pytest.mark.parametrize("layers", [1, 2])
def test_sample_images_shape_and_range(layers):
    model, _ = paper_architecture(layers)
    model.train()
    images = sample_images(model, 7, 784)
    assert images.shape == (7, 784) and images.dtype == torch.float32
    assert not images.requires_grad
    assert ((images >= 0) & (images <= 1)).all()
    # Probabilities, not 0/1 draws; and different z give different images.
    assert ((images > 0) & (images < 1)).float().mean() > 0.5
    assert not torch.allclose(images[0], images[1])
    assert model.training  # the mode is restored


def test_sample_images_device_and_bias():
    data_mean = torch.full((784,), 0.2)
    model, _ = paper_architecture(1, data_mean=data_mean)
    torch.nn.init.zeros_(model.pixels[-1].weight)
    images = sample_images(model, 3, 784, device="cpu")
    assert images.device.type == "cpu"
    assert torch.allclose(images, torch.full_like(images, 0.2), atol=1e-6)
    with pytest.raises(ValueError):
        sample_images(model, 0, 784)


def test_samples_of_a_float64_model_are_float64(test_images):
    """The dummy x the model runs on takes its parameters' dtype, as the
    networks require of x."""
    model, guide = (m.double() for m in paper_architecture(1))
    torch.nn.init.zeros_(model.pixels[-1].weight)
    torch.nn.init.constant_(model.pixels[-1].bias, -1.0)
    images = sample_images(model, 3, 784)
    assert images.dtype == torch.float64
    assert torch.allclose(images, torch.sigmoid(torch.tensor(-1.0)).double())
    assert reconstruct(model, guide, test_images.double()).dtype == torch.float64


@pytest.mark.parametrize("layers", [1, 2])
def test_reconstruct_shape_and_range(test_images, layers):
    model, guide = paper_architecture(layers)
    recon = reconstruct(model, guide, test_images)
    assert recon.shape == test_images.shape and not recon.requires_grad
    assert ((recon > 0) & (recon < 1)).all()
    assert model.training and guide.training


def test_reconstruct_uses_the_guide(test_images):
    # With the guide's mean fixed at z = 0 and tiny noise, the reconstruction is
    # p(x | z = 0) for every image.
    model, guide = paper_architecture(1)
    out = guide.layers[0].out
    torch.nn.init.zeros_(out.weight)
    with torch.no_grad():
        out.bias.copy_(torch.cat([torch.zeros(50), torch.full((50,), -20.0)]))
    recon = reconstruct(model, guide, test_images)
    with torch.no_grad():
        expected = torch.sigmoid(model.pixels(torch.zeros(1, 50)))
    assert torch.allclose(recon, expected.expand_as(recon), atol=1e-5)


def read_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    return imread(path)


def test_png_files(tmp_path, test_images):
    path = save_image_grid(test_images[:10], tmp_path / "sub" / "grid.png", nrow=5)
    image = read_png(path)
    # 2 rows of 5 images of 28 pixels, 2 pixels of padding around each.
    assert image.shape[:2] == (2 * 30 + 2, 5 * 30 + 2)

    recon = save_reconstruction_grid(
        test_images[:6], test_images[:6] * 0.5, tmp_path / "recon.png", nrow=4
    )
    # 2 groups of (originals, reconstructions): 4 rows of 4 images.
    assert read_png(recon).shape[:2] == (4 * 30 + 2, 4 * 30 + 2)
    with pytest.raises(ValueError, match="shape"):
        save_reconstruction_grid(test_images[:2], test_images[:3], tmp_path / "x.png")

    metrics = [
        {"epoch": e, "train_bound": -200 + e, "test_bound": -190 + e, "k": 5}
        for e in range(1, 4)
    ]
    metrics[1]["test_bound"] = None
    curves = save_curves(metrics, tmp_path / "curves.png", title="run")
    assert read_png(curves).shape[:2] == (400, 600)
    assert read_png(save_curves([], tmp_path / "empty.png")).shape[:2] == (400, 600)


def _observing(*names):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1)
            )
            logits = z.sum(-1, keepdim=True).expand(-1, x.shape[-1])
            for name in names:
                pyro.sample(name, dist.Bernoulli(logits=logits).to_event(1), obs=x)

    return model


def _standard_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))


def test_the_observed_site_is_found_whatever_its_name():
    # `pyro-iwae sample` of a run whose model observes "obs" gave a traceback:
    # "the model has no sample site 'x'".
    model = _observing("obs")
    assert sample_images(model, 3, 4).shape == (3, 4)
    assert reconstruct(model, _standard_guide, torch.ones(2, 4)).shape == (2, 4)
    with pytest.raises(ProgramError, match=r"observes 2 sites \('a', 'b'\), not one"):
        sample_images(_observing("a", "b"), 3, 4)
    assert sample_images(_observing("a", "b"), 3, 4, observed_site="b").shape == (3, 4)
