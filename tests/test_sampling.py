"""Samples, reconstructions and the PNG figures."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from matplotlib.image import imread
from test_cli import assert_ok, invoke

from pyro_iwae import ProgramError, load_run, paper_architecture
from pyro_iwae.data import load_dataset
from pyro_iwae.infer.sampling import reconstruct, sample_images
from pyro_iwae.runs.plots import (
    image_range,
    save_curves,
    save_image_grid,
    save_reconstruction_grid,
)

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


def test_data_of_the_wrong_shape_are_refused_in_one_line(test_images):
    # The model's own message came with Pyro's multi-line table of trace shapes.
    model, guide = paper_architecture(1)
    for draw, name in (
        (lambda: sample_images(model, 3, 5), "PaperModel"),
        (lambda: reconstruct(model, guide, test_images[0]), "PaperGuide"),
    ):
        with pytest.raises(ValueError) as error:
            draw()
        message = str(error.value)
        assert message.startswith(name)
        assert " takes x of shape [batch, 784], got shape " in message
        assert "\n" not in message and "Trace Shapes" not in message


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


def tile(picture, row, column, side=28):
    """The pixels of one image of a grid PNG (2 pixels of padding), 0..255."""
    top, left = 2 + row * (side + 2), 2 + column * (side + 2)
    pixels = picture[top : top + side, left : left + side, 0] * 255
    return torch.from_numpy(pixels).double().round()


def test_pictures_of_data_on_another_scale_are_drawn_over_its_range(
    tmp_path, test_images
):
    # Before, values were clipped to [0, 1]: 0..255 data drew black and white.
    grey = (test_images[:4] * 255).round()
    scale = image_range(grey)
    assert scale == (0.0, 255.0)
    path = save_reconstruction_grid(
        grey, grey / 2, tmp_path / "r.png", nrow=4, value_range=scale
    )
    picture = read_png(path)
    for column in range(4):
        original = grey[column].reshape(28, 28).double()
        assert torch.equal(tile(picture, 0, column), original)
        # The reconstructions on the originals' scale, not their own.
        assert torch.equal(tile(picture, 1, column), (original / 2 + 1e-6).round())
    # Standardised data: their least value black, their greatest white.
    standard = (test_images[:2] - 0.3) / 0.2
    picture = read_png(save_image_grid(standard, tmp_path / "s.png", nrow=2))
    low, high = image_range(standard)
    assert (low, high) == (float(standard.min()), float(standard.max()))
    expected = ((standard[1] - low) / (high - low) * 255).round().reshape(28, 28)
    assert (tile(picture, 0, 1) - expected.double()).abs().max() <= 1


def test_pictures_of_data_in_the_unit_interval_are_drawn_as_they_are(
    tmp_path, test_images
):
    grey = test_images[:2] * 0.5  # within [0, 1], though not reaching 1
    assert image_range(grey) == (0.0, 1.0)
    picture = read_png(save_image_grid(grey, tmp_path / "g.png", nrow=2))
    expected = (grey[0].double() * 255 + 0.5).floor().reshape(28, 28)
    assert torch.equal(tile(picture, 0, 0), expected)
    # One value outside [0, 1] alone is drawn mid-grey, not divided by zero.
    assert image_range(torch.full((3, 4), 7.0)) == (6.5, 7.5)


def test_sample_draws_a_run_of_0_to_255_data_on_the_data_s_scale(tmp_path):
    # Before, the command clipped to [0, 1]: 0..255 pictures came out saturated.
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (40, 28, 28), generator=g, dtype=torch.uint8)
    np.savez(tmp_path / "u8.npz", train=data[:30].numpy(), test=data[30:].numpy())
    run = tmp_path / "run"
    args = ["--likelihood", "gaussian", "--hidden", 8, "--latent-dim", 2]
    assert_ok(
        invoke(
            "fit",
            "--dataset",
            tmp_path / "u8.npz",
            *args,
            "--epochs",
            1,
            "--batch-size",
            10,
            "--quiet",
            "--out",
            run,
        )
    )
    assert_ok(invoke("sample", run, "--n", 2, "--out", tmp_path / "s.png"))
    picture = read_png(tmp_path / "s-reconstructions.png")
    assert torch.equal(tile(picture, 0, 1), data[31].double())
    # The samples on the same scale: the command's draws, from its seed (0).
    _, model, _ = load_run(run)
    torch.manual_seed(0)
    means = sample_images(model, 2, 784)[1].reshape(28, 28).double()
    expected = means.clamp(0, 255).round()
    assert means.max() - means.min() > 50  # their own range is another scale
    assert (tile(read_png(tmp_path / "s.png"), 0, 1) - expected).abs().max() <= 1
