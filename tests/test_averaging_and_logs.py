"""Nothing silent: weight averaging keeps exact masks, runs that cannot move masks say so, logs people can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import ImageClassifier, SparsityCallback, dense_state_dict, export_checkpoint, fold
from sift_lightning.sparse.masks import get_mask, sparse_parameters

QUIET = dict(enable_progress_bar=False, enable_model_summary=False)


class MLP(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _data(n: int = 64, scale: float = 1.0) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g) * scale, torch.randint(0, 4, (n,), generator=g)),
                      batch_size=8)


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {full: get_mask(owner, local).clone() for full, owner, local, _ in sparse_parameters(model)}


def _assert_exactly_sparse(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for full, owner, local, param in sparse_parameters(model):
        mask = get_mask(owner, local)
        assert mask.dtype == torch.bool and torch.equal(mask, masks[full]), full
        assert torch.count_nonzero(param[~mask]) == 0, f"masked weights of {full} are not 0"


# ---------------------------------------------------------------- weight averaging
def test_ema_averaged_model_keeps_the_masks_and_zeros():
    torch.manual_seed(0)
    model = MLP()
    ema = EMAWeightAveraging(decay=0.5)
    cb = SparsityCallback(0.75, algorithm="rigl", update_frequency=2, drop_fraction=0.5, end=1.0)
    trainer = pl.Trainer(max_steps=16, callbacks=[cb, ema], logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(model, _data())
    masks = _masks(model)
    assert cb.engine.updates == 8
    _assert_exactly_sparse(model, masks)  # the model now holds the averaged weights (EMA's end of training)
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert density == 0.25


def test_averaging_callback_before_the_sparsity_callback_is_refused():
    trainer = pl.Trainer(max_steps=2, callbacks=[EMAWeightAveraging(), SparsityCallback(0.5)], logger=False,
                         enable_checkpointing=False, **QUIET)
    with pytest.raises(ValueError, match="^put SparsityCallback before EMAWeightAveraging in the Trainer's callbacks"):
        trainer.fit(MLP(), _data())


def test_swa_averaged_model_keeps_the_masks_and_zeros():
    torch.manual_seed(0)
    model = MLP()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1, annealing_epochs=1)
    cb = SparsityCallback(0.75, algorithm="set", update_frequency=3, drop_fraction=0.5, end=1.0)
    trainer = pl.Trainer(max_epochs=4, callbacks=[cb, swa], logger=False, enable_checkpointing=False, **QUIET)
    trainer.fit(model, _data())
    assert cb.engine.updates > 0
    _assert_exactly_sparse(model, _masks(model))


def test_export_of_an_ema_run_ships_the_averaged_weights(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier("resnet18", 10, in_chans=1, image_size=16, backbone_kwargs=dict(channels=(8, 16, 32, 64)))
    cb = SparsityCallback(0.5, transform="sparse_parallel", algorithm="rigl", update_frequency=2, end=1.0)
    save = ModelCheckpoint(tmp_path, "ema", save_last=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    trainer = pl.Trainer(max_steps=6, callbacks=[cb, EMAWeightAveraging(decay=0.5), save], logger=False, **QUIET)
    trainer.fit(module, DataLoader(data, batch_size=4))
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=False)
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    mask_keys = [k for k in averaged if k.endswith("_sift_mask")]
    assert mask_keys and all(averaged[k].dtype == torch.bool and torch.equal(averaged[k], current[k]) for k in mask_keys)
    for k in mask_keys:
        assert torch.count_nonzero(averaged[k.removesuffix("_sift_mask")][~averaged[k]]) == 0
    summary = export_checkpoint(tmp_path / "ema.ckpt", tmp_path / "model.pt", program=False)
    shipped = torch.load(summary["out"], weights_only=True)
    expected = dense_state_dict(fold(ImageClassifier.load_from_checkpoint(tmp_path / "ema.ckpt").backbone))
    assert shipped.keys() == expected.keys()
    assert all(torch.equal(shipped[k], expected[k]) for k in expected)
    trained = ImageClassifier.load_from_checkpoint(tmp_path / "ema.ckpt")
    trained.load_state_dict(current)  # the non-averaged weights fold to something else
    other = dense_state_dict(fold(trained.backbone))
    assert any(not torch.equal(shipped[k], other[k]) for k in expected)


# ---------------------------------------------------------------- runs that cannot move masks say so
def test_end_before_the_first_update_warns():
    cb = SparsityCallback(0.5, algorithm="rigl", update_frequency=10, end=0.5)
    trainer = pl.Trainer(max_steps=8, callbacks=[cb], logger=False, enable_checkpointing=False, **QUIET)
    with pytest.warns(UserWarning, match=r"^end=0.5 of 8 optimizer steps is step 4, before the first mask update at "
                                         r"step 10: masks never change"):
        trainer.fit(MLP(), _data())


def test_max_time_warns_that_end_may_never_come():
    cb = SparsityCallback(0.5, algorithm="rigl", update_frequency=2)
    trainer = pl.Trainer(max_epochs=2, max_time="00:00:10:00", callbacks=[cb], logger=False, enable_checkpointing=False,
                         **QUIET)
    with pytest.warns(UserWarning, match=r"^max_time may stop this run before its 16 estimated steps, so `end` "
                                         r"\(step 12\) may never come"):
        trainer.fit(MLP(), _data())


def test_non_finite_loss_is_reported_and_masks_keep_their_count():
    cb = SparsityCallback(0.75, algorithm="rigl", update_frequency=2, end=1.0)
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False, log_every_n_steps=1,
                         **QUIET)
    model = MLP(lr=1e30)
    with pytest.warns(UserWarning) as record:
        trainer.fit(model, _data(scale=1e30))
    messages = [str(w.message) for w in record]
    assert any(m.startswith("the training loss is nan at step") or m.startswith("the training loss is inf at step")
               for m in messages), messages
    assert any(m.startswith("non-finite weights or gradients in net.2.weight") for m in messages), messages
    assert cb.engine.skipped_updates > 0
    assert all(int(get_mask(o, loc).sum()) == round(0.25 * p.numel()) for _, o, loc, p in sparse_parameters(model))


# ---------------------------------------------------------------- TensorBoard
def test_tensorboard_shows_images_histograms_survival_and_hparams(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    cb = SparsityCallback(0.75, algorithm="rigl", update_frequency=3, drop_fraction=0.5, end=1.0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(max_steps=12, callbacks=[cb], logger=logger, enable_checkpointing=False, log_every_n_steps=50,
                         **QUIET)
    trainer.fit(model, _data())
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    updates = [3, 6, 9, 12]
    assert {"sift/layer_density", "sift/layer_itop", "sift_mask/net.2.weight"} <= set(tags["images"])
    assert [e.step for e in events.Images("sift/layer_itop")] == updates  # at mask updates only
    last = events.Images("sift/layer_itop")[-1]
    assert (last.width, last.height) == (12 * len(updates), 12)  # one layer, one column per update
    assert {"sift_hist/active_weights", "sift_hist/grow_scores"} <= set(tags["histograms"])
    assert [e.step for e in events.Histograms("sift_hist/active_weights")] == updates
    assert events.Histograms("sift_hist/active_weights")[0].histogram_value.num == 0.25 * 32 * 32
    survival = {e.step: e.value for e in events.Scalars("sift/grown_survival")}
    assert set(survival) == {6, 9, 12} and all(0.0 <= v <= 1.0 for v in survival.values())
    change = {e.step: e.value for e in events.Scalars("sift/mask_change")}
    assert set(change) == set(updates)
    assert not any(t.startswith("sift_density/") for t in tags["scalars"])
    hparams = (Path(logger.log_dir) / "hparams.yaml").read_text()
    assert "sift/algorithm: rigl" in hparams and "sift/sparsity: 0.75" in hparams
