"""``ModelCheckpoint`` whose ``last.ckpt`` is always the state at the end of training.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` at the end of training only
when it has never saved before: a run that checkpoints at a validation mid-epoch and then stops at
``max_steps`` later in the epoch leaves ``last.ckpt`` at the validation step, and the final steps are
lost (the LM study lost its last 90 of 1,500 steps this way). This subclass saves ``last.ckpt`` once
more at the end of fit whenever the final optimizer step is not yet in it, so ``last.ckpt`` holds
the trained model and resumes exactly from where training stopped.
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
