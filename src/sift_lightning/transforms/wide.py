"""Sparse Wide: widen the whole network by ``k = sqrt(1 / (1 - s))`` and train every widened layer
at sparsity ``s``.

Size rule (iso-FLOP): a layer whose input and output widths both grow by ``k`` has ``k^2`` times
the weights; at density ``1 - s`` it costs ``k^2 (1 - s) d_in d_out = d_in d_out`` MACs. The stem
(input width fixed by the data), the classifier (output fixed by the classes) and depthwise or
grouped convs stay dense and grow with the width, so the whole model lands above the dense budget;
``transform`` retunes the sparsity to meet it whenever it has an example input (``match_flops``).

Widening rebuilds the network: every hidden width ``c`` -> ``floor(k c)`` (as the official code),
with fresh weights drawn by the model's own rule (``_init.init_rule``: kaiming normal fan_out for
timm ResNets, as a fresh timm model of that width; norms at 1/0, timm's zero-init kept). Each layer is a resized copy of itself (``_resize.resize_``), so its class and
every setting besides its widths stay: a norm-act layer's activation, "same" padding, drop path,
the groups rule of depthwise convs. What cannot be resized (attention with fixed head counts,
embeddings, weight-standardised convs, learned per-channel scales held outside a norm) is refused
by name before anything is built, and the widened model is then run once on the meta device: a
width held outside the layers (a channel split at a fixed index, a concatenation whose parts no
longer add up) fails there and is refused by the module it failed in, as is a changed output shape.
Modules with a ``sift_widened(factor) -> nn.Module`` method (our GPT) widen themselves.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from sift_lightning.sparse.masks import mark_sparse
from sift_lightning.transforms._init import bias_std, init_like_, init_rule, weight_std
from sift_lightning.transforms._probe import ProbeFailure, meta_copy, meta_input, trace
from sift_lightning.transforms._registry import register
from sift_lightning.transforms._resize import RESIZABLE, resize_
from sift_lightning.transforms._surgery import assert_no_sparse_layers, candidate_layers, uses_raw_weight

__all__ = ["sparse_wide", "wide_factor", "widened"]

SUPPORTED = (
    "CNNs of Conv2d (plain, depthwise or grouped), BatchNorm/GroupNorm/LayerNorm and Linear layers, such as timm "
    "ResNets, EfficientNets and ConvNets built of ConvNormAct/BatchNormAct2d blocks, and modules with sift_widened() "
    "(sift_lightning's GPT)"
)
# root attributes timm reads to rebuild or describe the head
_WIDTH_ATTRS = ("num_features", "head_hidden_size")


def wide_factor(sparsity: float) -> float:
    """``k = sqrt(1 / (1 - s))``."""
    return math.sqrt(1.0 / (1.0 - sparsity))


def _refuse(model: nn.Module, where: str, why: str) -> ValueError:
    return ValueError(f"sparse_wide cannot widen {type(model).__name__}: {where} {why}; supported: {SUPPORTED}. "
                      "Use sparse_parallel, sparse_factorized or sparse_doped for this model")


def _is_scale(p: torch.Tensor) -> bool:
    """A per-channel scale (timm's layer scale ``gamma``): one dim of size > 1, the rest 1."""
    return sum(d > 1 for d in p.shape) == 1


def _check_widenable(model: nn.Module) -> None:
    """Refuse, by name, every module that holds parameters no width map can resize."""
    for name, m in model.named_modules():
        where = name or "(the model itself)"
        own = [k for k, p in m._parameters.items() if p is not None]
        if not own:
            continue
        if not isinstance(m, RESIZABLE) and all(_is_scale(m._parameters[k]) for k in own):
            continue  # per-channel scales: resized to the width, filled with their (constant) init value
        if not isinstance(m, RESIZABLE) or (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1):
            raise _refuse(model, where, f"is a {type(m).__name__} with parameters {', '.join(own)}")
        if isinstance(m, (nn.Conv2d, nn.Linear)) and (set(own) - {"weight", "bias"} or not uses_raw_weight(m)):
            raise _refuse(model, where, f"is a {type(m).__name__}, which computes its kernel from more than its "
                                        "weight (weight standardisation?), so a mask would not make it sparse")


def _width(factor: float):
    def w(c: int) -> int:
        return max(1, int(c * factor + 1e-6))
    return w


@torch.no_grad()
def _widen_scales_(m: nn.Module, w: Any) -> None:
    """Resize ``m``'s per-channel scale parameters to ``w(c)`` entries of their init value."""
    for k, p in list(m._parameters.items()):
        if p is None:
            continue
        if not p.is_meta and p.numel() and not bool((p == p.flatten()[0]).all()):
            raise ValueError(f"its {k} holds trained per-channel values, not one init value to extend")
        shape = tuple(w(d) if d > 1 else d for d in p.shape)
        new = torch.empty(shape, dtype=p.dtype, device=p.device)
        if not p.is_meta:
            new.fill_(p.flatten()[0])
        m._parameters[k] = nn.Parameter(new, requires_grad=p.requires_grad)


def _widen_(model: nn.Module, factor: float, first: set[str], last: set[str]) -> nn.Module:
    """Resize every layer of ``model`` in place: each hidden width ``c`` -> ``floor(k c)``.

    Widths map through one function of their value, so layers that agreed before agree after:
    the layers in ``first`` keep their inputs, those in ``last`` their outputs, everything between grows.
    """
    w = _width(factor)
    rule = init_rule(model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, RESIZABLE):
            if any(p is not None for p in m._parameters.values()):
                try:
                    _widen_scales_(m, w)
                except ValueError as err:
                    raise _refuse(model, name, f"cannot be widened ({err})") from None
            continue
        try:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                conv = isinstance(m, nn.Conv2d)
                d_in, d_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
                c_in = d_in if name in first else w(d_in)
                c_out = d_out if name in last else w(d_out)
                std, b_std = weight_std(m), bias_std(m)
                if conv:
                    # depthwise (and channel-multiplier) convs keep one group per input channel;
                    # grouped convs keep their group count
                    groups = 1 if m.groups == 1 else (c_in if m.groups == m.in_channels else m.groups)
                    resize_(m, c_in, c_out, groups)
                else:
                    resize_(m, c_in, c_out)
                init_like_(m, m, rule, std=std, b_std=b_std)  # as the model draws its own layers
            else:  # a norm: one width
                width = m.num_channels if isinstance(m, nn.GroupNorm) else (
                    m.normalized_shape[0] if isinstance(m, nn.LayerNorm) else m.num_features)
                old = m._parameters.get("weight")
                resize_(m, c_out=w(width))
                if old is not None and not old.is_meta and not old.any():
                    with torch.no_grad():  # keep timm's zero init of each residual branch's last norm
                        m.weight.zero_()
        except ValueError as err:
            raise _refuse(model, name, f"cannot be widened ({err})") from None
    for attr in _WIDTH_ATTRS:
        value = getattr(model, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(model, attr, w(value))
    return model


def _probe_input(model: nn.Module, example_input: Any) -> Any:
    """A meta-device input: ``example_input``'s shape, else what timm's config or the first layer implies."""
    if example_input is not None:
        return meta_input(example_input)
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    like = {"device": "meta", "dtype": first.weight.dtype}
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features, **like)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (first.in_channels, 32, 32))
    return torch.zeros(1, first.in_channels, *size[-2:], **like)


