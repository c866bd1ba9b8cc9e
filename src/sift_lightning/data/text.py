"""Language-model data: a text corpus tokenised once, cached as memory-mapped token arrays.

Corpora: ``wikitext103`` (the paper's GPT benchmark), ``kjv`` (the King James Bible, offline, see
``kjv.py``) and ``files`` (any text files). Samples are non-overlapping ``block_size`` windows:
``x = tokens[i*T : i*T+T]`` and ``y = tokens[i*T+1 : i*T+T+1]``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import DataNotFoundError, SplitDataModule, abspath, one_line
from .kjv import kjv_source, read_kjv
from .tokenizers import get_tokenizer

__all__ = ["DATASETS", "TextDataModule", "TokenWindows", "read_text"]

DATASETS = ("kjv", "wikitext103", "files")
SPLITS = ("train", "val", "test")
WIKITEXT_DIR = "wikitext-103-raw"
WIKITEXT_FILES = {"train": "wiki.train.raw", "val": "wiki.valid.raw", "test": "wiki.test.raw"}
WIKITEXT_URLS = (  # Salesforce's original S3 bucket went away; Smerity (an author) re-hosts it
    "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
)
CACHE_VERSION = 1  # bump when the text extraction or the file format changes


class TokenWindows(Dataset):
    """Non-overlapping (x, y) windows over a flat token file; y is x shifted by one token.

    The file is memory-mapped lazily in each process, so workers share the page cache instead of
    each unpickling a copy.
    """

    def __init__(self, path: str | Path, dtype: np.dtype, block_size: int) -> None:
        self.path, self.dtype, self.block_size = Path(path), np.dtype(dtype), block_size
        self.num_tokens = self.path.stat().st_size // self.dtype.itemsize
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        # The last window needs one token beyond it for its final target.
        return max(0, (self.num_tokens - 1) // self.block_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        start = i * self.block_size
        chunk = torch.from_numpy(self._tokens[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]  # (T,), (T,)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


# First bytes of the compressed formats a text file is most often mistaken for -> how to undo them.
COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"), b"\xfd7zXZ\x00": ("xz", "unxz"),
              b"PK\x03\x04": ("zip", "unzip"), b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


def read_text(path: Path) -> str:
    """A text file's content; an empty or non-UTF-8 file raises a one-line ``ValueError`` naming it."""
    raw = Path(path).read_bytes()
    if not raw:
        raise ValueError(f"{path} is empty; fill it with text or leave it out")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        for magic, (kind, tool) in COMPRESSED.items():
            if raw.startswith(magic):
                raise ValueError(f"{path} is not UTF-8 text but {kind}-compressed data; decompress it first "
                                 f"({tool} {path}) and pass the result") from None
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                         "pass a text file, or convert it to UTF-8 first (iconv -t utf-8)") from None


def _carve(text: str, fraction: float) -> dict[str, str]:
    """Train / val / test = the first 1-2f, the next f and the last f of ``text``, cut at newlines."""

    def cut(pos: int) -> int:
        newline = text.find("\n", pos)
        return len(text) if newline < 0 else newline + 1

    val_start = cut(int(len(text) * (1 - 2 * fraction)))
    test_start = cut(int(len(text) * (1 - fraction)))
    return {"train": text[:val_start], "val": text[val_start:test_start], "test": text[test_start:]}


