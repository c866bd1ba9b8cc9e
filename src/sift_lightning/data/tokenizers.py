"""Tokenizers for the language-model data: raw UTF-8 bytes, or GPT-2's BPE through tiktoken."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np

from ._common import DataNotFoundError

__all__ = ["TOKENIZERS", "ByteTokenizer", "GPT2Tokenizer", "Tokenizer", "get_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the text data module needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte: 256 ids, nothing to download, never an unknown token."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as a 1-D uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int]) -> str:
        """Text from byte ids; a multi-byte character cut in half decodes as U+FFFD."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 ids) from tiktoken's ``gpt2`` encoding.

    The BPE files load on first use, not at construction, so ``vocab_size`` is known (and a config
    can link it to the model) without them. tiktoken downloads them once into its cache
    (``$TIKTOKEN_CACHE_DIR``, else ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``);
    offline, copy that cache from a machine that has run ``tiktoken.get_encoding("gpt2")``.
    """

    name = "gpt2"
    vocab_size = 50257

    def __init__(self) -> None:
        self._encoding = None

    @property
    def encoding(self):
        """The tiktoken ``Encoding``; ``DataNotFoundError`` when the BPE files cannot be had."""
        if self._encoding is None:
            try:
                import tiktoken
            except ImportError as err:
                raise ImportError("the gpt2 tokenizer needs tiktoken: pip install 'sift-lightning[bpe]'") from err
            try:
                self._encoding = tiktoken.get_encoding("gpt2")
            except OSError as err:  # requests' ConnectionError and urllib's URLError are OSErrors
                raise DataNotFoundError(
                    "GPT-2 BPE files",
                    [_tiktoken_cache_dir()],
                    "vocab.bpe and encoder.json",
                    "they are not available offline: use `tokenizer: byte`, or set TIKTOKEN_CACHE_DIR "
                    "to a folder holding tiktoken's cached copies",
                ) from err
        return self._encoding

    def encode(self, text: str) -> np.ndarray:
        """BPE ids of ``text`` as a 1-D uint32 array (special tokens are treated as plain text)."""
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text from BPE ids."""
        return self.encoding.decode([int(i) for i in ids])


def _tiktoken_cache_dir() -> str:
    # Mirrors tiktoken.load.read_file_cached.
    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or default


TOKENIZERS = {"byte": ByteTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    """A new tokenizer by name; an unknown name lists the valid ones."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; valid: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()
