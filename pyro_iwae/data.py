"""Data sets for IWAE experiments: loading, binarisation and mini-batches.

Images are flattened to 784 grey levels in [0, 1]. Following the paper's code
(yburda/iwae), training images are kept as grey levels and binarised afresh for
every mini-batch, while the test (and validation) images are binarised once,
with a fixed seed, so that evaluations of different models are comparable.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "binarize",
    "default_data_dir",
    "load_dataset",
    "minibatches",
    "one_line",
]

DATASETS: tuple[str, ...] = ("mnist-mini", "mnist", "fashion-mnist", "omniglot")
"""Names accepted by :func:`load_dataset`; ``"mnist-mini"`` ships with the package."""

_MNIST_MINI = "mnist-mini.idx.gz"
# File names shared by torchvision's MNIST and FashionMNIST, under <root>/<Class>/raw.
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_OMNIGLOT_FILE = "chardata.mat"
_OMNIGLOT_URL = (
    "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat"
)
# The paper's code shuffles the Omniglot training set with this numpy seed.
_OMNIGLOT_SHUFFLE_SEED = 123


class DataError(Exception):
    """A data set cannot be found, fetched or read; the message says what to do."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A data set of flattened images.

    :param name: Name as passed to :func:`load_dataset`.
    :param train: Float32 ``[N, x_dim]`` grey levels in [0, 1], to be binarised
        dynamically (see :func:`minibatches`).
    :param test: Float32 ``[M, x_dim]`` of 0/1, binarised once with a fixed seed.
    :param validation: Float32 ``[V, x_dim]`` of 0/1 binarised once, or None.
    """

    name: str
    train: Tensor
    test: Tensor
    validation: Tensor | None = None

    @property
    def x_dim(self) -> int:
        """Number of pixels per image."""
        return self.train.shape[-1]

    @property
    def train_mean(self) -> Tensor:
        """Mean grey level of each pixel over the training set, shape ``[x_dim]``."""
        return self.train.mean(0)

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            train=self.train.to(device),
            test=self.test.to(device),
            validation=None if self.validation is None else self.validation.to(device),
        )


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``Bernoulli(x)`` elementwise: 0/1 values, same shape, dtype and device.

    :param x: Probabilities (grey levels) in [0, 1].
    :param generator: Random generator on ``x.device``, or None for the global one.
    """
    return torch.bernoulli(x, generator=generator)


