"""Train sparse, ship dense: fold, sparse export and plain checkpoints (DESIGN.md section 3).

Two members fold back, exactly, into one dense layer of the original shape, so a model trained with
them deploys at dense cost:

- Sparse Parallel, ``sum_i BN_i(conv_i(x))``. A BatchNorm in eval mode is the per-channel affine map
  ``a (y - mu) + beta`` with ``a = gamma / sqrt(var + eps)``, so branch ``i`` is the conv with kernel
  ``a_i W_i`` and bias ``a_i (b_i - mu_i) + beta_i``; convs of one shape sum into one conv whose
  kernel and bias are the sums. The Identity that stands where the block's BatchNorm was stays.
- Sparse Doped, ``W_s x + V(U(x))`` with nothing between U (KxK, ``c_in -> r``, the original
  stride/padding) and V (1x1, ``r -> c_out``): ``V U`` is one KxK conv with
  ``W_uv[o, i] = sum_r V[o, r] U[r, i]``. Add the masked ``W_s`` and keep its bias.

Sums are taken in float64 and cast back. Sparse Wide (the network is wider than the original) and
Sparse Factorized (a nonlinearity sits between U and V) cannot fold: ``sparse_export`` keeps them
sparse, storing a masked weight in CSR where that is measured faster on this machine.
"""


from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sift_lightning.sparse.masks import MASK_SUFFIX, SparseOwner, get_mask, sparse_modules
from sift_lightning.transforms._registry import FAMILIES
from sift_lightning.transforms._surgery import replace_module
from sift_lightning.transforms.doped import SparseDoped
from sift_lightning.transforms.factorized import SparseFactorized
from sift_lightning.transforms.parallel import SparseParallel


__all__ = ['dense_state_dict', 'fold']


_WRAPPERS = (SparseParallel, SparseDoped, SparseFactorized)
_EXPORT_HINT = "use sift_lightning.export.sparse_export to run it with CSR weights where that is faster"



# ---------------------------------------------------------------- fold: the maths, in float64
def _weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight with its mask applied (masked entries are zero already; be sure)."""
    w = layer.weight.detach().double()
    mask = get_mask(layer, "weight")
    return w * mask if mask is not None else w


def _bias(layer: nn.Module, out: int) -> torch.Tensor:
    b = getattr(layer, "bias", None)
    return torch.zeros(out, dtype=torch.float64, device=layer.weight.device) if b is None else b.detach().double()


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))  # (C,) -> (C, 1, ...) against a weight


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, c)`` with ``bn(y) == a * y + c`` per channel in eval mode."""
    if bn.running_mean is None:
        raise ValueError(f"cannot fold {bn}: it keeps no running statistics (track_running_stats=False)")
    a = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        a = a * bn.weight.detach().double()
    c = -bn.running_mean.double() * a
    if bn.affine:
        c = c + bn.bias.detach().double()
    return a, c


def _dense_like(ref: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A plain Conv2d/Linear with ``ref``'s input side and hyper-parameters, holding ``weight``."""
    factory = {"device": ref.weight.device, "dtype": ref.weight.dtype}
    if isinstance(ref, nn.Conv2d):
        new = nn.Conv2d(ref.in_channels, weight.shape[0], ref.kernel_size, ref.stride, ref.padding,
                        ref.dilation, ref.groups, bias is not None, ref.padding_mode, **factory)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, **factory)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _fold_parallel(name: str, module: SparseParallel) -> tuple[nn.Module, dict[str, Any] | None]:
    """One layer whose kernel and bias are the sums of the BN-folded branches."""
    weight = bias = None
    norm: _BatchNorm | None = None
    for branch in module.branches:
        layer, bn = (branch[0], branch[1]) if isinstance(branch, nn.Sequential) and len(branch) == 2 else (branch, None)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not (bn is None or isinstance(bn, _BatchNorm)):
            raise ValueError(f"cannot fold {name}: a branch is {branch}; fold takes a Conv2d/Linear, or (conv, BatchNorm)")
        w, b = _weight(layer), _bias(layer, layer.weight.shape[0])
        if bn is not None:
            a, c = _bn_affine(bn)
            w, b, norm = w * _per_channel(a, w), a * b + c, bn
        weight, bias = (w, b) if weight is None else (weight + w, bias + b)
    first = module.branches[0]
    layer = first[0] if isinstance(first, nn.Sequential) else first
    keep_bias = norm is not None or layer.bias is not None
    new = _dense_like(layer, weight, bias if keep_bias else None)
    # where the block's BatchNorm was, an Identity now stands; dense_state_dict rebuilds it
    slot = {"eps": norm.eps, "affine": norm.affine, "conv_bias": layer.bias is not None} if norm else None
    return new, slot


