"""ImageNet on a tiny ImageFolder of two classes, PNG and JPEG files mixed."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from sift_lightning.cli import error_line
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


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 cut short", b"", b"not an image at all"])
def test_unreadable_image_is_named_in_one_line(fake_imagenet, content):
    # one bad file among many: the error names it, in the main process and from a loader worker
    bad = fake_imagenet / "train" / "n01443537" / "n01443537_9.JPEG"
    bad.write_bytes(content)
    line = re.escape(f"{bad} is not a readable image (") + r"[A-Za-z]+Error: .+" + re.escape(
        "); delete it or replace it with a good copy")
    dm = ImageNetDataModule(root=str(fake_imagenet), batch_size=7, num_workers=0, image_size=32, val_resize=36)
    dm.setup("fit")
    with pytest.raises(ValueError, match=f"^{line}$"):
        list(dm.train_dataloader())
    dm.num_workers = 1
    with pytest.raises(ValueError) as worker_error:
        list(dm.train_dataloader())
    assert re.fullmatch(line, error_line(worker_error.value))  # what sift-fit prints after "error: "


def test_class_folder_without_images(fake_imagenet):
    (fake_imagenet / "val" / "n01443537" / "n01443537_0.png").unlink()
    for f in (fake_imagenet / "val" / "n01443537").iterdir():
        f.unlink()
    dm = ImageNetDataModule(root=str(fake_imagenet), batch_size=4, num_workers=0, image_size=32, val_resize=36)
    with pytest.raises(ValueError, match=f"^ImageNet under {re.escape(str(fake_imagenet / 'val'))}: .*n01443537"):
        dm.setup("fit")
