"""Name -> Sparse-IFT member, with loud lookups."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["FAMILIES", "get_member", "register"]

# A member takes (model, sparsity, **options) and returns the transformed model.
Member = Callable[..., nn.Module]

FAMILIES = ("dense", "sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
_MEMBERS: dict[str, Member] = {}


def register(name: str) -> Callable[[Member], Member]:
    """Register a member under ``name`` (one of ``FAMILIES``)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; valid: {', '.join(FAMILIES)}")

    def deco(fn: Member) -> Member:
        _MEMBERS[name] = fn
        return fn

    return deco


def get_member(name: str) -> Member:
    """The member registered under ``name``; an unknown name lists the valid ones."""
    if name not in _MEMBERS:
        raise ValueError(f"unknown Sparse-IFT family {name!r}; valid: {', '.join(FAMILIES)}")
    return _MEMBERS[name]
