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

Weight averaging (Lightning's ``EMAWeightAveraging``/``WeightAveraging`` and
``StochasticWeightAveraging``) averages weights over time, and with buffers the masks too: after
every averaging step the averaged model takes the live masks (boolean, unchanged) and its masked
weights are zeroed, so the averaged model -- the one those callbacks checkpoint and hand back at
the end of training -- is exactly as sparse as the trained one. Logs stay off the hot path: scalars
at the logging interval, images and histograms (TensorBoard) at mask updates only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging, Timer, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from sift_lightning.flops.training import TrainingFlops
from sift_lightning.sparse.masks import apply_masks, get_mask, set_mask, sparse_parameters
from sift_lightning.modules._restore import SIFT_CHECKPOINT_KEY, saved_settings
from sift_lightning.sparse.engine import DynamicSparsity, SupportsTransform, check_checkpoint_fits
from sift_lightning.sparse.settings import SparsitySettings
from sift_lightning.sparse.sharded import local_tensor

__all__ = ["SparsityCallback", "SupportsTransform"]


class SparsityCallback(pl.Callback):
    """Train any LightningModule with a Sparse-IFT member and static, SET or RigL masks.

    Args:
        sparsity: s in (0, 1); the other arguments are the fields of ``SparsitySettings`` (see its
            docstrings): transform, algorithm, distribution, init, update_frequency, drop_fraction,
            drop_schedule, end, include, exclude, keep_ends_dense, transform_options, match_flops,
            sparse_init_scale, parametrization, seed.
        log_per_layer: log per-layer images to TensorBoard at mask updates: each layer's density and
            ITOP over time as heatmaps, a few layers' masks; and histograms of the active weights and
            of the grow scores.
        settings: a ready ``SparsitySettings`` instead of the individual arguments.
        optimizer_steps: the optimizer steps each optimizer takes in the run (one int for all, or one
            per optimizer in ``configure_optimizers`` order), where ``end`` and the drop-fraction
            schedule are placed. Only manual optimization needs it, and only when an optimizer does
            not step once per batch (a critic stepped 5 times per generator step); by default the
            callback derives it from ``max_steps``/``max_epochs`` and checks the assumption.
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
        match_flops: bool | None = None,
        sparse_init_scale: bool = False,
        parametrization: str = "standard",
        seed: int = 0,
        log_per_layer: bool = True,
        settings: SparsitySettings | None = None,
        optimizer_steps: int | Sequence[int] | None = None,
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
        self.optimizer_steps = _check_optimizer_steps(optimizer_steps)
        self.engine = DynamicSparsity(settings)
        self.flops = TrainingFlops()
        self._load_hook: Any = None
        self._logged_updates = 0
        self._itop_history: list[list[float]] = []  # per-layer ITOP at each update: the heatmap's columns
        self._warned_loss = False
        self._manual: dict[str, Any] | None = None  # manual optimization: batches and steps since fit start

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
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ValueError(_NO_DEEPSPEED)
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(_NO_FSDP1)
        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            raise ValueError(_NO_SPAWN.format(method=trainer.strategy.launcher._start_method))
        mine = next(i for i, c in enumerate(trainer.callbacks) if c is self)
        averaging = [(i, type(c).__name__) for i, c in enumerate(trainer.callbacks)
                     if isinstance(c, (WeightAveraging, StochasticWeightAveraging))]
        if averaging and isinstance(trainer.strategy, ModelParallelStrategy):
            name = averaging[0][1]
            raise ValueError(f"{name} under FSDP2 (ModelParallelStrategy) is not supported with SparsityCallback: "
                             "its averaged copy would not follow the sharded masks; use strategy=ddp for weight "
                             f"averaging, or drop {name}")
        earlier = [name for i, name in averaging if i < mine]
        if earlier:  # it would copy the model before the member is applied, and average another structure
            raise ValueError(f"put SparsityCallback before {earlier[0]} in the Trainer's callbacks: the averaging "
                             "callback copies the model at setup, which must already be sparse")
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
        if trainer.ckpt_path and Path(trainer.ckpt_path).is_dir():  # FSDP2's distributed checkpoint: this is its state
            ckpt = {**torch.load(Path(trainer.ckpt_path, "meta.pt"), weights_only=False), "state_dict": args[0]}
        elif trainer.ckpt_path:
            ckpt = torch.load(trainer.ckpt_path, map_location="cpu", mmap=True, weights_only=False)
        if trainer.ckpt_path:
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
        totals = self._run_steps(trainer, pl_module)
        for opt, total in zip(trainer.optimizers, totals):
            self.engine.attach(opt, total)
        if self._manual is not None:
            self._manual["start"] = list(self.engine.steps)  # a resumed run's steps so far
        self.engine.check_coverage()
        self._warn_if_masks_cannot_move(trainer, min(totals))
        self._guard_weight_averaging(trainer, pl_module)
        self._log_hyperparams(trainer)

    def _run_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[int]:
        """The optimizer steps each optimizer takes in this run (``end`` is placed on them).

        Automatic optimization steps its one optimizer once per ``accumulate_grad_batches`` batches:
        Lightning's estimate. Under manual optimization ``max_steps`` counts every optimizer's steps
        (two optimizers stepped per batch reach ``max_steps=40`` after 20 batches), so the estimate
        would place ``end`` twice too late: each optimizer is taken to step once per batch, and
        ``on_train_batch_end`` checks that it does.
        """
        n = len(trainer.optimizers)
        self._manual = None
        if self.optimizer_steps is not None:
            if len(self.optimizer_steps) not in (1, n):
                raise ValueError(f"optimizer_steps has {len(self.optimizer_steps)} entries but the module has {n} "
                                 "optimizers; give one int, or one per optimizer in configure_optimizers order")
            return list(self.optimizer_steps) * (n if len(self.optimizer_steps) == 1 else 1)
        if pl_module.automatic_optimization:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("SparsityCallback needs a finite run to place `end`: set max_steps or max_epochs")
            return [max(1, int(total))] * n
        trainer.estimated_stepping_batches  # loads the train dataloader: num_training_batches is set after it
        limits = []
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            limits.append(math.ceil(trainer.max_steps / max(n, 1)))  # manual: max_steps counts every optimizer's steps
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(trainer.num_training_batches):
            limits.append(int(trainer.num_training_batches) * max(trainer.max_epochs, 1))
        if not limits:
            raise ValueError("SparsityCallback needs a finite run to place `end`: set max_steps or max_epochs, "
                             "or pass optimizer_steps")
        self._manual = {"batches": 0, "start": None, "total": max(1, min(limits))}
        return [self._manual["total"]] * n

    def _check_manual_steps(self) -> None:
        """Manual optimization: each optimizer must step about once per batch, or ``end`` is misplaced."""
        m = self._manual
        if m is None:
            return
        m["batches"] += 1
        b = m["batches"]
        if b < 10:
            return
        taken = [now - then for now, then in zip(self.engine.steps, m["start"])]
        off = [(i, t) for i, t in enumerate(taken) if abs(t - b) > 0.1 * b]
        if off:
            self._manual = None
            desc = ", ".join(f"optimizer {i} took {t} steps" for i, t in off)
            raise ValueError(
                f"manual optimization: {desc} in {b} batches, but SparsityCallback placed end and the drop-fraction "
                f"schedule on one step per optimizer per batch ({m['total']} steps each); pass "
                "SparsityCallback(optimizer_steps=[...]) with each optimizer's steps in the run")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.detach()
        apply_masks(pl_module)  # whatever a callback copied in at the end (averaged weights), masked is 0
        s = self.settings
        if s.algorithm != "static" and self.engine.updates == 0 and trainer.global_step > 0:
            warnings.warn(f"no mask update happened in this run's {max(self.engine.steps)} optimizer steps "
                          f"(update_frequency={s.update_frequency}): {s.algorithm} trained static masks; lower "
                          "update_frequency or train longer", stacklevel=2)

    def _warn_if_masks_cannot_move(self, trainer: pl.Trainer, total: int) -> None:
        s = self.settings
        if s.algorithm == "static":
            return
        end_step = int(s.end * total)
        if end_step < s.update_frequency:
            warnings.warn(f"end={s.end} of {total} optimizer steps is step {end_step}, before the first mask update at "
                          f"step {s.update_frequency}: masks never change; lower update_frequency or raise end",
                          stacklevel=2)
        if any(isinstance(c, Timer) and c.time_remaining() is not None for c in trainer.callbacks):
            warnings.warn(f"max_time may stop this run before its {total} estimated steps, so `end` (step {end_step}) "
                          "may never come and the drop fraction will not decay; set max_steps to place end",
                          stacklevel=2)

    def _guard_weight_averaging(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap each averaging callback's update so its averaged model keeps the live masks (see the module doc)."""
        for c in trainer.callbacks:
            if isinstance(c, WeightAveraging):
                average = getattr(c, "_average_model", None)
                if average is None or not hasattr(average, "module"):
                    raise ValueError(f"{type(c).__name__} keeps no averaged model SparsityCallback can mask; "
                                     "update Lightning or train without weight averaging")
                update = average.update_parameters

                def masked_update(model: nn.Module, _update: Any = update, _average: Any = average) -> None:
                    _update(model)
                    _take_masks(_average.module, pl_module)

                average.update_parameters = masked_update
                _take_masks(average.module, pl_module)
            elif isinstance(c, StochasticWeightAveraging):
                update = c.update_parameters

                def masked_swa(average: nn.Module, model: nn.Module, *args: Any, _update: Any = update) -> None:
                    _update(average, model, *args)
                    _take_masks(average, model)

                c.update_parameters = masked_swa

    @rank_zero_only
    def _log_hyperparams(self, trainer: pl.Trainer) -> None:
        params = {f"sift/{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for k, v in self.settings.to_dict().items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.engine.prepare_step(optimizer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # one real forward pass measures the per-sample MACs; a manual training_step's passes and
        # backwards are its own (a GAN runs several), so no FLOPs are counted or logged for it
        if pl_module.automatic_optimization:
            self.flops.start_forward(pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.flops.end_forward()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.engine.discard_step()  # prepared but never stepped: the GradScaler skipped this step
        if pl_module.automatic_optimization:
            self.flops.add_batch(extract_batch_size(batch), trainer.world_size, trainer.accumulate_grad_batches,
                                 self.engine.dense_gradient_steps)
        else:
            self._check_manual_steps()
        updated = self.engine.updates != self._logged_updates
        if updated or trainer.global_step % trainer.log_every_n_steps == 0:
            self._check_loss(trainer, outputs)
            self._log(trainer, pl_module, updated)

    def _check_loss(self, trainer: pl.Trainer, outputs: Any) -> None:
        """A non-finite loss, said once (checked at the logging interval only: it syncs with the device)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self._warned_loss or not torch.is_tensor(loss) or bool(torch.isfinite(loss).all()):
            return
        self._warned_loss = True
        warnings.warn(f"the training loss is {loss.item()} at step {trainer.global_step}: the weights are diverging "
                      "and mask updates are skipped while they are not finite; lower the learning rate or check the "
                      "inputs for NaN/inf", stacklevel=2)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, updated: bool) -> None:
        metrics = {**self.engine.metrics(), **self.flops.metrics(), **self.engine.take_update_metrics()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._logged_updates = self.engine.updates
        histograms = self.engine.take_update_histograms()
        if updated and self.log_per_layer and any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            stats = self.engine.layer_stats()  # on every rank: FSDP2-sharded masks are counted over the ranks
            if trainer.is_global_zero:
                writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
                self._log_images(writers, pl_module, histograms, trainer.global_step, stats)

    def _log_images(self, writers: list[Any], pl_module: nn.Module, histograms: dict[str, torch.Tensor],
                    step: int, stats: dict[str, tuple[float, float, int]]) -> None:
        self._itop_history.append([itop for _, itop, _ in stats.values()])
        density = torch.tensor([[d for d, _, _ in stats.values()]]).T  # (layers, 1)
        itop = torch.tensor(self._itop_history).T  # (layers, updates)
        sparse = list(sparse_parameters(pl_module))
        shown = {sparse[i] for i in sorted({0, len(sparse) // 2, len(sparse) - 1})} if sparse else set()
        for w in writers:
            w.add_image("sift/layer_density", _heatmap(density, 0.0, 1.0), step)
            w.add_image("sift/layer_itop", _heatmap(itop, 0.0, 1.0), step)
            for name, values in histograms.items():
                if values.numel():
                    w.add_histogram(name, values, step)
            for full, owner, local, _ in shown:
                mask = local_tensor(get_mask(owner, local))  # FSDP2: rank 0's shard, the first rows
                w.add_image(f"sift_mask/{full}", mask.reshape(mask.shape[0], -1)[:256, :256].float().cpu()[None], step)

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


def _take_masks(average: nn.Module, live: nn.Module) -> None:
    """Give an averaged copy of ``live`` its masks and zero its masked weights."""
    masks = {full: get_mask(owner, local) for full, owner, local, _ in sparse_parameters(live)}
    with torch.no_grad():
        for full, owner, local, param in sparse_parameters(average):
            set_mask(owner, local, masks[full])
            param.masked_fill_(~get_mask(owner, local), 0.0)


# a few anchors of matplotlib's viridis: dark (0) to yellow (1)
_VIRIDIS = torch.tensor([[0.267, 0.005, 0.329], [0.229, 0.322, 0.546], [0.128, 0.567, 0.551],
                         [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])


def _heatmap(values: torch.Tensor, lo: float, hi: float, cell: int = 12) -> torch.Tensor:
    """A (3, H, W) image of a (rows, cols) matrix: one ``cell`` x ``cell`` square per entry, viridis colours."""
    t = ((values.float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1) * (len(_VIRIDIS) - 1)
    i = t.floor().long().clamp(max=len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (t - i)[..., None] * (_VIRIDIS[i + 1] - _VIRIDIS[i])  # (rows, cols, 3)
    return rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1).permute(2, 0, 1)


def _check_optimizer_steps(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not items or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise ValueError(f"optimizer_steps must be a positive int or a list of them (one per optimizer), got {value!r}")
    return list(items)


_NO_SPAWN = ("SparsityCallback does not support Lightning's multiprocessing launcher (ddp_spawn, ddp_fork, "
             "ddp_notebook; start method {method}): training runs in child processes, and Lightning copies the weights "
             "back into your main-process model non-strictly, silently dropping the masks and every layer the member "
             "built; use strategy='ddp', which runs the script once per process")
_NO_DEEPSPEED = ("SparsityCallback does not support DeepSpeed (ZeRO flattens the parameters its masks follow); "
                 "shard with FSDP2 instead: --config configs/strategies/fsdp2.yaml (ModelParallelStrategy)")
_NO_FSDP1 = ("SparsityCallback does not support FSDPStrategy (FSDP1 flattens the parameters its masks follow); "
             "shard with FSDP2 instead: --config configs/strategies/fsdp2.yaml (sift_lightning.parallel.FSDP2Strategy)")
_NEEDS_SWAP = ("transform={transform!r} rebuilds the network; {module} must implement transform_backbone(fn) "
               "(see sift_lightning.SupportsTransform), or use ImageClassifier/LanguageModel")
