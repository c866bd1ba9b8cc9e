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

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sift_lightning.sparse.masks import MASK_SUFFIX, SparseOwner, get_mask, sparse_modules
from sift_lightning.transforms._registry import FAMILIES
from sift_lightning.transforms._surgery import replace_module
from sift_lightning.transforms.doped import SparseDoped
from sift_lightning.transforms.factorized import SparseFactorized
from sift_lightning.transforms.parallel import SparseParallel

__all__ = [
    "CSRConv2d",
    "CSRLinear",
    "LayerDecision",
    "dense_state_dict",
    "export_checkpoint",
    "export_main",
    "fold",
    "format_summary",
    "sparse_export",
]

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


# ---------------------------------------------------------------- checkpoints: what sift-fit export does
def _module_class(checkpoint: dict[str, Any]) -> type:
    from sift_lightning.modules import ImageClassifier, LanguageModel

    hparams = checkpoint.get("hyper_parameters") or {}
    if "num_classes" in hparams:
        if not isinstance(hparams.get("backbone", "resnet18"), str):
            raise ValueError("this ImageClassifier was built from an nn.Module, not a timm name: rebuild it yourself, "
                             "then use fold/dense_state_dict or sparse_export")
        return ImageClassifier
    if "model" in hparams or "vocab_size" in hparams:
        return LanguageModel
    raise ValueError("not a checkpoint of sift_lightning.ImageClassifier or LanguageModel (no matching hyper_parameters)")


