import gzip
import hashlib
import importlib.resources
import math
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from pyro_iwae.data import (
    DATASETS,
    DataError,
    Dataset,
    binarize,
    in_unit_interval,
    load_dataset,
    minibatches,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# sha256 of the decompressed embedded file (see pyro_iwae/resources/MNIST-MINI.md).
MNIST_MINI_PAYLOAD_SHA256 = (
    "eaf71cf55b51e1dd7f24a41425ce60ed055550699bec7fe9dfb302ec1d9a362a"
)

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def mini() -> Dataset:
    return load_dataset("mnist-mini")


def assert_binary(x: torch.Tensor) -> None:
    assert ((x == 0) | (x == 1)).all()


def test_mnist_mini_shapes_and_values(mini):
    assert mini.name == "mnist-mini"
    assert mini.train.shape == (10000, 784) and mini.train.dtype == torch.float32
    assert mini.test.shape == (2000, 784) and mini.test.dtype == torch.float32
    assert mini.validation is None
    assert mini.x_dim == 784
    assert mini.train.min() == 0 and mini.train.max() == 1
    # Grey levels, not already binarised.
    assert ((mini.train > 0) & (mini.train < 1)).any()
    assert_binary(mini.test)


def test_mnist_mini_test_set_is_fixed(mini):
    assert torch.equal(load_dataset("mnist-mini").test, mini.test)
    assert not torch.equal(load_dataset("mnist-mini", seed=1).test, mini.test)


def test_mnist_mini_resource_bytes():
    resource = (
        importlib.resources.files("pyro_iwae") / "resources" / "mnist-mini.idx.gz"
    )
    payload = gzip.decompress(resource.read_bytes())
    assert hashlib.sha256(payload).hexdigest() == MNIST_MINI_PAYLOAD_SHA256


def test_train_mean(mini):
    mean = mini.train_mean
    assert mean.shape == (784,)
    # MNIST's mean grey level is 33.32 / 255 = 0.1307 over all 60,000 images.
    assert abs(mean.mean().item() - 0.1307) < 0.005


def test_validation_takes_last_images(mini):
    data = load_dataset("mnist-mini", validation_size=400)
    assert data.train.shape == (9600, 784)
    assert data.validation.shape == (400, 784)
    assert torch.equal(data.train, mini.train[:9600])
    assert_binary(data.validation)
    # A binarised pixel is 0 where the grey level is 0 and 1 where it is 1.
    grey = mini.train[9600:]
    assert (data.validation[grey == 0] == 0).all()
    assert (data.validation[grey == 1] == 1).all()
    # The test set does not depend on the split.
    assert torch.equal(data.test, mini.test)


def test_mnist_mini_labels_follow_the_split():
    """The labels are those of MNIST's head (shared/data/README.md: the first ten
    training labels 5 0 4 1 9 2 1 3 1 4, test labels 7 2 1 0 4 1 4 9 5 9)."""
    data = load_dataset("mnist-mini", validation_size=400)
    assert data.train_labels.dtype == torch.int64
    assert data.train_labels.shape == (9600,) and data.test_labels.shape == (2000,)
    assert data.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    whole = load_dataset("mnist-mini")
    assert torch.equal(
        torch.cat([data.train_labels, data.validation_labels]), whole.train_labels
    )
    assert whole.validation_labels is None
    assert torch.bincount(whole.train_labels).min() > 800  # all ten digits


@pytest.mark.parametrize("size", [-1, 10000])
def test_validation_size_out_of_range(size):
    with pytest.raises(DataError, match="validation_size"):
        load_dataset("mnist-mini", validation_size=size)


def test_to_device(mini):
    moved = mini.to("cpu")
    assert moved is not mini and moved.name == mini.name
    assert torch.equal(moved.train, mini.train)
    assert moved.validation is None
    assert torch.equal(moved.train_labels, mini.train_labels)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binarize(device, dtype):
    generator = torch.Generator(device).manual_seed(0)
    x = torch.rand(200, 784, generator=generator, device=device, dtype=dtype)
    b = binarize(x, generator)
    assert b.shape == x.shape and b.dtype == dtype and b.device == x.device
    assert_binary(b)
    # Sum of independent Bernoulli(x): its standard deviation is sqrt(sum x(1-x)).
    stderr = math.sqrt((x * (1 - x)).sum().item()) / x.numel()
    assert abs(b.mean().item() - x.mean().item()) < 5 * stderr


@pytest.mark.parametrize("device", devices)
def test_minibatches_cover_each_index_once(device):
    data = torch.arange(103, device=device).unsqueeze(-1)
    generator = torch.Generator(device).manual_seed(0)
    epochs = []
    for _ in range(2):
        batches = list(minibatches(data, 10, generator=generator))
        assert [len(b) for b in batches] == [10] * 10 + [3]
        assert all(b.device == data.device for b in batches)
        seen = torch.cat(batches).squeeze(-1)
        assert torch.equal(seen.sort().values, data.squeeze(-1))
        assert not torch.equal(seen, data.squeeze(-1))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])