class TextDataModule(SplitDataModule):
    """Token windows from WikiText-103, the King James Bible or your own text files.

    Splits: WikiText-103 has its own train/valid/test files. ``kjv`` and ``files`` are cut by
    position: the last ``val_fraction`` of the text (moved to the next line break) is test, the
    ``val_fraction`` before it val, the rest train. For ``kjv`` with 0.05 that makes test the end
    of the New Testament (most of Revelation and the late epistles), unseen text rather than
    verses interleaved with training ones.

    The tokens are cached as flat arrays (uint16 when the vocabulary fits, else uint32) under
    ``root/cache/<dataset>-<tokenizer>-<key>.<split>.bin``; the key hashes the source files'
    paths, sizes and mtimes and ``val_fraction``, so an edited source is re-tokenised.

    Args:
        dataset: One of ``kjv``, ``wikitext103``, ``files``.
        root: Data folder: holds ``wikitext-103-raw/`` and the token cache.
        files: The text files for ``dataset: files``, trained on concatenated.
        tokenizer: ``byte`` or ``gpt2`` (see ``tokenizers.py``).
        block_size: Tokens per sample (the model's context length).
        batch_size: Samples per batch.
        num_workers: Loader worker processes.
        val_fraction: Share of the text held out for val, and again for test (kjv and files).
        download: Fetch WikiText-103 (raw, ~190 MB zip) when missing (needs internet).
        seed: Seeds the order of the training windows.
    """

    def __init__(
        self,
        dataset: str = "kjv",
        root: str = "data",
        files: list[str] | None = None,
        tokenizer: str = "byte",
        block_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown text dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        if (dataset == "files") != bool(files):
            raise ValueError("files must be given exactly when dataset is 'files'")
        if not 0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.save_hyperparameters()
        self.tokenizer = get_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self.dtype = np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)
        self.dataset, self.root, self.files, self.block_size = dataset, root, files, block_size
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        self.download, self.seed = download, seed

    # -- sources -------------------------------------------------------------------------------
    def _wikitext_paths(self) -> dict[str, Path]:
        return {split: abspath(self.root) / WIKITEXT_DIR / name for split, name in WIKITEXT_FILES.items()}

    def source_files(self) -> list[Path]:
        """The files the text is read from; ``DataNotFoundError`` when any is missing."""
        if self.dataset == "kjv":
            return [kjv_source()]
        if self.dataset == "wikitext103":
            paths = list(self._wikitext_paths().values())
            if not all(p.is_file() for p in paths):
                raise DataNotFoundError(
                    "WikiText-103",
                    [abspath(self.root)],
                    f"{WIKITEXT_DIR}/{{{','.join(WIKITEXT_FILES.values())}}}",
                    "unzip wikitext-103-raw-v1.zip there, or set download: true (needs internet)",
                )
            return paths
        paths = [abspath(f) for f in self.files]
        folders = [p for p in paths if p.is_dir()]
        if folders:
            raise ValueError(f"{folders[0]} is a folder, but files lists text files; list the files in it "
                             f"(e.g. {folders[0]}/*.txt expanded by your shell) instead")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataNotFoundError(
                "Text files",
                sorted({str(p.parent) for p in missing}),
                ", ".join(p.name for p in missing),
                "check the paths given in files",
            )
        return paths

    def _read_splits(self) -> dict[str, str]:
        if self.dataset == "wikitext103":
            return {s: read_text(p) for s, p in self._wikitext_paths().items()}
        if self.dataset == "kjv":
            return _carve(read_kjv(), self.val_fraction)
        texts = [read_text(p) for p in self.source_files()]
        return _carve("".join(t if t.endswith("\n") else t + "\n" for t in texts), self.val_fraction)

    def _too_short(self, split: str, num_tokens: int) -> str:
        """The one-line message for a split with no full window: which file, how short, what to do."""
        need = f"{num_tokens} tokens but one window needs block_size + 1 = {self.block_size + 1}"
        if self.dataset == "wikitext103":
            path = self._wikitext_paths()[split]
            return f"{path} (the {split} split) has {need}; check that the file is complete, or lower block_size"
        sources = ", ".join(str(p) for p in self.source_files())
        if split == "train":
            fix = "give more text, or lower block_size (the model's too)"
        else:
            fix = (f"give more text (val and test each get val_fraction = {self.val_fraction} of it), "
                   "raise val_fraction, or lower block_size (the model's too)")
        return f"the {split} split of {sources} has {need}; {fix}"

    # -- token cache ---------------------------------------------------------------------------
    def cache_paths(self) -> dict[str, Path]:
        """Where each split's tokens are (or will be) cached."""
        key = hashlib.sha1(f"v{CACHE_VERSION} {self.val_fraction}".encode())
        for path in self.source_files():
            stat = path.stat()
            key.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        stem = f"{self.dataset}-{self.tokenizer.name}-{key.hexdigest()[:16]}"
        return {split: abspath(self.root) / "cache" / f"{stem}.{split}.bin" for split in SPLITS}

    def _build_cache(self) -> dict[str, Path]:
        paths = self.cache_paths()
        if all(p.is_file() for p in paths.values()):
            return paths
        paths["train"].parent.mkdir(parents=True, exist_ok=True)
        for split, text in self._read_splits().items():
            tmp = paths[split].with_suffix(f".tmp{os.getpid()}")
            self.tokenizer.encode(text).astype(self.dtype).tofile(tmp)
            os.replace(tmp, paths[split])  # atomic: a reader never sees half a file
        return paths

    # -- Lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download WikiText-103 when asked, then tokenise once (local rank 0 only)."""
        if self.download and self.dataset == "wikitext103":
            self._download_wikitext()
        self._build_cache()

    def _download_wikitext(self) -> None:
        if all(p.is_file() for p in self._wikitext_paths().values()):
            return
        from torchvision.datasets.utils import download_and_extract_archive

        errors = []
        for url in WIKITEXT_URLS:
            try:
                return download_and_extract_archive(url, str(abspath(self.root)))
            except (OSError, RuntimeError) as err:  # offline, or a bad archive: try the next mirror
                errors.append(f"{url}: {one_line(err, 120)}")
        raise DataNotFoundError(
            "WikiText-103",
            [abspath(self.root)],
            f"{WIKITEXT_DIR}/{{{','.join(WIKITEXT_FILES.values())}}}",
            f"put {WIKITEXT_DIR}/ there (unzip wikitext-103-raw-v1.zip from {WIKITEXT_URLS[0]}), or rerun with internet",
            OSError("; ".join(errors)),
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the cached token files (tokenising first if ``prepare_data`` did not run)."""
        paths = self._build_cache()
        self.splits = {split: TokenWindows(path, self.dtype, self.block_size) for split, path in paths.items()}
        for split, windows in self.splits.items():
            if len(windows) == 0:
                raise ValueError(self._too_short(split, windows.num_tokens))
        self.train_set, self.val_set, self.test_set = (self.splits[k] for k in ("train", "val", "test"))

