"""Sparse-IFT in Hugging Face's ``Trainer``: a ``TrainerCallback`` around the same engine.

Needs the ``[hf]`` extra (``pip install 'sift-lightning[hf]'``)::

    from sift_lightning.hf import SparsityTrainerCallback
    cb = SparsityTrainerCallback(sparsity=0.75, transform="sparse_parallel")   # SparsitySettings fields
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

- ``on_init_end`` applies the member to the Trainer's model in place (before the optimizer exists);
  Sparse Wide builds a new model, so apply it yourself first: ``model = cb.engine.apply(model)``.
- ``on_train_begin`` attaches the optimizer for ``state.max_steps`` steps; the engine's optimizer
  hooks do the rest (the Trainer calls ``optimizer.step()`` after backward, accumulation, the DDP
  all-reduce and the GradScaler's unscale; a step the scaler skips never reaches the hooks).
  Note that the Trainer clips gradients (``max_grad_norm``) before the step, so the clipping norm
  includes the masked positions' gradients (Lightning's glue masks them before clipping).
- ``on_save`` writes the engine's state to ``sift_engine.pt`` in the checkpoint folder; a resumed
  run reads it back (masks are model buffers: they come back with the model's weights).
- ``on_log`` adds density, ITOP rate and the last mask update to the log entry.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("sift_lightning.hf needs transformers: pip install 'sift-lightning[hf]'") from err

from sift_lightning.sparse.engine import DynamicSparsity
from sift_lightning.sparse.settings import SparsitySettings
from sift_lightning.transforms._surgery import is_hf_conv1d, replace_module

__all__ = ["ENGINE_STATE_NAME", "SparsityTrainerCallback", "conv1d_to_linear"]

ENGINE_STATE_NAME = "sift_engine.pt"


class SparsityTrainerCallback(TrainerCallback):
    """Drive ``DynamicSparsity`` from a ``transformers.Trainer``.

    Args:
        settings: a ``SparsitySettings``, a ready ``DynamicSparsity`` (already applied to the model,
            e.g. for Sparse Wide), or None with the settings' fields as keyword arguments.
        log_per_layer: add each layer's density to the logs too.
    """

    def __init__(self, settings: SparsitySettings | DynamicSparsity | None = None, log_per_layer: bool = False,
                 **kwargs: Any) -> None:
        if isinstance(settings, DynamicSparsity):
            if kwargs:
                raise ValueError("pass SparsityTrainerCallback either an engine or settings, not both")
            self.engine = settings
        else:
            self.engine = DynamicSparsity(settings, **kwargs)
        self.log_per_layer = log_per_layer

    def on_init_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any) -> None:
        sharding = [name for name in ("fsdp", "deepspeed") if getattr(args, name, None)]
        if sharding:
            raise ValueError(f"SparsityTrainerCallback does not support the Trainer's {sharding[0]} (it flattens the "
                             "parameters the masks follow); train with DDP (torchrun), or shard with FSDP2 through "
                             "sift_lightning.parallel.shard_model in your own loop")
        if self.engine.model is not None:
            if self.engine.model is not model:
                raise ValueError("the engine was applied to another model than the Trainer's; pass the model that "
                                 "engine.apply returned to the Trainer")
            return
        if self.engine.apply(model) is not model:
            raise ValueError(f"transform={self.engine.settings.transform!r} builds a new model: apply it before creating "
                             "the Trainer (model = callback.engine.apply(model)) and pass that model to the Trainer")

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if state.global_step > 0:
            self._load(args, state)
        self.engine.attach(optimizer, int(state.max_steps))  # accelerate's wrapper: the engine hooks the torch one
        self.engine.check_coverage()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.engine.detach()

    def _load(self, args: Any, state: Any) -> None:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", ENGINE_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"resuming at step {state.global_step} but {path} does not exist: the sparsity engine's state (steps, "
                "random generator) is saved beside each checkpoint in output_dir; resume from a checkpoint there"
            )
        self.engine.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.engine.state_dict(), os.path.join(folder, ENGINE_STATE_NAME))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or self.engine.model is None:
            return
        metrics = {**self.engine.metrics(), **self.engine.take_update_metrics()}
        if self.log_per_layer:
            metrics.update({f"sift_density/{n}": d for n, (d, _, _) in self.engine.layer_stats().items()})
        logs.update(metrics)  # seen by the callbacks after this one (put it first to reach TensorBoard)
        if state.log_history:
            state.log_history[-1].update(metrics)


def conv1d_to_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Replace each of transformers' ``Conv1D`` layers (GPT-2's attention and MLP) by the same ``nn.Linear``.

    ``Conv1D`` computes ``x @ W + b`` with ``W`` of shape (in, out): a Linear with its weight
    transposed, which Sparse-IFT's members and masks do not recognise. The Linear computes the same
    function (weight ``W.T``, same bias, dtype and device). The model changes in place and is
    returned; its ``state_dict`` then holds those weights transposed under the same names, so load
    such checkpoints into a converted model (``conv1d_to_linear(GPT2LMHeadModel(config))``).
    Call it before the engine, the callback or ``transform``.
    """
    for name, module in list(model.named_modules()):
        if not is_hf_conv1d(module):
            continue
        weight = module.weight
        linear = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                                 device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        replace_module(model, name, linear)
    return model
