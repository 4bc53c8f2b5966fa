"""Data sets for IWAE experiments: loading, binarisation and mini-batches.

The built-in data sets are images flattened to 784 grey levels in [0, 1]; a
user's own data come from a ``.npy``, ``.npz`` or ``.pt`` file of shape
``[N, ...]``, flattened to ``[N, x_dim]``. Binarisation is a choice
(:data:`BINARIZATIONS`). With ``"dynamic"`` (the default for the built-in
data sets), following the paper's code (yburda/iwae), training images are
kept as grey levels and binarised afresh for every mini-batch, while the test
(and validation) images are binarised once, with a fixed seed, so that
evaluations of different models are comparable; ``"static"`` binarises every
split once; ``"none"`` uses the values as given.
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

from .data_files import FILE_SUFFIXES, file_width, load_file
from .downloads import default_data_dir, undone_on_error
from .errors import DataError, literal, one_line

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "DataError",
    "Dataset",
    "binarize",
    "default_data_dir",
    "file_width",
    "load_dataset",
    "minibatches",
    "one_line",
]

DATASETS: tuple[str, ...] = ("mnist-mini", "mnist", "fashion-mnist", "omniglot")
"""Names accepted by :func:`load_dataset`; ``"mnist-mini"`` ships with the package."""

BINARIZATIONS: tuple[str, ...] = ("dynamic", "static", "none")
"""How the values are binarised: ``"dynamic"`` (training data afresh for every
mini-batch, test and validation data once with a fixed seed), ``"static"``
(every split once, with a fixed seed) or ``"none"`` (values as given)."""

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


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A data set of flattened points (images for the built-in ones).

    :param name: Name (or path) as passed to :func:`load_dataset`.
    :param train: Float32 ``[N, x_dim]``: grey levels in [0, 1] to be binarised
        dynamically (see :func:`minibatches`) if ``binarize`` is ``"dynamic"``,
        else the values to train on.
    :param test: Float32 ``[M, x_dim]``: of 0/1, binarised once with a fixed
        seed, unless ``binarize`` is ``"none"``.
    :param validation: Float32 ``[V, x_dim]`` as ``test``, or None.
    :param binarize: one of :data:`BINARIZATIONS`: what was done to the test and
        validation data, and what :func:`pyro_iwae.fit` does to ``train``.
    :param image_shape: shape of one point before flattening, for pictures
        (None: not a picture).
    :param train_labels: int64 ``[N]`` class of each training point (digits
        0-9 for MNIST), or None where the source has no labels (Omniglot, a
        file); ``test_labels`` and ``validation_labels`` the same for those
        splits.
    """

    name: str
    train: Tensor
    test: Tensor
    validation: Tensor | None = None
    binarize: str = "dynamic"
    image_shape: tuple[int, ...] | None = (28, 28)
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    validation_labels: Tensor | None = None

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
            **{
                field.name: getattr(self, field.name).to(device)
                for field in dataclasses.fields(self)
                if isinstance(getattr(self, field.name), Tensor)
            },
        )


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``Bernoulli(x)`` elementwise: 0/1 values, same shape, dtype and device.

    :param x: Probabilities (grey levels) in [0, 1].
    :param generator: Random generator on ``x.device``, or None for the global one.
    """
    return torch.bernoulli(x, generator=generator)


_binarize = binarize  # load_dataset's argument binarize hides the function


def in_unit_interval(x: Tensor) -> bool:
    """Whether every value of ``x`` lies in [0, 1] (False where one is NaN)."""
    if not x.numel():
        return True
    # One pass without temporaries: comparing the whole tensor twice took a
    # tenth of a second of each MNIST load.
    low, high = torch.aminmax(x)
    return bool(low >= 0) and bool(high <= 1)


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
            # index_select: the same rows as data[index], in a fraction of
            # the time (advanced indexing is a general gather).
            batch = data.index_select(0, order[start : start + batch_size])
        if binarize:
            batch = torch.bernoulli(batch, generator=generator)
        yield batch


def load_dataset(
    name: str | os.PathLike = "mnist-mini",
    data_dir: str | os.PathLike | None = None,
    *,
    validation_size: int = 0,
    download: bool = True,
    seed: int = 0,
    binarize: str = "dynamic",
    test_fraction: float = 0.1,
) -> Dataset:
    """Load a data set by name, or a user's data set from a file, on the CPU.

    Names are in :data:`DATASETS`:

    - ``"mnist-mini"``: the first 10,000 training and 2,000 test MNIST images,
      embedded in the package; needs no file and no network.
    - ``"mnist"``, ``"fashion-mnist"``: 60,000 / 10,000 images from the IDX
      files in ``<data_dir>/MNIST/raw`` or ``<data_dir>/FashionMNIST/raw``
      (torchvision's layout; torchvision downloads missing files).
    - ``"omniglot"``: 24,345 / 8,070 images from the paper's ``chardata.mat`` in
      ``data_dir`` (needs scipy; never downloaded), training set shuffled as in
      the paper.

    Any other name is the path of a file (see :func:`load_file`): a ``.npy``
    array, a ``.npz`` with arrays ``train`` and optionally ``test``, or a ``.pt``
    tensor (or dict of ``train`` and ``test`` tensors), each ``[N, ...]``.

    :param name: Data set name or file path.
    :param data_dir: Folder holding the data; defaults to :func:`default_data_dir`.
    :param validation_size: Number of images held out from the *end* of the
        training set as validation data (the paper uses 400 for MNIST and 1345
        for Omniglot); 0 for none.
    :param download: Allow torchvision to download missing MNIST files.
    :param seed: Seed of the one-off binarisation of the test and validation sets
        (and of the split of a file without a test set).
    :param binarize: one of :data:`BINARIZATIONS`.
    :param test_fraction: share of the points of a file without a test set
        held out, at random (with ``seed``), as its test set.
    :raises DataError: If the name is unknown or the data cannot be found or read.
    """
    if binarize not in BINARIZATIONS:
        raise DataError(
            f"binarize must be one of {', '.join(BINARIZATIONS)}, got {binarize!r}"
        )
    image_shape: tuple[int, ...] | None = (28, 28)
    labels: list[Tensor] = []  # train and test labels, where the source has them
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if name not in DATASETS:
        if not is_data_file(name):
            raise DataError(
                f"unknown data set {str(name)!r}; choose one of: "
                f"{', '.join(DATASETS)}, or pass the path of a "
                f"{', '.join(FILE_SUFFIXES)} file"
            )
        train, test, image_shape = load_file(name, test_fraction, seed)
        name = str(name)
    elif name == "mnist-mini":
        train, test, *labels = _load_mnist_mini()
    elif name == "omniglot":
        train, test = _load_omniglot(root)
    else:
        train, test, *labels = _load_idx_files(name, root, download)

    n = train.shape[0]
    if not 0 <= validation_size < n:
        raise DataError(
            f"validation_size must be in [0, {n}) for {name}, got {validation_size}"
        )
    validation = train[n - validation_size :] if validation_size else None
    train = train[: n - validation_size]
    train_labels = test_labels = validation_labels = None
    if labels:
        train_labels, test_labels = labels
        if validation_size:
            validation_labels = train_labels[n - validation_size :]
        train_labels = train_labels[: n - validation_size]

    if binarize != "none":
        for split, x in (("train", train), ("test", test)):
            if not in_unit_interval(x):
                # {binarize}: the command line says --binarize.
                raise DataError(
                    f"{literal(name)}: {{binarize}} {binarize} needs values in "
                    f"[0, 1], but the {split} data hold values in "
                    f"[{float(x.min()):g}, {float(x.max()):g}]; scale them into "
                    "[0, 1] or use {binarize} none",
                    template=True,
                )
        # Test first, so that the test set does not depend on validation_size.
        generator = torch.Generator().manual_seed(seed)
        test = _binarize(test, generator)
        if validation is not None:
            validation = _binarize(validation, generator)
        if binarize == "static":
            train = _binarize(train, generator)
    return Dataset(
        name,
        train,
        test,
        validation,
        binarize,
        image_shape,
        train_labels,
        test_labels,
        validation_labels,
    )


def is_data_file(name: str | os.PathLike) -> bool:
    """Whether ``name`` names a user's data file rather than a built-in data set:
    a path with one of :data:`FILE_SUFFIXES` (in any case: ``.NPY`` too)."""
    return str(name) not in DATASETS and Path(name).suffix.lower() in FILE_SUFFIXES


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


def _load_mnist_mini() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test images, then their labels."""
    resource = importlib.resources.files(__package__) / "resources" / _MNIST_MINI
    try:
        train_x, train_y, test_x, test_y = _read_idx(
            gzip.decompress(resource.read_bytes())
        )
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise DataError(
            f"the embedded data set {_MNIST_MINI} is missing or corrupt ({e}); "
            "reinstall pyro-iwae"
        ) from e
    return _flatten(train_x), _flatten(test_x), train_y.long(), test_y.long()


def _load_idx_files(
    name: str, root: Path, download: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test images, then their labels, from torchvision's raw folder.

    torchvision downloads missing files; present ones are read here, which spares
    a run the second or so that importing torchvision takes.
    """
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    raw = root / folder / "raw"
    missing = [f for f in _IDX_FILES if not (raw / f).is_file()]
    if missing and not download:
        raise DataError(
            f"{name}: {raw / missing[0]} not found; pass data_dir=FOLDER, a folder "
            f"holding {folder}/raw, or allow download"
        )
    if missing:
        from torchvision import datasets

        try:
            with undone_on_error(raw):
                getattr(datasets, folder)(root, train=True, download=True)
        except (OSError, RuntimeError) as e:
            raise DataError(
                f"{name}: could not download into {raw} ({one_line(e)}); check the "
                f"network, or pass data_dir=FOLDER, a folder holding {folder}/raw"
            ) from e
    try:
        records = [_read_idx((raw / f).read_bytes()) for f in _IDX_FILES]
        if any(len(r) != 1 for r in records):
            raise ValueError("not one IDX record per file")
        train, train_labels, test, test_labels = (r[0] for r in records)
    except (OSError, ValueError, struct.error) as e:
        raise DataError(
            f"{name}: cannot read the files in {raw} ({one_line(e)}); delete them "
            "and download again"
        ) from e
    for images, labels in ((train, train_labels), (test, test_labels)):
        if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DataError(
                f"{name}: the files in {raw} do not hold one label per 28x28 "
                "image; delete them and download again"
            )
    return _flatten(train), _flatten(test), train_labels.long(), test_labels.long()


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
            "data_dir=FOLDER, the folder holding it"
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
    return images.reshape(images.shape[0], -1).to(torch.float32).div_(255)
