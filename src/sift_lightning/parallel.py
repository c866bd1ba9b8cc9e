"""FSDP2 for Sparse-IFT models: shard per block, and turn a sharded checkpoint into one file.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a ``DTensor`` shard (a slice
of dim 0 per rank) and all-gathers one *unit* at a time for forward and backward, so a unit should
be one transformer block or one CNN stage: small enough that one gathered unit fits, large enough
that few collectives run. ``shard_model`` makes every block of our GPT (``model.blocks``) and every
top-level stage of a timm backbone (``stages``, ``blocks``, ``layers`` or ResNet's ``layer1..4``)
a unit, then the root (embeddings, stem, head, and the tied LM head with them). Sparse-IFT must be
applied *before* sharding (``SparsityCallback.setup`` runs before ``configure_model``; a plain loop
calls ``DynamicSparsity.apply`` first): it rebuilds layers, which a sharded model cannot do. Each
mask then becomes a ``DTensor`` buffer sharded like its parameter (``sparse.sharded.shard_masks``).

Under Lightning, ``ImageClassifier`` and ``LanguageModel`` call ``configure_fsdp2`` from their
``configure_model`` when the strategy is ``ModelParallelStrategy`` (configs/strategies/fsdp2.yaml).
A user's own LightningModule does the same: ``def configure_model(self): configure_fsdp2(self, self.net)``.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from sift_lightning.sparse.sharded import shard_masks

__all__ = ["FSDP2Strategy", "configure_fsdp2", "consolidate_checkpoint", "is_fully_sharded", "mixed_precision_policy",
           "read_sharded_checkpoint", "shard_model", "shard_units"]

_STAGE_LISTS = ("blocks", "stages", "layers")  # GPT and ViT: blocks; ConvNeXt, EfficientNet...: stages; Swin: layers
_RESNET_STAGE = re.compile(r"layer\d+$")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules ``shard_model`` shards on their own: each block of a block list, or ResNet's stages."""
    for name in _STAGE_LISTS:
        stages = getattr(model, name, None)
        if isinstance(stages, (nn.ModuleList, nn.Sequential)) and len(stages) > 0:
            return list(stages)
    return [m for name, m in model.named_children() if _RESNET_STAGE.match(name)]


def is_fully_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` already."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def mixed_precision_policy(device: torch.device, precision: str | None) -> Any:
    """FSDP2's bf16 policy (bf16 compute and all-gathers, fp32 gradient reduction), or None (fp32).

    Only for ``precision="bf16-mixed"`` on a CUDA device with bf16 support. On CPU the sharded
    parameters and their all-gathers stay fp32 and Lightning's bf16 autocast runs the matmuls in
    bf16 (checked with the quickstart GPT on 2 CPU processes; speed not measured).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16-mixed" or device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, mesh: Any = None, *, mp_policy: Any = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply ``fully_shard`` per block (``shard_units``) and to ``model``; shard its masks; return it.

    Args:
        model: a GPT, a timm backbone or any module (without blocks: one unit, the whole model).
            Make it sparse first (``DynamicSparsity.apply`` / ``SparsityCallback``).
        mesh: the 1-D data-parallel ``DeviceMesh`` (default: all ranks).
        mp_policy: a ``MixedPrecisionPolicy`` (``mixed_precision_policy``), or None for fp32.
        reshard_after_forward: free each unit's gathered parameters after its forward (FSDP2's
            default; False keeps them until backward: faster, more memory).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_fully_sharded(model):
        raise ValueError("model is sharded already (fully_shard was applied); shard it once, after making it sparse")
    options: dict[str, Any] = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                                   mp_policy=mp_policy or MixedPrecisionPolicy())
    for unit in shard_units(model):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    shard_masks(model)
    return model


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every process in one FSDP2 (data-parallel) group, any device count.

    ``ModelParallelStrategy``'s ``"auto"`` sizes mean tensor parallelism within a node, which
    Sparse-IFT's masks do not support; this sets ``data_parallel_size`` to the world size and
    ``tensor_parallel_size`` to 1 once the devices are known (configs/strategies/fsdp2.yaml).

    Args:
        save_distributed_checkpoint: each rank writes its shards to a checkpoint folder (True), or
            rank 0 gathers one whole file (False; needs the whole model in its CPU memory).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # read when the device mesh is built
        super().setup_environment()


def configure_fsdp2(module: Any, model: nn.Module | None = None) -> None:
    """``LightningModule.configure_model`` for FSDP2: shard ``model`` (default ``module.backbone``).

    Does nothing unless the trainer's strategy is ``ModelParallelStrategy``, or when the model is
    sharded already (Lightning calls ``configure_model`` again for ``test`` after ``fit``).
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return
    model = model if model is not None else module.backbone
    if is_fully_sharded(model):
        return
    mesh = module.device_mesh
    tp = mesh["tensor_parallel"].size()
    if tp > 1:
        raise ValueError(f"Sparse-IFT shards with FSDP2 only, but tensor_parallel_size={tp}; "
                         "use ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)")
    policy = mixed_precision_policy(trainer.strategy.root_device, str(trainer.precision))
    shard_model(model, mesh["data_parallel"], mp_policy=policy)


def read_sharded_checkpoint(folder: str | Path, *, metadata_only: bool = False) -> dict[str, Any]:
    """The checkpoint dict in ``ModelParallelStrategy``'s distributed-checkpoint folder, whole, in memory.

    As a one-process ``Trainer`` writes it: the whole weights and masks (``state_dict``), every
    callback's state (the sparsity engine's included) and the optimizer states keyed by parameter
    index. Runs in one process (no process group needed).

    Args:
        folder: the folder (``.../checkpoints/last.ckpt/`` with ``meta.pt`` and ``*.distcp`` files).
        metadata_only: read only ``meta.pt`` (loops, callbacks, hyper-parameters): no tensors.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    meta = folder / "meta.pt"
    if not folder.is_dir() or not meta.is_file():
        raise ValueError(f"{folder} is not a distributed checkpoint folder (no meta.pt); pass the folder "
                         "ModelParallelStrategy wrote (e.g. checkpoints/last.ckpt/)")
    checkpoint = torch.load(meta, map_location="cpu", weights_only=False)
    if metadata_only:
        return checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp, "whole.pt")
        dcp_to_torch_save(folder, whole)  # the folder's tensors, whole, in one torch.save file
        tensors = torch.load(whole, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = tensors.pop("state_dict")
    keys = sorted((k for k in tensors if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_index_keyed(tensors.pop(k)) for k in keys]
    return checkpoint


def consolidate_checkpoint(folder: str | Path, out: str | Path) -> Path:
    """Write ``read_sharded_checkpoint(folder)`` to one file ``out``: a checkpoint that resumes in one
    process, loads with ``LanguageModel.load_from_checkpoint`` and exports with ``sift-fit export``
    (which also reads the folder itself). Command line: ``python -m sift_lightning.parallel FOLDER OUT.ckpt``.
    """
    out = Path(out)
    torch.save(read_sharded_checkpoint(folder), out)
    return out


def _index_keyed(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (distributed checkpoint) keyed by index, as
    ``Optimizer.state_dict`` writes it: names are numbered in param-group order."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        for name in group["params"]:
            index.setdefault(name, len(index))
        groups.append({**group, "params": [index[name] for name in group["params"]]})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m sift_lightning.parallel CHECKPOINT_FOLDER OUT.ckpt")
    print(consolidate_checkpoint(sys.argv[1], sys.argv[2]))
