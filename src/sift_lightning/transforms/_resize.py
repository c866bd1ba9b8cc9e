"""Resize a layer's widths in place, keeping its class and every other setting.

Rebuilding a layer as ``type(m)(c_in, c_out, ...)`` forgets what its constructor was told besides
the widths (a norm-act layer's activation, "same" padding, drop path). Resizing a copy instead keeps
the object, its class and its submodules, and swaps only what depends on the widths: the width
attributes and freshly initialised parameters/buffers of the new shapes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sift_lightning.sparse.masks import MASK_SUFFIX

__all__ = ["RESIZABLE", "resize_", "strip_sparsity_"]

RESIZABLE = (nn.Conv2d, nn.Linear, _BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _factory(m: nn.Module) -> dict:
    """The device/dtype of a module's first parameter or buffer (BN without affine has only buffers)."""
    t = next(iter(m.parameters(recurse=False)), None)
    if t is None:
        t = next((b for b in m.buffers(recurse=False) if b.is_floating_point()), None)
    return {} if t is None else {"device": t.device, "dtype": t.dtype}


def _new(m: nn.Module, name: str, shape: tuple[int, ...], factory: dict) -> None:
    """Replace parameter/buffer ``name`` (when present) by an empty tensor of ``shape``."""
    if m._parameters.get(name) is not None:
        old = m._parameters[name]
        m._parameters[name] = nn.Parameter(torch.empty(shape, **factory), requires_grad=old.requires_grad)
    elif m._buffers.get(name) is not None:
        m._buffers[name] = torch.empty(shape, **{**factory, "dtype": m._buffers[name].dtype})


@torch.no_grad()
def resize_(m: nn.Module, c_in: int | None = None, c_out: int | None = None, groups: int | None = None) -> nn.Module:
    """Give ``m`` new widths and fresh parameters of the new shapes, in place; return it.

    Args:
        m: a Conv2d or Linear (subclasses too), or a BatchNorm/GroupNorm/LayerNorm (``c_out`` is
            their width).
        c_in, c_out: new input/output widths (``None``: unchanged).
        groups: a conv's new group count (``None``: unchanged).

    Raises:
        ValueError: for other module types, a GroupNorm whose groups do not divide the new width,
            or a conv whose groups do not divide its widths.
    """
    f = _factory(m)
    if isinstance(m, nn.Conv2d):
        c_in, c_out, groups = c_in or m.in_channels, c_out or m.out_channels, groups or m.groups
        if c_in % groups or c_out % groups:
            raise ValueError(f"{c_in} -> {c_out} channels cannot form {groups} groups")
        m.in_channels, m.out_channels, m.groups = c_in, c_out, groups
        _new(m, "weight", (c_out, c_in // groups, *m.kernel_size), f)
        _new(m, "bias", (c_out,), f)
        nn.Conv2d.reset_parameters(m)
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = c_in or m.in_features, c_out or m.out_features
        _new(m, "weight", (m.out_features, m.in_features), f)
        _new(m, "bias", (m.out_features,), f)
        nn.Linear.reset_parameters(m)
    elif isinstance(m, _BatchNorm):
        m.num_features = c_out
        for name in ("weight", "bias", "running_mean", "running_var"):
            _new(m, name, (c_out,), f)
        m.reset_parameters()
    elif isinstance(m, nn.GroupNorm):
        if c_out % m.num_groups:
            raise ValueError(f"{c_out} channels cannot form the norm's {m.num_groups} groups")
        m.num_channels = c_out
        _new(m, "weight", (c_out,), f)
        _new(m, "bias", (c_out,), f)
        m.reset_parameters()
    elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        m.normalized_shape = (c_out,)
        _new(m, "weight", (c_out,), f)
        _new(m, "bias", (c_out,), f)
        m.reset_parameters()
    else:
        raise ValueError(f"cannot resize a {type(m).__name__}")
    return m


def strip_sparsity_(m: nn.Module) -> nn.Module:
    """Drop ``m``'s own ``sift_sparsity`` and mask buffers (a copy of a sparse layer made plain)."""
    m.__dict__.pop("sift_sparsity", None)
    for key in [k for k in m._buffers if k.endswith(MASK_SUFFIX)]:
        del m._buffers[key]
    return m
