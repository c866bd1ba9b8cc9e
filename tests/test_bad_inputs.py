"""Bad inputs give one line that names the problem and the fix (issue 13): offline downloads, corrupt
checkpoints, unreadable text, unknown backbones, reused run folders and --trainer.default_root_dir."""

from __future__ import annotations

import gzip
import re
import urllib.error
from pathlib import Path

import pytest
import torch

from sift_lightning import create_backbone
from sift_lightning.cli import main
from sift_lightning.data import CIFARDataModule, DataNotFoundError, FashionMNISTDataModule, TextDataModule
from sift_lightning.data import cifar, fashion_mnist
from sift_lightning.export.checkpoint import export_checkpoint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
OFFLINE = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
FAST = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.batch_size", "4"]


def _error_line(capsys, *args: str) -> str:
    """Run ``sift-fit`` in this process (an uncaught exception fails the test); its one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


def _offline(*args, **kwargs):
    raise OFFLINE


# ---------------------------------------------------------------- offline downloads
def test_cifar_download_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "download_and_extract_archive", _offline)
    message = (
        f"CIFAR-100 not found under {tmp_path} and the download failed (<urlopen error [Errno -3] Temporary failure "
        "in name resolution>); put cifar-100-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar-100-python"
        ".tar.gz) there and extract it, or rerun with internet"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        CIFARDataModule(root=str(tmp_path), download=True).prepare_data()
    monkeypatch.setattr(cifar, "download_and_extract_archive", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("File not found or corrupted.")))
    with pytest.raises(DataNotFoundError, match=re.escape("CIFAR-10 not found under ") + ".*" + re.escape(
            "download failed (File not found or corrupted.); put cifar-10-python.tar.gz")):
        CIFARDataModule(root=str(tmp_path), num_classes=10, download=True).prepare_data()


def test_fashion_mnist_download_offline_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", _offline)
    root = tmp_path / "fm"
    message = (
        f"Fashion-MNIST not found under {root}, {root}/FashionMNIST/raw, {tmp_path}/debian and the download failed "
        "(<urlopen error [Errno -3] Temporary failure in name resolution>); put the four IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, raw or "
        ".gz, from http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/) there, or install Debian's "
        "dataset-fashion-mnist"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        FashionMNISTDataModule(root=str(root), download=True).prepare_data()


def test_wikitext_download_offline_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", _offline)
    urls = ("https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip")
    reason = "; ".join(f"{u}: <urlopen error [Errno -3] Temporary failure in name resolution>" for u in urls)
    message = (
        f"WikiText-103 not found under {tmp_path} and the download failed ({reason}); put wikitext-103-raw/ there "
        f"(unzip wikitext-103-raw-v1.zip from {urls[0]}), or rerun with internet"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        TextDataModule(dataset="wikitext103", root=str(tmp_path), download=True).prepare_data()


def test_imagenet_has_no_download_and_says_how_to_get_it(tmp_path):
    from sift_lightning.data import ImageNetDataModule

    message = (
        f"ImageNet not found under {tmp_path} (looked for train/<wnid>/*.JPEG and val/<wnid>/*.JPEG); download "
        "ILSVRC2012 from image-net.org (needs an account), extract it there and sort val/ into one folder per class"
    )
    with pytest.raises(DataNotFoundError, match=f"^{re.escape(message)}$"):
        ImageNetDataModule(root=str(tmp_path)).setup("fit")


def test_shipped_cifar_config_offline_through_sift_fit(tmp_path, monkeypatch, capsys):
    """The shipped config (download: true) with no network: one line, no urllib traceback."""
    monkeypatch.chdir(tmp_path)
    for proxy in ("http_proxy", "https_proxy"):  # a proxy that refuses connections: "no network", for sure
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    line = _error_line(capsys, "fit", "--config", str(CONFIGS / "resnet18_sparse_wide.yaml"), "--data.init_args.root",
                       str(tmp_path / "data"), "--trainer.accelerator", "cpu", "--trainer.logger", "false")
    assert line.startswith(f"sift-fit: error: CIFAR-100 not found under {tmp_path / 'data'} and the download failed (")
    assert line.endswith("put cifar-100-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) "
                         "there and extract it, or rerun with internet")


# ---------------------------------------------------------------- text files
def _text_module(tmp_path, *files, **kwargs):
    return TextDataModule(dataset="files", root=str(tmp_path / "data"), files=[str(f) for f in files], **kwargs)


def test_empty_text_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    message = f"{tmp_path}/empty.txt is empty; fill it with text or leave it out"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _text_module(tmp_path, tmp_path / "empty.txt").setup("fit")


def test_folder_passed_as_a_text_file(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'corpus'))} is a folder, but files lists text files"):
        _text_module(tmp_path, tmp_path / "corpus").setup("fit")


def test_gzip_file_passed_as_text(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress(b"some text\n" * 100))
    message = (f"{path} is not UTF-8 text but gzip-compressed data; decompress it first (gunzip {path}) "
               "and pass the result")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _text_module(tmp_path, path).setup("fit")


def test_binary_file_passed_as_text(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    message = (f"{path} is not UTF-8 text (byte 0xe9 at offset 3); pass a text file, or convert it to UTF-8 first "
               "(iconv -t utf-8)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _text_module(tmp_path, path).setup("fit")


def test_split_too_short_for_block_size(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("a\n" * 100)  # 200 bytes: val and test get 10 each
    message = (f"the val split of {path} has 10 tokens but one window needs block_size + 1 = 17; give more text "
               "(val and test each get val_fraction = 0.05 of it), raise val_fraction, or lower block_size "
               "(the model's too)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _text_module(tmp_path, path, block_size=16).setup("fit")
    message = (f"the train split of {path} has 200 tokens but one window needs block_size + 1 = 201; give more "
               "text, or lower block_size (the model's too)")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _text_module(tmp_path, path, block_size=200, val_fraction=0.0001).setup("fit")


def test_wikitext_split_too_short_names_its_file(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    for name, text in (("wiki.train.raw", "x" * 500), ("wiki.valid.raw", "y" * 100), ("wiki.test.raw", "z" * 5)):
        (folder / name).write_text(text)
    message = (f"{folder}/wiki.test.raw (the test split) has 5 tokens but one window needs block_size + 1 = 33; "
               "check that the file is complete, or lower block_size")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TextDataModule(dataset="wikitext103", root=str(tmp_path), block_size=32).setup("fit")


# ---------------------------------------------------------------- backbones
def test_unknown_backbone_ranks_close_matches_by_similarity():
    message = "unknown backbone 'resnt18'; did you mean resnet18, resnet18d, skresnet18, seresnet18, resnetv2_18?"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        create_backbone("resnt18", 10)
    with pytest.raises(ValueError, match=r"^unknown backbone 'vit_tiny'; did you mean vit_tiny_patch16_224, "):
        create_backbone("vit_tiny", 10)


def test_unknown_backbone_through_sift_fit_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = _error_line(capsys, "fit", "--config", str(CONFIGS / "resnet18_dense.yaml"), "--model.init_args.backbone",
                       "resnt18", "--trainer.accelerator", "cpu")
    assert line == ("sift-fit: error: unknown backbone 'resnt18'; did you mean resnet18, resnet18d, skresnet18, "
                    "seresnet18, resnetv2_18?")


# ---------------------------------------------------------------- checkpoints
@pytest.fixture
def broken_checkpoints(tmp_path):
    """A real (tiny) checkpoint cut in half, and random bytes."""
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "global_step": 3}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    return {"truncated": truncated, "noise": noise, "good": good}


def _corrupt(path: Path) -> str:
    return re.escape(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): ") + ".+" + re.escape(
        "; use another checkpoint of the run (best-*.ckpt, or an earlier copy) or train again")


@pytest.mark.parametrize("kind", ["truncated", "noise"])
def test_corrupt_checkpoint_is_one_line(broken_checkpoints, kind, tmp_path):
    path = broken_checkpoints[kind]
    with pytest.raises(ValueError, match=f"^{_corrupt(path)}$"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=f"^{_corrupt(path)}$"):
        export_checkpoint(path, tmp_path / "out.pt")
    assert read_checkpoint(broken_checkpoints["good"])["global_step"] == 3


def test_missing_checkpoint_names_the_file(tmp_path):
    message = (f"checkpoint {tmp_path}/nowhere.ckpt does not exist; pass the path of a .ckpt file "
               "(e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        read_checkpoint(tmp_path / "nowhere.ckpt")


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_corrupt_ckpt_path_through_sift_fit(broken_checkpoints, tmp_path, monkeypatch, capsys, subcommand):
    monkeypatch.chdir(tmp_path)
    path = broken_checkpoints["truncated"]
    line = _error_line(capsys, subcommand, "--config", str(CONFIGS / "quickstart_gpt.yaml"), "--ckpt_path", str(path),
                       "--trainer.logger", "false", "--data.init_args.root", str(tmp_path / "data"))
    assert re.fullmatch("sift-fit: error: " + _corrupt(path), line)
    line = _error_line(capsys, subcommand, "--config", str(CONFIGS / "quickstart_gpt.yaml"), "--ckpt_path",
                       str(tmp_path / "nowhere.ckpt"), "--trainer.logger", "false")
    assert line == (f"sift-fit: error: checkpoint {tmp_path}/nowhere.ckpt does not exist; pass the path of a .ckpt "
                    "file (e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)")


def test_corrupt_checkpoint_through_export(broken_checkpoints, tmp_path, capsys):
    line = _error_line(capsys, "export", "--ckpt_path", str(broken_checkpoints["noise"]), "--out", str(tmp_path / "x.pt"))
    assert re.fullmatch("sift-fit: error: " + _corrupt(broken_checkpoints["noise"]), line)


def test_export_creates_the_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), *FAST, "--data.init_args.root", str(tmp_path / "data")])
    (last,) = tmp_path.glob("runs/quickstart_gpt/version_0/checkpoints/last.ckpt")
    summary = export_checkpoint(last, tmp_path / "new" / "deeper" / "model.pt", program=False)
    assert summary["out"] == str(tmp_path / "new" / "deeper" / "model.pt") and Path(summary["out"]).is_file()


# ---------------------------------------------------------------- run folders
def test_default_root_dir_moves_logs_config_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), *FAST, "--data.init_args.root", str(tmp_path / "data"),
          "--trainer.default_root_dir", str(tmp_path / "elsewhere")])
    version = tmp_path / "elsewhere" / "runs" / "quickstart_gpt" / "version_0"
    assert (version / "config.yaml").is_file() and (version / "checkpoints" / "last.ckpt").is_file()
    assert list(version.glob("events.out.tfevents.*")) and not (tmp_path / "runs").exists()


def test_a_previous_runs_config_is_not_overwritten(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), *FAST, "--data.init_args.root", str(tmp_path / "data")]
    main(args)
    main(args)  # the TensorBoard logger gives each run its own version folder
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart_gpt").iterdir()) == ["version_0", "version_1"]
    config = tmp_path / "runs" / "quickstart_gpt" / "version_0" / "config.yaml"
    before = config.read_text()
    line = _error_line(capsys, *args, "--trainer.logger.init_args.version", "0")
    assert line == (
        f"sift-fit: error: {Path('runs') / 'quickstart_gpt' / 'version_0' / 'config.yaml'} exists: a previous run "
        "wrote it, and its checkpoints belong to it; give this run its own folder (--trainer.default_root_dir, or "
        "keep the TensorBoard logger: it makes version_<n>) or delete that file")
    assert config.read_text() == before


def test_pretrained_weights_offline_are_one_line(tmp_path):
    # a fresh process with an empty Hugging Face cache and the hub offline: what an offline user meets
    import os
    import subprocess
    import sys

    code = ("from sift_lightning import create_backbone\n"
            "try:\n    create_backbone('resnet18', 10, pretrained=True)\n"
            "except ValueError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert re.fullmatch(r"pretrained weights for resnet18 could not be downloaded or found in the Hugging Face "
                        r"cache \(\w+: .*\); connect once to download them, copy the cache .* or set pretrained: false",
                        out.stdout.strip()), out.stdout + out.stderr
