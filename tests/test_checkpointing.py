"""sift_lightning.checkpointing.ModelCheckpoint: last.ckpt is the state at the end of training, and a
run resumed from it continues exactly as one longer run would (epochs, batch indices, samples, steps)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning.checkpointing import ModelCheckpoint
from sift_lightning.data import SplitDataModule, train_loader


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


class _Indices(SplitDataModule):
    """40 samples, batches of 4: 10 batches an epoch; each sample is its own index."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.seed = 4, 0, 0
        self.train_set = self.val_set = TensorDataset(torch.arange(40.0).view(40, 1))


class _Recorder(L.LightningModule):
    """Records (epoch, batch_idx, first sample) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.seen.append((self.current_epoch, batch_idx, int(x[0, 0])))
        return self.layer(x).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _record(folder, ckpt_path=None, val=True, **limits) -> tuple[list[tuple[int, int, int]], int]:
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=int(val), callbacks=[ModelCheckpoint(folder, monitor="val/loss" if val else None, save_last=True)],
        **limits,
    )  # fmt: skip
    trainer.fit(model, _Indices(), ckpt_path=ckpt_path)
    return model.seen, trainer.global_step


@pytest.mark.parametrize(
    ("first", "then"),
    [
        # stopped by max_steps inside epoch 0 (Lightning counted the epoch done: 0 steps, or the rest skipped)
        ({"max_epochs": 1, "max_steps": 4}, {"max_epochs": 1, "max_steps": 8}),
        ({"max_steps": 7, "val_check_interval": 3}, {"max_steps": 16, "val_check_interval": 3}),
        # a finished epoch: the next epoch reads a new pass, not epoch 0's order again
        ({"max_epochs": 1}, {"max_epochs": 2}),
        ({"max_epochs": 1}, {"max_steps": 14}),  # (Lightning replays a finished epoch when resuming by steps)
        # limit_train_batches ends the epoch before the pass runs out: the rest of the pass is not read
        ({"max_epochs": 1, "limit_train_batches": 5}, {"max_epochs": 3, "limit_train_batches": 5}),
        ({"max_steps": 5, "limit_train_batches": 5}, {"max_steps": 13, "limit_train_batches": 5}),
    ],
    ids=["max_steps-mid-epoch", "max_steps-after-validation", "epoch-end", "epoch-end-then-max_steps",
         "limited-epoch-end", "limited-epoch-end-max_steps"],
)
@pytest.mark.parametrize("val", [True, False], ids=["validating", "no-validation"])
def test_last_ckpt_of_a_finished_run_continues_like_one_run(tmp_path, first, then, val):
    """Resuming a finished run's last.ckpt with a larger budget trains exactly the batches one run would."""
    uninterrupted, steps = _record(tmp_path / "one", val=val, **then)
    before, _ = _record(tmp_path / "first", val=val, **first)
    after, resumed_steps = _record(tmp_path / "resumed", ckpt_path=str(tmp_path / "first" / "last.ckpt"), val=val,
                                   **then)
    assert before + after == uninterrupted  # same epochs, batch indices and samples, in order
    assert resumed_steps == steps == len(uninterrupted)

