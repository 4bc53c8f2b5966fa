"""A user's data set in a file: a ``.npy`` array, a ``.npz`` of arrays ``train``
(and ``test``), or a ``.pt`` tensor or dict of them; read without executing any
code, each problem said in one line."""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .errors import DataError, literal

__all__ = ["FILE_SUFFIXES", "file_width", "holds_test_set", "load_file"]

#: Suffixes of the files :func:`~pyro_iwae.data.load_dataset` reads as a user's
#: data set.
FILE_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".pt")


def file_width(path: str | os.PathLike, test_fraction: float = 0.1) -> int:
    """x_dim of a user's data file: the values of one point.

    :raises DataError: see :func:`load_file`.
    """
    import numpy as np

    path = Path(path).expanduser()
    if path.suffix.lower() == ".npy" and path.is_file():
        try:  # the header alone, not the whole array
            shape = np.load(path, mmap_mode="r").shape
        except Exception:  # left to load_file, which says what is wrong
            shape = ()
        if len(shape) > 1:
            return math.prod(shape[1:])
    return load_file(path, test_fraction)[0].shape[1]


def holds_test_set(path: str | os.PathLike) -> bool:
    """Whether the data file ``path``, one :func:`load_file` reads, holds its
    own test set (an array named ``test``), so that none of its points are
    held out."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".npy":
        return False
    if path.suffix.lower() == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as arrays:  # the names, not the arrays
            return "test" in arrays.files
    return "test" in _read_arrays(path)


def load_file(
    path: str | os.PathLike, test_fraction: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
    """Train and test data of a user's file, float32 ``[N, x_dim]``, and the shape
    of one point if it is a picture (None otherwise).

    A point of shape ``[H, W]`` or ``[C, H, W]`` (C of 1 or 3), or a flat one
    whose size is a square, is a picture. Without a test set, a random
    ``test_fraction`` of the points (drawn with ``seed``) is held out as one.

    :raises DataError: if the file is missing, unreadable, or of the wrong shape.
    """
    path = Path(path).expanduser()
    *others, last = FILE_SUFFIXES
    if path.is_dir():  # it was "not found", there
        raise DataError(
            f"{literal(path)} is a folder, not a data file; set {{dataset}} to a "
            f"{', '.join(others)} or {last} file of shape [N, ...]",
            template=True,
        )
    if not path.is_file():
        raise DataError(
            f"data file {literal(path)} not found; set {{dataset}} to where it is "
            f"now, or to another {', '.join(others)} or {last} file of shape [N, ...]",
            template=True,
        )
    try:
        arrays = _read_arrays(path)
    except DataError:
        raise
    except Exception as e:  # numpy and torch raise many types on damaged files
        # Their messages advise unsafe loading or run to hundreds of characters.
        raise DataError(f"cannot read {path}: {_unreadable(path, e)}") from e
    if "train" not in arrays:
        raise DataError(
            f"{path} holds {', '.join(sorted(arrays)) or 'no arrays'}, not an array "
            "named train; save the training data as train (and the test data as test)"
        )
    train = _as_points(arrays["train"], path, "train", "save at least one point")
    if "test" in arrays:
        test = _as_points(
            arrays["test"],
            path,
            "test",
            "leave it out, and a share of the training points is held out as the "
            f"test set (test_fraction={test_fraction}), or save test points",
        )
        if test.shape[1:] != train.shape[1:]:
            raise DataError(
                f"{path}: test points have shape {list(test.shape[1:])}, training "
                f"points {list(train.shape[1:])}; save both with the same shape"
            )
    else:
        if not 0 < test_fraction < 1:
            raise DataError(
                f"test_fraction must lie in (0, 1), got {test_fraction}; {path} has "
                "no test set, so a share of its points is held out"
            )
        n = train.shape[0]
        n_test = max(1, round(test_fraction * n))
        if n_test >= n:
            raise DataError(
                f"{path} holds {n} point{'' if n == 1 else 's'}, too few to hold out "
                "a test set; give it more points, or a test array"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        train, test = train[order[n_test:]], train[order[:n_test]]
    shape = tuple(train.shape[1:])
    flat = math.prod(shape)
    side = math.isqrt(flat)
    if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
        image_shape: tuple[int, ...] | None = shape
    elif len(shape) == 1 and side * side == flat and flat > 1:
        image_shape = (side, side)
    else:
        image_shape = None
    return train.reshape(len(train), -1), test.reshape(len(test), -1), image_shape


#: How each kind of NumPy file begins (np.save's format; a zip archive).
_NUMPY_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}


def _unreadable(path: Path, error: Exception) -> str:
    """Why a data file that failed to load cannot be read, and how to save it, in
    a few words."""
    advice = "save the data with np.save, np.savez or torch.save as numeric arrays"
    magic = _NUMPY_MAGIC.get(path.suffix.lower())
    if magic is not None:
        with open(path, "rb") as f:
            if not f.read(len(magic)) == magic:
                # numpy takes any other file for a pickle: say what it is not.
                return f"it is not a NumPy {path.suffix.lower()} file; {advice}"
        if "pickle" in str(error).lower():
            return f"it holds pickled Python objects, not numbers; {advice}"
    elif found := re.search(r"Unsupported global: GLOBAL (\S+)", str(error)):
        # torch.load(weights_only=True) refuses objects other than tensors and
        # containers; loading them otherwise runs code the file names: unsafe.
        name = found[1]
        what = "numpy arrays" if name.startswith("numpy") else name.split(".")[-1]
        return (
            f"it holds Python objects ({what}), not only tensors, and cannot be "
            "loaded safely; save tensors, or a dict of tensors, e.g. "
            'torch.save({"train": torch.as_tensor(a)}, path)'
        )
    return "it is damaged, or not written by np.save, np.savez or torch.save; " + advice


def _read_arrays(path: Path) -> dict[str, object]:
    if path.suffix.lower() == ".pt":
        with warnings.catch_warnings():
            # It checks a sparse tensor's indices (wanted: bad ones could write
            # out of bounds) and warns that this takes time: no advice to a user.
            warnings.filterwarnings("ignore", "Validating sparse tensor invariants")
            value = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(value, dict):
            return value
        return {"train": value}
    import numpy as np

    value = np.load(path, allow_pickle=False)
    if path.suffix.lower() == ".npz":
        with value:
            return {key: value[key] for key in value.files}
    return {"train": value}


def _as_points(value: object, path: Path, key: str, if_empty: str) -> Tensor:
    """``value`` as float32 ``[N, ...]``; one clear error for anything else
    (``if_empty``: what to do about an empty array)."""
    dtype = getattr(value, "dtype", None)
    if getattr(dtype, "isnative", True) is False:  # torch takes native order only
        value = value.astype(dtype.newbyteorder("="))  # type: ignore[union-attr]
    try:
        x = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        # torch's own message lists every dtype it takes: too long for one line.
        dtype = getattr(value, "dtype", type(value).__name__)
        raise DataError(
            f"{path}: {key} is an array of {dtype}, not numbers; save integers, "
            "floats or booleans"
        ) from e
    # Plain values: a tensor saved with requires_grad keeps it, and training
    # then backpropagated through the data (a traceback on its second step).
    x = x.detach()
    if x.layout != torch.strided:  # sparse: most operations take dense tensors
        x = x.to_dense()
    if x.is_complex():
        raise DataError(f"{path}: {key} holds complex numbers; save real ones")
    if x.dim() >= 2 and x.shape[0] == 0 and x.shape[1:].numel() > 0:
        raise DataError(
            f"{path}: {key} is empty (shape {list(x.shape)}, no points); {if_empty}"
        )
    if x.dim() < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise DataError(
            f"{path}: {key} has shape {list(x.shape)}; save an array of shape "
            "[N, ...], one row per data point (reshape(-1, 1) for scalars)"
        )
    finite = bool(torch.isfinite(x).all()) if x.is_floating_point() else True
    x = x.to(torch.float32)
    if not finite:
        raise DataError(f"{path}: {key} holds nan or infinite values; remove them")
    if not bool(torch.isfinite(x).all()):  # finite before, so beyond float32's range
        raise DataError(
            f"{path}: {key} holds values beyond float32's range (±3.4e38), in "
            "which the model computes; scale the data down"
        )
    return x
