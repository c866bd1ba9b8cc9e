"""Sparse Parallel: ``n`` sparse copies of a layer whose outputs are summed.

Size rule (iso-FLOP): each branch has the dense layer's shape at density ``1 - s``, so
``n (1 - s) = 1`` and ``n = round(1 / (1 - s))`` (s=0.5 -> 2, 0.75 -> 4, 0.9 -> 10).
Sparse MACs: ``n (1 - s) d_in d_out ~= d_in d_out``.

A conv followed by a norm becomes ``sum_i norm_i(conv_i(x))``: every branch owns its norm, as in
the official ResNet-18. The norm is found in timm's own blocks too: a ``BatchNorm2d``, a norm-act
layer (``BatchNormAct2d``, ``GroupNormAct``: norm, then drop and activation) or the ``bn`` of a
``ConvNormAct``. Branch norms are copies of the norm without its drop and activation; where the
norm was, its drop and activation stay (``NormActTail``, or ``Identity`` for a plain norm), so they
act on the sum. Without per-branch norms a sum of linear maps is one denser matrix.
Linear layers have no norm to carry: their branches are plain Linear copies (biases summed). Such
branches -- and conv branches without a norm of their own -- always compute one matrix, the sum,
whose support is the union of the branch masks: no more capacity than the dense layer, at ``n``
times its memory. RigL makes it worse: every branch sees the same gradient, so they grow the same
positions (in the LM study the two s=0.5 branches summed to density 0.57, not 1 - s^2 = 0.75). The
transform warns when it builds such branches; sparse_wide and sparse_factorized suit Linear layers.

Faithful to the official ResNet-18 by default: a residual shortcut's 1x1 conv stays one sparse conv
with its norm (``transform_shortcuts=True`` branches it too), branch norms start at 1 even where the
model zero-initialised the norm (``zero_init_last_norm=True`` copies the zeros), and branch layers are
drawn by the model's own init rule (``_init.init_rule``).

For inference the member folds back (``SparseParallel.fold``): a BatchNorm in eval mode is a
per-channel affine map, so each branch is one conv with kernel ``a_i W_i`` and bias
``a_i (b_i - mu_i) + beta_i``, and the branches sum into one conv of the original shape.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sift_lightning.sparse.masks import mark_sparse
from sift_lightning.transforms._fold import bn_affine, dense_like, layer_bias, masked_weight, per_channel
from sift_lightning.transforms._init import InitRule, bias_std, init_like_, init_rule
from sift_lightning.transforms._registry import register
from sift_lightning.transforms._surgery import (
    candidate_layers,
    check_weight_readers,
    following_norm,
    keep_zero_init,
    replace_module,
    split_shortcuts,
)

__all__ = ["NormActTail", "SparseParallel", "norm_path", "parallel_branches", "sparse_parallel"]


def parallel_branches(sparsity: float) -> int:
    """Number of branches ``n = round(1 / (1 - s))``."""
    return max(1, round(1.0 / (1.0 - sparsity)))


def norm_path(layer_name: str, slot: str) -> str:
    """Full name of the norm slot ``slot`` (relative to the parent of ``layer_name``; ``../`` climbs)."""
    parent = layer_name.rpartition(".")[0]
    while slot.startswith("../"):
        parent, slot = parent.rpartition(".")[0], slot[3:]
    return f"{parent}.{slot}" if parent else slot


class NormActTail(nn.Module):
    """What stays of a norm-act layer once its norm moved into the branches: ``act(drop(x))``.

    The children keep the norm-act layer's names (``drop``, ``act``), so their state-dict keys do too.
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


