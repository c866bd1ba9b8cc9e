"""The Sparse-IFT family: one member per file, looked up by name in the registry.

``MEMBERS`` lists the registered members in registration order (``dense`` first); ``register``
adds one under any new name. ``FAMILIES`` is the former name of ``MEMBERS``, kept as an alias.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from sift_lightning.sparse.masks import sparse_modules
from sift_lightning.transforms import dense, wide, parallel, factorized, doped  # noqa: F401, I001  registers, in this order
from sift_lightning.transforms._init import declared_attr, init_rule
from sift_lightning.transforms._registry import get_member, member_names, register, unregister

__all__ = [
    "FAMILIES", "MEMBERS", "check_sparsity", "declared_attr", "get_member", "init_rule", "match_flop_budget",
    "register", "transform", "unregister",
]

_SELECT = ("include", "exclude", "keep_ends_dense", "match_flops")
_ISO_TOLERANCE = 0.02  # the whole-model iso-FLOP bar (DESIGN.md section 1)


def __getattr__(name: str) -> tuple[str, ...]:
    # read from the registry on every access, so a member registered later is listed too
    if name in ("MEMBERS", "FAMILIES"):
        return member_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float in (0, 1) or raise a ValueError that says so."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1) such as 0.5, 0.75 or 0.9, got {sparsity!r}")
    return float(sparsity)


def _member_options(member: str) -> list[str]:
    params = inspect.signature(get_member(member)).parameters.items()
    return [p for p, v in params if v.kind is v.KEYWORD_ONLY and p != "example_input"]


def _check_options(member: str, options: dict[str, Any]) -> None:
    valid = _member_options(member)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"{member} does not take option(s) {', '.join(unknown)}; valid: {', '.join(valid + list(_SELECT))}"
        )


def transform(
    model: nn.Module,
    member: str,
    sparsity: float,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_ends_dense: bool = True,
    match_flops: bool | None = None,
    example_input: Any = None,
    **options: Any,
) -> nn.Module:
    """Apply a Sparse-IFT member and return the transformed model.

    Parallel, Factorized and Doped replace layers of ``model`` in place (shapes, device and dtype
    kept); Sparse Wide returns a new, wider model. ``dense`` returns ``model`` unchanged. A model the
    member cannot transform faithfully raises one ValueError naming the layer and the reason, before
    ``model`` is touched.

    Args:
        model: the dense model.
        member: one of ``MEMBERS``.
        sparsity: s in (0, 1); every member's size rule follows from it.
        include: fnmatch patterns of layer names to transform (default: every Conv2d/Linear).
        exclude: patterns of layer names to keep dense, on top of the defaults.
        keep_ends_dense: keep the first and last layer (or the model's ``sift_dense_layers``) dense.
        match_flops: after building the structure for ``s``, retune the sparsity of every sparse
            layer so the model's sparse MACs equal the dense model's on ``example_input`` (the
            official code's ``flop_budget`` search, solved in closed form). Default (``None``): with
            ``example_input``, on for ``sparse_wide`` -- its dense stem, classifier and depthwise
            convs grow with the width, +3% to +12% MACs on timm CNNs at 224 px -- and for the other
            members only when the whole model misses dense MACs by more than 2% (the single sparse
            shortcuts of a ResNet-50 at 224 px leave it 4-8% short); without it, off. With it off, Sparse Wide warns when it measures more than 2% over budget (on
            ``example_input``'s shape, else timm's configured input size), saying how far and the fix.
        example_input: one input batch, for ``match_flops`` (and Sparse Wide's shape check).
        **options: member options (e.g. ``branch_norm`` for Parallel, ``linear_act`` for Factorized;
            ``transform_shortcuts`` and ``zero_init_last_norm`` for Parallel, Factorized and Doped,
            whose defaults follow the official code: README, "Fidelity").

    Raises:
        ValueError: unknown member or option, sparsity outside (0, 1), or a model the member
            cannot transform; the message lists the valid choices or names the layer.
    """
    fn = get_member(member)
    if member == "dense":
        return model
    sparsity = check_sparsity(sparsity)
    _check_options(member, options)
    auto = match_flops is None and example_input is not None  # the default, with something to measure on
    if match_flops is None:
        match_flops = member == "sparse_wide" and example_input is not None
    if match_flops and example_input is None:
        raise ValueError("match_flops=True needs example_input (e.g. torch.zeros(1, 3, 32, 32))")
    budget = count_dense(model, example_input) if match_flops or auto else None
    if "example_input" in inspect.signature(fn).parameters:
        options["example_input"] = example_input
    out = fn(model, sparsity, include=include, exclude=exclude, keep_ends_dense=keep_ends_dense, **options)
    out.sift_member = member  # fold() must tell Sparse Wide apart from plain sparse layers
    if budget is not None and not match_flops:
        # the default for in-place members: keep s unless the whole model misses the iso-FLOP bar
        # (the kept dense/single-sparse parts, e.g. ResNet-50's shortcuts at 224 px, can leave it 4-8% short)
        from sift_lightning.flops import count_flops

        match_flops = abs(count_flops(out, example_input).sparse_macs / budget - 1.0) > _ISO_TOLERANCE
    if budget is not None and match_flops:
        match_flop_budget(out, example_input, budget)
    elif member == "sparse_wide" and out is not model:
        _warn_over_budget(model, out, example_input)
    return out


def _warn_over_budget(dense_model: nn.Module, wide_model: nn.Module, example_input: Any) -> None:
    """Warn when Sparse Wide's dense parts push it over the budget (on the meta device: no arithmetic).

    Measured on ``example_input``'s shape, else on timm's configured input size (or 32x32).
    """
    from sift_lightning.transforms._probe import meta_copy
    from sift_lightning.transforms.wide import _probe_input

    x = _probe_input(dense_model, example_input)
    try:
        budget = count_dense(meta_copy(dense_model), x)
        from sift_lightning.flops import count_flops

        cost = count_flops(meta_copy(wide_model), x).sparse_macs
    except Exception:  # noqa: BLE001  a model that cannot run on meta: nothing to measure, nothing to say
        return
    if budget and cost > budget * (1 + _ISO_TOLERANCE):
        warnings.warn(
            f"sparse_wide: the widened model costs {cost / budget - 1:+.1%} MACs over the dense one at a "
            f"{tuple(x.shape)} input (the stem, classifier and depthwise/grouped convs stay dense and grow with "
            "the width); pass example_input= (one batch) and leave match_flops on to retune the sparsity to the "
            "dense budget",
            UserWarning,
            stacklevel=3,
        )


def count_dense(model: nn.Module, example_input: Any) -> int:
    """Dense forward MACs of ``model`` on ``example_input``."""
    from sift_lightning.flops import count_flops

    return count_flops(model, example_input).dense_macs


def _largest_dense(report: Any, n: int = 3) -> str:
    rows = sorted((r for r in report.layers if r.density >= 1.0), key=lambda r: -r.dense_macs)[:n]
    return ", ".join(f"{r.name} {r.dense_macs:,}" for r in rows)


def match_flop_budget(model: nn.Module, example_input: Any, budget: float) -> float:
    """Set one sparsity for every sparse layer so the sparse MACs equal ``budget``; return it.

    With ``F`` the MACs that stay dense and ``P`` the dense MACs of the sparse layers, the sparse
    total ``F + (1 - s) P`` meets the budget at ``s = 1 - (budget - F) / P``.
    """
    from sift_lightning.flops import count_flops

    report = count_flops(model, example_input)
    sparse_part = report.sparse_layer_macs
    fixed = report.dense_macs - sparse_part
    s = 1.0 - (budget - fixed) / sparse_part if sparse_part else -1.0
    if not 0.0 < s < 1.0:
        raise ValueError(
            f"cannot meet a budget of {budget:,.0f} MACs: the layers that stay dense cost {fixed:,.0f} "
            f"(largest: {_largest_dense(report)}) and the budget needs sparsity {s:.4f}; choose another sparsity, "
            "keep fewer layers dense or turn match_flops off"
        )
    for _, module in sparse_modules(model):
        module.sift_sparsity = {k: s for k in module.sift_sparsity}
    return s
