"""Fashion-MNIST: the IDX reader, the data module on a tiny IDX set, and Debian's real files."""

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sift_lightning.data import DataNotFoundError, FashionMNISTDataModule, read_idx
from sift_lightning.data import fashion_mnist

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` in the IDX format (big-endian header and data)."""
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_CODES[big.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + big.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fashion(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), gz)
    return folder


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", array, gz=gz))
    assert out.shape == (2, 3, 5) and out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, array)


def test_idx_rejects_corrupt_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((4, 2, 2), np.uint8)).read_bytes()
    cases = {
        "magic": (b"\x01\x00" + good[2:], "bad magic number 0100"),
        "type": (good[:2] + b"\x07" + good[3:], "bad magic number 0000"),
        "short": (good[:-1], "31 bytes, header (4, 2, 2) needs 32"),
        "header": (good[:6], "6 bytes, too short for a 3-d header"),
        "gzip": (gzip.compress(good)[:-6], "corrupt gzip data"),
    }
    for name, (data, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{path} is not a valid IDX file: ") + ".*" + re.escape(why)):
            read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_data_module_on_tiny_idx_set(tmp_path, gz):
    write_fashion(tmp_path, gz=gz)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=8, val_size=10)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 1, 32)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= set(range(10))
    x, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # test set in file order
    # The 2-pixel zero border holds the normalised background value.
    assert torch.allclose(x[:, :, :2], torch.tensor(-fashion_mnist.MEAN / fashion_mnist.STD))


def test_no_padding_and_no_augmentation(tmp_path):
    write_fashion(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=0, augment=False, pad_to=None)
    dm.setup("fit")
    assert dm.image_size == 28 and dm.val_set is dm.test_set and len(dm.train_set) == 60
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")[3]
    expected = (torch.from_numpy(raw).float() / 255 - fashion_mnist.MEAN) / fashion_mnist.STD
    assert torch.allclose(dm.train_set[3][0][0], expected, atol=1e-6)


def test_split_is_seeded(tmp_path):
    write_fashion(tmp_path)

    def val_indices(seed):
        dm = FashionMNISTDataModule(root=str(tmp_path), val_size=10, seed=seed)
        dm.setup("fit")
        assert sorted(dm.train_set.indices + dm.val_set.indices) == list(range(60))
        return dm.val_set.indices

    assert val_indices(0) == val_indices(0)
    assert val_indices(0) != val_indices(1)


def test_torchvision_layout_is_found(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert FashionMNISTDataModule(root=str(tmp_path)).find_dir() == tmp_path / "FashionMNIST" / "raw"


def test_missing_data_message(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    write_fashion(tmp_path / "half")
    (tmp_path / "half" / "t10k-labels-idx1-ubyte.gz").unlink()  # three files of four are not enough
    root = tmp_path / "half"
    message = (
        f"Fashion-MNIST not found under {root}, {root}/FashionMNIST/raw, {tmp_path}/debian "
        "(looked for train-images-idx3-ubyte[.gz]); put the IDX files there, install Debian's "
        "dataset-fashion-mnist, or set download: true (needs internet)"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        FashionMNISTDataModule(root=str(root)).setup("fit")


def test_bad_pad_to():
    with pytest.raises(ValueError, match=re.escape("pad_to must be None or >= 28 (images are 28x28), got 20")):
        FashionMNISTDataModule(pad_to=20)


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_real_debian_files():
    names = sorted(p.name for p in fashion_mnist.DEBIAN_DIR.iterdir())
    assert names == sorted(f"{n}.gz" for n in fashion_mnist.FILES)
    dm = FashionMNISTDataModule(val_size=5000)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    base = dm.train_set.dataset
    assert base.images.shape == (60000, 1, 32, 32)
    assert torch.bincount(base.labels).tolist() == [6000] * 10
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
    x, y = dm.test_set[0]
    assert x.shape == (1, 32, 32) and y == 9  # the first test image is an ankle boot


def test_download_fetches_the_four_files_into_root(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    calls = []
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", lambda url, root, md5: calls.append((url, root, md5)))
    FashionMNISTDataModule(root=str(tmp_path / "fm"), download=True).prepare_data()
    assert calls == [
        (f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}.gz", str(tmp_path / "fm"), md5)
        for name, md5 in fashion_mnist.FILES.items()
    ]
    calls.clear()
    write_fashion(tmp_path / "fm")
    FashionMNISTDataModule(root=str(tmp_path / "fm"), download=True).prepare_data()
    assert calls == []  # already there
    with pytest.raises(ValueError, match=re.escape("download: true needs a root to put the files in")):
        FashionMNISTDataModule(download=True)
