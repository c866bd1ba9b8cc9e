"""Masks: the protocol for modules that own sparse parameters, and the mask buffers.

A module owns sparse parameters when it carries a ``sift_sparsity`` dict mapping the names of its
*own* parameters (``"weight"``) to their target sparsity. Nothing else is required, so any module
-- ours, timm's or a user's -- can take part: set the attribute (``mark_sparse``) and the callback,
the FLOP counter and the exporters find it. Masks are boolean buffers ``<param>_sift_mask`` on the
same module, so they travel in ``state_dict`` and in every checkpoint. (torch's ``nn.utils.prune``,
and so Lightning's ``ModelPruning``, owns ``<param>_mask``; checkpoints written with that older name
of ours still load: ``mark_sparse`` renames their keys on the way in.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "SparseOwner",
    "active_count",
    "apply_masks",
    "get_mask",
    "init_masks",
    "keep_bits",
    "mark_sparse",
    "sparse_modules",
    "sparse_parameters",
    "sparse_targets",
    "set_mask",
    "upgrade_mask_keys",
    "zero_masked_",
]

MASK_SUFFIX = "_sift_mask"
LEGACY_MASK_SUFFIX = "_mask"  # sift_lightning <= 0.1 (the name torch.nn.utils.prune uses too)
MASK_INITS = ("random", "magnitude")


@runtime_checkable
class SparseOwner(Protocol):
    """A module whose parameters named in ``sift_sparsity`` are trained sparse."""

    sift_sparsity: dict[str, float]


def mark_sparse(module: nn.Module, sparsity: float, names: tuple[str, ...] = ("weight",)) -> nn.Module:
    """Declare ``module``'s parameters ``names`` sparse at ``sparsity`` and return the module."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for name in names:
        if not isinstance(getattr(module, name, None), nn.Parameter):
            raise ValueError(f"{type(module).__name__} has no parameter {name!r} to make sparse")
    module.sift_sparsity = {name: float(sparsity) for name in names}
    if not getattr(module, "_sift_legacy_hook", False):
        module.register_load_state_dict_pre_hook(_rename_legacy_masks)
        module._sift_legacy_hook = True
    return module


def _rename_legacy_masks(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Read a mask saved as ``<param>_mask`` (sift_lightning <= 0.1) into ``<param>_sift_mask``."""
    for local in getattr(module, "sift_sparsity", {}):
        old, new = prefix + local + LEGACY_MASK_SUFFIX, prefix + local + MASK_SUFFIX
        if old in state_dict and new not in state_dict and state_dict[old].dtype == torch.bool:
            state_dict[new] = state_dict.pop(old)


def upgrade_mask_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with legacy ``*_mask`` boolean buffers renamed ``*_sift_mask`` (a new dict)."""
    out = {}
    for key, value in state_dict.items():
        if (key.endswith(LEGACY_MASK_SUFFIX) and not key.endswith(MASK_SUFFIX) and torch.is_tensor(value)
                and value.dtype == torch.bool):
            key = key[: -len(LEGACY_MASK_SUFFIX)] + MASK_SUFFIX
        out[key] = value
    return out


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module of ``model`` that owns sparse parameters."""
    for name, module in model.named_modules():
        if isinstance(module, SparseOwner):
            yield name, module


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def sparse_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """Yield ``(full_name, owner, local_name, parameter)`` for every sparse parameter."""
    for prefix, module in sparse_modules(model):
        for local in module.sift_sparsity:
            yield _join(prefix, local), module, local, getattr(module, local)


def sparse_targets(model: nn.Module) -> dict[str, float]:
    """Map each sparse parameter's full name to its target sparsity.

    Once masks exist the target is the mask's real sparsity, so this, the FLOP counter and the
    callback's logs always agree.
    """
    targets = {}
    for full, owner, local, _ in sparse_parameters(model):
        mask = get_mask(owner, local)
        if mask is None:
            targets[full] = owner.sift_sparsity[local]
        else:
            targets[full] = 1.0 - active_count(mask) / mask.numel()
    return targets


def get_mask(owner: nn.Module, local: str) -> torch.Tensor | None:
    """The boolean mask buffer of ``owner.<local>``, or None before masks exist."""
    return owner._buffers.get(local + MASK_SUFFIX)


def set_mask(owner: nn.Module, local: str, mask: torch.Tensor) -> None:
    """Create or overwrite the mask buffer of ``owner.<local>`` (same device as the parameter)."""
    param = getattr(owner, local)
    if mask.shape != param.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {local} {tuple(param.shape)}")
    mask = mask.to(device=param.device, dtype=torch.bool)
    existing = get_mask(owner, local)
    if existing is None:
        owner.register_buffer(local + MASK_SUFFIX, mask)
    else:
        existing.copy_(mask)


def active_count(mask: torch.Tensor) -> int:
    """Number of True entries of a mask (of the whole mask when it is an FSDP2 ``DTensor``: a collective)."""
    total = mask.sum()
    if hasattr(total, "full_tensor"):  # a DTensor's sum is partial: each rank holds its slice's count
        total = total.full_tensor()
    return int(total.item())


def keep_count(numel: int, sparsity: float) -> int:
    """Active weights of a tensor of ``numel`` entries at ``sparsity`` (at least one)."""
    return max(1, min(numel, round((1.0 - sparsity) * numel)))


def init_masks(
    model: nn.Module, init: str = "random", generator: torch.Generator | None = None, only_missing: bool = False
) -> None:
    """Give every sparse parameter a mask with exactly ``keep_count`` active entries.

    Args:
        model: the model whose sparse parameters get masks (existing masks are overwritten).
        init: ``"random"`` keeps a uniformly random subset; ``"magnitude"`` keeps the largest |w|.
        generator: CPU generator for ``"random"``; seed it identically on every rank.
        only_missing: leave parameters that have a mask already as they are.
    """
    if init not in MASK_INITS:
        raise ValueError(f"init must be one of {MASK_INITS}, got {init!r}")
    for _, owner, local, param in sparse_parameters(model):
        if only_missing and get_mask(owner, local) is not None:
            continue
        keep = keep_count(param.numel(), owner.sift_sparsity[local])
        if init == "random":
            scores = torch.rand(param.shape, generator=generator)
        else:
            scores = param.detach().abs().float().cpu()
        idx = torch.topk(scores.flatten(), keep, sorted=False).indices
        mask = torch.zeros(param.numel(), dtype=torch.bool)
        mask[idx] = True
        set_mask(owner, local, mask.view(param.shape))
    apply_masks(model)


_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def keep_bits(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as integer words of ``dtype``'s width: all bits set where active, 0 where masked.

    ``t.view(int).bitwise_and_(bits)`` zeroes masked entries exactly (a masked NaN becomes +0.0)
    and, on CPU, 35-57x faster than ``masked_fill_`` with a boolean mask (bench/overhead.py).
    """
    return mask.to(_WORDS[torch.empty((), dtype=dtype).element_size()]).neg_()


def zero_masked_(t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Zero the entries of ``t`` where ``bits`` (from ``keep_bits``) is 0, in place."""
    if t.element_size() == bits.element_size() and t.is_floating_point():
        t.view(bits.dtype).bitwise_and_(bits)
    else:  # a tensor of another width (an optimizer state kept in float32 beside bf16 weights)
        t.masked_fill_(bits == 0, 0)
    return t


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Set every masked-out weight to exactly zero."""
    for _, owner, local, param in sparse_parameters(model):
        mask = get_mask(owner, local)
        if mask is not None:
            param.masked_fill_(~mask, 0.0)
