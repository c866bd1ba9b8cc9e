"""Sparse Parallel: ``n`` sparse copies of a layer whose outputs are summed.

Size rule (iso-FLOP): each branch has the dense layer's shape at density ``1 - s``, so
``n (1 - s) = 1`` and ``n = round(1 / (1 - s))`` (s=0.5 -> 2, 0.75 -> 4, 0.9 -> 10).
Sparse MACs: ``n (1 - s) d_in d_out ~= d_in d_out``.

A conv followed by a BatchNorm becomes ``sum_i BN_i(conv_i(x))``: every branch owns its norm,
as in the official ResNet-18, and the original BN is replaced by Identity so the block's
activation follows the sum. Without per-branch norms a sum of linear maps is one denser matrix.
Linear layers have no norm to carry: their branches are plain Linear copies (biases summed). Such
branches -- and conv branches without a norm of their own -- always compute one matrix, the sum,
whose support is the union of the branch masks: no more capacity than the dense layer, at ``n``
times its memory. RigL makes it worse: every branch sees the same gradient, so they grow the same
positions (in the LM study the two s=0.5 branches summed to density 0.57, not 1 - s^2 = 0.75). The
transform warns when it builds such branches; sparse_wide and sparse_factorized suit Linear layers.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from sift_lightning.sparse.masks import mark_sparse
from sift_lightning.transforms._registry import register
from sift_lightning.transforms._surgery import candidate_layers, following_batchnorm, keep_zero_init, replace_module

__all__ = ["SparseParallel", "parallel_branches", "sparse_parallel"]


def parallel_branches(sparsity: float) -> int:
    """Number of branches ``n = round(1 / (1 - s))``."""
    return max(1, round(1.0 / (1.0 - sparsity)))


class SparseParallel(nn.Module):
    """Sum of ``n`` branches with identical input/output shapes."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


@torch.no_grad()
def _fresh_copy(layer: nn.Module) -> nn.Module:
    """A copy with its own fresh draw of the original's initialisation (same device and dtype).

    Weights are redrawn from a normal with the original weight's std, so a model with its own
    init (the GPT's normal(0, 0.02), scaled residual projections) keeps its scale in every branch;
    norms restart at weight 1 / bias 0, or 0 where the original was zero-initialised.
    """
    new = copy.deepcopy(layer)
    if isinstance(new, nn.modules.batchnorm._NormBase):
        new.reset_parameters()
        keep_zero_init(layer, new)
    elif new.weight.is_meta:
        new.reset_parameters()
    else:
        new.weight.normal_(0.0, float(layer.weight.float().std()))
        if new.bias is not None:
            new.bias.zero_()
    return new


@register("sparse_parallel")
def sparse_parallel(
    model: nn.Module,
    sparsity: float,
    *,
    branch_norm: bool = True,
    **select,
) -> nn.Module:
    """Replace every candidate layer by ``parallel_branches(s)`` sparse branches, in place.

    Args:
        model: any module of Conv2d/Linear layers.
        sparsity: s in (0, 1).
        branch_norm: give each conv branch its own copy of the BatchNorm that follows the conv.
        **select: ``include``/``exclude``/``keep_ends_dense`` (see ``candidate_layers``).
    """
    n = parallel_branches(sparsity)
    unnormed = []
    for name, layer in candidate_layers(model, **select):
        bn = following_batchnorm(model, name) if branch_norm and isinstance(layer, nn.Conv2d) else None
        if bn is None:
            unnormed.append(name)
        branches: list[nn.Module] = []
        for _ in range(n):
            conv = mark_sparse(_fresh_copy(layer), sparsity)
            branches.append(nn.Sequential(conv, _fresh_copy(bn[1])) if bn else conv)
        replace_module(model, name, SparseParallel(branches))
        if bn:
            replace_module(model, bn[0], nn.Identity())
    if unnormed:
        warnings.warn(
            f"sparse_parallel: {len(unnormed)} layer(s) ({unnormed[0]}, ...) have no norm of their own after each "
            f"branch, so their {n} branches sum to one matrix with no more capacity than the dense layer; "
            "Parallel's gains need a norm per branch (conv + BatchNorm). For Linear layers use sparse_wide or "
            "sparse_factorized",
            UserWarning,
            stacklevel=2,
        )
    return model
