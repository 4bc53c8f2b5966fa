"""Write ``pyro_iwae/resources/mnist-mini.idx.gz``, the embedded offline data set.

The file holds the first 10,000 MNIST training images and the first 2,000 test
images (uint8 grey levels, 28x28) with their labels, as four IDX records
(train images, train labels, test images, test labels) concatenated and
gzipped with ``mtime=0`` so that the output is byte-for-byte reproducible.

Run from anywhere::

    python scripts/make_mnist_mini.py --data-dir ../shared/data
"""

import argparse
import gzip
import hashlib
import struct
import sys
from pathlib import Path

import torch
import torchvision

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "pyro_iwae" / "resources" / "mnist-mini.idx.gz"
N_TRAIN = 10_000
N_TEST = 2_000

# sha256 of the original uncompressed LeCun IDX files (shared/data/README.md).
SOURCE_SHA256 = {
    "train-images-idx3-ubyte": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}


def idx_record(x: torch.Tensor) -> bytes:
    """Encode a uint8 tensor as one IDX record (big-endian header, C-order data)."""
    assert x.dtype == torch.uint8 and 1 <= x.dim() <= 255
    header = bytes([0, 0, 0x08, x.dim()]) + struct.pack(f">{x.dim()}I", *x.shape)
    return header + x.contiguous().numpy().tobytes()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder holding MNIST/raw/ with the four uncompressed IDX files "
        "(default: ../shared/data next to the repository)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    raw = args.data_dir / "MNIST" / "raw"
    for name, expected in SOURCE_SHA256.items():
        if not (raw / name).is_file():
            sys.exit(f"error: {raw / name} not found; pass --data-dir")
        if sha256(raw / name) != expected:
            sys.exit(f"error: {raw / name} is not the original MNIST file")

    train = torchvision.datasets.MNIST(args.data_dir, train=True, download=False)
    test = torchvision.datasets.MNIST(args.data_dir, train=False, download=False)
    payload = b"".join(
        [
            idx_record(train.data[:N_TRAIN]),
            idx_record(train.targets[:N_TRAIN].to(torch.uint8)),
            idx_record(test.data[:N_TEST]),
            idx_record(test.targets[:N_TEST].to(torch.uint8)),
        ]
    )
    # No file name and mtime=0 in the gzip header: same bytes on every run.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:
        with gzip.GzipFile(
            filename="", mode="wb", compresslevel=9, fileobj=f, mtime=0
        ) as gz:
            gz.write(payload)

    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    print(f"sha256 (file):    {sha256(args.out)}")
    print(f"sha256 (payload): {hashlib.sha256(payload).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
