"""Name -> Sparse-IFT member, with loud lookups. The registry is the one list of members."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["get_member", "member_names", "register", "unregister"]

# A member takes (model, sparsity, **options) and returns the transformed model.
Member = Callable[..., nn.Module]

_MEMBERS: dict[str, Member] = {}


def register(name: str) -> Callable[[Member], Member]:
    """Register a member under ``name``; a second registration under one name is refused."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a member name must be a non-empty string, got {name!r}")

    def deco(fn: Member) -> Member:
        if name in _MEMBERS and _MEMBERS[name] is not fn:
            raise ValueError(f"member {name!r} is registered already; pick another name")
        _MEMBERS[name] = fn
        return fn

    return deco


def member_names() -> tuple[str, ...]:
    """Every registered member, in registration order."""
    return tuple(_MEMBERS)


def get_member(name: str) -> Member:
    """The member registered under ``name``; an unknown name lists the valid ones."""
    if name not in _MEMBERS:
        raise ValueError(f"unknown Sparse-IFT member {name!r}; valid: {', '.join(_MEMBERS)}")
    return _MEMBERS[name]


def unregister(name: str) -> None:
    """Remove the member registered under ``name`` (a plug-in's own cleanup; tests)."""
    get_member(name)  # an unknown name fails loudly, listing the valid ones
    del _MEMBERS[name]
