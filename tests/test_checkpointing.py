"""sift_lightning.checkpointing.ModelCheckpoint: last.ckpt is the state at the end of training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning.checkpointing import ModelCheckpoint
from sift_lightning.data._common import train_loader


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


def _fit(tmp_path, steps, checkpoint=None, ckpt_path=None) -> Regression:
    torch.manual_seed(0)
    model = Regression()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        val_check_interval=3, num_sanity_val_steps=0, enable_checkpointing=checkpoint is not None,
        callbacks=[checkpoint] if checkpoint is not None else [],
    )  # fmt: skip
    trainer.fit(model, train_loader(_data(40), batch_size=4, num_workers=0, seed=0),
                DataLoader(_data(8), batch_size=4), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_checkpoint_holds_the_final_step_and_resumes_exactly(tmp_path, save_last):
    # 10 batches an epoch, validation (and a checkpoint) every 3: max_steps=7 stops 1 step after one
    ckpt = ModelCheckpoint(tmp_path / "ours", monitor="val/loss", save_last=save_last)
    trained = _fit(tmp_path, 7, ckpt)
    last = torch.load(tmp_path / "ours" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 7
    assert torch.equal(last["state_dict"]["layer.weight"], trained.layer.weight.detach())
    assert (tmp_path / "ours" / "last.ckpt").is_file() and not (tmp_path / "ours" / "last.ckpt").is_symlink()
    # ... and it resumes exactly where training stopped
    uninterrupted = _fit(tmp_path, 12)
    resumed = _fit(tmp_path, 12, ModelCheckpoint(tmp_path / "resumed", save_last=True),
                   ckpt_path=str(tmp_path / "ours" / "last.ckpt"))
    assert torch.equal(resumed.layer.weight, uninterrupted.layer.weight)


def test_lightning_own_checkpoint_loses_the_final_steps(tmp_path):
    """Why the subclass exists (Lightning 2.6): its last.ckpt stays at the last validation."""
    _fit(tmp_path, 7, LightningModelCheckpoint(tmp_path / "theirs", monitor="val/loss", save_last=True))
    last = torch.load(tmp_path / "theirs" / "last.ckpt", map_location="cpu", weights_only=False)
    if last["global_step"] == 7:
        pytest.skip("this Lightning version saves the final step itself")
    assert last["global_step"] == 6


def test_no_extra_save_when_the_last_step_is_saved(tmp_path):
    ckpt = ModelCheckpoint(tmp_path / "ours", monitor="val/loss", save_last=True)
    _fit(tmp_path, 6, ckpt)  # validation at step 6 already wrote last.ckpt
    assert torch.load(tmp_path / "ours" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert ckpt._last_global_step_saved == 6
