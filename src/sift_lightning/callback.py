"""SparsityCallback: the sparsity engine (``DynamicSparsity``) in any Lightning ``Trainer``.

Glue only; the engine keeps the invariants (see ``sift_lightning.sparse.engine``):

- ``setup`` (before optimizers exist): ``engine.apply``; a ``load_state_dict`` pre-hook checks that
  a resumed checkpoint fits before Lightning copies its tensors (it loads after setup).
- ``on_fit_start``: ``engine.attach`` each optimizer, with the run's optimizer steps.
- ``on_before_optimizer_step`` (after backward, the DDP all-reduce, accumulation and AMP unscale,
  before Lightning clips gradients): ``engine.prepare_step``. Lightning runs backward inside
  ``optimizer.step(closure)``, so the engine's own step pre-hook would come too early here.
- ``on_train_batch_end``: FLOP accounting and logging; a step the GradScaler skipped is discarded.
- ``state_dict``: the engine's and the FLOP counter's state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from sift_lightning.flops.training import TrainingFlops
from sift_lightning.modules._restore import SIFT_CHECKPOINT_KEY, saved_settings
from sift_lightning.sparse.engine import DynamicSparsity, SupportsTransform, check_checkpoint_fits
from sift_lightning.sparse.settings import SparsitySettings

__all__ = ["SparsityCallback", "SupportsTransform"]


class SparsityCallback(pl.Callback):
    """Train any LightningModule with a Sparse-IFT member and static, SET or RigL masks.

    Args:
        sparsity: s in (0, 1); the other arguments are the fields of ``SparsitySettings`` (see its
            docstrings): transform, algorithm, distribution, init, update_frequency, drop_fraction,
            drop_schedule, end, include, exclude, keep_ends_dense, transform_options, match_flops,
            sparse_init_scale, parametrization, seed.
        log_per_layer: log each layer's density too.
        settings: a ready ``SparsitySettings`` instead of the individual arguments.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        transform: str | None = None,
        algorithm: str = "rigl",
        distribution: str = "uniform",
        init: str = "random",
        update_frequency: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
        end: float = 0.75,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        keep_ends_dense: bool = True,
        transform_options: dict[str, Any] | None = None,
        match_flops: bool = False,
        sparse_init_scale: bool = False,
        parametrization: str = "standard",
        seed: int = 0,
        log_per_layer: bool = True,
        settings: SparsitySettings | None = None,
    ) -> None:
        given = dict(sparsity=sparsity, transform=transform, algorithm=algorithm, distribution=distribution, init=init,
                     update_frequency=update_frequency, drop_fraction=drop_fraction, drop_schedule=drop_schedule,
                     end=end, include=include, exclude=exclude, keep_ends_dense=keep_ends_dense,
                     transform_options=transform_options or {}, match_flops=match_flops,
                     sparse_init_scale=sparse_init_scale, parametrization=parametrization, seed=seed)
        if settings is None:
            if sparsity is None:
                raise ValueError("SparsityCallback needs a sparsity in (0, 1), e.g. SparsityCallback(0.75), or settings=")
            settings = SparsitySettings(**given)
        else:
            defaults = {f.name: f.default for f in fields(SparsitySettings) if f.name != "transform_options"}
            changed = [k for k, v in given.items() if k in defaults and v != defaults[k] and not (k == "sparsity" and v is None)]
            if changed or transform_options:
                raise ValueError(f"pass SparsityCallback either settings= or individual arguments, not both "
                                 f"(got settings and {', '.join(changed or ['transform_options'])})")
        self.settings = settings
        self.log_per_layer = log_per_layer
        self.engine = DynamicSparsity(settings)
        self.flops = TrainingFlops()
        self._load_hook: Any = None
        self._logged_updates = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(transform=self.settings.transform, sparsity=self.settings.sparsity)

    @property
    def step(self) -> int:
        """The first optimizer's step count (every optimizer's: ``engine.steps``)."""
        return self.engine.steps[0]

    @property
    def train_flops(self) -> float:
        return self.flops.total

    # ---------------------------------------------------------------- setup: structure and masks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pruning = [type(c).__name__ for c in trainer.callbacks if isinstance(c, ModelPruning)]
        if pruning:
            raise ValueError(
                f"{pruning[0]} and SparsityCallback cannot be combined: both mask the same weights (torch's pruning "
                "reparametrises them); use SparsityCallback(transform=None, ...) for sparse training alone"
            )
        if self.settings.transform == "sparse_wide" and not isinstance(pl_module, SupportsTransform):
            raise ValueError(_NEEDS_SWAP.format(transform="sparse_wide", module=type(pl_module).__name__))
        if self.engine.apply(pl_module) is not pl_module:
            raise ValueError(_NEEDS_SWAP.format(transform=self.settings.transform, module=type(pl_module).__name__))
        # Lightning loads a resumed checkpoint after setup (trainer.ckpt_path is set only then):
        # check it fits just before its tensors are copied, so a mismatch fails in one clear line
        if self._load_hook is None:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(partial(self._before_load, trainer))

    def _before_load(self, trainer: pl.Trainer, pl_module: nn.Module, *args: Any) -> None:
        self._remove_load_hook()
        if trainer.ckpt_path:
            ckpt = torch.load(trainer.ckpt_path, map_location="cpu", mmap=True, weights_only=False)
            check_checkpoint_fits(pl_module, ckpt.get("state_dict", {}), saved_settings(ckpt), self.settings,
                                  str(trainer.ckpt_path))

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()
        self.flops.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.flops.close()  # a failed first step must not leave its FlopCounterMode on the dispatch stack

    # ---------------------------------------------------------------- fit
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("SparsityCallback needs a finite run to place `end`: set max_steps or max_epochs")
        for opt in trainer.optimizers:
            self.engine.attach(opt, max(1, int(total)))
        self.engine.check_coverage()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.detach()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.engine.prepare_step(optimizer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.flops.start_forward(pl_module)  # one real forward pass measures the per-sample MACs

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.flops.end_forward()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.engine.discard_step()  # prepared but never stepped: the GradScaler skipped this step
        self.flops.add_batch(extract_batch_size(batch), trainer.world_size, trainer.accumulate_grad_batches,
                             self.engine.dense_gradient_steps)
        if self.engine.updates != self._logged_updates or trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer)

    def _log(self, trainer: pl.Trainer) -> None:
        metrics = {**self.engine.metrics(self.log_per_layer), **self.flops.metrics(), **self.engine.take_update_metrics()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._logged_updates = self.engine.updates

    # ---------------------------------------------------------------- checkpointed state
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # lets Module.load_from_checkpoint rebuild the structure outside a Trainer; our modules write
        # it themselves (SiftCheckpointMixin), weights-only checkpoints included
        checkpoint.setdefault(SIFT_CHECKPOINT_KEY, {"settings": self.settings.to_dict()})

    def state_dict(self) -> dict[str, Any]:
        return {**self.engine.state_dict(), **self.flops.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self.flops.load_state_dict(state_dict)


_NEEDS_SWAP = ("transform={transform!r} rebuilds the network; {module} must implement transform_backbone(fn) "
               "(see sift_lightning.SupportsTransform), or use ImageClassifier/LanguageModel")
