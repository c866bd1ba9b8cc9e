"""The Sparse-IFT family: one member per file, looked up by name."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from sift_lightning.sparse.masks import sparse_modules
from sift_lightning.transforms import doped, factorized, parallel, wide  # noqa: F401  registers members
from sift_lightning.transforms._registry import FAMILIES, get_member, register

__all__ = ["FAMILIES", "check_sparsity", "match_flop_budget", "transform"]


@register("dense")
def _dense(model: nn.Module, sparsity: float, **select: Any) -> nn.Module:
    return model


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float in (0, 1) or raise a ValueError that says so."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1) such as 0.5, 0.75 or 0.9, got {sparsity!r}")
    return float(sparsity)


def _check_options(family: str, options: dict[str, Any]) -> None:
    member = get_member(family)
    valid = [p for p, v in inspect.signature(member).parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{family} does not take option(s) {', '.join(unknown)}; valid: "
            f"{', '.join(valid + ['include', 'exclude', 'keep_ends_dense', 'match_flops']) }"
        )


def transform(
    model: nn.Module,
    family: str,
    sparsity: float,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_ends_dense: bool = True,
    match_flops: bool = False,
    example_input: Any = None,
    **options: Any,
) -> nn.Module:
    """Apply a Sparse-IFT member and return the transformed model.

    Parallel, Factorized and Doped replace layers of ``model`` in place (shapes, device and dtype
    kept); Sparse Wide returns a new, wider model. ``dense`` returns ``model`` unchanged.

    Args:
        model: the dense model.
        family: one of ``FAMILIES``.
        sparsity: s in (0, 1); every member's size rule follows from it.
        include: fnmatch patterns of layer names to transform (default: every Conv2d/Linear).
        exclude: patterns of layer names to keep dense, on top of the defaults.
        keep_ends_dense: keep the first and last layer (or the model's ``sift_dense_layers``) dense.
        match_flops: after building the structure for ``s``, retune the sparsity of every sparse
            layer so the model's sparse MACs equal the dense model's on ``example_input`` (the
            official code's ``flop_budget`` search, solved in closed form).
        example_input: input for ``match_flops``.
        **options: member options (e.g. ``branch_norm`` for Parallel, ``linear_act`` for Factorized).

    Raises:
        ValueError: unknown family or option, sparsity outside (0, 1), or a model the member
            cannot transform; the message lists the valid choices.
    """
    member = get_member(family)
    if family == "dense":
        return model
    sparsity = check_sparsity(sparsity)
    _check_options(family, options)
    if match_flops and example_input is None:
        raise ValueError("match_flops=True needs example_input (e.g. torch.zeros(1, 3, 32, 32))")
    budget = count_dense(model, example_input) if match_flops else None
    out = member(model, sparsity, include=include, exclude=exclude, keep_ends_dense=keep_ends_dense, **options)
    out.sift_family = family  # fold() must tell Sparse Wide apart from plain sparse layers
    if budget is not None:
        match_flop_budget(out, example_input, budget)
    return out


def count_dense(model: nn.Module, example_input: Any) -> int:
    from sift_lightning.flops import count_flops

    return count_flops(model, example_input).dense_macs


def match_flop_budget(model: nn.Module, example_input: Any, budget: float) -> float:
    """Set one sparsity for every sparse layer so the sparse MACs equal ``budget``; return it.

    With ``F`` the MACs that stay dense and ``P`` the dense MACs of the sparse layers, the sparse
    total ``F + (1 - s) P`` meets the budget at ``s = 1 - (budget - F) / P``.
    """
    from sift_lightning.flops import count_flops

    report = count_flops(model, example_input)
    sparse_part = report.sparse_layer_macs
    fixed = report.dense_macs - sparse_part
    s = 1.0 - (budget - fixed) / sparse_part
    if not 0.0 < s < 1.0:
        raise ValueError(f"cannot meet a budget of {budget:,.0f} MACs: it needs sparsity {s:.4f}; choose another sparsity or turn match_flops off")
    for _, module in sparse_modules(model):
        module.sift_sparsity = {k: s for k in module.sift_sparsity}
    return s
