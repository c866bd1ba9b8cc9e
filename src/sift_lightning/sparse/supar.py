"""SµPar: init and learning-rate multipliers that keep a sparse layer on the dense model's scale.

Dey, Bergsma, Hestness, "Sparse maximal update parameterization" (NeurIPS 2024, arXiv 2405.15743).
Masking a layer to density ``rho`` shrinks each output unit's *effective fan-in* (its active
inputs) by ``rho``; widening it by ``k`` grows the fan-in by ``k``. A standard parameterization
ignores both, so activations and updates change scale with ``s`` and the dense recipe stops being
optimal. SµPar is muP extended to density: for a hidden layer, init variance and (Adam-family)
learning rate go as ``1 / effective fan-in``, relative to the dense base model.

Notation, per sparse parameter: ``F`` its nominal fan-in (``in_features``, or ``K*K*c_in`` of a
conv), ``rho`` its real density (mask, else the target ``1 - sift_sparsity``), ``F_base`` the
fan-in of the dense layer it replaces, and ``p`` the number of sparse paths summed into the same
output before any norm or nonlinearity. The effective fan-in is ``F_eff = p * rho * F``. Then:

- **Adam-family LR** (each entry moves by about ``lr``, and an output unit sums ``F_eff``
  coherent moves): ``lr_mult = F_base / F_eff``.
- **Init variance**: the output variance ``F_eff * var`` must equal the dense ``F_base * var_base``,
  so ``var = var_base * F_base / F_eff``. ``SuparScale.init_std`` is relative to the layer's *own*
  default init, i.e. what the model's scheme gives a layer of this shape:

  - ``"fan_in"`` schemes (PyTorch's Linear/Conv default, kaiming, timm): the own default has
    ``var_base * F_base / F``, so ``init_std = sqrt(F / F_eff) = 1 / sqrt(p * rho)``;
  - ``"fixed"`` schemes (a std that ignores the layer's size, such as GPT-2's 0.02; our GPT
    declares ``sift_init_scheme = "fixed"``): the own default is ``var_base``, so
    ``init_std = sqrt(F_base / F_eff)`` (the reference code's ``std / sqrt(m_width * density)``).

Per member (derived from the structure each builds):

- **Plain sparse layer** (no member): ``F_base = F``, ``p = 1``: lr ``1/rho``, init_std ``1/sqrt(rho)``.
- **Sparse Wide** (the model carries ``sift_width_factor = k``): every sparse layer is a hidden
  layer widened in its inputs, ``F = k F_base``, density ``rho = 1/k^2`` nominally, so
  ``F_eff = F_base / k``: lr ``1/(k rho)`` (``= k``), init_std ``1/sqrt(rho)`` (``= k``) under
  ``fan_in`` (init var x ``1/rho`` vs the widened default) or ``1/sqrt(k rho)`` (``= sqrt(k)``)
  under ``fixed``. s=0.75: k=2, lr x2, init_std x2 (fixed: x1.414). ``k`` is the nominal factor
  the transform records; rounded widths (floors, the GPT's multiples of ``n_head``) differ from
  ``k F_base`` by a few per cent, which the rule ignores.
- **Sparse Parallel**: ``n`` branches of the dense shape at density ``~1/n``. Branches without a
  norm of their own are summed before anything else sees them: ``p = n``, ``F_eff = n rho F ~= F``,
  so lr and init_std stay ~1 (exactly ``1/(n rho)`` and ``1/sqrt(n rho)``). A branch with its own
  norm (conv -> BN) is normalised alone: ``p = 1``, lr ``1/rho ~= n``, init_std ``1/sqrt(rho)``.
- **Sparse Factorized**: U (``d_in -> d_h``) has ``F = F_base = d_in``: lr ``1/rho``, init_std
  ``1/sqrt(rho)``. V (``d_h -> d_out``, fed by U through a norm and an activation) has
  ``F = d_h`` and ``F_base = d_in``: lr ``d_in / (rho d_h)`` (about ``(d_in + d_out) / d_out``, ~2
  for a square layer, at any s), init_std ``1/sqrt(rho)`` (fan_in) or ``sqrt(d_in / (rho d_h))`` (fixed).
- **Sparse Doped**: W_sparse has the dense shape, ``F = F_base``: lr ``1/rho``, init_std
  ``1/sqrt(rho)``. The low-rank ``V U`` beside it is dense and keeps the standard
  parameterization, so the layer's output carries the low-rank path's variance on top of the
  dense layer's (bench/coord_check.py measures how much).

SGD: muP keeps a hidden layer's SGD learning rate constant in width, because muP's readout makes
the backward signal shrink as ``1/width`` and cancels the growth of the fan-in. Masking shrinks the
fan-in without touching that signal, so SµPar's SGD rule keeps only the density part:
``sgd_lr_mult = F / F_eff = 1 / (p rho)`` (``k^2`` for Sparse Wide, ``n`` for normalised Parallel
branches, ``1/rho`` for plain, Factorized and Doped sparse weights).

Weight decay: decoupled decay (AdamW) shrinks a weight by ``lr * wd`` per step and settles it at a
size ``~ sqrt(lr / wd)``. Keeping ``wd`` unchanged while ``lr`` scales by ``1/F_eff`` settles the
weights at ``~ 1/sqrt(F_eff)``, the same law as SµPar's init, so ``supar_param_groups`` copies each
group's ``weight_decay`` as is (as the SµPar reference code does; ``lr * wd`` then scales with the
LR multiplier).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sift_lightning.sparse.masks import active_count, get_mask, sparse_parameters
from sift_lightning.transforms import declared_attr, init_rule

__all__ = ["INIT_SCHEMES", "SuparScale", "supar_init_", "supar_multipliers", "supar_param_groups", "uses_supar"]

INIT_SCHEMES = ("fan_in", "fixed")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class SuparScale:
    """SµPar multipliers of one sparse parameter."""

    init_std: float
    """Init std relative to the layer's own default init."""
    lr: float
    """Adam-family learning rate relative to the dense base model's."""


