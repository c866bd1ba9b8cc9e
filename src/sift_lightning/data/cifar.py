"""CIFAR-10/100 (Krizhevsky 2009) through torchvision, with the Sparse-IFT paper's recipe."""

from __future__ import annotations

import pickle

import torch
import torchvision.datasets.cifar as cifar_files
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import v2

from ._common import DataNotFoundError, SplitDataModule, abspath, split_indices

__all__ = ["CIFARDataModule"]

# Per-channel statistics of each training set, pixels scaled to [0, 1].
STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS = {10: datasets.CIFAR10, 100: datasets.CIFAR100}


class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100: 50k train / 10k test colour 32x32 images.

    Reads torchvision's on-disk layout (``root/cifar-100-python/{train,test,meta}`` or
    ``root/cifar-10-batches-py/...``). Training uses the paper's augmentation, RandomCrop(32,
    padding=4) + horizontal flip.

    Args:
        root: Folder holding (or receiving) torchvision's extracted CIFAR folder.
        num_classes: 10 or 100.
        batch_size: Samples per batch (the paper uses 128).
        num_workers: Loader worker processes.
        download: Fetch the archive from cs.toronto.edu when missing (needs internet).
        val_size: 0 validates on the test split, as the paper's CIFAR code does; otherwise a
            seeded split of that many training images.
        seed: Seeds the train/val split and the shuffle order.
    """

    in_chans = 3
    image_size = 32

    def __init__(
        self,
        root: str = "data",
        num_classes: int = 100,
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = False,
        val_size: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes not in DATASETS:
            raise ValueError(f"unknown CIFAR num_classes {num_classes!r}; valid: 10, 100")
        self.save_hyperparameters()
        self.root, self.num_classes, self.batch_size = root, num_classes, batch_size
        self.num_workers, self.download, self.val_size, self.seed = num_workers, download, val_size, seed
        self.dataset_cls = DATASETS[num_classes]

    def _files(self) -> list[str]:
        cls = self.dataset_cls
        return [name for name, _md5 in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def check(self, download_error: BaseException | None = None) -> None:
        """Raise ``DataNotFoundError`` unless every file torchvision reads is there."""
        folder = abspath(self.root) / self.dataset_cls.base_folder
        if not all((folder / name).is_file() for name in self._files()):
            cls = self.dataset_cls
            hint = (f"put {cls.filename} (from {cls.url}) there and extract it, or rerun with internet"
                    if download_error else f"extract {cls.filename} there, or set download: true (needs internet)")
            raise DataNotFoundError(
                f"CIFAR-{self.num_classes}",
                [abspath(self.root)],
                f"{cls.base_folder}/{{{','.join(self._files())}}}",
                hint,
                download_error,
            )

    def prepare_data(self) -> None:
        """Download and extract the archive when asked and not already there (offline: one line)."""
        if not self.download:
            return
        try:
            self.check()
        except DataNotFoundError:
            cls = self.dataset_cls
            try:
                download_and_extract_archive(cls.url, str(abspath(self.root)), filename=cls.filename, md5=cls.tgz_md5)
            except (OSError, RuntimeError) as err:  # URLError and timeouts are OSErrors; a bad md5 a RuntimeError
                self.check(download_error=err)

    def _transform(self, train: bool) -> v2.Transform:
        mean, std = STATS[self.num_classes]
        augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train else []
        return v2.Compose([*augment, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def _dataset(self, train: bool, transform: v2.Transform) -> datasets.CIFAR10:
        cls = self.dataset_cls
        try:
            return cls(str(abspath(self.root)), train=train, transform=transform)
        except RuntimeError:  # torchvision's md5 check: "Dataset not found or corrupted"
            folder = abspath(self.root) / cls.base_folder
            bad = [name for name, md5 in cls.train_list + cls.test_list
                   if not cifar_files.check_integrity(str(folder / name), md5)]
            if not bad:
                raise
            raise ValueError(
                f"{folder / bad[0]} is corrupt (its md5 differs from the official CIFAR-{self.num_classes} file's); "
                f"delete {folder} and extract {cls.filename} (from {cls.url}) again, or set download: true"
            ) from None
        except (pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"CIFAR-{self.num_classes} under {abspath(self.root) / cls.base_folder} is not readable "
                             f"({type(err).__name__}: {err}); extract {cls.filename} there again") from None

    def setup(self, stage: str | None = None) -> None:
        """Load the pickles (torchvision checks their md5) and build the three data sets."""
        self.check()
        self.test_set = self._dataset(train=False, transform=self._transform(train=False))
        train = self._dataset(train=True, transform=self._transform(train=True))
        if self.val_size == 0:
            self.train_set, self.val_set = train, self.test_set
            return
        train_idx, val_idx = split_indices(len(train), self.val_size, self.seed)
        self.train_set = Subset(train, train_idx)
        self.val_set = Subset(self._dataset(train=True, transform=self._transform(train=False)), val_idx)

