"""Finding and replacing layers; no Sparse-IFT maths lives here.

Candidates are ``nn.Conv2d`` with ``groups == 1`` (depthwise convs stay dense) and ``nn.Linear``.
By default the network's first and last candidate (stem and classifier) stay dense. A module that
knows better declares ``sift_dense_layers``: fnmatch patterns of its own submodule names to keep
dense instead (the GPT keeps ``lm_head`` dense but transforms its first Linear, Q/K/V).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from sift_lightning.sparse.masks import SparseOwner

__all__ = ["assert_no_sparse_layers", "candidate_layers", "is_candidate", "keep_zero_init", "replace_module"]


def is_candidate(module: nn.Module) -> bool:
    """A layer a Sparse-IFT member can replace: Linear, or a Conv2d that is not grouped."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def _declared_dense(model: nn.Module) -> list[str] | None:
    """Patterns from every ``sift_dense_layers`` in the tree, prefixed by where it was found."""
    patterns: list[str] | None = None
    for prefix, module in model.named_modules():
        declared = getattr(module, "sift_dense_layers", None)
        if declared is None:
            continue
        patterns = patterns or []
        patterns.extend(f"{prefix}.{p}" if prefix else p for p in declared)
    return patterns


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def assert_no_sparse_layers(model: nn.Module) -> None:
    """Raise when ``model`` was transformed already: members apply to a fresh, dense model."""
    owners = [n for n, m in model.named_modules() if isinstance(m, SparseOwner)]
    if owners:
        raise ValueError(
            f"model already has sparse layers ({owners[0]}, ...); apply a transformation to a fresh model"
        )


def keep_zero_init(old: nn.Module, new: nn.Module) -> None:
    """Zero ``new``'s norm weight where ``old``'s was all zeros (timm zero-inits each residual
    branch's last norm so blocks start as identities; fresh copies must not undo that)."""
    w = getattr(old, "weight", None)
    if isinstance(w, torch.Tensor) and not w.is_meta and not w.any():
        with torch.no_grad():
            new.weight.zero_()


def candidate_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_ends_dense: bool = True,
) -> list[tuple[str, nn.Module]]:
    """The layers a transformation should replace, in registration order.

    Args:
        model: any module.
        include: fnmatch patterns of module names; when given only matching layers are candidates.
        exclude: fnmatch patterns of module names that stay dense (added to the defaults).
        keep_ends_dense: keep the first and last candidate dense, or what the model declares in
            ``sift_dense_layers``.

    Raises:
        ValueError: when the model already owns sparse parameters, or nothing is left to replace.
    """
    assert_no_sparse_layers(model)
    layers = [(n, m) for n, m in model.named_modules() if is_candidate(m)]
    dense_patterns = list(exclude or [])
    if keep_ends_dense:
        declared = _declared_dense(model)
        if declared is not None:
            dense_patterns += declared
        elif layers:
            dense_patterns += [layers[0][0], layers[-1][0]]
    chosen = [
        (n, m)
        for n, m in layers
        if (include is None or _matches(n, include)) and not _matches(n, dense_patterns)
    ]
    if not chosen:
        names = ", ".join(n for n, _ in layers[:6]) or "none"
        raise ValueError(
            f"no Conv2d/Linear layer left to make sparse (layers found: {names}); "
            "check include/exclude patterns or pass keep_ends_dense=False"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def following_batchnorm(model: nn.Module, name: str) -> tuple[str, nn.BatchNorm2d] | None:
    """The plain BatchNorm2d registered right after conv ``name`` in the same parent, if any.

    timm, torchvision and most CNNs register a conv's norm right after it (conv1, bn1). Norms that
    carry their own activation (timm's BatchNormAct2d) are not paired: summing activated branches
    would change the block.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    children = list(parent.named_children())
    keys = [k for k, _ in children]
    i = keys.index(child)
    if i + 1 >= len(children):
        return None
    bn_name, bn = children[i + 1]
    conv = children[i][1]
    if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm) and bn.num_features == conv.out_channels:
        return (f"{parent_name}.{bn_name}" if parent_name else bn_name), bn
    return None
