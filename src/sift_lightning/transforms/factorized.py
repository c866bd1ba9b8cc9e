"""Sparse Factorized: ``W ~= U V`` with a normalisation and nonlinearity between, both sparse.

Size rule (iso-FLOP): ``U: d_in -> d_h`` and ``V: d_h -> d_out`` at density ``1 - s`` cost
``(1 - s) d_h (d_in + d_out)`` MACs, equal to the dense ``d_in d_out`` when
``d_h = ceil(d_in d_out / ((d_in + d_out) (1 - s)))``. For a KxK conv ``d_in = K K c_in``.

Conv form: U is a KxK conv ``c_in -> d_h`` with the original stride/padding/dilation, then
BatchNorm + ReLU (the official CIFAR config), then V, a 1x1 conv ``d_h -> c_out`` that keeps the
original bias. Linear form (our choice, visible in configs): LayerNorm + GELU between U and V by
default; ``linear_norm="none"``/``linear_act="none"`` turn them off.

As in the official code, a residual shortcut's 1x1 conv stays one sparse conv (``transform_shortcuts``)
and a norm the model zero-initialised after a factorized conv restarts at 1 (``zero_init_last_norm``);
U and V are drawn by the model's own init rule (``_init.init_rule``).

U keeps the original layer's class and settings (timm's "same" padding too): it is a resized copy.
``SparseFactorized.fold`` refuses when a nonlinearity sits between U and V (``U V`` is then no
single linear map); with only Identity/BatchNorm between them it folds like Sparse Doped's path.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sift_lightning.sparse.masks import mark_sparse
from sift_lightning.transforms._fold import compose, dense_like, mid_affine
from sift_lightning.transforms._init import InitRule, init_like_, init_rule
from sift_lightning.transforms._registry import register
from sift_lightning.transforms._resize import resize_
from sift_lightning.transforms._surgery import (
    candidate_layers,
    check_weight_readers,
    following_norm,
    replace_module,
    reset_zero_init,
    split_shortcuts,
)

__all__ = ["SparseFactorized", "factorized_hidden", "sparse_factorized", "layer_dims"]

CONV_NORMS = ("batchnorm", "none")
LINEAR_NORMS = ("layernorm", "none")  # BatchNorm1d would normalise the sequence dim of (B, T, C)
ACTS = ("relu", "gelu", "none")


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Linear, or ``(K*K*c_in, c_out)`` of a Conv2d."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return kh * kw * layer.in_channels // layer.groups, layer.out_channels
    return layer.in_features, layer.out_features


def factorized_hidden(d_in: int, d_out: int, sparsity: float) -> int:
    """``d_h = ceil(d_in d_out / ((d_in + d_out)(1 - s)))``."""
    return math.ceil(d_in * d_out / ((d_in + d_out) * (1.0 - sparsity)) - 1e-9)


def _norm(kind: str, dim: int, factory: dict) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return (nn.BatchNorm2d if kind == "batchnorm" else nn.LayerNorm)(dim, **factory)


def _act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU(), "gelu": nn.GELU(), "none": nn.Identity()}[kind]


class SparseFactorized(nn.Module):
    """``v(act(norm(u(x))))``: a factorisation with a nonlinearity between its factors."""

    def __init__(self, u: nn.Module, mid: nn.Module, v: nn.Module) -> None:
        super().__init__()
        self.u, self.mid, self.v = u, mid, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(self.mid(self.u(x)))

    def fold(self) -> nn.Module:
        """One dense layer computing ``v(mid(u(x)))`` in eval mode, when ``mid`` is affine.

        Raises:
            ValueError: a nonlinearity sits between U and V (the default), so no single layer computes it.
        """
        affine = mid_affine(self.mid, self.u.weight.shape[0])
        if affine is None:
            between = ", ".join(type(m).__name__ for m in self.mid.modules() if not isinstance(m, nn.Sequential))
            raise ValueError(
                f"cannot fold Sparse Factorized: a nonlinearity sits between U and V ({between}), so U V is not "
                "one linear map; use sift_lightning.export.sparse_export to run it with CSR weights where that is faster"
            )
        weight, bias = compose(self.u, self.v, *affine)
        return dense_like(self.u, weight, bias)


def factor_pair(
    layer: nn.Module, hidden: int, v_bias: bool | None = None, rule: InitRule = "torch_default"
) -> tuple[nn.Module, nn.Module]:
    """U (the original's kernel/stride/padding, no bias) and V (1x1 or Linear), drawn by ``rule``.

    V has a bias when ``v_bias`` says so; by default when the original layer has one. ``rule`` is the
    model's init rule (``_init.init_rule``), so U and V start as the model's own layers would.
    """
    w = layer.weight
    factory = {"device": w.device, "dtype": w.dtype}
    bias = layer.bias is not None if v_bias is None else v_bias
    u = copy.deepcopy(layer)  # the original's class and settings ("same" padding, padding_mode)
    u.bias = None
    resize_(u, c_out=hidden)
    if isinstance(layer, nn.Conv2d):
        v = nn.Conv2d(hidden, layer.out_channels, 1, bias=bias, **factory)
    else:
        v = nn.Linear(hidden, layer.out_features, bias=bias, **factory)
    return init_like_(u, layer, rule), init_like_(v, layer, rule)


def settle_shortcuts_and_norms(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    sparsity: float,
    transform_shortcuts: bool,
    zero_init_last_norm: bool,
    who: str,
) -> list[tuple[str, nn.Module]]:
    """Before Factorized/Doped replace ``layers``: refuse what cannot be replaced, keep shortcut convs
    as one sparse conv and restart zero-initialised norms after the layers at 1 (unless told
    otherwise); return the layers to transform."""
    layers, shortcuts = split_shortcuts(model, layers, transform_shortcuts)
    check_weight_readers(model, layers, who)  # before anything changes
    for _, layer in shortcuts:
        mark_sparse(layer, sparsity)
    if not zero_init_last_norm:
        for name, layer in layers:
            norm = following_norm(model, name) if isinstance(layer, nn.Conv2d) else None
            if norm is not None:
                reset_zero_init(norm[2])
    return layers


@register("sparse_factorized")
def sparse_factorized(
    model: nn.Module,
    sparsity: float,
    *,
    conv_norm: str = "batchnorm",
    conv_act: str = "relu",
    linear_norm: str = "layernorm",
    linear_act: str = "gelu",
    transform_shortcuts: bool = False,
    zero_init_last_norm: bool = False,
    **select,
) -> nn.Module:
    """Replace every candidate layer by a sparse ``U``, norm + act, sparse ``V``, in place.

    Args:
        model: any module of Conv2d/Linear layers.
        sparsity: s in (0, 1).
        conv_norm, conv_act: what sits between conv factors (``batchnorm``/``none``, ``relu``/
            ``gelu``/``none``).
        linear_norm, linear_act: the same for Linear layers (``layernorm``/``none``).
        transform_shortcuts: factorize residual shortcut convs (``_surgery.split_shortcuts``) too; by
            default each stays one sparse conv + its norm, as in the official code.
        zero_init_last_norm: keep a zero-initialised norm after a factorized conv (timm's last norm
            of each residual branch) at 0; by default it restarts at 1, as in the official code.
        **select: ``include``/``exclude``/``keep_ends_dense`` (see ``candidate_layers``).
    """
    for value, valid, arg in (
        (conv_norm, CONV_NORMS, "conv_norm"), (linear_norm, LINEAR_NORMS, "linear_norm"),
        (conv_act, ACTS, "conv_act"), (linear_act, ACTS, "linear_act"),
    ):
        if value not in valid:
            raise ValueError(f"{arg} must be one of {valid}, got {value!r}")
    layers = candidate_layers(model, **select, who="sparse_factorized")
    layers = settle_shortcuts_and_norms(
        model, layers, sparsity, transform_shortcuts, zero_init_last_norm, "sparse_factorized"
    )
    rule = init_rule(model)
    for name, layer in layers:
        conv = isinstance(layer, nn.Conv2d)
        hidden = factorized_hidden(*layer_dims(layer), sparsity)
        u, v = factor_pair(layer, hidden, rule=rule)
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        norm = _norm(conv_norm if conv else linear_norm, hidden, factory)
        mid = nn.Sequential(norm, _act(conv_act if conv else linear_act))
        replace_module(model, name, SparseFactorized(mark_sparse(u, sparsity), mid, mark_sparse(v, sparsity)))
    return model