def minibatches(
    data: Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    binarize: bool = False,
) -> Iterator[Tensor]:
    """Iterate once over ``data`` in mini-batches along its first dimension.

    Indexing happens on ``data.device``, so no data cross the host-device link.
    The last batch is smaller when ``batch_size`` does not divide ``len(data)``.

    :param data: Tensor of shape ``[N, ...]``.
    :param batch_size: Number of rows per batch.
    :param generator: Random generator on ``data.device``, or None for the global
        one; used for both the permutation and the binarisation.
    :param shuffle: Visit the rows in a fresh random order.
    :param binarize: Replace each batch by a Bernoulli draw of its values
        (dynamic binarisation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = data.shape[0]
    order = (
        torch.randperm(n, generator=generator, device=data.device) if shuffle else None
    )
    for start in range(0, n, batch_size):
        if order is None:
            batch = data[start : start + batch_size]
        else:
            batch = data[order[start : start + batch_size]]
        if binarize:
            batch = torch.bernoulli(batch, generator=generator)
        yield batch


def default_data_dir() -> Path:
    """Folder for downloaded data: ``$PYRO_IWAE_DATA``, else the user cache."""
    if "PYRO_IWAE_DATA" in os.environ:
        return Path(os.environ["PYRO_IWAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyro-iwae"


def load_dataset(
    name: str = "mnist-mini",
    data_dir: str | os.PathLike | None = None,
    *,
    validation_size: int = 0,
    download: bool = True,
    seed: int = 0,
) -> Dataset:
    """Load a data set by name, on the CPU.

    Names are in :data:`DATASETS`:

    - ``"mnist-mini"``: the first 10,000 training and 2,000 test MNIST images,
      embedded in the package; needs no file and no network.
    - ``"mnist"``, ``"fashion-mnist"``: 60,000 / 10,000 images read by
      torchvision from ``<data_dir>/MNIST/raw`` or ``<data_dir>/FashionMNIST/raw``.
    - ``"omniglot"``: 24,345 / 8,070 images from the paper's ``chardata.mat`` in
      ``data_dir`` (needs scipy; never downloaded), training set shuffled as in
      the paper.

    :param name: Data set name.
    :param data_dir: Folder holding the data; defaults to :func:`default_data_dir`.
    :param validation_size: Number of images held out from the *end* of the
        training set as validation data (the paper uses 400 for MNIST and 1345
        for Omniglot); 0 for none.
    :param download: Allow torchvision to download missing MNIST files.
    :param seed: Seed of the one-off binarisation of the test and validation sets.
    :raises DataError: If the name is unknown or the data cannot be found or read.
    """
    if name not in DATASETS:
        raise DataError(
            f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}"
        )
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if name == "mnist-mini":
        train, test = _load_mnist_mini()
    elif name == "omniglot":
        train, test = _load_omniglot(root)
    else:
        train, test = _load_torchvision(name, root, download)

    n = train.shape[0]
    if not 0 <= validation_size < n:
        raise DataError(
            f"validation_size must be in [0, {n}) for {name}, got {validation_size}"
        )
    validation = train[n - validation_size :] if validation_size else None
    train = train[: n - validation_size]

    # Test first, so that the test set does not depend on validation_size.
    generator = torch.Generator().manual_seed(seed)
    test = binarize(test, generator)
    if validation is not None:
        validation = binarize(validation, generator)
    return Dataset(name=name, train=train, test=test, validation=validation)


def _read_idx(payload: bytes) -> list[Tensor]:
    """Decode concatenated uint8 IDX records into tensors."""
    records = []
    offset = 0
    while offset < len(payload):
        zeros, dtype, ndim = struct.unpack_from(">HBB", payload, offset)
        if zeros != 0 or dtype != 0x08 or ndim == 0:
            raise ValueError(f"bad IDX header at byte {offset}")
        shape = struct.unpack_from(f">{ndim}I", payload, offset + 4)
        offset += 4 + 4 * ndim
        size = 1
        for d in shape:
            size *= d
        if offset + size > len(payload):
            raise ValueError("truncated IDX record")
        # bytearray makes the tensor own writable memory.
        data = bytearray(payload[offset : offset + size])
        records.append(torch.frombuffer(data, dtype=torch.uint8).view(shape))
        offset += size
    return records


def _load_mnist_mini() -> tuple[Tensor, Tensor]:
    resource = importlib.resources.files(__package__) / "resources" / _MNIST_MINI
    try:
        train_x, _, test_x, _ = _read_idx(gzip.decompress(resource.read_bytes()))
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise DataError(
            f"the embedded data set {_MNIST_MINI} is missing or corrupt ({e}); "
            "reinstall pyro-iwae"
        ) from e
    return _flatten(train_x), _flatten(test_x)


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = root / cls.__name__ / "raw"
    missing = [f for f in _IDX_FILES if not (raw / f).is_file()]
    if missing and not download:
        raise DataError(
            f"{name}: {raw / missing[0]} not found; pass --data-dir pointing at a "
            f"folder holding {cls.__name__}/raw, or allow download"
        )
    if missing:
        try:
            cls(root, train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"{name}: could not download into {raw} ({one_line(e)}); check the "
                f"network, or pass --data-dir pointing at a folder holding "
                f"{cls.__name__}/raw"
            ) from e
    try:
        train = cls(root, train=True, download=False).data
        test = cls(root, train=False, download=False).data
    except (
        OSError,
        RuntimeError,
        ValueError,
        TypeError,
        KeyError,
        AssertionError,
    ) as e:
        raise DataError(
            f"{name}: cannot read the files in {raw} ({one_line(e)}); delete them "
            "and download again"
        ) from e
    if train.shape[1:] != (28, 28) or test.shape[1:] != (28, 28):
        raise DataError(
            f"{name}: the images in {raw} are not 28x28; delete them and download again"
        )
    return _flatten(train), _flatten(test)


def _load_omniglot(root: Path) -> tuple[Tensor, Tensor]:
    try:
        import numpy as np
        import scipy.io
    except ImportError as e:
        raise DataError(
            "omniglot needs scipy: pip install 'pyro-iwae[omniglot]'"
        ) from e

    path = root / _OMNIGLOT_FILE
    if not path.is_file():
        raise DataError(
            f"omniglot: {path} not found; download {_OMNIGLOT_URL} and pass "
            "--data-dir pointing at its folder"
        )
    try:
        mat = scipy.io.loadmat(path)
        train, test = mat["data"], mat["testdata"]
    except Exception as e:  # loadmat raises many types on a damaged file
        raise DataError(
            f"omniglot: cannot read {path} ({one_line(e)}); download it again "
            f"from {_OMNIGLOT_URL}"
        ) from e
    for key, x in (("data", train), ("testdata", test)):
        if x.ndim != 2 or x.shape[0] != 784 or not ((x >= 0) & (x <= 1)).all():
            raise DataError(
                f"omniglot: {path} key {key!r} is not 784 x N grey levels in [0, 1]; "
                f"download it again from {_OMNIGLOT_URL}"
            )

    def to_images(x: np.ndarray) -> Tensor:
        # The file stores each image column-major: transpose every 28x28 image.
        x = torch.as_tensor(np.ascontiguousarray(x.T), dtype=torch.float32)
        return x.view(-1, 28, 28).transpose(1, 2).reshape(-1, 784)

    train, test = to_images(train), to_images(test)
    order = np.random.RandomState(_OMNIGLOT_SHUFFLE_SEED).permutation(len(train))
    return train[torch.as_tensor(order)], test


def _flatten(images: Tensor) -> Tensor:
    """Map uint8 ``[N, 28, 28]`` images to float32 ``[N, 784]`` in [0, 1]."""
    return images.reshape(images.shape[0], -1).to(torch.float32) / 255


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line: user-facing errors here are one line."""
    return " ".join(str(e).split()).rstrip(":") or type(e).__name__
