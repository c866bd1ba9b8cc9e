"""Every YAML in configs/ goes through the real CLI parser and instantiates (on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sift_lightning import ImageClassifier, LanguageModel, SparsityCallback
from sift_lightning.cli import SiftCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUNS = sorted(p for p in CONFIGS.glob("*.yaml"))
STRATEGIES = sorted((CONFIGS / "strategies").glob("*.yaml"))
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
       "--trainer.logger", "false"]


def _cli(*args: str) -> SiftCLI:
    return SiftCLI(subclass_mode_model=True, subclass_mode_data=True, run=False, args=list(args))


def test_every_benchmark_has_a_config():
    names = {p.stem for p in RUNS}
    for family in ("dense", "sparse_wide", "sparse_par", "sparse_fact", "sparse_doped", "sparse_wide_static"):
        assert f"resnet18_{family}" in names
    for arch in ("resnet18", "resnet34"):
        assert {f"imagenet_{arch}_dense", f"imagenet_{arch}_sparse_wide", f"imagenet_{arch}_sparse_par"} <= names
    assert {"gpt3_small_wikitext103_dense", "gpt3_small_wikitext103_sparse_wide", "quickstart", "quickstart_gpt"} <= names


@pytest.mark.parametrize("path", RUNS + STRATEGIES, ids=lambda p: p.name)
def test_config_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# sift-fit fit --config configs/")


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(path.read_text())
    cli = _cli("--config", str(path), *CPU[:-2], "--trainer.default_root_dir", str(tmp_path / "elsewhere"))
    # the logger follows --trainer.default_root_dir (no config hard-codes its save_dir)
    assert "save_dir" not in raw["trainer"]["logger"]["init_args"]
    assert cli.trainer.logger.save_dir == str(tmp_path / "elsewhere" / "runs")
    assert cli.trainer.logger.name == raw["trainer"]["logger"]["init_args"]["name"] == path.stem
    module_cls = ImageClassifier if "ImageClassifier" in raw["model"]["class_path"] else LanguageModel
    assert isinstance(cli.model, module_cls)
    sparsity_cbs = [c for c in cli.trainer.callbacks if isinstance(c, SparsityCallback)]
    sift = raw["sift"]
    if sift["transform"] == "dense":
        assert sparsity_cbs == []
    else:
        (cb,) = sparsity_cbs
        assert cb.settings.transform == sift["transform"] and cb.settings.sparsity == sift["sparsity"]
        assert cb.settings.algorithm == sift.get("algorithm", "rigl")
        assert cb is cli.trainer.callbacks[0]


@pytest.mark.parametrize("path", STRATEGIES, ids=lambda p: p.name)
def test_strategy_fragments_compose(path, capsys):
    fragment = yaml.safe_load(path.read_text())["trainer"]
    with pytest.raises(SystemExit) as exit_info:
        SiftCLI(subclass_mode_model=True, subclass_mode_data=True,
                args=["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    merged = yaml.safe_load(capsys.readouterr().out)
    for key, value in fragment.items():
        assert merged["trainer"][key] == value
    assert merged["sift"]["transform"] == "sparse_parallel"  # the run's own settings survive


def test_sift_flags_override_a_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli("--config", str(CONFIGS / "resnet18_dense.yaml"), *CPU,
               "--sift.transform", "sparse_wide", "--sift.sparsity", "0.9", "--sift.algorithm", "set")
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityCallback)]
    assert (cb.settings.transform, cb.settings.sparsity, cb.settings.algorithm) == ("sparse_wide", 0.9, "set")


def test_sift_none_means_plain_sparse_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli("--config", str(CONFIGS / "resnet18_dense.yaml"), *CPU, "--sift.transform", "none", "--sift.sparsity", "0.8")
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityCallback)]
    assert cb.settings.transform is None and cb.settings.sparsity == 0.8
