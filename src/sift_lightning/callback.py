"""SparsityCallback: Sparse-IFT and dynamic sparse training in any Lightning ``Trainer``.

Where each invariant is kept (DESIGN.md section 2):

- ``setup`` (before optimizers exist): apply the member, distribute sparsity, create masks; a
  ``load_state_dict`` pre-hook checks that a resumed checkpoint's masks fit before Lightning
  copies its tensors (the checkpoint is loaded after setup).
- ``on_before_optimizer_step`` (after backward, DDP all-reduce, gradient accumulation and AMP
  unscale): on update steps read the full dense gradient for RigL, then zero the masked gradient.
- an optimizer step post-hook (it does not fire when the AMP GradScaler skips a step, so a skipped
  step never updates masks): count the step, drop-and-grow on update steps, re-apply masks to the
  weights and to every optimizer-state tensor shaped like the weight -- after each update, and
  after every step for optimizers not known to keep zeros at zero (SGD and the Adam family are:
  with masked gradients their masked weights and state stay exactly 0, which the tests check).
- ``state_dict``: step, random generator, ever-active masks, FLOP counter; masks themselves are
  buffers in the model's ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from sift_lightning.flops import LayerRecorder
from sift_lightning.modules._restore import SIFT_CHECKPOINT_KEY
from sift_lightning.sparse.distribution import DISTRIBUTIONS, distribute
from sift_lightning.sparse.masks import (
    MASK_INITS, MASK_SUFFIX, get_mask, init_masks, keep_bits, mark_sparse, sparse_parameters, zero_masked_,
)
from sift_lightning.sparse.schedules import DROP_SCHEDULES, drop_fraction_at, is_update_step
from sift_lightning.sparse.updaters import ALGORITHMS, drop_and_grow, grow_scores
from sift_lightning.transforms import FAMILIES, check_sparsity, transform
from sift_lightning.transforms._surgery import candidate_layers

__all__ = ["SparsityCallback", "SupportsTransform"]


@runtime_checkable
class SupportsTransform(Protocol):
    """A LightningModule whose backbone can be replaced before its optimizer exists.

    ``sparse_wide`` builds a new, wider network, so the module must let the callback swap it in;
    ``ImageClassifier`` and ``LanguageModel`` implement this as ``self.backbone = fn(self.backbone)``.
    """

    def transform_backbone(self, fn: Callable[[nn.Module], nn.Module]) -> None: ...


@dataclass
class _Entry:
    """One sparse parameter and what the hot path needs of it."""

    name: str
    param: nn.Parameter
    mask: torch.Tensor  # the buffer itself, updated in place
    keep: torch.Tensor  # the mask as all-ones/all-zeros integer words (``keep_bits``), cached between updates


class SparsityCallback(pl.Callback):
    """Train any LightningModule with a Sparse-IFT member and static, SET or RigL masks.

    Args:
        sparsity: s in (0, 1): the member's size rule and the share of zeros in every sparse layer
            (on average, with ``distribution="erk"``).
        transform: a Sparse-IFT family (``sparse_wide``, ``sparse_parallel``, ``sparse_factorized``,
            ``sparse_doped``), or None to train the existing Conv2d/Linear layers sparse.
        algorithm: ``static``, ``set`` or ``rigl``.
        distribution: ``uniform`` or ``erk`` per-layer sparsity.
        init: initial masks, ``random`` or ``magnitude`` (largest |w|).
        update_frequency: optimizer steps between mask updates.
        drop_fraction: initial share of active weights replaced per update.
        drop_schedule: ``constant``, ``cosine`` or ``exponential`` decay of the drop fraction.
        end: fraction of the run's optimizer steps after which masks freeze.
        include: fnmatch patterns of layer names to make sparse (default: all Conv2d/Linear).
        exclude: patterns of layer names kept dense, on top of the first/last layer.
        keep_ends_dense: keep the first and last layer (or the model's ``sift_dense_layers``) dense.
        transform_options: member options, e.g. ``{"branch_norm": False}`` or ``{"linear_act": "none"}``.
        match_flops: retune the sparsity so sparse MACs equal the dense model's on the module's
            ``example_input_array`` (needed for Sparse Wide at ImageNet resolution, whose dense stem grows).
        sparse_init_scale: rescale kept weights by ``1/sqrt(density)`` at mask init, so each layer's
            output variance matches a dense layer's (Evci et al. 2022).
        seed: seeds the callback's own generator (random masks, SET growth), identical on every rank.
        log_per_layer: log each layer's density too.
    """

    def __init__(
        self,
        sparsity: float,
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
        seed: int = 0,
        log_per_layer: bool = True,
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        if transform == "dense":
            raise ValueError(
                "transform='dense' is the baseline: train without SparsityCallback; transform must be one of "
                f"None (train the existing layers sparse), {', '.join(FAMILIES[1:])}"
            )
        _check_choice("transform", transform, (None, *FAMILIES[1:]))
        _check_choice("algorithm", algorithm, ALGORITHMS)
        _check_choice("distribution", distribution, DISTRIBUTIONS)
        _check_choice("init", init, MASK_INITS)
        _check_choice("drop_schedule", drop_schedule, DROP_SCHEDULES)
        if isinstance(update_frequency, bool) or not isinstance(update_frequency, int) or update_frequency < 1:
            raise ValueError(f"update_frequency must be a positive integer (optimizer steps), got {update_frequency!r}")
        if not _is_number(drop_fraction) or not 0.0 < drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1], got {drop_fraction!r}")
        if not _is_number(end) or not 0.0 < end <= 1.0:
            raise ValueError(f"end must be a fraction of the run's steps in (0, 1], got {end!r}")
        self.transform = transform
        self.algorithm = algorithm
        self.distribution = distribution
        self.init = init
        self.update_frequency = update_frequency
        self.drop_fraction = drop_fraction
        self.drop_schedule = drop_schedule
        self.end = end
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.keep_ends_dense = keep_ends_dense
        self.transform_options = dict(transform_options or {})
        self.match_flops = match_flops
        self.sparse_init_scale = sparse_init_scale
        self.seed = seed
        self.log_per_layer = log_per_layer

        self.step = 0  # optimizer steps that updated sparse weights (AMP-skipped steps excluded)
        self.train_flops = 0.0  # cumulative training FLOPs, counted sparse (+ RigL's dense gradients)
        self._generator = torch.Generator().manual_seed(seed)
        self._ever_active: dict[str, torch.Tensor] = {}
        self._entries: list[_Entry] = []
        self._by_optimizer: dict[int, list[_Entry]] = {}
        self._pending: dict[str, torch.Tensor] | None = None  # RigL scores between the two hooks
        self._load_hook: Any = None
        self._handles: list[Any] = []
        self._end_step = 0
        self._fwd: tuple[float, float] | None = None  # per-sample forward MACs (dense, sparse)
        self._recorder: LayerRecorder | None = None
        self._last_update: dict[str, float] = {}
        self._log_now = False
        self._dense_grad_due = False
        self._step_samples = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(transform=self.transform, sparsity=self.sparsity)

    # ---------------------------------------------------------------- setup: structure and masks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "_sift_applied", False):
            return  # fit, then test on the same module: the structure is already there
        self._apply(pl_module)
        pl_module._sift_applied = True
        # Lightning loads a resumed checkpoint after setup (trainer.ckpt_path is set only then):
        # check it fits just before its tensors are copied, so a mismatch fails in one clear line
        self._load_hook = pl_module.register_load_state_dict_pre_hook(partial(self._before_load, trainer))
        # masks are identical on every rank by construction (and broadcast on updates), so DDP
        # need not re-broadcast them as buffers before every forward
        names = [n + MASK_SUFFIX for n, _ in self._named_sparse(pl_module)]
        ignored = getattr(pl_module, "_ddp_params_and_buffers_to_ignore", [])
        pl_module._ddp_params_and_buffers_to_ignore = list(ignored) + names

    def _apply(self, pl_module: pl.LightningModule) -> None:
        select = dict(include=self.include, exclude=self.exclude, keep_ends_dense=self.keep_ends_dense)
        example = getattr(pl_module, "example_input_array", None)
        if self.match_flops and example is None:
            raise ValueError("match_flops=True needs the LightningModule's example_input_array (one input batch)")

        def fn(model: nn.Module) -> nn.Module:
            if self.transform is None:
                for _, layer in candidate_layers(model, **select):
                    mark_sparse(layer, self.sparsity)
                return model
            return transform(model, self.transform, self.sparsity, match_flops=self.match_flops,
                             example_input=example, **select, **self.transform_options)

        if isinstance(pl_module, SupportsTransform):
            pl_module.transform_backbone(fn)
        elif self.transform == "sparse_wide" or fn(pl_module) is not pl_module:
            raise ValueError(
                f"transform={self.transform!r} rebuilds the network; {type(pl_module).__name__} must implement "
                "transform_backbone(fn) (see sift_lightning.SupportsTransform), or use ImageClassifier/LanguageModel"
            )
        self._distribute(pl_module)
        init_masks(pl_module, self.init, self._generator)
        if self.sparse_init_scale:
            with torch.no_grad():
                for _, owner, local, param in sparse_parameters(pl_module):
                    param.mul_(1.0 / math.sqrt(1.0 - owner.sift_sparsity[local]))

    def _distribute(self, pl_module: nn.Module) -> None:
        params = list(sparse_parameters(pl_module))
        numel = {full: p.numel() for full, _, _, p in params}
        active = sum((1.0 - o.sift_sparsity[loc]) * numel[full] for full, o, loc, _ in params)
        overall = 1.0 - active / sum(numel.values())
        per_layer = distribute({full: tuple(p.shape) for full, _, _, p in params}, overall, self.distribution)
        for full, owner, local, _ in params:
            owner.sift_sparsity[local] = per_layer[full]

    @staticmethod
    def _named_sparse(pl_module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(full, p) for full, _, _, p in sparse_parameters(pl_module)]

    def _before_load(self, trainer: pl.Trainer, pl_module: nn.Module, *args: Any) -> None:
        self._remove_load_hook()
        if trainer.ckpt_path:
            self._check_checkpoint(trainer.ckpt_path, pl_module)

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_load_hook()
        self._close_recorder()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_recorder()  # a failed first step must not leave its FlopCounterMode on the dispatch stack

    def _close_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.__exit__()
            self._recorder = None

    def _check_checkpoint(self, path: str, pl_module: nn.Module) -> None:
        """Fail early, in one line, when a checkpoint's masks do not fit this model."""
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        theirs = {k: tuple(v.shape) for k, v in ckpt.get("state_dict", {}).items() if k.endswith(MASK_SUFFIX)}
        ours = {n + MASK_SUFFIX: tuple(p.shape) for n, p in self._named_sparse(pl_module)}
        saved = ckpt.get(SIFT_CHECKPOINT_KEY, {}).get("callback")  # written by on_save_checkpoint
        # equal mask shapes are not enough: transform=None (or Doped's W_sparse) keeps every shape
        # at any sparsity, so compare the settings that built the structure too
        same_settings = saved is None or (saved["transform"], saved["sparsity"]) == (self.transform, self.sparsity)
        if theirs == ours and same_settings:
            return
        trained = (f"transform={saved['transform']!r}, sparsity={saved['sparsity']}" if saved
                   else "no SparsityCallback" if not theirs else "other settings")
        diff = sorted(set(theirs.items()) ^ set(ours.items()))
        where = f" (first difference: mask {diff[0][0]} {diff[0][1]})" if diff else ""
        raise ValueError(
            f"checkpoint {path} does not fit this model: it was trained with {trained} but this run uses "
            f"transform={self.transform!r}, sparsity={self.sparsity}{where}; resume with the checkpoint's "
            "SparsityCallback settings"
        )

    # ---------------------------------------------------------------- fit: hooks on the hot path
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("SparsityCallback needs a finite run to place `end`: set max_steps or max_epochs")
        self._end_step = int(self.end * total)
        self._entries = []
        for full, owner, local, param in sparse_parameters(pl_module):
            mask = get_mask(owner, local)
            self._entries.append(_Entry(full, param, mask, keep_bits(mask, param.dtype)))
            self._ever_active.setdefault(full, mask.detach().cpu().clone())
        self._broadcast_masks()
        owned = {id(e.param): e for e in self._entries}
        self._by_optimizer = {}
        for opt in trainer.optimizers:
            entries = [owned[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in owned]
            if entries:
                self._by_optimizer[id(opt)] = entries
                self._handles.append(opt.register_step_post_hook(self._after_step))
                self._mask_tensors(opt, entries)
        missing = set(owned) - {id(e.param) for es in self._by_optimizer.values() for e in es}
        if missing:
            raise ValueError(f"{len(missing)} sparse parameters are in no optimizer; pass all of model.parameters() to it")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        entries = self._by_optimizer.get(id(optimizer), ())
        if self.algorithm == "rigl" and is_update_step(self.step + 1, self.update_frequency, self._end_step):
            # the full, synchronised dense gradient: scored now, dropped after the update
            self._pending = {e.name: e.param.grad.abs() for e in entries if e.param.grad is not None}
        for e in entries:
            if e.param.grad is not None:
                zero_masked_(e.param.grad, e.keep)  # NaN-safe, unlike multiplying by the mask

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        entries = self._by_optimizer[id(optimizer)]
        if entries is next(iter(self._by_optimizer.values())):
            self.step += 1
        updated = self.algorithm != "static" and is_update_step(self.step, self.update_frequency, self._end_step)
        if updated:
            self._update(optimizer, entries)
        self._pending = None
        # With masked gradients, these optimizers leave a zero weight with zero state exactly zero
        # (momentum, Adam moments, L2 and decoupled decay all scale zeros), so a plain step needs
        # no re-masking; any other optimizer, and every mask update, re-masks weights and state.
        if updated or not isinstance(optimizer, _ZERO_PRESERVING):
            self._mask_tensors(optimizer, entries)

    @torch.no_grad()
    def _mask_tensors(self, optimizer: torch.optim.Optimizer, entries: list[_Entry]) -> None:
        """Zero masked weights and every optimizer-state tensor shaped like them."""
        for e in entries:
            zero_masked_(e.param, e.keep)
            for value in optimizer.state.get(e.param, {}).values():
                if torch.is_tensor(value) and value.shape == e.param.shape:
                    zero_masked_(value, e.keep)

    @torch.no_grad()
    def _update(self, optimizer: torch.optim.Optimizer, entries: list[_Entry]) -> None:
        fraction = drop_fraction_at(self.step, self.drop_fraction, self._end_step, self.drop_schedule)
        changed = active = 0
        old = []
        for e in entries:
            scores = grow_scores(self.algorithm, e.param, (self._pending or {}).get(e.name), self._generator)
            new, k = drop_and_grow(e.mask, e.param, scores, fraction)
            old.append(e.mask.clone())
            e.mask.copy_(new)
            changed, active = changed + 2 * k, active + int(new.sum())
        self._broadcast_masks()
        for e, before in zip(entries, old):
            grown = e.mask & ~before  # inactive before, active now: start at 0 with empty state
            e.param.masked_fill_(grown, 0.0)
            for value in optimizer.state.get(e.param, {}).values():
                if torch.is_tensor(value) and value.shape == e.param.shape:
                    value.masked_fill_(grown, 0.0)
            e.keep = keep_bits(e.mask, e.param.dtype)
            self._ever_active[e.name] |= e.mask.cpu()
        self._last_update = {"sift/drop_fraction": fraction, "sift/mask_change": changed / max(active, 1)}
        self._log_now = True
        # counted in on_train_batch_end, where the per-sample MACs are known (also on the first
        # step of a run or of a resumed run, before any batch has ended)
        self._dense_grad_due = self.algorithm == "rigl"

    def _broadcast_masks(self) -> None:
        """Rank 0's masks everywhere: equal by construction, broadcast so they cannot drift."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([e.mask.flatten() for e in self._entries]).to(torch.uint8)
        dist.broadcast(flat, src=0)
        offset = 0
        for e in self._entries:
            n = e.mask.numel()
            e.mask.copy_(flat[offset:offset + n].view_as(e.mask).bool())
            offset += n

    # ---------------------------------------------------------------- logging and FLOP accounting
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._fwd is None and self._recorder is None:
            self._recorder = LayerRecorder(pl_module).__enter__()  # measure one real forward pass

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._recorder is not None:  # the forward pass only: attention's backward must not count as forward
            self._recorder.__exit__()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._pending = None  # set when the GradScaler skipped this step's optimizer.step
        per_rank = extract_batch_size(batch)
        samples = per_rank * trainer.world_size
        if self._recorder is not None:
            self._recorder.__exit__()  # a no-op when on_before_backward closed it
            report, self._recorder = self._recorder.report(), None
            self._fwd = (report.dense_macs / per_rank, report.sparse_macs / per_rank)
        self._step_samples = samples * trainer.accumulate_grad_batches
        self.train_flops += 3 * 2 * self._fwd[1] * samples  # forward + backward ~= 3 forward passes
        if self._dense_grad_due:
            # the dense gradient costs one dense weight-gradient pass beyond a sparse step
            self.train_flops += 2 * (self._fwd[0] - self._fwd[1]) * self._step_samples
            self._dense_grad_due = False
        if self._log_now or trainer.global_step % trainer.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = [int(e.mask.sum()) for e in self._entries]
        total = sum(e.mask.numel() for e in self._entries)
        active = sum(counts)
        ever = sum(int(t.sum()) for t in self._ever_active.values())
        metrics = {
            "sift/density": active / max(total, 1),
            "sift/itop_rate": ever / max(total, 1),
            "sift/flops_per_sample_dense": 2 * self._fwd[0],
            "sift/flops_per_sample_sparse": 2 * self._fwd[1],
            "sift/train_flops": self.train_flops,
            **self._last_update,
        }
        if self.log_per_layer:
            for e, n in zip(self._entries, counts):
                metrics[f"sift_density/{e.name}"] = n / e.mask.numel()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._last_update, self._log_now = {}, False

    # ---------------------------------------------------------------- checkpointed state
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # lets Module.load_from_checkpoint rebuild the structure outside a Trainer (SiftCheckpointMixin)
        checkpoint[SIFT_CHECKPOINT_KEY] = {"callback": {name: getattr(self, name) for name in _INIT_ARGS}}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "generator": self._generator.get_state(),
            "ever_active": self._ever_active,
            "train_flops": self.train_flops,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self._generator.set_state(state_dict["generator"])
        self._ever_active = dict(state_dict["ever_active"])
        self.train_flops = state_dict["train_flops"]


# optimizers whose step maps (weight 0, state 0, gradient 0) to exactly (0, 0)
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                    torch.optim.Adamax)

_INIT_ARGS = (
    "sparsity", "transform", "algorithm", "distribution", "init", "update_frequency", "drop_fraction",
    "drop_schedule", "end", "include", "exclude", "keep_ends_dense", "transform_options", "match_flops",
    "sparse_init_scale", "seed", "log_per_layer",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(arg: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        names = ", ".join("None" if v is None else str(v) for v in valid)
        raise ValueError(f"{arg} must be one of {names}; got {value!r}")
