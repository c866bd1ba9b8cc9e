"""Lightning data modules, one file per data-set family, and the tokenizers.

Every module's train loader is a ``StatefulDataLoader``, so a mid-epoch checkpoint resumes with
exactly the next batch; every missing data set raises a one-line ``DataNotFoundError``.
"""

from ._common import DataNotFoundError, EpochShuffleSampler, SplitDataModule, split_indices, train_loader
from .cifar import CIFARDataModule
from .fashion_mnist import FashionMNISTDataModule, read_idx
from .imagenet import ImageNetDataModule
from .text import TextDataModule
from .tokenizers import ByteTokenizer, GPT2Tokenizer, Tokenizer, get_tokenizer

__all__ = [
    "ByteTokenizer",
    "CIFARDataModule",
    "DataNotFoundError",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "GPT2Tokenizer",
    "ImageNetDataModule",
    "SplitDataModule",
    "TextDataModule",
    "Tokenizer",
    "get_tokenizer",
    "read_idx",
    "split_indices",
    "train_loader",
]
