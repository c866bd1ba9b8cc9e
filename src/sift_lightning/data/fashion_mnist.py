"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, gzipped or raw; works offline on Debian."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from ._common import DataNotFoundError, SplitDataModule, abspath, split_indices

__all__ = ["FASHION_MNIST_CLASSES", "FashionMNISTDataModule", "read_idx"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Statistics of the 60k training images, pixels scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt install dataset-fashion-mnist
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {  # name -> md5 of the official .gz (Debian re-compresses, so its .gz md5s differ)
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "IDX file format").
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw, or gzipped: detected from its first bytes) into a numpy array.

    The header is two zero bytes, a type byte, the number of dimensions, then each dimension as a
    big-endian uint32. Anything else raises a one-line ``ValueError`` naming the file.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path} is not a valid IDX file: corrupt gzip data ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not a valid IDX file: bad magic number {raw[:4].hex() or 'empty'}")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is not a valid IDX file: {len(raw)} bytes, too short for a {ndim}-d header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path} is not a valid IDX file: {len(raw)} bytes, header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


class _Images(Dataset):
    """(N, 1, H, W) uint8 images and their labels; ``transform`` runs per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST: 60k train / 10k test grey 28x28 images of 10 clothing classes.

    Files are searched in ``root``, ``root/FashionMNIST/raw`` (torchvision's layout) and then
    Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``), each as
    ``train-images-idx3-ubyte[.gz]`` and so on. Validation is a seeded ``val_size`` split of the
    60k train images; test is the official 10k set.

    Args:
        root: Folder holding the IDX files, and where ``download`` puts them; None searches
            only Debian's folder.
        batch_size: Samples per batch.
        num_workers: Loader worker processes.
        val_size: Train images held out for validation; 0 validates on the test set.
        augment: Random crop (padding 2) + horizontal flip on training images.
        download: Fetch the four .gz files from Zalando's mirror when not found (needs internet).
        seed: Seeds the train/val split and the shuffle order.
        pad_to: Zero-pad images to this size (32 lets CIFAR-style ResNets apply); None keeps 28.
    """

    num_classes = 10
    in_chans = 1
    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        augment: bool = True,
        download: bool = False,
        seed: int = 0,
        pad_to: int | None = 32,
    ) -> None:
        super().__init__()
        if pad_to is not None and pad_to < 28:
            raise ValueError(f"pad_to must be None or >= 28 (images are 28x28), got {pad_to}")
        if download and root is None:
            raise ValueError("download: true needs a root to put the files in")
        self.save_hyperparameters()
        self.root, self.batch_size, self.num_workers = root, batch_size, num_workers
        self.val_size, self.augment, self.download, self.seed = val_size, augment, download, seed
        self.pad_to = pad_to
        self.image_size = pad_to or 28

    def search_dirs(self) -> list[Path]:
        """Folders searched for the IDX files, in order."""
        dirs = [abspath(self.root), abspath(self.root) / "FashionMNIST" / "raw"] if self.root else []
        return dirs + [DEBIAN_DIR]

    def find_dir(self, download_error: BaseException | None = None) -> Path:
        """The first folder that holds all four IDX files; ``DataNotFoundError`` if none does."""
        for directory in self.search_dirs():
            if all(_find(directory, name) for name in FILES):
                return directory
        hint = "put the IDX files there, install Debian's dataset-fashion-mnist, or set download: true (needs internet)"
        if download_error is not None:
            hint = (f"put the four IDX files ({', '.join(FILES)}, raw or .gz, from {MIRROR}) there, "
                    "or install Debian's dataset-fashion-mnist")
        raise DataNotFoundError("Fashion-MNIST", self.search_dirs(), "train-images-idx3-ubyte[.gz]", hint, download_error)

    def prepare_data(self) -> None:
        """Download the four .gz files into ``root`` when asked and not found anywhere (offline: one line)."""
        if not self.download:
            return
        try:
            self.find_dir()
        except DataNotFoundError:
            from torchvision.datasets.utils import download_url

            for name, md5 in FILES.items():
                try:
                    download_url(MIRROR + f"{name}.gz", str(abspath(self.root)), md5=md5)
                except (OSError, RuntimeError) as err:  # URLError and timeouts are OSErrors
                    self.find_dir(download_error=err)

    def _load(self, directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(_find(directory, f"{split}-images-idx3-ubyte"))
        labels = read_idx(_find(directory, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"Fashion-MNIST {split} files in {directory} do not match: images {images.dtype} "
                f"{images.shape}, labels {labels.shape}"
            )
        x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 28, 28)
        pad = self.image_size - x.shape[-1]
        # Pad once here, with 0 = background, before normalising: cheaper than per sample.
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return x, torch.from_numpy(labels.astype(np.int64))

    def _transform(self, train: bool) -> v2.Transform:
        steps: list[v2.Transform] = []
        if train and self.augment:
            # Garments fill most of the frame: a 2-pixel shift is "light"; 4 would crop sleeves.
            steps += [v2.RandomCrop(self.image_size, padding=2), v2.RandomHorizontalFlip()]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])]
        return v2.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        """Read the IDX files and build the train/val/test data sets."""
        directory = self.find_dir()
        x, y = self._load(directory, "train")
        x_test, y_test = self._load(directory, "t10k")
        self.test_set = _Images(x_test, y_test, self._transform(train=False))
        if self.val_size == 0:
            self.train_set = _Images(x, y, self._transform(train=True))
            self.val_set = self.test_set
            return
        train_idx, val_idx = split_indices(len(y), self.val_size, self.seed)
        self.train_set = Subset(_Images(x, y, self._transform(train=True)), train_idx)
        self.val_set = Subset(_Images(x, y, self._transform(train=False)), val_idx)