@dataclass(frozen=True)
class _FanIn:
    fan_in: int  # F: the layer's nominal fan-in
    base_fan_in: float  # F_base: the fan-in of the dense layer it replaces
    density: float  # rho
    paths: int  # p: sparse paths summed into the same output before a norm

    @property
    def effective(self) -> float:
        return self.paths * self.density * self.fan_in


def uses_supar(model: nn.Module) -> bool:
    """Whether ``supar_init_`` marked ``model`` or any of its submodules (a LightningModule's backbone)."""
    return any(getattr(m, "sift_parametrization", None) == "supar" for m in model.modules())


def _init_scheme(model: nn.Module, scheme: str | None) -> str:
    # layers a member builds under the "keep_std" rule start at the replaced layer's std, which does
    # not scale with the width: relative to the base model that is the "fixed" scheme
    scheme = scheme or declared_attr(model, "sift_init_scheme") or ("fixed" if init_rule(model) == "keep_std" else "fan_in")
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init_scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
    return scheme


def _width_factor(model: nn.Module) -> float:
    k = declared_attr(model, "sift_width_factor")
    if k is None and declared_attr(model, "sift_member") == "sparse_wide":
        raise ValueError(
            "a sparse_wide model must carry sift_width_factor = k (transform() records it); "
            "set model.sift_width_factor = sqrt(1 / (1 - s)) for a model widened by hand"
        )
    if k is not None and not k >= 1.0:
        raise ValueError(f"sift_width_factor must be >= 1 (the Sparse Wide factor k), got {k!r}")
    return 1.0 if k is None else float(k)


def _density(owner: nn.Module, local: str) -> float:
    mask = get_mask(owner, local)
    if mask is None:
        return 1.0 - owner.sift_sparsity[local]
    return active_count(mask) / mask.numel()


def _fan_in_of(param: torch.Tensor, name: str) -> int:
    if param.dim() < 2:
        raise ValueError(f"SµPar needs a weight matrix or kernel, but sparse parameter {name} has shape "
                         f"{tuple(param.shape)}; mark only Linear/Conv weights sparse")
    return math.prod(param.shape[1:])


