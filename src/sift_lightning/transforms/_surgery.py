"""Finding and replacing layers; no Sparse-IFT maths lives here.

Candidates are ``nn.Conv2d`` with ``groups == 1`` (depthwise convs stay dense) and ``nn.Linear``.
By default the network's first and last candidate (stem and classifier) stay dense; in a model that
starts with an ``nn.Embedding`` (a language model) or another weight layer no member handles (a
Conv1d front end) that layer is the stem, and only the last candidate stays dense. A module that
knows better declares ``sift_dense_layers``: fnmatch patterns of its own submodule names to keep
dense instead (the GPT keeps ``lm_head`` dense but transforms its first Linear, Q/K/V).

Shortcuts: a 1x1 conv on a residual shortcut (named, or held directly by a module named,
``downsample`` -- timm and torchvision ResNets -- or ``shortcut`` -- CIFAR ResNets, ours) stays one
sparse conv under Parallel, Factorized and Doped, as in the official code, unless the member is
told ``transform_shortcuts=True``. A model names its own shortcut modules in ``sift_shortcut_names``.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import textwrap
import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from sift_lightning.sparse.masks import SparseOwner

__all__ = [
    "assert_no_sparse_layers",
    "candidate_layers",
    "check_weight_readers",
    "exclude_hint",
    "following_norm",
    "is_candidate",
    "is_hf_conv1d",
    "keep_zero_init",
    "other_weight_layers",
    "replace_module",
    "reset_zero_init",
    "split_shortcuts",
    "uses_raw_weight",
]

SHORTCUT_NAMES = ("downsample", "shortcut")

# Subclasses whose forward differs from Conv2d's but still convolves with the raw ``weight``
# (timm's "same" padding pads the input first; timm's Linear casts it for AMP). Anything else that overrides forward may compute
# an effective kernel (weight standardisation), which a mask on ``weight`` would not make sparse.
RAW_WEIGHT_SUBCLASSES = ("timm.layers.conv2d_same.Conv2dSame", "timm.layers.linear.Linear")


def is_candidate(module: nn.Module) -> bool:
    """A layer a Sparse-IFT member can replace: Linear, or a Conv2d that is not grouped."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


# Weight layers no member transforms or masks. They stay dense: said in a warning, or, when nothing
# else is left to make sparse, in the error (a GPT-2 from transformers is built of Conv1D).
_OTHER_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd, nn.Bilinear, nn.MultiheadAttention,
                        nn.RNNBase)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``x @ W + b`` with ``W`` of shape (in, out), a transposed Linear."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def other_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers computing with a weight matrix or kernel that are not candidates: they stay dense.

    torch's Conv1d/Conv3d, transposed convs, Bilinear, MultiheadAttention's packed input projection,
    recurrent layers, and transformers' ``Conv1D`` (a Linear with its weight transposed).
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _OTHER_WEIGHT_LAYERS) or is_hf_conv1d(m)]


def exclude_hint(names: Sequence[str]) -> str:
    """How to keep the named layers dense: ``keep them dense with exclude=['a', 'b', ...] ...``."""
    listed = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"keep them dense with exclude=[{listed}] (fnmatch patterns such as 'backbone.*' work), or unfreeze them"


def _other_layers_note(others: list[tuple[str, nn.Module]]) -> str:
    kinds = sorted({type(m).__name__ for _, m in others})
    names = ", ".join(n for n, _ in others[:3]) + (", ..." if len(others) > 3 else "")
    note = (f"{len(others)} layer(s) of type {'/'.join(kinds)} ({names}) are not Conv2d or Linear, so no member "
            "transforms or masks them")
    if "Conv1D" in kinds:
        note += ("; transformers' Conv1D (GPT-2) is a Linear with its weight transposed: convert the model with "
                 "sift_lightning.hf.conv1d_to_linear(model) first")
    return note


def uses_raw_weight(layer: nn.Module) -> bool:
    """Whether ``layer`` computes with its raw ``weight`` parameter, so a mask on it is real."""
    base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    cls = type(layer)
    return cls.forward is base.forward or f"{cls.__module__}.{cls.__qualname__}" in RAW_WEIGHT_SUBCLASSES


def _check_raw_weights(layers: list[tuple[str, nn.Module]], who: str) -> None:
    for name, layer in layers:
        if not uses_raw_weight(layer):
            raise ValueError(
                f"{who} cannot make {name} sparse: it is a {type(layer).__name__}, whose forward computes its "
                "kernel from the weight (weight standardisation or similar), so a mask on the weight would not "
                f"make the computed kernel sparse; exclude it (exclude=['{name}']) or use a model of plain convs"
            )


@lru_cache(maxsize=None)
def _forward_source(cls: type) -> str:
    """Source of ``cls.forward`` and of the methods of ``cls`` it calls (one level), or ''."""
    try:
        src = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return ""
    for called in set(re.findall(r"self\.(\w+)\(", src)):
        fn = getattr(cls, called, None)
        if inspect.isfunction(fn):
            try:
                src += "\n" + inspect.getsource(fn)
            except (OSError, TypeError):
                pass
    return src


