"""Train sparse, ship dense: fold, sparse export and plain checkpoints (DESIGN.md section 3).

Two members fold back, exactly, into one dense layer of the original shape, so a model trained with
them deploys at dense cost. Each member owns its deploy form, as timm blocks own ``reparameterize``:

- ``SparseParallel.fold``: ``sum_i BN_i(conv_i(x))`` is one conv whose kernel and bias are the sums
  of the BN-folded branches. The Identity (or activation) that stands where the block's norm was stays.
- ``SparseDoped.fold``: ``W_s x + V(U(x))`` with nothing between U and V is one layer, ``W_s + V U``.
- ``SparseFactorized.fold`` refuses when a nonlinearity sits between U and V (the default).

``fold`` only walks the model and calls them. Sums are taken in float64 and cast back. Sparse Wide
(the network is wider than the original) cannot fold: ``sparse_export`` keeps it sparse, storing a
masked weight in CSR where that is measured faster on this machine.
"""


from __future__ import annotations

import copy

import torch
from torch import nn

from sift_lightning.sparse.masks import MASK_SUFFIX, SparseOwner, get_mask, sparse_modules
import sift_lightning.transforms as transforms
from sift_lightning.transforms._fold import masked_weight
from sift_lightning.transforms._surgery import replace_module
from sift_lightning.transforms.doped import SparseDoped
from sift_lightning.transforms.factorized import SparseFactorized
from sift_lightning.transforms.parallel import SparseParallel, norm_path


__all__ = ['dense_state_dict', 'fold']


_WRAPPERS = (SparseParallel, SparseDoped, SparseFactorized)
_weight = masked_weight  # the name csr.py imports it by
_EXPORT_HINT = "use sift_lightning.export.sparse_export to run it with CSR weights where that is faster"


def _drop_masks(owner: nn.Module) -> None:
    """Zero masked entries, then make ``owner`` a plain module: no mask buffers, no ``sift_sparsity``."""
    with torch.no_grad():
        for local in owner.sift_sparsity:
            mask = get_mask(owner, local)
            if mask is not None:
                getattr(owner, local).masked_fill_(~mask, 0.0)
                del owner._buffers[local + MASK_SUFFIX]
    del owner.sift_sparsity


def _declared_member(model: nn.Module) -> str | None:
    """The member ``transform`` recorded on the model (``sift_member``), if any."""
    for m in model.modules():
        member = getattr(m, "sift_member", None)
        if isinstance(member, str):
            return member
    return None


def fold(model: nn.Module, *, member: str | None = None, inplace: bool = False) -> nn.Module:
    """Fold a model trained with Sparse Parallel or Sparse Doped into dense layers of the original shape.

    Every ``SparseParallel`` and ``SparseDoped`` becomes one plain ``nn.Conv2d``/``nn.Linear`` whose
    outputs equal the module's in eval mode (BatchNorms contribute their running statistics); so
    does a ``SparseFactorized`` with nothing but Identity/BatchNorm between its factors. Each module
    folds itself (its ``fold()``); this function walks the model. Layers made
    sparse without a member (``transform=None``) just lose their masks: their weights are already
    zero where masked. The result has no ``sift_sparsity`` and no mask buffers; a Parallel conv
    whose branches carried BatchNorms has a bias, and the Identity after it stays (see
    ``dense_state_dict`` for a checkpoint of the plain architecture).

    Args:
        model: a trained model (any module; a LightningModule works too).
        member: the member it was trained with; default: the ``sift_member`` that ``transform``
            records on the model, else inferred from the modules found.
        inplace: fold ``model`` itself instead of a copy.

    Raises:
        ValueError: for Sparse Wide (the network is wider than the original) and for Sparse
            Factorized with a nonlinearity between U and V; both point to ``sparse_export``.
    """
    member = member if member is not None else _declared_member(model)
    if member is not None and member not in transforms.MEMBERS:
        raise ValueError(f"unknown member {member!r}; valid: {', '.join(transforms.MEMBERS)}")
    if member == "sparse_wide":
        raise ValueError(
            "cannot fold a Sparse Wide model: the network itself is wider than the original (every hidden "
            f"width x sqrt(1/(1-s))), so no dense layer of the original shape computes it; {_EXPORT_HINT}"
        )
    out = model if inplace else copy.deepcopy(model)
    wrappers = [(n, m) for n, m in out.named_modules() if isinstance(m, _WRAPPERS)]
    for name, module in wrappers:
        try:
            new = module.fold()
        except ValueError as err:
            raise ValueError(f"layer {name or '(the model)'}: {err}") from None
        if not name:
            return new  # the model was a single Sparse-IFT layer
        replace_module(out, name, new)
    for _, owner in list(sparse_modules(out)):
        _drop_masks(owner)
    for m in out.modules():
        for attr in ("sift_member",):
            m.__dict__.pop(attr, None)
        m.__dict__.pop("sift_width_factor", None)
    return out


def _has_sift(model: nn.Module) -> bool:
    return any(isinstance(m, (*_WRAPPERS, SparseOwner)) for m in model.modules())


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain architecture, for a model trained with Parallel or Doped.

    The folded layers already sit under the original names (``layer1.0.conv1.weight``). A Parallel
    conv whose branches carried BatchNorms folded them into its kernel and a bias; the plain model
    has a bias-free conv and a BatchNorm there (``layer1.0.bn1``), which becomes an identity carrying
    that bias: weight 1, bias b, running mean 0 and running variance ``1 - eps``, so that
    ``(x - 0) / sqrt(1 - eps + eps) * 1 + b == x + b`` in eval mode. ``strict=True`` loading into
    ``create_backbone(name, ...)`` (or a fresh ``GPT(config)``) then gives the same outputs.

    Args:
        model: a folded model, or one still to fold (a copy is folded first).
    """
    if _has_sift(model):
        model = fold(model)
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        slot = getattr(module, "sift_folded_norm", None)
        if slot is None:
            continue
        bn = norm_path(name, slot["name"])  # Res2Net's norm sits in a sibling list: "../bns.0"
        bias = state.pop(f"{name}.bias")
        if slot["conv_bias"]:
            state[f"{name}.bias"] = torch.zeros_like(bias)
        state[f"{bn}.running_var"] = torch.full_like(bias, 1.0 - slot["eps"])
        state[f"{bn}.num_batches_tracked"] = torch.tensor(0)
        if slot["affine"]:
            state.update({f"{bn}.weight": torch.ones_like(bias), f"{bn}.bias": bias,
                          f"{bn}.running_mean": torch.zeros_like(bias)})
        else:  # no affine bias to carry it: x - (-b) == x + b
            state[f"{bn}.running_mean"] = -bias
    return state
