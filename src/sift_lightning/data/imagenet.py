"""ImageNet-1k (ILSVRC2012) in the ImageFolder layout, with the standard ResNet transforms."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

from ._common import DataNotFoundError, SplitDataModule, abspath, one_line

__all__ = ["ImageNetDataModule"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read_image(path: str) -> Image.Image:
    """torchvision's RGB loader, with an unreadable file named in one line (one bad JPEG in 1.28M)."""
    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}: {one_line(err)}); "
                         "delete it or replace it with a good copy") from None


def _has_class_dirs(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


class ImageNetDataModule(SplitDataModule):
    """ImageNet from ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``.

    The official validation archive is flat; sort it into one folder per class first (for
    example with the ``valprep.sh`` script that PyTorch's ImageNet example points to). There is
    no download: ILSVRC2012 needs an account at image-net.org. Validation doubles as the test
    split, as is usual for ImageNet.

    Args:
        root: Folder holding ``train/`` and ``val/``.
        batch_size: Samples per batch (the paper uses 256).
        num_workers: Loader worker processes (JPEG decoding is the bottleneck: use many).
        image_size: Side of the training crop and of the validation centre crop.
        val_resize: Shorter side that validation images are resized to before the centre crop.
        seed: Seeds the shuffle order.
    """

    drop_last_train = True  # a last batch of a few images would give BatchNorm noisy statistics

    in_chans = 3

    def __init__(
        self,
        root: str,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        val_resize: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if val_resize < image_size:
            raise ValueError(f"val_resize ({val_resize}) must be >= image_size ({image_size})")
        self.save_hyperparameters()
        self.root, self.batch_size, self.num_workers = root, batch_size, num_workers
        self.image_size, self.val_resize, self.seed = image_size, val_resize, seed
        self.num_classes = 1000  # becomes the number of class folders found, after setup()

    def check(self) -> None:
        """Raise ``DataNotFoundError`` unless ``train/`` and ``val/`` both hold class folders."""
        root = abspath(self.root)
        if not (_has_class_dirs(root / "train") and _has_class_dirs(root / "val")):
            raise DataNotFoundError(
                "ImageNet",
                [root],
                "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
                "download ILSVRC2012 from image-net.org (needs an account), extract it there "
                "and sort val/ into one folder per class",
            )

    def _transform(self, train: bool) -> v2.Transform:
        if train:
            resize = [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            resize = [v2.Resize(self.val_resize, antialias=True), v2.CenterCrop(self.image_size)]
        return v2.Compose([*resize, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

    def setup(self, stage: str | None = None) -> None:
        """Index the image folders (ImageFolder lists every file once, here)."""
        self.check()
        root = abspath(self.root)
        self.train_set = _image_folder(root / "train", self._transform(train=True))
        self.val_set = _image_folder(root / "val", self._transform(train=False))
        if self.train_set.classes != self.val_set.classes:
            raise ValueError(f"ImageNet train/ and val/ under {root} hold different class folders")
        self.num_classes = len(self.train_set.classes)
        self.test_set = self.val_set  # ImageNet's labelled evaluation set is its validation set


def _image_folder(folder: Path, transform: v2.Transform) -> ImageFolder:
    try:
        return ImageFolder(str(folder), transform=transform, loader=_read_image)
    except FileNotFoundError as err:  # a class folder without images: torchvision's message names it
        raise ValueError(f"ImageNet under {folder}: {one_line(err, 400)}") from None
