"""Sparse Wide: widen the whole network by ``k = sqrt(1 / (1 - s))`` and train every widened layer
at sparsity ``s``.

Size rule (iso-FLOP): a layer whose input and output widths both grow by ``k`` has ``k^2`` times
the weights; at density ``1 - s`` it costs ``k^2 (1 - s) d_in d_out = d_in d_out`` MACs. The stem
(input width fixed by the data) and the classifier (output fixed by the classes) stay dense, which
is why the whole-model figure lands within a few per cent of dense rather than exactly on it.

Widening rebuilds the network: CNNs of Conv2d/BatchNorm2d/Linear layers (timm ResNets, basic and
bottleneck, with or without the CIFAR stem) get every hidden width ``c`` -> ``floor(k c)`` (as the official code) with
fresh weights; any module with a ``sift_widened(factor) -> nn.Module`` method (our GPT) widens
itself. Anything else (attention with fixed head counts, embeddings) gets a clear error.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from sift_lightning.sparse.masks import mark_sparse
from sift_lightning.transforms._registry import register
from sift_lightning.transforms._surgery import assert_no_sparse_layers, candidate_layers, keep_zero_init, replace_module

__all__ = ["sparse_wide", "wide_factor", "widened"]

SUPPORTED = (
    "CNNs made of Conv2d (plain or depthwise), BatchNorm2d and Linear layers, such as timm ResNets "
    "(basic and bottleneck, with or without the CIFAR stem), and modules with sift_widened() "
    "(sift_lightning's GPT)"
)


def wide_factor(sparsity: float) -> float:
    """``k = sqrt(1 / (1 - s))``."""
    return math.sqrt(1.0 / (1.0 - sparsity))


def _check_widenable(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse, by name, what one width map cannot widen consistently."""
    for name, module in model.named_modules():
        where = name or "(the model itself)"
        if isinstance(module, nn.Conv2d):
            plain = module.groups == 1 or module.groups == module.in_channels == module.out_channels
            if not plain:
                raise ValueError(f"sparse_wide cannot widen grouped conv {where} (groups={module.groups}); "
                                 f"supported: {SUPPORTED}")
        elif not isinstance(module, (nn.BatchNorm2d, nn.Linear)) and any(True for _ in module.parameters(recurse=False)):
            raise ValueError(
                f"sparse_wide cannot widen {type(model).__name__}: {where} is a {type(module).__name__}; "
                f"supported: {SUPPORTED}. Use sparse_parallel, sparse_factorized or sparse_doped for other models"
            )
    # a Linear fed by a flattened C x H x W map takes C*H*W inputs, which no width map can follow
    widths = {m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for _, m in layers}
    for name, m in layers[1:]:
        if isinstance(m, nn.Linear) and m.in_features not in widths:
            raise ValueError(
                f"sparse_wide cannot widen {name}: its {m.in_features} inputs match no layer width (a flattened "
                f"feature map?); pool to channels before the Linear, or use another Sparse-IFT member"
            )


def _factory(m: nn.Module) -> dict:
    """The device/dtype of a module's first parameter or buffer (BN without affine has only buffers)."""
    t = next(iter(m.parameters(recurse=False)), None)
    if t is None:
        t = next(iter(m.buffers(recurse=False)), None)
    return {} if t is None else {"device": t.device, "dtype": t.dtype}


def _widen_cnn(model: nn.Module, factor: float) -> nn.Module:
    """Rebuild every Conv2d/BatchNorm2d/Linear with each hidden width ``c`` -> ``floor(c * k)``.

    Widths map through one function of their value, so layers that agreed before agree after:
    the first layer keeps its inputs, the last its outputs, everything between grows.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    _check_widenable(model, layers)
    wide = copy.deepcopy(model)
    first, last = layers[0][0], layers[-1][0]

    def w(c: int) -> int:
        return max(1, int(c * factor + 1e-6))

    for name, m in list(wide.named_modules()):
        factory = _factory(m)
        if isinstance(m, nn.Conv2d):
            c_in = m.in_channels if name == first else w(m.in_channels)
            groups = 1 if m.groups == 1 else c_in  # depthwise stays depthwise
            new = nn.Conv2d(c_in, w(m.out_channels), m.kernel_size, m.stride, m.padding, m.dilation,
                            groups, m.bias is not None, m.padding_mode, **factory)
        elif isinstance(m, nn.Linear):
            d_in = m.in_features if name == first else w(m.in_features)
            d_out = m.out_features if name == last else w(m.out_features)
            new = nn.Linear(d_in, d_out, m.bias is not None, **factory)
        elif isinstance(m, nn.BatchNorm2d):
            new = type(m)(w(m.num_features), m.eps, m.momentum, m.affine, m.track_running_stats, **factory)
            keep_zero_init(m, new)
        else:
            continue
        replace_module(wide, name, new)
    if isinstance(getattr(wide, "num_features", None), int):
        wide.num_features = w(wide.num_features)  # timm reads it to rebuild the head
    return wide


def widened(model: nn.Module, factor: float) -> nn.Module:
    """A new, freshly initialised copy of ``model`` with every hidden width times ``factor``."""
    if hasattr(model, "sift_widened"):
        return model.sift_widened(factor)
    return _widen_cnn(model, factor)


@register("sparse_wide")
def sparse_wide(model: nn.Module, sparsity: float, **select) -> nn.Module:
    """Return a widened copy of ``model`` whose widened layers are sparse at ``s``.

    Args:
        model: a timm ResNet or a module with ``sift_widened``.
        sparsity: s in (0, 1).
        **select: ``include``/``exclude``/``keep_ends_dense`` (see ``candidate_layers``).
    """
    assert_no_sparse_layers(model)  # before widening: the copy would hide the owners
    wide = widened(model, wide_factor(sparsity))
    for _, layer in candidate_layers(wide, **select):
        mark_sparse(layer, sparsity)
    return wide
