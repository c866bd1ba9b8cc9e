"""The Sparse-IFT settings in a LightningModule's own checkpoint, and rebuilding from them.

A checkpoint of a transformed model holds branch/factor weights and mask buffers that a freshly
constructed module does not have, so the settings that built the structure travel with the module
(``on_save_checkpoint`` is called for weights-only checkpoints too) and ``load_from_checkpoint``
rebuilds the structure before the weights are copied.
"""

from __future__ import annotations

from typing import Any

from sift_lightning.sparse.engine import DynamicSparsity
from sift_lightning.sparse.settings import SparsitySettings

__all__ = ["SIFT_CHECKPOINT_KEY", "SiftCheckpointMixin", "saved_settings"]

SIFT_CHECKPOINT_KEY = "sift_lightning"


def saved_settings(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``SparsitySettings.to_dict`` a checkpoint was trained with (older checkpoints: the callback's arguments)."""
    entry = checkpoint.get(SIFT_CHECKPOINT_KEY) or {}
    return entry.get("settings") or entry.get("callback")


class SiftCheckpointMixin:
    """Write the Sparse-IFT settings into every checkpoint; rebuild the structure when loading one."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        settings = getattr(self, "sift_settings", None)
        if settings is not None:
            checkpoint[SIFT_CHECKPOINT_KEY] = {"settings": dict(settings)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        settings = saved_settings(checkpoint)
        if not settings or getattr(self, "sift_settings", None) is not None:
            return  # dense, or a SparsityCallback has set the module up already (a Trainer resume)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            s = SparsitySettings.from_dict(settings)
            raise ValueError(
                f"checkpoint was trained sparse (transform={s.transform!r}, sparsity={s.sparsity}) but this run trains "
                "without SparsityCallback: its masked weights would grow back; resume it with the same sparsity "
                f"settings (sift-fit: --sift.transform {s.transform or 'none'} --sift.sparsity {s.sparsity}), or "
                "export it (sift-fit export) to fine-tune it dense"
            )
        DynamicSparsity(SparsitySettings.from_dict(settings)).apply(self)  # masks: overwritten by the checkpoint's