def _widen_cnn(model: nn.Module, factor: float, example_input: Any = None) -> nn.Module:
    """A widened, freshly initialised copy of ``model``; checked on the meta device first."""
    _check_widenable(model)
    x = _probe_input(model, example_input)
    try:
        dense = trace(meta_copy(model), x)
    except ProbeFailure as err:
        raise ValueError(
            f"sparse_wide cannot widen {type(model).__name__} unchecked: it runs the widened model once to check it, and "
            f"the dense model fails on a {tuple(x.shape)} probe input ({err}); pass example_input= (one input batch)"
        ) from None
    if not dense.layers:
        raise _refuse(model, "(the model itself)", "calls no Conv2d/Linear layer")
    # the layers that read the model's input keep their inputs; those that write its output keep theirs
    first, last = set(dense.inputs or dense.layers[:1]), set(dense.outputs) | {dense.layers[-1]}
    # no Conv2d/Linear writes the model's output: a backbone without a classifier (timm's num_classes=0,
    # features_only) returns its widened features, or fails on the residual stream's width
    headless = "" if dense.outputs else (
        "; no Conv2d/Linear layer writes this model's output, as in a backbone without its classifier (timm's "
        "num_classes=0 or features_only=True), whose features would widen: transform the model together with "
        "its head (the classifier keeps its outputs)")
    try:
        wide = trace(_widen_(meta_copy(model), factor, first, last), x)
    except ProbeFailure as err:
        raise _refuse(model, err.where, f"fails once widened ({err.message}): a width the model holds outside its "
                                        "layers (a channel split, a concatenation, a fixed index) does not follow"
                                        + headless) from None
    if wide.out_shapes != dense.out_shapes:
        raise _refuse(model, dense.layers[-1], f"leaves the widened model with outputs {wide.out_shapes} instead "
                                               f"of {dense.out_shapes}: a width outside the layers does not follow"
                                               + headless)
    return _widen_(copy.deepcopy(model), factor, first, last)


def widened(model: nn.Module, factor: float, example_input: Any = None) -> nn.Module:
    """A new, freshly initialised copy of ``model`` with every hidden width times ``factor``."""
    if hasattr(model, "sift_widened"):
        return model.sift_widened(factor)
    return _widen_cnn(model, factor, example_input)


@register("sparse_wide")
def sparse_wide(model: nn.Module, sparsity: float, *, example_input: Any = None, **select) -> nn.Module:
    """Return a widened copy of ``model`` whose widened layers are sparse at ``s``.

    The copy records ``sift_width_factor = k``.

    Args:
        model: a CNN of Conv2d/norm/Linear layers, or a module with ``sift_widened``.
        sparsity: s in (0, 1).
        example_input: one input batch, to check the widened model (default: a 1-image batch of
            timm's configured input size, or 32x32).
        **select: ``include``/``exclude``/``keep_ends_dense`` (see ``candidate_layers``).
    """
    assert_no_sparse_layers(model)  # before widening: the copy would hide the owners
    names = [n for n, _ in candidate_layers(model, **select, who="sparse_wide")]
    factor = wide_factor(sparsity)
    wide = widened(model, factor, example_input)
    if hasattr(model, "sift_widened"):  # it widens itself: its layer names may differ
        names = [n for n, _ in candidate_layers(wide, **select, who="sparse_wide")]
    for name in names:
        mark_sparse(wide.get_submodule(name), sparsity)
    wide.sift_width_factor = float(factor)
    return wide
