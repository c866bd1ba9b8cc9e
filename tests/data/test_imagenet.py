"""ImageNet on a tiny ImageFolder of two classes, PNG and JPEG files mixed."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from sift_lightning.data import DataNotFoundError, ImageNetDataModule


@pytest.fixture
def fake_imagenet(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / wnid / f"{wnid}_{i}.{'JPEG' if i else 'png'}")
    return tmp_path


def test_shapes_and_classes(fake_imagenet):
    dm = ImageNetDataModule(root=str(fake_imagenet), batch_size=4, num_workers=0, image_size=32, val_resize=36)
    assert dm.num_classes == 1000
    dm.setup("fit")
    assert dm.num_classes == 2 and (len(dm.train_set), len(dm.val_set)) == (6, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert len(list(dm.train_dataloader())) == 1  # drop_last: 6 images make one batch of 4
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 0, 1]


def test_missing_data_message(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)  # val/ is missing
    message = (
        f"ImageNet not found under {tmp_path} (looked for train/<wnid>/*.JPEG and val/<wnid>/*.JPEG); "
        "download ILSVRC2012 from image-net.org (needs an account), extract it there and sort val/ "
        "into one folder per class"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        ImageNetDataModule(root=str(tmp_path)).setup("fit")


def test_val_resize_is_checked():
    with pytest.raises(ValueError, match=re.escape("val_resize (200) must be >= image_size (224)")):
        ImageNetDataModule(root="x", val_resize=200)
