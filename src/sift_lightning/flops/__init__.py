"""Forward FLOP accounting, dense and sparse, and the iso-FLOP table.

``count_flops`` runs one forward pass under ``torch.utils.flop_counter.FlopCounterMode`` (which
counts every matmul/conv/attention aten op, so nothing depends on a hand-written zoo of formulas)
with forward hooks on Conv/Linear layers to attribute MACs to layers. A layer's sparse MACs are its
dense MACs times its weight density: the mask's real density once masks exist, else the target
``1 - s``. MACs outside layers (attention scores ``QK^T`` and ``AV``: activation x activation) can
never be sparse and are counted dense in both totals.

Run ``python -m sift_lightning.flops resnet18 --cifar-stem`` for the table of every member.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sift_lightning.sparse.masks import SparseOwner, get_mask

__all__ = ["FlopReport", "LayerFlops", "LayerRecorder", "count_flops", "iso_flop_table", "weight_density"]

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
    return float(mask.sum().item()) / mask.numel()


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


def iso_flop_table(
    build: Any, example_input: Any, families: list[str], sparsities: list[float], **options: Any
) -> list[dict[str, Any]]:
    """Rows of (family, sparsity, params, dense MACs, sparse MACs, ratio to dense).

    Args:
        build: a callable returning a fresh dense model.
        example_input: input for ``count_flops``.
        families: members to tabulate (``dense`` is always the first row).
        sparsities: values of s.
        **options: passed to ``transform``.
    """
    from sift_lightning.transforms import transform

    base = count_flops(build(), example_input)
    rows = [dict(family="dense", sparsity=0.0, params=base.params, dense_macs=base.dense_macs,
                 sparse_macs=base.sparse_macs, ratio=1.0)]
    for family in families:
        if family == "dense":
            continue
        for s in sparsities:
            r = count_flops(transform(build(), family, s, example_input=example_input, **options), example_input)
            rows.append(dict(family=family, sparsity=s, params=r.params, dense_macs=r.dense_macs,
                             sparse_macs=r.sparse_macs, ratio=r.sparse_macs / base.dense_macs))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``iso_flop_table`` rows."""
    out = [f"{'family':<18} {'s':>5} {'params':>14} {'dense MACs':>16} {'sparse MACs':>16} {'sparse/dense':>12}"]
    for r in rows:
        out.append(
            f"{r['family']:<18} {r['sparsity']:>5.2f} {r['params']:>14,} {r['dense_macs']:>16,} "
            f"{r['sparse_macs']:>16,.0f} {r['ratio']:>12.4f}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m sift_lightning.flops MODEL``: the iso-FLOP table of every member."""
    from sift_lightning.models.backbones import create_backbone
    from sift_lightning.transforms import FAMILIES

    p = argparse.ArgumentParser(prog="python -m sift_lightning.flops", description=main.__doc__)
    p.add_argument("model", help="a timm model name (resnet18, vit_tiny_patch16_224, ...) or a GPT preset (gpt_tiny, gpt3_small)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 ResNet stem, no max-pool")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None, help="default: 32 with --cifar-stem, else 224")
    p.add_argument("--seq-len", type=int, default=None, help="GPT sequence length (default: block size)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES[1:]), choices=FAMILIES[1:])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    p.add_argument("--match-flops", action="store_true", help="tune s so sparse MACs meet the dense budget")
    a = p.parse_args(argv)
    if a.model.startswith("gpt"):
        from sift_lightning.models.gpt import GPT, gpt_config

        cfg = gpt_config(a.model)
        build = lambda: GPT(cfg, device="meta")  # noqa: E731  shapes only: instant and memory-free
        example = torch.zeros(1, a.seq_len or cfg.block_size, dtype=torch.long, device="meta")
    else:
        size = a.image_size or (32 if a.cifar_stem else 224)
        kwargs = dict(cifar_stem=a.cifar_stem, in_chans=a.in_chans)
        if "vit" in a.model or "deit" in a.model:
            kwargs["img_size"] = size

        def build() -> nn.Module:
            with torch.device("meta"):
                return create_backbone(a.model, a.num_classes, **kwargs)

        example = torch.zeros(1, a.in_chans, size, size, device="meta")
    rows = iso_flop_table(build, example, a.families, a.sparsity, match_flops=a.match_flops)
    print(format_table(rows))
