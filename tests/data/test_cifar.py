"""CIFAR on a tiny fake CIFAR-100 written in torchvision's real pickle format."""

import os
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from sift_lightning.data import CIFARDataModule, DataNotFoundError, cifar


def write_cifar100(root, n_train=40, n_test=12):
    """root/cifar-100-python/{train,test,meta}: the pickled dicts the official archive holds."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {
            "filenames": [f"img_{i}.png" for i in range(n)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": [i % 100 for i in range(n)],
            "coarse_labels": [i % 20 for i in range(n)],
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),  # rows: R plane, G, B
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": [f"super{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    write_cifar100(tmp_path)
    # torchvision checks each file's md5 against the official archive's; ours differ by design.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    return tmp_path


def test_validates_on_test_split_by_default(fake_cifar):
    dm = CIFARDataModule(root=str(fake_cifar), batch_size=4, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (40, 12) and dm.val_set is dm.test_set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    x, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [0, 1, 2, 3]


def test_eval_images_are_normalised_pixels(fake_cifar):
    dm = CIFARDataModule(root=str(fake_cifar), num_workers=0)
    dm.setup("test")
    raw = pickle.loads((fake_cifar / "cifar-100-python" / "test").read_bytes())["data"][5].reshape(3, 32, 32)
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in cifar.STATS[100])
    assert torch.allclose(dm.test_set[5][0], (torch.from_numpy(raw).float() / 255 - mean) / std, atol=1e-6)


def test_seeded_val_split(fake_cifar):
    dm = CIFARDataModule(root=str(fake_cifar), val_size=8, num_workers=0, seed=3)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (32, 8, 12)
    assert sorted(dm.train_set.indices + dm.val_set.indices) == list(range(40))
    again = CIFARDataModule(root=str(fake_cifar), val_size=8, num_workers=0, seed=3)
    again.setup("fit")
    assert again.val_set.indices == dm.val_set.indices
    assert dm.val_set.dataset.transform.transforms[0].__class__.__name__ == "ToImage"  # no augmentation


def test_missing_data_message(tmp_path):
    message = (
        f"CIFAR-100 not found under {tmp_path} (looked for cifar-100-python/{{train,test,meta}}); "
        "extract cifar-100-python.tar.gz there, or set download: true (needs internet)"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        CIFARDataModule(root=str(tmp_path)).setup("fit")
    message = (
        f"CIFAR-10 not found under {tmp_path} (looked for cifar-10-batches-py/{{data_batch_1,data_batch_2,"
        "data_batch_3,data_batch_4,data_batch_5,test_batch,batches.meta}); extract cifar-10-python.tar.gz "
        "there, or set download: true (needs internet)"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        CIFARDataModule(root=str(tmp_path), num_classes=10).setup("fit")


def test_num_classes_is_checked():
    with pytest.raises(ValueError, match=re.escape("unknown CIFAR num_classes 7; valid: 10, 100")):
        CIFARDataModule(num_classes=7)


def test_download_extracts_the_official_archive(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar, "download_and_extract_archive", lambda *args, **kwargs: calls.append((args, kwargs)))
    CIFARDataModule(root=str(tmp_path), download=True).prepare_data()
    assert calls == [
        (("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", str(tmp_path)),
         {"filename": "cifar-100-python.tar.gz", "md5": "eb9058c3a382ffc7106e4002c42a8d85"}),
    ]  # fmt: skip


def test_corrupt_file_is_named(tmp_path):
    # torchvision checks each file's md5 ("Dataset not found or corrupted"): the line names the file
    write_cifar100(tmp_path)  # real layout, but not the official bytes
    folder = tmp_path / "cifar-100-python"
    message = (f"{folder / 'train'} is corrupt (its md5 differs from the official CIFAR-100 file's); delete {folder} "
               "and extract cifar-100-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) "
               "again, or set download: true")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CIFARDataModule(root=str(tmp_path), num_workers=0).setup("fit")


def test_unreadable_pickle_is_one_line(fake_cifar):
    (fake_cifar / "cifar-100-python" / "test").write_bytes(b"\x80\x02 cut")  # the md5 check is patched out here
    with pytest.raises(ValueError, match=r"^CIFAR-100 under .*cifar-100-python is not readable \(.*\); extract "
                                         r"cifar-100-python.tar.gz there again$"):
        CIFARDataModule(root=str(fake_cifar), num_workers=0).setup("fit")