class SparseParallel(nn.Module):
    """Sum of ``n`` branches with identical input/output shapes.

    Args:
        branches: each a layer, or ``Sequential(layer, norm)``.
        norm_slot: the name, relative to the parent (``../`` climbs a level), of the norm the branches
            took over (its ``Identity`` or ``NormActTail`` stands there now); ``dense_state_dict``
            rebuilds the plain norm there.
    """

    def __init__(self, branches: list[nn.Module], norm_slot: str | None = None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.norm_slot = norm_slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    def fold(self) -> nn.Module:
        """One layer of the original shape whose kernel and bias are the sums of the norm-folded branches.

        It computes what this module computes in eval mode (norms contribute their running
        statistics). When the branches carried norms, the result has a bias and records the norm's
        settings in ``sift_folded_norm`` for ``dense_state_dict``.

        Raises:
            ValueError: a branch norm that is not a BatchNorm (a GroupNorm depends on the input).
        """
        weight = bias = norm = None
        for branch in self.branches:
            layer, bn = (branch[0], branch[1]) if isinstance(branch, nn.Sequential) else (branch, None)
            if bn is not None and not isinstance(bn, _BatchNorm):
                raise ValueError(
                    f"cannot fold Sparse Parallel branches with a {type(bn).__name__}: only BatchNorm is an affine "
                    "map at inference; use sift_lightning.export.sparse_export instead"
                )
            w, b = masked_weight(layer), layer_bias(layer, layer.weight.shape[0])
            if bn is not None:
                a, c = bn_affine(bn)
                w, b, norm = w * per_channel(a, w), a * b + c, bn
            weight, bias = (w, b) if weight is None else (weight + w, bias + b)
        first = self.branches[0]
        layer = first[0] if isinstance(first, nn.Sequential) else first
        new = dense_like(layer, weight, bias if norm is not None or layer.bias is not None else None)
        if norm is not None and self.norm_slot is not None:
            new.sift_folded_norm = {"eps": norm.eps, "affine": norm.affine, "conv_bias": layer.bias is not None,
                                    "name": self.norm_slot}
        return new


@torch.no_grad()
def _fresh_copy(
    layer: nn.Module, rule: InitRule = "keep_std", zero_init: bool = False, b_scale: float = 1.0
) -> nn.Module:
    """A copy with its own fresh draw of the model's initialisation (same device and dtype).

    Layers are drawn by the model's rule (``_init.init_rule``: kaiming normal fan_out for timm
    ResNets, the original weight's std for our GPT's normal(0, 0.02) and its scaled residual
    projections); biases keep the original's std, times ``b_scale`` (``1/sqrt(n)`` for bare branches,
    whose n biases add). Norms restart at weight 1 / bias 0 -- or 0 where the original was zero-initialised,
    when ``zero_init`` -- and lose the drop and activation of a norm-act layer (those act after the sum).
    """
    new = copy.deepcopy(layer)
    if isinstance(new, (_BatchNorm, nn.GroupNorm)):
        new.reset_parameters()
        if zero_init:
            keep_zero_init(layer, new)
        for child in ("drop", "act"):
            if isinstance(getattr(new, child, None), nn.Module):
                setattr(new, child, nn.Identity())
    elif new.weight.is_meta:
        new.reset_parameters()
    else:
        init_like_(new, layer, rule, b_std=bias_std(layer) * b_scale)
    return new


def _tail(norm: nn.Module) -> nn.Module:
    """What replaces the norm: its drop and activation, or Identity when it has neither."""
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    if not isinstance(drop, nn.Module) and not isinstance(act, nn.Module):
        return nn.Identity()
    return NormActTail(drop if isinstance(drop, nn.Module) else nn.Identity(),
                       act if isinstance(act, nn.Module) else nn.Identity())


@register("sparse_parallel")
def sparse_parallel(
    model: nn.Module,
    sparsity: float,
    *,
    branch_norm: bool = True,
    transform_shortcuts: bool = False,
    zero_init_last_norm: bool = False,
    **select,
) -> nn.Module:
    """Replace every candidate layer by ``parallel_branches(s)`` sparse branches, in place.

    Args:
        model: any module of Conv2d/Linear layers.
        sparsity: s in (0, 1).
        branch_norm: give each conv branch its own copy of the norm that follows the conv.
        transform_shortcuts: split residual shortcut convs (``_surgery.split_shortcuts``) into
            branches too; by default each stays one sparse conv + its norm, as in the official code.
        zero_init_last_norm: branch norms copy a zero-initialised norm's zeros (timm's last norm of
            each residual branch); by default they start at 1, as in the official code.
        **select: ``include``/``exclude``/``keep_ends_dense`` (see ``candidate_layers``).
    """
    n = parallel_branches(sparsity)
    layers = candidate_layers(model, **select, who="sparse_parallel")
    layers, shortcuts = split_shortcuts(model, layers, transform_shortcuts)
    check_weight_readers(model, layers, "sparse_parallel")
    rule = init_rule(model)
    for _, layer in shortcuts:
        mark_sparse(layer, sparsity)
    unnormed = []
    for name, layer in layers:
        norm = following_norm(model, name) if branch_norm and isinstance(layer, nn.Conv2d) else None
        if norm is None:
            unnormed.append(name)
        branches: list[nn.Module] = []
        for _ in range(n):
            # bare branches add n biases into one output: each starts at 1/sqrt(n) of the original's std
            conv = mark_sparse(_fresh_copy(layer, rule, b_scale=1.0 if norm else n**-0.5), sparsity)
            branches.append(nn.Sequential(conv, _fresh_copy(norm[2], zero_init=zero_init_last_norm)) if norm else conv)
        replace_module(model, name, SparseParallel(branches, norm[1] if norm else None))
        if norm:
            replace_module(model, norm[0], _tail(norm[2]))
    if unnormed:
        warnings.warn(
            f"sparse_parallel: {len(unnormed)} layer(s) ({unnormed[0]}, ...) have no norm of their own after each "
            f"branch, so their {n} branches sum to one matrix with no more capacity than the dense layer; "
            "Parallel's gains need a norm per branch (conv + BatchNorm). For Linear layers use sparse_wide or "
            "sparse_factorized",
            UserWarning,
            stacklevel=3,  # the caller of transform()
        )
    return model
