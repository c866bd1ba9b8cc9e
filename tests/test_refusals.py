"""Silent misreadings that now get one line: the settings' inputs, and sparse checkpoints trained on dense."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import ImageClassifier, SparsityCallback, SparsitySettings
from sift_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
TINY = dict(channels=(8, 16, 32, 64))


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)),
                      batch_size=4)


def _module() -> ImageClassifier:
    return ImageClassifier("resnet18", 10, in_chans=1, image_size=16, backbone_kwargs=TINY)


def test_dense_run_with_an_invalid_sparsity_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--sift.transform", "dense", "--sift.sparsity", "1.5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "sift-fit: error: --sift.sparsity must be a number in (0, 1) such as 0.5, 0.75 or 0.9, got 1.5"


def test_patterns_given_as_one_string_are_one_pattern():
    s = SparsitySettings(include="layer4*", exclude="layer4.0.conv1")
    assert s.include == ["layer4*"] and s.exclude == ["layer4.0.conv1"]


def test_resuming_a_sparse_checkpoint_without_the_callback_is_refused(tmp_path):
    trainer = pl.Trainer(max_steps=2, callbacks=[SparsityCallback(0.5, transform="sparse_doped", algorithm="static")],
                         enable_checkpointing=False, **QUIET)
    trainer.fit(_module(), _data())
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    dense = pl.Trainer(max_steps=4, enable_checkpointing=False, **QUIET)
    with pytest.raises(ValueError, match=r"^checkpoint was trained sparse \(transform='sparse_doped', sparsity=0.5\) but "
                                         r"this run trains without SparsityCallback: its masked weights would grow back; "
                                         r"resume it with the same sparsity settings \(sift-fit: --sift.transform "
                                         r"sparse_doped --sift.sparsity 0.5\)"):
        dense.fit(_module(), _data(), ckpt_path=tmp_path / "sparse.ckpt")
    # evaluating it without the callback is fine: the structure is rebuilt from the checkpoint
    results = pl.Trainer(**QUIET).test(_module(), _data(), ckpt_path=tmp_path / "sparse.ckpt")
    assert "test/loss" in results[0]


def _bare(cls):
    """A strategy instance without its constructor (FSDP needs CUDA or a process group to build)."""
    return cls.__new__(cls)


def test_fsdp1_is_refused_at_setup_pointing_to_fsdp2():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    cb = SparsityCallback(0.5)
    trainer = SimpleNamespace(strategy=_bare(FSDPStrategy), callbacks=[cb])
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy .*fsdp2.yaml"):
        cb.setup(trainer, _module(), "fit")


@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_weight_averaging_under_fsdp2_is_refused(averaging):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    from sift_lightning.parallel import FSDP2Strategy

    cb = SparsityCallback(0.5)
    other = EMAWeightAveraging() if averaging == "ema" else StochasticWeightAveraging(swa_lrs=0.01)
    trainer = SimpleNamespace(strategy=_bare(FSDP2Strategy), callbacks=[cb, other])
    with pytest.raises(ValueError, match=rf"{type(other).__name__} under FSDP2 .* use strategy=ddp"):
        cb.setup(trainer, _module(), "fit")


@pytest.mark.parametrize("sharding", [{"fsdp": ["full_shard"]}, {"deepspeed": "ds_config.json"}])
def test_hf_trainer_sharding_is_refused(sharding):
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from sift_lightning.hf import SparsityTrainerCallback

    args = SimpleNamespace(**{"fsdp": [], "deepspeed": None, **sharding})
    with pytest.raises(ValueError, match=f"does not support the Trainer's {next(iter(sharding))}.*DDP"):
        SparsityTrainerCallback(sparsity=0.5).on_init_end(args, None, None, model=torch.nn.Linear(8, 8))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_multiprocessing_launcher_is_refused(strategy):
    # its children train; Lightning loads their weights back non-strictly: masks and built layers dropped
    cb = SparsityCallback(0.5, transform="sparse_doped")
    trainer = pl.Trainer(strategy=strategy, devices=2, accelerator="cpu", callbacks=[cb], **QUIET)
    with pytest.raises(ValueError, match=r"does not support Lightning's multiprocessing launcher \(ddp_spawn, ddp_fork, "
                                         r"ddp_notebook; start method (spawn|fork)\).*use strategy='ddp'"):
        cb.setup(trainer, _module(), "fit")


def test_the_engine_crosses_a_spawn():
    # torch cannot send a Generator to a spawned process; the engine sends its state as bytes
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's shared-memory reductions, as a spawn does

    engine = SparsityCallback(0.5, seed=3).engine
    torch.rand(3, generator=engine.generator)
    data = bytes(ForkingPickler.dumps(engine))
    assert b"rebuild_storage" not in data  # no tensor storage to share: a raw Generator's state sends one
    assert b"rebuild_storage" in bytes(ForkingPickler.dumps(torch.Generator()))
    clone = pickle.loads(data)
    assert torch.equal(torch.rand(5, generator=clone.generator), torch.rand(5, generator=engine.generator))
    assert clone.settings == engine.settings