def check_weight_readers(model: nn.Module, layers: list[tuple[str, nn.Module]], who: str) -> None:
    """Refuse layers whose parent's forward reads their ``.weight``/``.bias`` directly.

    Replacing such a layer by a module without that parameter would crash the parent (EdgeNeXt's
    positional encoding reads ``token_projection.weight.dtype``) or, worse, compute with a stale one.
    """
    for name, _ in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if re.search(rf"self\.{re.escape(child)}\.(weight|bias)\b", _forward_source(type(parent))):
            raise ValueError(
                f"{who} cannot replace {name}: {type(parent).__name__}.forward reads {child}.weight/.bias directly, "
                f"which the replacing module does not have; exclude it (exclude=['{name}']) or use sparse_wide"
            )


def _declared_dense(model: nn.Module) -> list[str] | None:
    """Patterns from every ``sift_dense_layers`` in the tree, prefixed by where it was found."""
    patterns: list[str] | None = None
    for prefix, module in model.named_modules():
        declared = getattr(module, "sift_dense_layers", None)
        if declared is None:
            continue
        patterns = patterns or []
        patterns.extend(f"{prefix}.{p}" if prefix else p for p in declared)
    return patterns


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def assert_no_sparse_layers(model: nn.Module) -> None:
    """Raise when ``model`` was transformed already: members apply to a fresh, dense model."""
    owners = [n for n, m in model.named_modules() if isinstance(m, SparseOwner)]
    if owners:
        raise ValueError(
            f"model already has sparse layers ({owners[0]}, ...); apply a transformation to a fresh model"
        )


def keep_zero_init(old: nn.Module, new: nn.Module) -> None:
    """Zero ``new``'s norm weight where ``old``'s was all zeros (timm zero-inits each residual
    branch's last norm so blocks start as identities; fresh copies must not undo that)."""
    w = getattr(old, "weight", None)
    if isinstance(w, torch.Tensor) and not w.is_meta and not w.any():
        with torch.no_grad():
            new.weight.zero_()


def reset_zero_init(norm: nn.Module) -> None:
    """Set ``norm``'s weight to 1 where the model zero-initialised it (the official code zero-inits
    the last norm of plain residual blocks only; Parallel, Factorized and Doped blocks start at 1)."""
    w = getattr(norm, "weight", None)
    if isinstance(w, torch.Tensor) and not w.is_meta and not w.any():
        with torch.no_grad():
            w.fill_(1.0)


def _shortcut_names(model: nn.Module) -> tuple[str, ...]:
    declared = getattr(model, "sift_shortcut_names", None)
    return tuple(declared) if declared is not None else SHORTCUT_NAMES


