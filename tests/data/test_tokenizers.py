"""Tokenizers: byte round trip, name lookup, and GPT-2's offline failure."""

import re

import numpy as np
import pytest
import requests
import torch

from sift_lightning.data import ByteTokenizer, DataNotFoundError, GPT2Tokenizer, get_tokenizer
from sift_lightning.data.tokenizers import Tokenizer


def test_byte_round_trip():
    tok = get_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer) and tok.vocab_size == 256
    text = "In the beginning — Ἐν ἀρχῇ\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == tok.decode(ids.tolist()) == tok.decode(torch.from_numpy(ids)) == text
    assert tok.decode(ids[:-3]) == text[:-2] + "\ufffd"  # "ῇ" (3 bytes) cut after its first


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match=re.escape("unknown tokenizer 'bpe'; valid: byte, gpt2")):
        get_tokenizer("bpe")


def test_gpt2_vocab_size_needs_no_files():
    tok = get_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer) and isinstance(tok, Tokenizer) and tok.vocab_size == 50257


def test_gpt2_offline_error(tmp_path, monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken.load
    import tiktoken.registry

    def offline(url):
        raise requests.exceptions.ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: it must download
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    message = (
        f"GPT-2 BPE files not found under {tmp_path} (looked for vocab.bpe and encoder.json); they are "
        "not available offline: use `tokenizer: byte`, or set TIKTOKEN_CACHE_DIR to a folder holding "
        "tiktoken's cached copies"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        GPT2Tokenizer().encode("hello")
