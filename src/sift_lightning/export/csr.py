"""Sparse export: masked layers stored as CSR where that is measured faster on this machine."""


from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sift_lightning.sparse.masks import get_mask, sparse_modules
from sift_lightning.transforms._surgery import replace_module
from sift_lightning.export.folding import _drop_masks, _weight


__all__ = ['CSRConv2d', 'CSRLinear', 'LayerDecision', 'sparse_export']

# ---------------------------------------------------------------- sparse export: CSR where faster
class _CSRWeight(nn.Module):
    """An inference-only layer whose weight is stored as CSR (three dense buffers, so ``.to()``,
    ``state_dict`` and ``copy.deepcopy`` work; the CSR tensor itself is cached, not stored)."""

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()  # (out, in * kh * kw)
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.csr_shape = tuple(csr.shape)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def csr(self) -> torch.Tensor:
        key = (self.values.data_ptr(), self.col_indices.data_ptr(), self.values.device, self.values.dtype)
        if self._cache is None or self._cache[0] != key:
            # built from our own valid CSR: skip the invariant checks
            w = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.csr_shape,
                                        check_invariants=False)
            self._cache = (key, w)
        return self._cache[1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # a CSR tensor has no storage to copy or pickle; rebuilt on use
        return state

    @property
    def nnz(self) -> int:
        return self.values.numel()


class CSRLinear(_CSRWeight):
    """``nn.Linear`` with a CSR weight: ``y = (W_csr @ x^T)^T + b``."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._store(_weight(layer).to(layer.weight.dtype), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, d_in)
        out = torch.sparse.mm(self.csr(), rows.t()).t()  # (N, d_out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class CSRConv2d(_CSRWeight):
    """``nn.Conv2d`` (groups=1, zero padding) as im2col then a CSR matmul, a chunk of samples at a time."""

    CHUNK_ELEMENTS = 1 << 23  # at most ~32 MB of float32 im2col columns live at once

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__()
        self.out_channels = layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation
        self._store(_weight(layer).to(layer.weight.dtype), layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h = (H + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        w = (W + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        per_sample = self.csr_shape[1] * h * w
        chunk = max(1, self.CHUNK_ELEMENTS // per_sample)
        weight, outs = self.csr(), []
        for start in range(0, B, chunk):
            cols = F.unfold(x[start:start + chunk], self.kernel_size, self.dilation, self.padding, self.stride)
            outs += [torch.sparse.mm(weight, c) for c in cols]  # (C*kh*kw, L) -> (c_out, L)
        out = torch.stack(outs).view(B, self.out_channels, h, w)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


@dataclass
class LayerDecision:
    """What ``sparse_export`` measured for one masked layer, and what it chose.

    Attributes:
        dense_ms, sparse_ms: median milliseconds per call of the masked-dense layer and of its CSR
            form, per batch size; a batch size left out was not measured (CSR already lost).
    """

    name: str
    kind: str
    density: float
    dense_ms: dict[int, float] = field(default_factory=dict)
    sparse_ms: dict[int, float] = field(default_factory=dict)
    csr: bool = False

    def speedup(self, batch: int) -> float | None:
        if batch not in self.sparse_ms:
            return None
        return self.dense_ms[batch] / self.sparse_ms[batch]


def _exportable(module: nn.Module) -> bool:
    if get_mask(module, "weight") is None or set(module.sift_sparsity) != {"weight"}:
        return False
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)


def _run(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


@torch.inference_mode()
def _first_inputs(model: nn.Module, layers: list[nn.Module], example_input: Any) -> dict[nn.Module, torch.Tensor]:
    """Each layer's input on ``example_input``: its first sample, from the first call."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        seen.setdefault(module, args[0][:1].clone())

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def _seconds(fn: Any, x: torch.Tensor, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn(x)
    return (time.perf_counter() - start) / number


@torch.inference_mode()
def _race(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms per call of both, timed alternately so load on the machine hits both alike."""
    warm = max(_seconds(dense, x, 1), _seconds(sparse, x, 1), 1e-6)
    number = max(1, min(100, int(2e-3 / warm)))  # each sample lasts >= ~2 ms
    a, b = [], []
    for _ in range(repeats):
        a.append(_seconds(dense, x, number))
        b.append(_seconds(sparse, x, number))
        if b[0] > 3 * a[0]:
            break  # a clear loser needs no median
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def sparse_export(
    model: nn.Module,
    example_input: Any,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    min_speedup: float = 1.1,
    repeats: int = 5,
) -> nn.Module:
    """An inference copy of ``model`` whose masked Linear/Conv2d weights are CSR where that is faster.

    Every masked ``nn.Linear`` and ``nn.Conv2d`` (groups=1, zero padding) is timed on this machine
    on its own input from ``example_input``, repeated to each batch size, as the masked-dense layer
    and as ``CSRLinear``/``CSRConv2d``. The CSR form replaces it only where it is at least
    ``min_speedup`` times faster at every batch size; elsewhere the dense layer stays (its masked
    weights are zero). Masks and ``sift_sparsity`` are dropped everywhere: the copy is for inference
    (eval mode) and computes what the masked model computes. The per-layer measurements and choices
    are in the copy's ``sift_export_report`` (a list of ``LayerDecision``).

    Args:
        model: a masked model (any member; Wide and Factorized are the ones that need this).
        example_input: one input batch (tensor, tuple or dict), as for ``count_flops``.
        batch_sizes: batch sizes the CSR form must win at.
        min_speedup: how much faster CSR must be to be chosen (0 forces CSR everywhere).
        repeats: timed samples per layer and batch size (medians are kept).
    """
    out = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in sparse_modules(out) if _exportable(m)]
    inputs = _first_inputs(out, [m for _, m in layers], example_input)
    report = []
    for name, layer in layers:
        mask = get_mask(layer, "weight")
        candidate = (CSRLinear if isinstance(layer, nn.Linear) else CSRConv2d)(layer)
        decision = LayerDecision(name, type(layer).__name__, float(mask.float().mean()))
        x1 = inputs.get(layer)
        decision.csr = x1 is not None
        for batch in sorted(batch_sizes) if x1 is not None else ():
            x = x1.expand(batch, *x1.shape[1:]).contiguous()
            decision.dense_ms[batch], decision.sparse_ms[batch] = _race(layer, candidate, x, repeats)
            if decision.dense_ms[batch] < min_speedup * decision.sparse_ms[batch]:
                decision.csr = False
                break  # it must win at every batch size: stop measuring
        report.append(decision)
        if decision.csr:
            replace_module(out, name, candidate)
    for _, owner in list(sparse_modules(out)):
        _drop_masks(owner)
    out.sift_export_report = report
    return out
