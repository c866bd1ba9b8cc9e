"""Masks of sharded parameters: FSDP2 (``fully_shard``) ``DTensor`` shards (DESIGN.md section 6).

``fully_shard`` turns each parameter into a ``DTensor`` whose rank-local shard is a slice of dim 0,
but leaves buffers alone, so a mask would stay a full-size copy on every rank (1 byte per parameter
per rank). ``shard_masks`` makes every mask a ``DTensor`` buffer sharded exactly like its parameter:
each rank stores 1/world_size of it, and Lightning's distributed checkpoint saves and restores each
rank's own shard (a plain local tensor there would come back as if every rank held rank 0's copy).

The engine then works on local shards everywhere except RigL/SET's update, which must stay the
global per-layer rule: on update steps only, one layer at a time, ``full_tensor`` gathers its mask,
weights and scores, every rank makes the same choice, and ``write_shard`` keeps its own slice.
Every helper here is the identity on ordinary tensors, so the engine calls them unconditionally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sift_lightning.sparse.masks import MASK_SUFFIX, get_mask, sparse_parameters

try:  # torch >= 2.5: public DTensor API
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "all_finite",
    "full_tensor",
    "gather_all",
    "gather_like",
    "is_sharded",
    "local_tensor",
    "localize",
    "mask_bytes",
    "shard_like",
    "shard_masks",
    "sum_over_ranks",
    "version",
    "write_shard",
]


def is_sharded(t: Any) -> bool:
    """True for a ``DTensor`` (an FSDP2 parameter, its gradient, optimizer state or mask)."""
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when not sharded); in-place ops on it change ``t``."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor on every rank (a collective for a ``DTensor``: call it on every rank)."""
    return t.full_tensor() if is_sharded(t) else t


def version(t: torch.Tensor) -> int:
    """A counter that grows whenever ``t`` or its local shard is written in place.

    ``DTensor.copy_`` bumps the wrapper's version, a distributed-checkpoint load writes the shard.
    """
    return t._version + local_tensor(t)._version if is_sharded(t) else t._version


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The slice of ``full`` that this rank holds of ``ref`` (a plain tensor; no communication)."""
    if not is_sharded(ref):
        return full
    return distribute_tensor(full.to(local_tensor(ref).device), ref.device_mesh, ref.placements,
                             src_data_rank=None).to_local()


def gather_like(shard: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose rank-local slices (sharded like ``ref``) are ``shard`` (a collective)."""
    if not is_sharded(ref):
        return shard
    whole = DTensor.from_local(shard.to(local_tensor(ref).device), ref.device_mesh, ref.placements,
                               shape=ref.shape, stride=ref.stride())
    return whole.full_tensor().to(shard.device)


def write_shard(mask: torch.Tensor, new: torch.Tensor) -> None:
    """Write the whole new mask ``new`` into ``mask``: its own slice on each rank when sharded."""
    local_tensor(mask).copy_(shard_like(new, mask))


def sum_over_ranks(values: list[int], sharded: bool) -> list[int]:
    """Integer counts summed over the ranks when they were counted on shards (one all-reduce)."""
    if not sharded or not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, on every rank's shard (one all-reduce when sharded)."""
    ok = bool(torch.isfinite(local_tensor(t)).all())
    if not is_sharded(t):
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def localize(tensors: dict[str, torch.Tensor], model: nn.Module | None) -> dict[str, torch.Tensor]:
    """Per-parameter tensors (the engine's ever-active masks) cut to this rank's shards.

    Entries already local (or of unsharded parameters) are kept as they are; a whole one (read from a
    checkpoint) is sliced like the parameter's mask.
    """
    if model is None:
        return tensors
    out = dict(tensors)
    for name, owner, local, _ in sparse_parameters(model):
        mask = get_mask(owner, local)
        t = out.get(name)
        if t is not None and mask is not None and is_sharded(mask) and t.shape == mask.shape \
                and t.shape != local_tensor(mask).shape:
            out[name] = shard_like(t, mask).to(t.device)
    return out


def gather_all(tensors: dict[str, torch.Tensor], model: nn.Module | None) -> dict[str, torch.Tensor]:
    """The whole tensors of ``localize``'s shards, on every rank (collectives: call on every rank)."""
    if model is None:
        return {k: v.clone() for k, v in tensors.items()}
    out = {k: v.clone() for k, v in tensors.items()}
    for name, owner, local, _ in sparse_parameters(model):
        mask = get_mask(owner, local)
        t = out.get(name)
        if t is not None and mask is not None and is_sharded(mask) and t.shape == local_tensor(mask).shape \
                and t.shape != mask.shape:
            out[name] = gather_like(t, mask)
    return out


@torch.no_grad()
def shard_masks(model: nn.Module) -> int:
    """Make the mask of every sharded parameter a ``DTensor`` buffer sharded like it; return how many.

    Call after ``fully_shard`` (``shard_model`` and ``DynamicSparsity.attach`` do). The masks must
    be equal on every rank before the call (the engine makes them so: same seed, same rule); each
    rank keeps its slice and frees the rest.
    """
    done = 0
    for _, owner, local, param in sparse_parameters(model):
        mask = get_mask(owner, local)
        if mask is None or not is_sharded(param) or is_sharded(mask):
            continue
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask of {local} has shape {tuple(mask.shape)} but the sharded parameter has "
                             f"{tuple(param.shape)}; apply the sparsity engine before fully_shard")
        device = local_tensor(param).device
        owner._buffers[local + MASK_SUFFIX] = distribute_tensor(
            mask.to(device=device, dtype=torch.bool), param.device_mesh, param.placements, src_data_rank=None)
        done += 1
    return done


def mask_bytes(model: nn.Module) -> tuple[int, int]:
    """``(bytes this rank stores, bytes of the whole masks)`` over every sparse parameter's mask."""
    here = whole = 0
    for _, owner, local, _ in sparse_parameters(model):
        mask = get_mask(owner, local)
        if mask is not None:
            here += local_tensor(mask).numel() * mask.element_size()
            whole += mask.numel() * mask.element_size()
    return here, whole
