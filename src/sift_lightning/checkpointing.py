"""``ModelCheckpoint`` whose ``last.ckpt`` is always the state at the end of training.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` at the end of training only
when it has never saved before: a run that checkpoints at a validation mid-epoch and then stops at
``max_steps`` later in the epoch leaves ``last.ckpt`` at the validation step, and the final steps are
lost (the LM study lost its last 90 of 1,500 steps this way). This subclass saves ``last.ckpt`` once
more at the end of fit whenever the final optimizer step is not yet in it, so ``last.ckpt`` holds
the trained model and resumes exactly from where training stopped.

When training stops inside an epoch (``max_steps``, ``max_time``, early stopping), Lightning 2.6
counts that epoch as processed before the epoch-end and train-end saves, so such a checkpoint
resumes at the *next* epoch: the rest of the epoch is skipped, and with ``max_epochs`` reached
nothing trains at all. Every checkpoint taken while this callback is on the trainer therefore
records a cut-short epoch as still running (the state Lightning itself saves after a mid-epoch
batch), and a resume with a larger ``max_steps`` reads the very next batch of the same epoch (the
train loader is stateful). A checkpoint taken after an epoch ran to its end is recorded as "epoch
completed, next one not begun", without the loader's position: Lightning 2.6 otherwise replays
the finished epoch when resuming by ``max_steps``, and that replay reads one leftover batch, or
none and then counts an empty epoch, depending on whether validation ran at the epoch's end. The
next epoch then reads a new pass from its start (``first_pass`` in ``data._common``).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; with ``save_last`` the final step always reaches ``last.ckpt``."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            # "link" would point last.ckpt at an older file: write the final state itself
            self._last_checkpoint_saved = ""
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> dict:
        epochs = trainer.fit_loop.epoch_progress.current
        if epochs.processed == epochs.started > 0:  # saved after the epoch loop ended
            if trainer.fit_loop.epoch_loop._num_ready_batches_reached():
                _close_epoch(checkpoint)
            else:
                _reopen_epoch(checkpoint)  # the epoch was cut short: see the module docstring
        return super().on_save_checkpoint(trainer, pl_module, checkpoint)


def _close_epoch(checkpoint: dict) -> None:
    """Mark the saved fit loop's last epoch as completed, and the next one as not begun."""
    loop = checkpoint["loops"]["fit_loop"]
    progress = loop["epoch_progress"]
    for counts in (progress["total"], progress["current"]):
        counts["completed"] = counts["processed"]
    batches = loop["epoch_loop.batch_progress"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
    loop["state_dict"].pop("combined_loader", None)  # the next epoch reads a new pass from its start
    checkpoint["epoch"] = progress["current"]["completed"]


def _reopen_epoch(checkpoint: dict) -> None:
    """Mark the saved fit loop's last epoch as started, not processed or completed."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
    for counts in (progress["total"], progress["current"]):
        counts["processed"] = counts["completed"] = counts["started"] - 1
    checkpoint["epoch"] = progress["current"]["completed"]