def test_minibatches_in_order_and_binarized():
    data = torch.full((50, 784), 0.5)
    batches = list(minibatches(data, 20, shuffle=False))
    assert torch.equal(torch.cat(batches), data)
    generator = torch.Generator().manual_seed(0)
    for batch in minibatches(data, 20, generator=generator, binarize=True):
        assert_binary(batch)
        assert 0.4 < batch.mean() < 0.6


def test_unknown_name():
    with pytest.raises(DataError) as info:
        load_dataset("cifar10")
    message = str(info.value)
    assert "cifar10" in message and "\n" not in message
    assert all(name in message for name in DATASETS)


def test_mnist_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", missing, download=False)
    message = str(info.value)
    assert str(missing / "MNIST" / "raw") in message
    # The library's advice names its argument; the CLI's cli_text makes it
    # --data-dir FOLDER (tests/test_cli.py).
    assert "data_dir=FOLDER" in message and "\n" not in message
    assert not missing.exists()


def test_mnist_download_failure(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def fail(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ...")

    monkeypatch.setattr(MNIST, "download", fail)
    with pytest.raises(DataError, match="could not download") as info:
        load_dataset("mnist", tmp_path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_fashion_mnist_offline_download_failure(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    def fail(self):
        raise URLError("no network")

    monkeypatch.setattr(FashionMNIST, "download", fail)
    with pytest.raises(DataError, match="FashionMNIST/raw"):
        load_dataset("fashion-mnist", tmp_path)


def test_mnist_corrupt_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]:
        (raw / name).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02garbage")
    with pytest.raises(DataError, match="cannot read") as info:
        load_dataset("mnist", tmp_path, download=False)
    assert "\n" not in str(info.value)


def write_idx(path: Path, values: torch.Tensor) -> None:
    """One uint8 IDX record, as in the MNIST files."""
    header = bytes([0, 0, 8, values.dim()])
    for size in values.shape:
        header += size.to_bytes(4, "big")
    path.write_bytes(header + values.to(torch.uint8).numpy().tobytes())


def write_mnist_raw(raw: Path, n_train: int = 5, n_test: int = 3) -> None:
    raw.mkdir(parents=True)
    pixels = torch.arange((n_train + n_test) * 784) % 256
    images = pixels.view(-1, 28, 28)
    labels = torch.arange(n_train + n_test) % 10
    write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train:])


@pytest.mark.parametrize(
    "name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
)
def test_mnist_files_read_as_torchvision_reads_them(tmp_path, name, folder):
    datasets = pytest.importorskip("torchvision.datasets")
    write_mnist_raw(tmp_path / folder / "raw")
    data = load_dataset(name, tmp_path, download=False, binarize="none")
    theirs = getattr(datasets, folder)
    for split, x, y in (
        (True, data.train, data.train_labels),
        (False, data.test, data.test_labels),
    ):
        reference = theirs(tmp_path, train=split, download=False)
        assert torch.equal(x, reference.data.reshape(len(x), 784).float() / 255)
        assert torch.equal(y, reference.targets.long())


def test_mnist_files_with_fewer_labels_than_images(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_raw(raw)
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.zeros(2))
    with pytest.raises(DataError, match="one label per 28x28 image") as info:
        load_dataset("mnist", tmp_path, download=False)
    assert "\n" not in str(info.value)


def test_reading_mnist_files_does_not_import_torchvision(tmp_path):
    # Importing torchvision costs a run a second or more; only a download needs it.
    write_mnist_raw(tmp_path / "MNIST" / "raw")
    code = (
        "import sys; from pyro_iwae.data import load_dataset; "
        f"load_dataset('mnist', {str(tmp_path)!r}, download=False); "
        "print('torchvision' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="no shared MNIST copy"
)
def test_shared_mnist(mini):
    data = load_dataset("mnist", SHARED_DATA, download=False, validation_size=400)
    assert data.train.shape == (59600, 784)
    assert data.validation.shape == (400, 784)
    assert data.test.shape == (10000, 784)
    assert abs(data.train_mean.mean().item() - 0.1307) < 0.001
    # The embedded set is the head of the real one.
    assert torch.equal(data.train[:10000], mini.train)
    assert torch.equal(data.train_labels[:10000], mini.train_labels)
    assert torch.equal(data.test_labels[:2000], mini.test_labels)


# Omniglot: the tests write small files in the format of the paper's chardata.mat.


def omniglot_images(n: int, offset: int) -> torch.Tensor:
    """Images ``[n, 28, 28]``: top row lit, id ``(offset + i) / 100`` at (27, 27)."""
    images = torch.zeros(n, 28, 28, dtype=torch.float64)
    images[:, 0, :] = 1.0
    images[:, 27, 27] = (offset + torch.arange(n)) / 100
    return images


def write_chardata(path: Path, train: torch.Tensor, test: torch.Tensor) -> None:
    scipy_io = pytest.importorskip("scipy.io")

    def columns(images):
        # chardata.mat stores each image flattened in Fortran order, one per column.
        return images.transpose(1, 2).reshape(len(images), 784).T.numpy()

    scipy_io.savemat(path, {"data": columns(train), "testdata": columns(test)})


def test_omniglot(tmp_path):
    np = pytest.importorskip("numpy")
    train, test = omniglot_images(30, 0), omniglot_images(10, 50)
    write_chardata(tmp_path / "chardata.mat", train, test)

    data = load_dataset("omniglot", tmp_path, validation_size=5)
    assert data.train.shape == (25, 784) and data.train.dtype == torch.float32
    assert data.validation.shape == (5, 784)
    assert data.test.shape == (10, 784)
    assert data.train_labels is None and data.test_labels is None
    # Fortran-order storage undone: the top row is lit, not the left column.
    images = data.train.view(-1, 28, 28)
    assert (images[:, 0, :] == 1).all()
    assert (images[:, 1:27, 0] == 0).all()
    # Training set shuffled as in the paper; test set in file order.
    order = np.random.RandomState(123).permutation(30)
    ids = (images[:, 27, 27] * 100).round().long()
    assert ids.tolist() == order[:25].tolist()
    # Only the id pixel is grey; binarisation keeps the 0/1 pixels as they are.
    assert_binary(data.test)
    assert torch.equal(data.test.view(-1, 28, 28)[:, :27], test[:, :27].float())


def test_omniglot_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("omniglot", tmp_path)
    assert str(tmp_path / "chardata.mat") in str(info.value)


def test_omniglot_corrupt_file(tmp_path):
    pytest.importorskip("scipy.io")
    (tmp_path / "chardata.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match="cannot read") as info:
        load_dataset("omniglot", tmp_path)
    assert "\n" not in str(info.value)


def test_omniglot_wrong_contents(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": [[2.0]], "testdata": [[0.0]]})
    with pytest.raises(DataError, match="784 x N"):
        load_dataset("omniglot", tmp_path)


def test_omniglot_without_scipy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match=r"pip install 'pyro-iwae\[omniglot\]'"):
        load_dataset("omniglot", tmp_path)


@pytest.mark.parametrize(
    "values, inside",
    [
        ([0.0, 0.5, 1.0], True),
        ([0.0, 1.0 + 1e-6], False),
        ([-1e-30, 0.5], False),
        ([0.5, float("nan")], False),
        ([], True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_unit_interval(values, inside, dtype):
    x = torch.tensor(values, dtype=dtype)
    assert in_unit_interval(x) is inside
    assert in_unit_interval(x.reshape(-1, 1).expand(-1, 3)) is inside