def split_shortcuts(
    model: nn.Module, layers: list[tuple[str, nn.Module]], transform_shortcuts: bool
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(layers to transform, shortcut convs to keep as one sparse conv)``.

    A shortcut is a 1x1 Conv2d named, or held directly by a module named, one of the model's
    ``sift_shortcut_names`` (default ``SHORTCUT_NAMES``: timm's and torchvision's ``downsample``
    -- ``layer2.0.downsample.0``, RegNet's ``downsample.conv`` --, CIFAR ResNets' ``shortcut``); convs
    deeper inside such a module (FastViT's patch-embedding ``downsample.proj.0...``) are not shortcuts.
    With ``transform_shortcuts`` every layer is transformed and none is kept.
    """
    if transform_shortcuts:
        return layers, []
    names = _shortcut_names(model)
    keep = [
        (n, m) for n, m in layers
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and any(p in names for p in n.split(".")[-2:])
    ]
    kept = {n for n, _ in keep}
    return [(n, m) for n, m in layers if n not in kept], keep


def candidate_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    keep_ends_dense: bool = True,
    who: str = "this member",
) -> list[tuple[str, nn.Module]]:
    """The layers a transformation should replace, in registration order.

    Args:
        model: any module.
        include: fnmatch patterns of module names; when given only matching layers are candidates.
        exclude: fnmatch patterns of module names that stay dense (added to the defaults).
        keep_ends_dense: keep the first and last candidate dense, or what the model declares in
            ``sift_dense_layers``.
        who: the member asking, for error messages.

    Raises:
        ValueError: when the model already owns sparse parameters, nothing is left to replace, or a
            chosen layer computes with something other than its raw weight (weight standardisation).
    """
    assert_no_sparse_layers(model)
    layers = [(n, m) for n, m in model.named_modules() if is_candidate(m)]
    others = other_weight_layers(model)
    dense_patterns = list(exclude or [])
    if keep_ends_dense:
        declared = _declared_dense(model)
        if declared is not None:
            dense_patterns += declared
        elif layers:
            # the stem and the classifier; a model that starts with an embedding (a language model: HF
            # GPT-2, Llama, BERT) or a Conv1d front end has that as its stem, and its first block's
            # Q/K/V are transformed
            dense_patterns += [layers[-1][0]] if _stem_is_not_a_candidate(model, layers[0][1], others) else \
                [layers[0][0], layers[-1][0]]
    chosen = [
        (n, m)
        for n, m in layers
        if (include is None or _matches(n, include)) and not _matches(n, dense_patterns)
    ]
    if not chosen:
        names = ", ".join(n for n, _ in layers[:6]) or "none"
        if others:
            raise ValueError(f"no Conv2d/Linear layer left to make sparse (layers found: {names}); "
                             + _other_layers_note(others))
        raise ValueError(
            f"no Conv2d/Linear layer left to make sparse (layers found: {names}); "
            "check include/exclude patterns or pass keep_ends_dense=False"
        )
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for n, m in chosen:  # tied weights (an LM head sharing the embedding table): masking or rebuilding one breaks both
        others_sharing = [o for o in owners.get(id(m.weight), []) if o != f"{n}.weight"]
        if others_sharing:
            raise ValueError(
                f"{n}.weight is shared with {others_sharing[0]} (tied weights): {who} would mask or rebuild it, which "
                f"would make {others_sharing[0]} sparse too or untie the two; keep {n} dense (exclude=['{n}'], or "
                "keep_ends_dense=True for a head)"
            )
    frozen = [n for n, m in chosen if not m.weight.requires_grad]
    if frozen:
        raise ValueError(
            f"{len(frozen)} chosen layer(s) are frozen (requires_grad=False: {', '.join(frozen[:3])}"
            f"{', ...' if len(frozen) > 3 else ''}): {who} would rebuild or mask them, and masked frozen weights never "
            f"recover; {exclude_hint(frozen)}"
        )
    if others:
        warnings.warn(_other_layers_note(others) + ": they stay dense, and the sparsity and FLOP budget cover the "
                      "Conv2d/Linear layers only", stacklevel=3)
    _check_raw_weights(chosen, who)
    return chosen


def _stem_is_not_a_candidate(model: nn.Module, first: nn.Module, others: list[tuple[str, nn.Module]]) -> bool:
    """Whether an embedding or another weight layer (``others``: a Conv1d front end) is registered before
    ``first``, the first candidate layer: then that is the stem, and ``first`` is an ordinary hidden layer."""
    other_ids = {id(m) for _, m in others}
    for m in model.modules():
        if m is first:
            return False
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or id(m) in other_ids:
            return True
    return False


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _channels(norm: nn.Module) -> int | None:
    """Per-channel width of a norm that can sit after a conv (BatchNorm family, GroupNorm family)."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return norm.num_features
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    return None


def following_norm(model: nn.Module, name: str) -> tuple[str, str, nn.Module] | None:
    """The norm registered right after conv ``name``, if its width matches: ``(path, slot, norm)``.

    ``slot`` is the norm's name relative to the conv's parent (``../`` climbs one level).
    timm, torchvision and most CNNs register a conv's norm right after it in the same parent
    (``conv1, bn1``; timm's ``ConvNormAct`` holds ``conv, bn``); Res2Net keeps them in two lists,
    ``convs[i]`` and ``bns[i]``, registered one after the other. Norms of the BatchNorm and GroupNorm
    families count, timm's norm-act layers (``BatchNormAct2d``, ``GroupNormAct``: norm, then drop
    and activation) included.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    conv = parent.get_submodule(child)
    found = _next_sibling(parent, child)
    if found is not None and _channels(found[1]) is None:
        found = None
    slot = found[0] if found else None
    if found is None and isinstance(parent, nn.ModuleList) and parent_name:
        grand_name, _, list_name = parent_name.rpartition(".")
        grand = model.get_submodule(grand_name) if grand_name else model
        other = _next_sibling(grand, list_name)
        if other is not None and isinstance(other[1], nn.ModuleList) and len(other[1]) == len(parent):
            found = (f"{other[0]}.{child}", other[1][int(child)])
            slot = f"../{found[0]}"
    if found is None:
        return None
    norm = found[1]
    if _channels(norm) == conv.out_channels and set(dict(norm.named_children())) <= {"act", "drop"}:
        path = name.rpartition(".")[0]
        where = slot
        while where.startswith("../"):  # the same walk as parallel.norm_path
            path, where = path.rpartition(".")[0], where[3:]
        return (f"{path}.{where}" if path else where), slot, norm
    return None


def _next_sibling(parent: nn.Module, child: str) -> tuple[str, nn.Module] | None:
    keys = list(dict(parent.named_children()))
    i = keys.index(child)
    return (keys[i + 1], parent.get_submodule(keys[i + 1])) if i + 1 < len(keys) else None
