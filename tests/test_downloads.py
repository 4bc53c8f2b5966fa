"""A failed download leaves the data folder as it was (pyro_iwae/downloads.py)."""

import pytest
import torchvision

from pyro_iwae.data import DataError, load_dataset
from pyro_iwae.downloads import undone_on_error


def test_what_a_failing_block_added_goes_and_what_was_there_stays(tmp_path):
    kept = tmp_path / "data" / "raw" / "kept.gz"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="cut"):
        with undone_on_error(kept.parent):
            (kept.parent / "partial.gz").write_bytes(b"new")
            (kept.parent / "sub").mkdir()
            (kept.parent / "sub" / "x").write_bytes(b"new")
            raise RuntimeError("cut")
    assert sorted(p.name for p in kept.parent.iterdir()) == ["kept.gz"]
    assert kept.read_bytes() == b"old"


def test_folders_a_failing_block_made_go_with_it(tmp_path):
    raw = tmp_path / "new" / "FashionMNIST" / "raw"
    with pytest.raises(OSError):
        with undone_on_error(raw):
            raw.mkdir(parents=True)
            (raw / "partial.gz").write_bytes(b"new")
            raise OSError("offline")
    assert list(tmp_path.iterdir()) == []
    with undone_on_error(raw):  # a block that succeeds keeps what it made
        raw.mkdir(parents=True)
    assert raw.is_dir()


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    def offline(root, train, download):
        raw = root / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        (raw / "train-images-idx3-ubyte.gz.part").write_bytes(b"")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="could not download"):
        load_dataset("fashion-mnist", tmp_path, download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