def _mid_affine(mid: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(a, c)`` when ``mid`` is per-channel affine (Identity, eval BatchNorm); else None."""
    a = torch.ones(channels, dtype=torch.float64)
    c = torch.zeros(channels, dtype=torch.float64)
    for m in mid.modules():
        if isinstance(m, (nn.Sequential, nn.Identity)):
            continue
        if not isinstance(m, _BatchNorm) or m.running_mean is None:
            return None
        ma, mc = _bn_affine(m)
        a, c = a.to(ma.device) * ma, c.to(ma.device) * ma + mc
    return a, c


def _compose(u: nn.Module, v: nn.Module, a: torch.Tensor | None = None, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``v(a * u(x) + c)`` as one layer of ``u``'s kind and ``v``'s outputs."""
    if isinstance(v, nn.Conv2d) and (v.kernel_size != (1, 1) or v.stride != (1, 1) or v.padding not in ((0, 0), "valid")):
        raise ValueError(f"cannot fold a second factor that is not a 1x1, stride-1 conv: {v}")
    U, V = _weight(u), _weight(v)
    r = U.shape[0]
    a = torch.ones(r, dtype=U.dtype, device=U.device) if a is None else a.to(U.device)
    c = torch.zeros(r, dtype=U.dtype, device=U.device) if c is None else c.to(U.device)
    V2 = V.reshape(V.shape[0], r)  # (c_out, r)
    weight = (V2 @ (a[:, None] * U.reshape(r, -1))).reshape(V.shape[0], *U.shape[1:])
    bias = V2 @ (a * _bias(u, r) + c) + _bias(v, V.shape[0])
    return weight, bias


def _fold_doped(name: str, module: SparseDoped) -> tuple[nn.Module, None]:
    sparse = module.sparse
    weight, bias = _weight(sparse), _bias(sparse, sparse.weight.shape[0])
    if module.u is not None:
        w_uv, b_uv = _compose(module.u, module.v)
        weight, bias = weight + w_uv, bias + b_uv
    keep_bias = sparse.bias is not None or (module.v is not None and module.v.bias is not None)
    return _dense_like(sparse, weight, bias if keep_bias else None), None


def _fold_factorized(name: str, module: SparseFactorized) -> tuple[nn.Module, None]:
    affine = _mid_affine(module.mid, module.u.weight.shape[0])
    if affine is None:
        between = ", ".join(type(m).__name__ for m in module.mid.modules() if not isinstance(m, nn.Sequential))
        raise ValueError(
            f"cannot fold Sparse Factorized layer {name}: a nonlinearity sits between U and V "
            f"({between}), so U V is not one linear map; {_EXPORT_HINT}"
        )
    weight, bias = _compose(module.u, module.v, *affine)
    return _dense_like(module.u, weight, bias), None


_FOLDERS = {SparseParallel: _fold_parallel, SparseDoped: _fold_doped, SparseFactorized: _fold_factorized}


def _drop_masks(owner: nn.Module) -> None:
    """Zero masked entries, then make ``owner`` a plain module: no mask buffers, no ``sift_sparsity``."""
    with torch.no_grad():
        for local in owner.sift_sparsity:
            mask = get_mask(owner, local)
            if mask is not None:
                getattr(owner, local).masked_fill_(~mask, 0.0)
                del owner._buffers[local + MASK_SUFFIX]
    del owner.sift_sparsity


def _declared_family(model: nn.Module) -> str | None:
    """The family ``transform`` recorded on the model (``sift_family``), if any."""
    for m in model.modules():
        family = getattr(m, "sift_family", None)
        if isinstance(family, str):
            return family
    return None


def _next_sibling_identity(model: nn.Module, name: str) -> str | None:
    """Name of the Identity registered right after ``name`` in the same parent (the BN's place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    keys = list(dict(parent.named_children()))
    i = keys.index(child)
    if i + 1 < len(keys) and isinstance(getattr(parent, keys[i + 1]), nn.Identity):
        return keys[i + 1]
    return None


def fold(model: nn.Module, *, family: str | None = None, inplace: bool = False) -> nn.Module:
    """Fold a model trained with Sparse Parallel or Sparse Doped into dense layers of the original shape.

    Every ``SparseParallel`` and ``SparseDoped`` becomes one plain ``nn.Conv2d``/``nn.Linear`` whose
    outputs equal the module's in eval mode (BatchNorms contribute their running statistics); so
    does a ``SparseFactorized`` with nothing but Identity/BatchNorm between its factors. Layers made
    sparse without a member (``transform=None``) just lose their masks: their weights are already
    zero where masked. The result has no ``sift_sparsity`` and no mask buffers; a Parallel conv
    whose branches carried BatchNorms has a bias, and the Identity after it stays (see
    ``dense_state_dict`` for a checkpoint of the plain architecture).

    Args:
        model: a trained model (any module; a LightningModule works too).
        family: the member it was trained with; default: the ``sift_family`` that ``transform``
            records on the model, else inferred from the modules found.
        inplace: fold ``model`` itself instead of a copy.

    Raises:
        ValueError: for Sparse Wide (the network is wider than the original) and for Sparse
            Factorized with a nonlinearity between U and V; both point to ``sparse_export``.
    """
    family = family if family is not None else _declared_family(model)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    if family == "sparse_wide":
        raise ValueError(
            "cannot fold a Sparse Wide model: the network itself is wider than the original (every hidden "
            f"width x sqrt(1/(1-s))), so no dense layer of the original shape computes it; {_EXPORT_HINT}"
        )
    out = model if inplace else copy.deepcopy(model)
    wrappers = [(n, m) for n, m in out.named_modules() if isinstance(m, _WRAPPERS)]
    for name, module in wrappers:
        new, slot = next(f for cls, f in _FOLDERS.items() if isinstance(module, cls))(name, module)
        if not name:
            return new  # the model was a single Sparse-IFT layer
        if slot is not None and (place := _next_sibling_identity(out, name)) is not None:
            new.sift_folded_norm = {**slot, "name": place}
        replace_module(out, name, new)
    for _, owner in list(sparse_modules(out)):
        _drop_masks(owner)
    for m in out.modules():
        m.__dict__.pop("sift_family", None)
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
        parent = name.rpartition(".")[0]
        bn = f"{parent}.{slot['name']}" if parent else slot["name"]
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