def _structure(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The nearest Sparse-IFT structure above the owner ``name``, and the owner's path inside it."""
    from sift_lightning.transforms.doped import SparseDoped
    from sift_lightning.transforms.factorized import SparseFactorized
    from sift_lightning.transforms.parallel import SparseParallel

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = model.get_submodule(".".join(parts[:i]))
        if isinstance(module, (SparseParallel, SparseFactorized, SparseDoped)):
            return module, ".".join(parts[i:])
    return None, ""


def _fan_ins(model: nn.Module) -> dict[str, _FanIn]:
    """``F``, ``F_base``, ``rho`` and ``p`` of every sparse parameter (see the module docstring)."""
    from sift_lightning.transforms.factorized import SparseFactorized
    from sift_lightning.transforms.parallel import SparseParallel

    k = _width_factor(model)
    out = {}
    for full, owner, local, param in sparse_parameters(model):
        fan_in, rho = _fan_in_of(param, full), _density(owner, local)
        owner_name = full.rpartition(".")[0]
        struct, inner = _structure(model, owner_name)
        base, paths = float(fan_in), 1
        if isinstance(struct, SparseParallel):
            bare = any(branch is owner for branch in struct.branches)  # no norm of its own
            paths = len(struct.branches) if bare else 1
        elif isinstance(struct, SparseFactorized) and inner.split(".")[0] == "v":
            base = float(_fan_in_of(struct.u.weight, owner_name))  # V replaces a layer fed by d_in
        elif struct is None:
            base = fan_in / k  # Sparse Wide widened this layer's inputs by k (k = 1 otherwise)
        out[full] = _FanIn(fan_in, base, rho, paths)
    return out


def supar_multipliers(model: nn.Module, init_scheme: Literal["fan_in", "fixed"] | None = None) -> dict[str, SuparScale]:
    """SµPar's init-std and Adam-LR multipliers for every sparse parameter (full dotted names).

    Args:
        model: a transformed model (or a LightningModule holding one); masks optional.
        init_scheme: how the model's default init scales with a layer's size: ``"fan_in"``
            (PyTorch, kaiming, timm) or ``"fixed"`` (GPT-2's std 0.02). Default: the model's
            ``sift_init_scheme`` if any module declares one, else ``"fan_in"``.

    Raises:
        ValueError: an unknown ``init_scheme``, a Sparse Wide model without ``sift_width_factor``,
            or a sparse parameter that is not a matrix or kernel.
    """
    scheme = _init_scheme(model, init_scheme)
    out = {}
    for full, f in _fan_ins(model).items():
        var = (f.fan_in if scheme == "fan_in" else f.base_fan_in) / f.effective
        out[full] = SuparScale(init_std=math.sqrt(var), lr=f.base_fan_in / f.effective)
    return out


def _sgd_multipliers(model: nn.Module) -> dict[str, float]:
    return {full: f.fan_in / f.effective for full, f in _fan_ins(model).items()}


def _summed_biases(model: nn.Module) -> dict[int, float]:
    """``{id(param): 1/n}`` for the dense parameters (biases) of Parallel branches summed bare.

    ``n`` bias copies add into one output, so each moving at the base LR moves the sum ``n`` times
    as fast as the dense layer's one bias (under Adam and SGD alike: every copy sees the same gradient).
    """
    from sift_lightning.transforms.parallel import SparseParallel

    out = {}
    for module in model.modules():
        if isinstance(module, SparseParallel):
            for branch in module.branches:
                sparse = set(getattr(branch, "sift_sparsity", ()))
                if sparse:  # a bare branch: the sparse layer itself
                    for name, p in branch.named_parameters(recurse=False):
                        if name not in sparse:
                            out[id(p)] = 1.0 / len(module.branches)
    return out


@torch.no_grad()
def supar_init_(model: nn.Module, init_scheme: Literal["fan_in", "fixed"] | None = None) -> None:
    """Rescale every sparse weight by its SµPar init multiplier, in place, and mark the model.

    Call it once, on a freshly initialised model whose masks exist (the multipliers use the real
    densities); it sets ``model.sift_parametrization = "supar"``, which our LightningModules'
    optimizer config reads to apply ``supar_param_groups``.

    Raises:
        ValueError: the model was rescaled already (a second call would square the multipliers).
    """
    if uses_supar(model):
        raise ValueError("supar_init_ was applied to this model already; call it once, on a freshly initialised model")
    scales = supar_multipliers(model, init_scheme)
    params = {full: p for full, _, _, p in sparse_parameters(model)}
    for full, scale in scales.items():
        params[full].mul_(scale.init_std)
    model.sift_parametrization = "supar"


def _as_groups(param_groups: Iterable[Any]) -> list[dict]:
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        return [{"params": groups}]
    return [dict(g, params=list(g["params"])) for g in groups]


def supar_param_groups(
    model: nn.Module,
    param_groups: Iterable[Any],
    *,
    lr: float | None = None,
    optimizer: Literal["adam", "sgd"] = "adam",
) -> list[dict]:
    """Split optimizer parameter groups so each sparse parameter gets its SµPar learning rate.

    Every sparse parameter whose multiplier is not 1 (and each bias of Parallel branches that are
    summed without a norm: LR x ``1/n``, since ``n`` copies move one output) moves to a group that copies its original
    group's keys (``weight_decay``, betas, ...) with ``lr = base lr * multiplier`` and
    ``supar_lr_scale = multiplier``; everything else stays where it was (groups left empty are
    dropped). LR schedulers that scale each group's initial LR (``LambdaLR``, cosine, multistep)
    keep the ratios. Weight decay is copied unchanged (see the module docstring for why).

    Args:
        model: the model the parameters belong to (its sparse parameters are found by identity).
        param_groups: optimizer groups (dicts with ``params``) or a plain iterable of parameters.
        lr: base LR for groups without an ``lr`` key (the optimizer's default LR).
        optimizer: ``"adam"`` for the Adam family (``lr_mult = F_base / F_eff``) or ``"sgd"``
            (``1 / (p rho)``: muP's SGD rule, width-free, extended to density).

    Raises:
        ValueError: an unknown ``optimizer``, or a group without ``lr`` when ``lr`` is not given.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (Adam family or SGD), got {optimizer!r}")
    if optimizer == "adam":
        mults = {full: s.lr for full, s in supar_multipliers(model).items()}
    else:
        mults = _sgd_multipliers(model)
    by_id = _summed_biases(model) | {id(p): mults[full] for full, _, _, p in sparse_parameters(model)}
    out: list[dict] = []
    extra: list[dict] = []
    for group in _as_groups(param_groups):
        base = group.get("lr", lr)
        split: dict[float, list] = {}
        keep = []
        for p in group["params"]:
            m = by_id.get(id(p), 1.0)
            if abs(m - 1.0) < 1e-9:
                keep.append(p)
            else:
                split.setdefault(round(m, 9), []).append(p)
        if split and base is None:
            raise ValueError("a parameter group has no 'lr'; pass lr=<the optimizer's base learning rate>")
        if keep:
            out.append(dict(group, params=keep))
        for m, params in split.items():
            extra.append(dict(group, params=params, lr=base * m, supar_lr_scale=m))
    return out + extra
