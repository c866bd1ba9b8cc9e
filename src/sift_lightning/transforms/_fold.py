"""The maths members use to fold themselves into one dense layer, in float64.

A BatchNorm in eval mode is the per-channel affine map ``a (y - mu) + beta`` with
``a = gamma / sqrt(var + eps)``; a layer followed by one is the layer with kernel ``a W`` and bias
``a (b - mu) + beta``. Two factors with nothing but such maps between them, ``V (a U x + c)``, are
one layer with kernel ``V diag(a) U`` and bias ``V (a b_U + c) + b_V``. Sums are taken in float64
and cast back when the dense layer is built.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sift_lightning.sparse.masks import get_mask
from sift_lightning.transforms._resize import resize_, strip_sparsity_

__all__ = ["bn_affine", "compose", "dense_like", "layer_bias", "masked_weight", "mid_affine", "per_channel"]


def masked_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight in float64 with its mask applied (masked entries are zero already; be sure)."""
    w = layer.weight.detach().double()
    mask = get_mask(layer, "weight")
    return w * mask if mask is not None else w


def layer_bias(layer: nn.Module, out: int) -> torch.Tensor:
    """The layer's bias in float64, zeros when it has none."""
    b = getattr(layer, "bias", None)
    return torch.zeros(out, dtype=torch.float64, device=layer.weight.device) if b is None else b.detach().double()


def per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(C,)`` -> ``(C, 1, ...)`` against a weight."""
    return v.view(-1, *[1] * (like.dim() - 1))


def bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` with ``bn(y) == a * y + c`` per channel in eval mode."""
    if bn.running_mean is None:
        raise ValueError(f"cannot fold {bn}: it keeps no running statistics (track_running_stats=False)")
    a = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        a = a * bn.weight.detach().double()
    c = -bn.running_mean.double() * a
    if bn.affine:
        c = c + bn.bias.detach().double()
    return a, c


def mid_affine(mid: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(a, c)`` when ``mid`` is per-channel affine (Identity, eval BatchNorm); else None."""
    a = torch.ones(channels, dtype=torch.float64)
    c = torch.zeros(channels, dtype=torch.float64)
    for m in mid.modules():
        if isinstance(m, (nn.Sequential, nn.Identity)):
            continue
        if type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm) or m.running_mean is None:
            return None
        ma, mc = bn_affine(m)
        a, c = a.to(ma.device) * ma, c.to(ma.device) * ma + mc
    return a, c


def dense_like(ref: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A plain layer of ``ref``'s class and settings (stride, "same" padding...) holding ``weight``.

    The copy drops ``ref``'s ``sift_sparsity`` and masks; its output width is ``weight``'s.
    """
    new = strip_sparsity_(copy.deepcopy(ref))
    if bias is not None and new.bias is None:
        new.bias = nn.Parameter(torch.empty(0, dtype=ref.weight.dtype, device=ref.weight.device))
    elif bias is None:
        new.bias = None
    resize_(new, c_out=weight.shape[0])
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def compose(
    u: nn.Module, v: nn.Module, a: torch.Tensor | None = None, c: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``v(a * u(x) + c)`` as one layer of ``u``'s kind and ``v``'s outputs."""
    if isinstance(v, nn.Conv2d) and (v.kernel_size != (1, 1) or v.stride != (1, 1) or v.padding not in ((0, 0), "valid")):
        raise ValueError(f"cannot fold a second factor that is not a 1x1, stride-1 conv: {v}")
    U, V = masked_weight(u), masked_weight(v)
    r = U.shape[0]
    a = torch.ones(r, dtype=U.dtype, device=U.device) if a is None else a.to(U.device)
    c = torch.zeros(r, dtype=U.dtype, device=U.device) if c is None else c.to(U.device)
    V2 = V.reshape(V.shape[0], r)  # (c_out, r)
    weight = (V2 @ (a[:, None] * U.reshape(r, -1))).reshape(V.shape[0], *U.shape[1:])
    bias = V2 @ (a * layer_bias(u, r) + c) + layer_bias(v, V.shape[0])
    return weight, bias
