"""Sparse Doped: a sparse layer plus a dense low-rank path, ``W_sparse x + V(U(x))``.

Size rule (iso-FLOP): ``W_sparse`` (original shape, density ``1 - s``) costs ``(1 - s) d_in d_out``
and the dense rank-r path ``r (d_in + d_out)``; they sum to ``d_in d_out`` when
``r = floor(s d_in d_out / (d_in + d_out))``. Only ``W_sparse`` is sparse; U and V stay dense and
have no nonlinearity between them, so the layer folds back to one dense layer for inference.
U and V stay dense on purpose: the rank formula counts them dense, as the paper does (the official
code sparsifies them, but only because its sparsity rule matches parameters by name).
Conv form: U is a KxK conv ``c_in -> r`` with the original stride/padding, V a 1x1 conv ``r -> c_out``.
For inference ``SparseDoped.fold`` adds ``V U`` (one KxK conv, ``W_uv[o, i] = sum_r V[o, r] U[r, i]``)
to the masked ``W_sparse``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sift_lightning.sparse.masks import mark_sparse
from sift_lightning.transforms._fold import compose, dense_like, layer_bias, masked_weight
from sift_lightning.transforms._registry import register
from sift_lightning.transforms._surgery import candidate_layers, replace_module
from sift_lightning.transforms._init import init_rule
from sift_lightning.transforms.factorized import factor_pair, layer_dims, settle_shortcuts_and_norms

__all__ = ["SparseDoped", "doped_rank", "sparse_doped"]


def doped_rank(d_in: int, d_out: int, sparsity: float) -> int:
    """``r = floor(s d_in d_out / (d_in + d_out))``."""
    return math.floor(sparsity * d_in * d_out / (d_in + d_out) + 1e-9)


class SparseDoped(nn.Module):
    """``sparse(x) + v(u(x))``; ``u``/``v`` are None when the rank rounds to 0."""

    def __init__(self, sparse: nn.Module, u: nn.Module | None, v: nn.Module | None) -> None:
        super().__init__()
        self.sparse, self.u, self.v = sparse, u, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sparse(x)
        if self.u is not None:
            out = out + self.v(self.u(x))
        return out

    def fold(self) -> nn.Module:
        """One layer of the original shape computing ``W_sparse x + V(U(x))`` (exact up to float64 rounding)."""
        sparse = self.sparse
        weight, bias = masked_weight(sparse), layer_bias(sparse, sparse.weight.shape[0])
        if self.u is not None:
            w_uv, b_uv = compose(self.u, self.v)
            weight, bias = weight + w_uv, bias + b_uv
        keep_bias = sparse.bias is not None or (self.v is not None and self.v.bias is not None)
        return dense_like(sparse, weight, bias if keep_bias else None)


@register("sparse_doped")
def sparse_doped(
    model: nn.Module,
    sparsity: float,
    *,
    transform_shortcuts: bool = False,
    zero_init_last_norm: bool = False,
    **select,
) -> nn.Module:
    """Add a dense rank-r path to every candidate layer and make the layer itself sparse, in place.

    Args:
        model: any module of Conv2d/Linear layers.
        sparsity: s in (0, 1).
        transform_shortcuts: dope residual shortcut convs (``_surgery.split_shortcuts``) too; by
            default each stays one sparse conv + its norm, as in the official code.
        zero_init_last_norm: keep a zero-initialised norm after a doped conv (timm's last norm of each
            residual branch) at 0; by default it restarts at 1, as in the official code.
        **select: ``include``/``exclude``/``keep_ends_dense`` (see ``candidate_layers``).
    """
    layers = candidate_layers(model, **select, who="sparse_doped")
    layers = settle_shortcuts_and_norms(
        model, layers, sparsity, transform_shortcuts, zero_init_last_norm, "sparse_doped"
    )
    rule = init_rule(model)
    for name, layer in layers:
        rank = doped_rank(*layer_dims(layer), sparsity)
        # the sparse layer keeps the one bias, so V has none
        u, v = factor_pair(layer, rank, v_bias=False, rule=rule) if rank > 0 else (None, None)
        replace_module(model, name, SparseDoped(mark_sparse(layer, sparsity), u, v))
    return model
