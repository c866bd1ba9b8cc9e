"""Forward FLOP accounting, dense and sparse, and the iso-FLOP table.

``count_flops`` runs one forward pass under ``torch.utils.flop_counter.FlopCounterMode`` (which
counts every matmul/conv/attention aten op, so nothing depends on a hand-written zoo of formulas)
with forward hooks on Conv/Linear layers to attribute MACs to layers. A layer's sparse MACs are its
dense MACs times its weight density: the mask's real density once masks exist, else the target
``1 - s``. MACs outside layers (attention scores ``QK^T`` and ``AV``: activation x activation) can
never be sparse and are counted dense in both totals.

Run ``python -m sift_lightning.flops resnet18 --cifar-stem`` for the table of every member
(``flops/table.py``; this module knows nothing of the members, so the members can use it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sift_lightning.sparse.masks import SparseOwner, active_count, get_mask

__all__ = ["FlopReport", "LayerFlops", "LayerRecorder", "count_flops", "weight_density"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerFlops:
    """One Conv/Linear layer's forward MACs for the example input."""

    name: str
    kind: str
    dense_macs: int
    density: float

    @property
    def sparse_macs(self) -> float:
        return self.dense_macs * self.density


@dataclass
class FlopReport:
    """Forward multiply-accumulates of one pass over the example input.

    Attributes:
        layers: per-layer rows, in call order (a layer called twice appears twice).
        other_macs: MACs outside Conv/Linear layers (attention matmuls), always dense.
        params: all parameters; ``active_params`` counts sparse ones at their density.
    """

    layers: list[LayerFlops] = field(default_factory=list)
    other_macs: int = 0
    params: int = 0
    active_params: float = 0.0

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.layers) + self.other_macs

    @property
    def sparse_macs(self) -> float:
        return sum(r.sparse_macs for r in self.layers) + self.other_macs

    @property
    def sparse_layer_macs(self) -> int:
        """Dense MACs of the layers whose weight is sparse (density < 1)."""
        return sum(r.dense_macs for r in self.layers if r.density < 1.0)

    def __str__(self) -> str:
        rows = [f"{'layer':<40} {'dense MACs':>14} {'density':>8} {'sparse MACs':>14}"]
        rows += [f"{r.name:<40} {r.dense_macs:>14,} {r.density:>8.4f} {r.sparse_macs:>14,.0f}" for r in self.layers]
        rows.append(f"{'(attention / other matmuls)':<40} {self.other_macs:>14,} {1.0:>8.4f} {self.other_macs:>14,}")
        rows.append(f"{'total':<40} {self.dense_macs:>14,} {'':>8} {self.sparse_macs:>14,.0f}")
        return "\n".join(rows)


def weight_density(module: nn.Module) -> float:
    """Density of ``module.weight``: its mask's, its target's, or 1 for a dense layer."""
    if not isinstance(module, SparseOwner) or "weight" not in module.sift_sparsity:
        return 1.0
    mask = get_mask(module, "weight")
    if mask is None:
        return 1.0 - module.sift_sparsity["weight"]
    return active_count(mask) / mask.numel()  # active_count: the whole count of a sharded mask too


def _param_counts(model: nn.Module) -> tuple[int, float]:
    total, active = 0, 0.0
    owners = {id(p): m for m in model.modules() if isinstance(m, SparseOwner) for p in m.parameters(recurse=False)}
    for p in model.parameters():  # parameters() already skips tied duplicates
        total += p.numel()
        owner = owners.get(id(p))
        dense = owner is None or p is not getattr(owner, "weight", None)
        active += p.numel() * (1.0 if dense else weight_density(owner))
    return total, active


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


# torch has no formula for the CPU flash-attention kernel and would count attention as 0 on CPU;
# use the one it applies to every other SDPA kernel (the full T x T product, causal or not).
_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops


def _run(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, dict):
        model(**example_input)
    elif isinstance(example_input, (tuple, list)):
        model(*example_input)
    else:
        model(example_input)


class LayerRecorder:
    """Context manager that records a ``LayerFlops`` row for every Conv/Linear call inside it.

    It also counts every matmul/conv/attention op under ``FlopCounterMode``, so ``other_macs``
    (set on exit) holds the MACs outside the layers: the attention scores of a transformer.
    """

    def __init__(self, model: nn.Module) -> None:
        self.rows: list[LayerFlops] = []
        self.other_macs = 0
        self._names = {m: n for n, m in model.named_modules() if isinstance(m, _LAYERS)}
        self._handles: list[Any] = []
        self._counter: FlopCounterMode | None = None

    def _hook(self, module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        # every output entry is one dot product of length weight.numel() / out_features
        macs = module.weight.numel() * output.numel() // module.weight.shape[0]
        self.rows.append(LayerFlops(self._names[module], type(module).__name__, macs, weight_density(module)))

    def __enter__(self) -> LayerRecorder:
        self._handles = [m.register_forward_hook(self._hook) for m in self._names]
        self._counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
        self._counter.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:  # idempotent: a second exit keeps what the first recorded
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.other_macs = max(0, self._counter.get_total_flops() // 2 - sum(r.dense_macs for r in self.rows))
            self._counter = None

    def report(self) -> FlopReport:
        """What was recorded, as a ``FlopReport`` (without parameter counts)."""
        return FlopReport(layers=self.rows, other_macs=self.other_macs)


def count_flops(model: nn.Module, example_input: Any) -> FlopReport:
    """Count one forward pass of ``model`` on ``example_input`` (run in eval mode, restored after).

    Runs with gradients enabled but every parameter's ``requires_grad`` off (restored after): no
    graph is kept, and torch's FLOP counter, which tracks modules through autograd hooks, never
    meets a tensor that requires grad without a gradient function (views of parameters made under
    ``no_grad``, as in CaiT and PiT, crash it). Works whether or not the caller is in ``no_grad``.

    Args:
        model: any module; works on the ``meta`` device too (shapes only, no arithmetic).
        example_input: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
            MACs are for this input as given: pass a batch of one for per-sample figures.
    """
    was_training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with torch.enable_grad(), LayerRecorder(model) as rec:
            _run(model, example_input)
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)
    report = rec.report()
    report.params, report.active_params = _param_counts(model)
    return report