def _best_score(checkpoint: dict[str, Any]) -> tuple[str | None, float | None]:
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("best_model_score") is not None:
            return state.get("monitor"), float(state["best_model_score"])
    return None, None


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _export_program(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Save a ``torch.export`` program, with a dynamic batch dimension where that traces."""
    batch = example.expand(2, *example.shape[1:]).contiguous()
    try:
        dim = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(model, (batch,), dynamic_shapes=({0: dim},))
        note = "dynamic batch"
    except Exception:  # noqa: BLE001  some models only trace with static shapes
        program = torch.export.export(model, (example,))
        note = f"static shape {tuple(example.shape)}"
    torch.export.save(program, str(path))
    return note


def _save_program(shipped: nn.Module, trained: nn.Module, example: torch.Tensor, path: Path,
                  notes: list[str]) -> str | None:
    """The ``.pt2`` beside the state dict, or None with the reason in ``notes``."""
    model, why = shipped, ""
    if any(isinstance(m, _CSRWeight) for m in shipped.modules()):
        # torch.export has no kernels for CSR tensors; ship the same maths with dense weights
        model, why = copy.deepcopy(trained).eval(), " (masked weights run densely: torch.export cannot trace CSR)"
        for _, owner in list(sparse_modules(model)):
            _drop_masks(owner)
    try:
        notes.append(f"{path.name}: {_export_program(model, example, path)}{why}")
        return str(path)
    except Exception as err:  # noqa: BLE001  report, do not fail: the state dict is written already
        notes.append(f"no .pt2: torch.export failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        return None


def export_checkpoint(
    ckpt_path: str | Path,
    out_path: str | Path,
    *,
    program: bool = True,
    batch_sizes: Sequence[int] = (1, 64),
    min_speedup: float = 1.1,
    module_cls: type | None = None,
) -> dict[str, Any]:
    """Turn a Lightning checkpoint of ``ImageClassifier``/``LanguageModel`` into a file to ship.

    Parallel, Doped and ``transform=None`` models (and dense ones) are folded: ``out_path`` is a
    state dict that loads with ``strict=True`` into the plain backbone (``create_backbone(...)`` or
    ``GPT(config)``), checked here on the module's example input. Wide and Factorized cannot fold:
    ``out_path`` then holds the Sparse-IFT backbone's state dict (masks included; it loads into the
    structure ``transform`` rebuilds) and ``sparse_export`` decides which layers run as CSR. With
    ``program`` a ``torch.export`` program is saved beside it (``.pt2``); when that fails the summary
    says why instead.

    Args:
        ckpt_path: a checkpoint written while ``SparsityCallback`` trained the module (its settings
            under ``checkpoint["sift_lightning"]["callback"]`` rebuild the structure), or a dense one.
        out_path: the state dict to write; the program goes to the same name with ``.pt2``.
        program: also save a ``torch.export`` program.
        batch_sizes, min_speedup: passed to ``sparse_export`` for Wide and Factorized.
        module_cls: the LightningModule class; default: told from the checkpoint's hyper-parameters
            (``ImageClassifier`` or ``LanguageModel``). Another class must have a ``backbone``
            attribute, ``example_input_array`` and a constructor that builds the plain backbone.

    Returns:
        A summary: ``family``, ``sparsity``, ``folded``, ``out``, ``program``, ``params`` (stored),
        ``active_params`` (non-zero), ``macs`` (per sample, counted sparse), ``dense_macs``,
        ``monitor``/``score`` (the ModelCheckpoint's best, if any), ``max_rel_error`` (shipped
        vs. trained model), ``csr_layers`` and ``notes``. ``format_summary`` prints it in one line.
    """
    from sift_lightning.flops import count_flops
    from sift_lightning.modules._restore import SIFT_CHECKPOINT_KEY

    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    settings = (checkpoint.get(SIFT_CHECKPOINT_KEY) or {}).get("callback")
    if settings is None and any(k.endswith(MASK_SUFFIX) for k in checkpoint.get("state_dict", {})):
        raise ValueError(f"{ckpt_path} holds sparse masks but no '{SIFT_CHECKPOINT_KEY}' settings to rebuild "
                         "its structure from; was it written by SparsityCallback?")
    family = "dense" if settings is None else settings.get("transform")
    cls = module_cls or _module_class(checkpoint)
    module = cls.load_from_checkpoint(ckpt_path, map_location="cpu").eval()  # rebuilds the structure
    trained, example = module.backbone, module.example_input_array[:1]
    notes: list[str] = []
    csr = None
    if family in (None, "dense", "sparse_parallel", "sparse_doped"):
        shipped = cls(**module.hparams).backbone.eval()  # the plain architecture, fresh
        shipped.load_state_dict(dense_state_dict(fold(trained, family=family)), strict=True)
        torch.save(shipped.state_dict(), out_path)
        report = count_flops(shipped, example)
    else:
        shipped = sparse_export(trained, example, batch_sizes=batch_sizes, min_speedup=min_speedup)
        torch.save(trained.state_dict(), out_path)
        report = count_flops(trained, example)
        csr = f"{sum(d.csr for d in shipped.sift_export_report)}/{len(shipped.sift_export_report)}"
        notes.append(f"{family} cannot fold: {out_path.name} holds the Sparse-IFT weights and masks "
                     f"(load into transform(..., {family!r}, s)); {csr} sparse layers run as CSR")
    with torch.inference_mode():
        error = _rel_error(shipped(example), trained(example))
    program_path = _save_program(shipped, trained, example, out_path.with_suffix(".pt2"), notes) if program else None
    monitor, score = _best_score(checkpoint)
    return {
        "family": family, "sparsity": None if settings is None else settings.get("sparsity"),
        "folded": csr is None, "out": str(out_path), "program": program_path,
        "params": report.params, "active_params": int(round(report.active_params)),
        "macs": int(round(report.sparse_macs)), "dense_macs": report.dense_macs,
        "monitor": monitor, "score": score, "max_rel_error": error, "csr_layers": csr, "notes": notes,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """One line: what was written, params, MACs per sample and the metric carried over."""
    how = "folded" if summary["folded"] else f"sparse export ({summary['csr_layers']} layers CSR)"
    files = summary["out"] + (f" + {summary['program']}" if summary["program"] else "")
    s = f" s={summary['sparsity']}" if summary["sparsity"] is not None else ""
    metric = f", {summary['monitor']} {summary['score']:.4f}" if summary["score"] is not None else ", no metric logged"
    return (f"{summary['family'] or 'sparse'}{s} {how} -> {files}: {summary['params'] / 1e6:.2f}M params "
            f"({summary['active_params'] / 1e6:.2f}M non-zero), {summary['macs'] / 1e6:.1f}M MACs/sample{metric}, "
            f"max rel. error {summary['max_rel_error']:.1e}")


def export_main(argv: Sequence[str] | None = None) -> None:
    """``sift-fit export --ckpt_path CKPT --out FILE.pt``: fold or sparse-export a checkpoint."""
    p = argparse.ArgumentParser(prog="sift-fit export", description=export_checkpoint.__doc__.splitlines()[0])
    p.add_argument("--ckpt_path", required=True, help="a Lightning checkpoint of ImageClassifier or LanguageModel")
    p.add_argument("--out", required=True, help="state dict to write (.pt); the torch.export program goes beside it (.pt2)")
    p.add_argument("--no_program", action="store_true", help="skip the torch.export program")
    p.add_argument("--min_speedup", type=float, default=1.1, help="CSR must be this much faster to replace a layer")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64], help="batch sizes CSR must win at")
    a = p.parse_args(argv)
    if not math.isfinite(a.min_speedup) or a.min_speedup < 0:
        p.error(f"--min_speedup must be a finite number >= 0, got {a.min_speedup}")
    summary = export_checkpoint(a.ckpt_path, a.out, program=not a.no_program, batch_sizes=a.batch_sizes,
                                min_speedup=a.min_speedup)
    print(format_summary(summary))
    for note in summary["notes"]:
        print(f"  {note}")
