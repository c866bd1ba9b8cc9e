"""Loading a Sparse-IFT checkpoint outside a Trainer (``Module.load_from_checkpoint``)."""

from __future__ import annotations

from typing import Any

__all__ = ["SIFT_CHECKPOINT_KEY", "SiftCheckpointMixin"]

# SparsityCallback writes its constructor arguments here, so the structure can be rebuilt.
SIFT_CHECKPOINT_KEY = "sift_lightning"


class SiftCheckpointMixin:
    """Rebuild the Sparse-IFT structure before a checkpoint's weights are loaded.

    A checkpoint of a transformed model holds branch/factor weights and mask buffers that a freshly
    constructed module does not have. Lightning calls ``on_load_checkpoint`` before
    ``load_state_dict``; when no ``SparsityCallback`` has set the module up already (a Trainer
    resume), apply the one the checkpoint was trained with. Its random masks are then overwritten
    by the checkpoint's.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        settings = checkpoint.get(SIFT_CHECKPOINT_KEY)
        if settings and not getattr(self, "_sift_applied", False):
            from sift_lightning.callback import SparsityCallback

            cb = SparsityCallback(**settings["callback"])
            cb._apply(self)
            self._sift_applied = True
