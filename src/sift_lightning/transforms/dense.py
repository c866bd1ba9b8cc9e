"""The dense baseline, registered first so that ``MEMBERS`` starts with it: the model unchanged."""

from __future__ import annotations

from typing import Any

from torch import nn

from sift_lightning.transforms._registry import register

__all__ = ["dense"]


@register("dense")
def dense(model: nn.Module, sparsity: float, **select: Any) -> nn.Module:
    """Return ``model`` itself: the dense model every member is compared with."""
    return model
