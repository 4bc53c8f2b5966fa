"""PNG figures: image grids and training curves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IMAGE_SIDE",
    "image_grid",
    "image_range",
    "reconstruction_grid",
    "save_curves",
    "save_grid_curves",
    "save_image_grid",
    "save_nll_against_k",
    "save_reconstruction_grid",
]

#: Images are square, ``IMAGE_SIDE`` x ``IMAGE_SIDE`` pixels (784 in all).
IMAGE_SIDE = 28


def image_range(data: torch.Tensor) -> tuple[float, float]:
    """The values drawn black and white for pictures of ``data``: 0 and 1 where
    all of it lies in [0, 1] (grey levels, probabilities), else its least and
    greatest value (0..255, standardised data)."""
    data = data.detach()
    low, high = float(data.min()), float(data.max())
    if 0 <= low and high <= 1:
        return 0.0, 1.0
    if low == high:  # one value: drawn mid-grey, not divided by zero
        return low - 0.5, high + 0.5
    return low, high


def _as_images(
    images: torch.Tensor,
    image_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """``[n, 784]`` (or ``[n, 28, 28]``, ``[n, 1, 28, 28]``) -> ``[n, 1, 28, 28]``,
    for ``image_shape`` ``[H, W]`` (``[C, H, W]`` keeps its C channels), values
    scaled from ``value_range`` to [0, 1] and clipped there."""
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    images = images.detach().float().cpu().reshape(-1, *shape)
    low, high = value_range
    if (low, high) != (0, 1):  # [0, 1] is drawn as it is, to the bit
        images = (images - low) / (high - low)
    return images.clamp(0, 1)


def image_grid(
    images: torch.Tensor,
    *,
    nrow: int = 8,
    image_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """``images`` (``[n, 784]``) as one ``[C, H, W]`` picture of 28x28 images (of
    ``image_shape``), ``nrow`` per row, on the CPU; ``value_range`` (low, high)
    is drawn black to white (None: :func:`image_range` of ``images``; pass the
    data's to draw samples on the data's scale)."""
    from torchvision.utils import make_grid

    if value_range is None:
        value_range = image_range(images)
    images = _as_images(images, image_shape, value_range)
    return make_grid(images, nrow=nrow, padding=2, pad_value=0.5)


def reconstruction_grid(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    *,
    nrow: int = 8,
    image_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Rows of ``nrow`` originals, each followed by a row of their reconstructions
    (both ``[n, 784]``, of ``image_shape``), as one ``[C, H, W]`` picture; both
    on one scale, ``value_range`` drawn black to white (None: :func:`image_range`
    of ``originals``)."""
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions "
            f"{tuple(reconstructions.shape)} differ in shape"
        )
    if value_range is None:
        value_range = image_range(originals)
    x = _as_images(originals, image_shape, value_range)
    r = _as_images(reconstructions, image_shape, value_range)
    nrow = min(nrow, x.shape[0])
    rows = []
    for start in range(0, x.shape[0], nrow):
        pad = nrow - x[start : start + nrow].shape[0]
        for part in (x, r):
            row = part[start : start + nrow]
            if pad:
                row = torch.cat([row, row.new_ones(pad, *row.shape[1:])])
            rows.append(row)
    return image_grid(
        torch.cat(rows), nrow=nrow, image_shape=x.shape[1:], value_range=(0, 1)
    )


def _save_picture(picture: torch.Tensor, path: str | os.PathLike) -> Path:
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(picture, path)
    return path


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    *,
    nrow: int = 8,
    image_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Writes :func:`image_grid` of ``images`` as a PNG; returns the path."""
    picture = image_grid(
        images, nrow=nrow, image_shape=image_shape, value_range=value_range
    )
    return _save_picture(picture, path)


def save_reconstruction_grid(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    path: str | os.PathLike,
    *,
    nrow: int = 8,
    image_shape: Sequence[int] = (IMAGE_SIDE, IMAGE_SIDE),
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Writes :func:`reconstruction_grid` of the two as a PNG; returns the path."""
    picture = reconstruction_grid(
        originals,
        reconstructions,
        nrow=nrow,
        image_shape=image_shape,
        value_range=value_range,
    )
    return _save_picture(picture, path)


def save_curves(
    metrics: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Writes a PNG of the train and test bounds (nats per point) against the epoch,
    from :func:`pyro_iwae.fit`'s metrics; returns the path.

    The epoch axis is logarithmic for long runs (100 epochs or more), where the
    paper schedule's stages grow geometrically.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    epochs = [m["epoch"] for m in metrics]
    for key, label in (("train_bound", "train bound"), ("test_bound", "test bound")):
        points = [
            (e, m[key])
            for e, m in zip(epochs, metrics, strict=True)
            if m.get(key) is not None and math.isfinite(m[key])
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            k = metrics[-1].get("k")
            suffix = f" (k={k})" if k is not None else ""
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label + suffix)
    if epochs and epochs[-1] >= 100:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound (nats per point)")
    if title:
        ax.set_title(title)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no epochs yet", ha="center", va="center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_grid_curves(
    curves: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike
) -> Path:
    """Writes a PNG of each run's test bound (nats per point, at its training k)
    against the epoch, one line per run of ``curves`` (name -> metrics)."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    for name, metrics in curves.items():
        points = [
            (m["epoch"], -m["test_bound"]) for m in metrics if m.get("test_bound")
        ]
        if points:
            ax.plot(*zip(*points, strict=True), label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("-test bound at the training k (nats)")
    if ax.lines:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def save_nll_against_k(
    series: dict[str, Sequence[tuple[int, float, float]]], path: str | os.PathLike
) -> Path:
    """Writes a PNG of test NLL against k (log axis), one line per name of
    ``series`` (name -> (k, nll, standard error) points)."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    all_ks = sorted({k for points in series.values() for k, _, _ in points})
    for i, (name, points) in enumerate(series.items()):
        if points:
            ks, nlls, errors = zip(*sorted(points), strict=True)
            # Nudge each series sideways (a few percent in k) so that error bars
            # at the same k do not hide one another.
            nudged = [k * 1.04 ** (i - (len(series) - 1) / 2) for k in ks]
            ax.errorbar(nudged, nlls, yerr=errors, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.minorticks_off()
    ax.set_xlabel("k (training particles)")
    ax.set_ylabel("test NLL at k = 5000 (nats)")
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path
