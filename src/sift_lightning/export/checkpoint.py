"""Checkpoints: what ``sift-fit export`` does (fold, or sparse-export, and write a plain state dict)."""


from __future__ import annotations

import argparse
import copy
import io
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sift_lightning.sparse.masks import MASK_SUFFIX, sparse_modules, upgrade_mask_keys

from sift_lightning.export.csr import _CSRWeight, sparse_export
from sift_lightning.export.folding import _drop_masks, dense_state_dict, fold

__all__ = ['check_checkpoint', 'export_checkpoint', 'export_main', 'format_summary', 'read_checkpoint']

# ---------------------------------------------------------------- checkpoints: what sift-fit export does
def check_checkpoint(path: str | Path) -> None:
    """Raise a one-line error unless ``path`` is a checkpoint file ``torch.load`` can read.

    Cheap enough to run before a long job: tensors are memory-mapped, not read (a zip checkpoint
    cut short has lost its central directory, so truncation is still caught).
    """
    read_checkpoint(path, mmap=True)


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` on CPU; a missing, truncated or corrupt file raises one line naming it.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder).
        ValueError: the file is not a readable PyTorch checkpoint.
    """
    path = Path(path)
    if path.is_dir() and (path / "meta.pt").is_file():  # FSDP2 (ModelParallelStrategy): a folder of shards
        from sift_lightning.parallel import read_sharded_checkpoint

        return read_sharded_checkpoint(path, metadata_only=mmap)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {path} {what}; pass the path of a .ckpt file "
                                "(e.g. runs/<name>/version_<n>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001  PytorchStreamReader, UnpicklingError, EOFError, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {reason}; "
                         "use another checkpoint of the run (best-*.ckpt, or an earlier copy) or train again") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict; pass a .ckpt "
                         "written by Lightning (sift-fit fit)")
    return checkpoint


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
            under ``checkpoint["sift_lightning"]`` rebuild the structure), or a dense one.
        out_path: the state dict to write; the program goes to the same name with ``.pt2``.
        program: also save a ``torch.export`` program.
        batch_sizes, min_speedup: passed to ``sparse_export`` for Wide and Factorized.
        module_cls: the LightningModule class; default: told from the checkpoint's hyper-parameters
            (``ImageClassifier`` or ``LanguageModel``). Another class must have a ``backbone``
            attribute, ``example_input_array`` and a constructor that builds the plain backbone.

    Returns:
        A summary: ``member``, ``sparsity``, ``folded``, ``out``, ``program``, ``params`` (stored),
        ``active_params`` (non-zero), ``macs`` (per sample, counted sparse), ``dense_macs``,
        ``monitor``/``score`` (the ModelCheckpoint's best, if any), ``max_rel_error`` (shipped
        vs. trained model), ``csr_layers`` and ``notes``. ``format_summary`` prints it in one line.
    """
    from sift_lightning.flops import count_flops
    from sift_lightning.modules._restore import SIFT_CHECKPOINT_KEY, saved_settings

    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    checkpoint = read_checkpoint(ckpt_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    settings = saved_settings(checkpoint)
    if settings is None and any(k.endswith(MASK_SUFFIX) for k in upgrade_mask_keys(checkpoint.get("state_dict", {}))):
        raise ValueError(f"{ckpt_path} holds sparse masks but no '{SIFT_CHECKPOINT_KEY}' settings to rebuild "
                         "its structure from; was it written by SparsityCallback?")
    member = "dense" if settings is None else settings.get("transform")
    cls = module_cls or _module_class(checkpoint)
    source: Any = ckpt_path
    if ckpt_path.is_dir():  # FSDP2's folder of shards, read whole above: load_from_checkpoint takes one file
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    module = cls.load_from_checkpoint(source, map_location="cpu").eval()  # rebuilds the structure
    trained, example = module.backbone, module.example_input_array[:1]
    notes: list[str] = []
    csr = None
    if member in (None, "dense", "sparse_parallel", "sparse_doped"):
        shipped = cls(**module.hparams).backbone.eval()  # the plain architecture, fresh
        shipped.load_state_dict(dense_state_dict(fold(trained, member=member)), strict=True)
        torch.save(shipped.state_dict(), out_path)
        report = count_flops(shipped, example)
    else:
        shipped = sparse_export(trained, example, batch_sizes=batch_sizes, min_speedup=min_speedup)
        torch.save(trained.state_dict(), out_path)
        report = count_flops(trained, example)
        csr = f"{sum(d.csr for d in shipped.sift_export_report)}/{len(shipped.sift_export_report)}"
        notes.append(f"{member} cannot fold: {out_path.name} holds the Sparse-IFT weights and masks "
                     f"(load into transform(..., {member!r}, s)); {csr} sparse layers run as CSR")
    with torch.inference_mode():
        error = _rel_error(shipped(example), trained(example))
    program_path = _save_program(shipped, trained, example, out_path.with_suffix(".pt2"), notes) if program else None
    monitor, score = _best_score(checkpoint)
    return {
        "member": member, "sparsity": None if settings is None else settings.get("sparsity"),
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
    return (f"{summary['member'] or 'sparse'}{s} {how} -> {files}: {summary['params'] / 1e6:.2f}M params "
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
