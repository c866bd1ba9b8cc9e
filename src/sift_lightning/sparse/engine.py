"""``DynamicSparsity``: the sparse-training engine, with no trainer attached (DESIGN.md section 4).

In the shape of ``torch.ao.pruning``'s sparsifier: one object that owns the sparse entries, the
random generator, each optimizer's step count and RigL scores, the ever-active masks and the update
schedule. It needs the model and the optimizer(s), nothing else::

    ds = DynamicSparsity(SparsitySettings(sparsity=0.75, transform="sparse_parallel"))
    model = ds.apply(model)                       # structure, per-layer sparsity, masks
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ds.attach(opt, total_steps=10_000)            # hooks the optimizer itself
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()

Where each invariant is kept:

- a step pre-hook (after backward, gradient accumulation, the DDP all-reduce and the GradScaler's
  unscale) reads the dense gradient for RigL on update steps only, then zeroes the masked gradient
  (NaN-safe). An optimizer stepped with a closure (Lightning, LBFGS) runs backward *inside* ``step``:
  the pre-hook then wraps the closure and prepares after it, unless the trainer called
  ``prepare_step`` itself (Lightning's ``on_before_optimizer_step``, before gradient clipping);
- a step post-hook (it never fires on a step the GradScaler skips) counts the optimizer's step,
  drops and grows on update steps, and re-masks weights and every state tensor shaped like them;
- ``state_dict`` holds the generator, the ever-active masks and each optimizer's step; the masks
  themselves are buffers in the model's ``state_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from sift_lightning.sparse.distribution import distribute
from sift_lightning.sparse.masks import (
    LEGACY_MASK_SUFFIX, MASK_SUFFIX, get_mask, init_masks, keep_bits, keep_count, mark_sparse, sparse_modules,
    sparse_parameters, zero_masked_,
)
from sift_lightning.sparse.schedules import drop_fraction_at, is_update_step
from sift_lightning.sparse.settings import SparsitySettings
from sift_lightning.sparse.sharded import (
    all_finite, full_tensor, gather_all, is_sharded, local_tensor, localize, shard_masks, sum_over_ranks, version, write_shard,
)
from sift_lightning.sparse.updaters import drop_and_grow, grow_scores
from sift_lightning.transforms import transform
from sift_lightning.transforms._surgery import candidate_layers, exclude_hint

__all__ = ["DynamicSparsity", "SupportsTransform", "check_checkpoint_fits"]


@runtime_checkable
class SupportsTransform(Protocol):
    """A model whose backbone can be replaced before its optimizer exists.

    ``sparse_wide`` builds a new, wider network, so a wrapper (a LightningModule) must let the engine
    swap it in; ``ImageClassifier`` and ``LanguageModel`` implement this as ``self.backbone = fn(self.backbone)``.
    """

    def transform_backbone(self, fn: Callable[[nn.Module], nn.Module]) -> None: ...


# optimizers whose step maps (weight 0, state 0, gradient 0) to exactly (0, 0): momentum, Adam
# moments, L2 and decoupled decay all scale zeros, so a plain step needs no re-masking
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
                    torch.optim.Adamax)


@dataclass
class _Entry:
    """One sparse parameter. The mask is looked up on its owner each time (``.to()`` replaces buffers)."""

    name: str
    owner: nn.Module
    local: str
    param: nn.Parameter
    grown: torch.Tensor | None = None  # flat indices grown at this layer's last update (their survival is logged)
    _keep: torch.Tensor | None = None
    _keep_of: tuple[int, int] = (0, -1)  # (id, version) of the mask the cached bits were made from

    @property
    def mask(self) -> torch.Tensor:
        return self.owner._buffers[self.local + MASK_SUFFIX]

    @property
    def keep(self) -> torch.Tensor:
        """``keep_bits`` of the mask, rebuilt only when the mask changed (an update, a loaded checkpoint)."""
        mask = self.mask  # under FSDP2: a DTensor, and the bits are those of this rank's shard
        if self._keep_of != (id(mask), version(mask)):
            self._keep, self._keep_of = keep_bits(local_tensor(mask), self.param.dtype), (id(mask), version(mask))
        return self._keep


@dataclass
class _OptimizerState:
    """What the engine keeps per optimizer: its entries, its own step count and its RigL scores."""

    optimizer: torch.optim.Optimizer
    entries: list[_Entry]
    end_step: int
    step: int = 0  # optimizer steps taken (steps the GradScaler skipped excluded)
    prepared: bool = False  # gradients of the coming step already scored and masked
    pending: dict[str, torch.Tensor] | None = None  # RigL's dense-gradient scores, update steps only
    handles: list[Any] = field(default_factory=list)


class DynamicSparsity:
    """Sparse-IFT structure plus static, SET or RigL masks, driven by any training loop.

    Args:
        settings: the run's ``SparsitySettings``; or pass its fields as keyword arguments.
    """

    def __init__(self, settings: SparsitySettings | None = None, **kwargs: Any) -> None:
        if settings is not None and kwargs:
            raise ValueError("pass DynamicSparsity either a SparsitySettings or its fields as keywords, not both")
        self.settings = settings if settings is not None else SparsitySettings(**kwargs)
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.model: nn.Module | None = None
        self.updates = 0  # mask updates so far, over every optimizer, in this process
        self.dense_gradient_steps = 0  # RigL updates, each of which read a dense gradient (FLOP accounting)
        self._ever_active: dict[str, torch.Tensor] = {}
        self._optimizers: list[_OptimizerState] = []
        self._loaded_steps: list[int] | None = None  # from load_state_dict before attach
        self.skipped_updates = 0  # updates skipped because weights or gradients were not finite
        self._last_update: dict[str, float] = {}
        self._last_histograms: dict[str, torch.Tensor] = {}
        self._covered = False

    def __getstate__(self) -> dict[str, Any]:
        # the generator travels as bytes: torch cannot send a Generator to a spawned process (DDP spawn,
        # torch.multiprocessing), whose shared-memory reduction of its state tensor fails
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "generator": generator})

    # ------------------------------------------------------------ structure: before any optimizer
    def apply(self, model: nn.Module, example_input: Any = None) -> nn.Module:
        """Transform ``model``, distribute the sparsity and create the masks; return the model.

        Layers a user already marked sparse (``mark_sparse``, or ``transform`` called beforehand)
        are kept with their own sparsity, and existing masks are kept. A model with a
        ``transform_backbone`` method is changed in place (Sparse Wide swaps its backbone);
        otherwise Sparse Wide returns a new model, so always use the return value.

        Args:
            model: the dense model (or one marked sparse by hand, with ``transform=None``).
            example_input: one input batch for ``match_flops``; defaults to ``model.example_input_array``.
        """
        s = self.settings
        _refuse_torch_pruning(model)
        saved = getattr(model, "sift_settings", None)
        if saved is not None:  # applied already (fit, then test on the same model)
            if SparsitySettings.from_dict(saved).structure() != s.structure():
                raise ValueError("model was made sparse with other settings already; apply the engine to a fresh model")
            self.model = model
            return model
        if any(is_sharded(p) for p in model.parameters()):  # a member rebuilds layers: whole tensors only
            raise ValueError("model is sharded already (fully_shard); apply the sparsity engine first, then shard "
                             "(sift_lightning.parallel.shard_model, or configure_model under Lightning)")
        marked = [name for name, _ in sparse_modules(model)]
        if marked and s.transform is not None:
            raise ValueError(
                f"model already has sparse layers ({marked[0]}, ...); {s.transform} applies to a fresh dense model: "
                "build the model again, or use transform=None to train the layers already marked sparse"
            )
        example = example_input if example_input is not None else getattr(model, "example_input_array", None)
        if s.match_flops and example is None:
            raise ValueError("match_flops=True needs one input batch: pass example_input or set the model's "
                             "example_input_array")
        select = dict(include=s.include, exclude=s.exclude, keep_ends_dense=s.keep_ends_dense)

        def build(m: nn.Module) -> nn.Module:
            if s.transform is None:
                if not marked:
                    for _, layer in candidate_layers(m, **select, who="the sparsity engine"):
                        mark_sparse(layer, s.sparsity)
                return m
            return transform(m, s.transform, s.sparsity, match_flops=s.match_flops, example_input=example,
                             **select, **s.transform_options)

        if isinstance(model, SupportsTransform):
            model.transform_backbone(build)
        else:
            model = build(model)
        if marked:
            _warn_hand_marked(model, s)
        if not marked or s.distribution == "erk":
            self._distribute(model)
        new = [(full, owner, local, p) for full, owner, local, p in sparse_parameters(model)
               if get_mask(owner, local) is None]
        init_masks(model, s.init, self.generator, only_missing=True)
        _warn_unreachable(model, s.sparsity)
        with torch.no_grad():
            if s.sparse_init_scale:
                for _, owner, local, param in new:
                    param.mul_(1.0 / math.sqrt(1.0 - owner.sift_sparsity[local]))
            if s.parametrization == "supar":
                from sift_lightning.sparse.supar import supar_init_

                supar_init_(model)
        # masks agree on every rank by construction and are broadcast on updates: torch's DDP need
        # not re-broadcast them as buffers before every forward
        ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
        model._ddp_params_and_buffers_to_ignore = ignored + [full + MASK_SUFFIX for full, *_ in sparse_parameters(model)]
        model.sift_settings = s.to_dict()  # travels with the model's checkpoint (SiftCheckpointMixin)
        self.model = model
        return model

    def _distribute(self, model: nn.Module) -> None:
        params = list(sparse_parameters(model))
        numel = {full: p.numel() for full, _, _, p in params}
        active = sum((1.0 - o.sift_sparsity[loc]) * numel[full] for full, o, loc, _ in params)
        overall = 1.0 - active / sum(numel.values())
        per_layer = distribute({full: tuple(p.shape) for full, _, _, p in params}, overall, self.settings.distribution)
        for full, owner, local, _ in params:
            owner.sift_sparsity[local] = per_layer[full]

    # ------------------------------------------------------------ optimizers
    def attach(self, optimizer: torch.optim.Optimizer, total_steps: int, *, hooks: bool = True) -> None:
        """Drive ``optimizer``'s sparse parameters: mask them, and hook the optimizer's steps.

        Args:
            optimizer: an optimizer over (some of) the model's parameters; call once per optimizer.
            total_steps: the optimizer steps this optimizer will take in the run; ``end`` is placed
                at ``end * total_steps`` of *its own* steps.
            hooks: register the step pre- and post-hooks (a trainer that calls ``prepare_step`` and
                ``after_step`` itself passes False).
        """
        if self.model is None:
            raise ValueError("call apply(model) before attach(optimizer, total_steps)")
        optimizer = _unwrap(optimizer)
        if isinstance(total_steps, bool) or not isinstance(total_steps, (int, float)) or not math.isfinite(total_steps) \
                or total_steps < 1:
            raise ValueError(f"total_steps must be the run's optimizer steps (a positive integer), got {total_steps!r}; "
                             "set max_steps or max_epochs")
        if any(st.optimizer is optimizer for st in self._optimizers):
            raise ValueError("this optimizer is attached already")
        shard_masks(self.model)  # FSDP2: each mask a DTensor sharded like its parameter (sparse/sharded.py)
        owned = {id(p): _Entry(full, owner, local, p) for full, owner, local, p in sparse_parameters(self.model)}
        seen: set[int] = set()
        entries = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in owned and id(p) not in seen:
                    seen.add(id(p))
                    entries.append(owned[id(p)])
        st = _OptimizerState(optimizer, entries, end_step=int(self.settings.end * int(total_steps)))
        if self._loaded_steps is not None and len(self._optimizers) < len(self._loaded_steps):
            st.step = self._loaded_steps[len(self._optimizers)]
        elif self._loaded_steps is not None and len(self._loaded_steps) == 1:
            st.step = self._loaded_steps[0]  # a checkpoint from before per-optimizer steps
        self._ever_active = localize(self._ever_active, self.model)  # this rank's shards when sharded
        for e in entries:
            self._ever_active.setdefault(e.name, local_tensor(e.mask).detach().cpu().clone())
        self._broadcast(entries)
        if hooks:
            st.handles = [optimizer.register_step_pre_hook(self._pre_hook),
                          optimizer.register_step_post_hook(self._post_hook)]
        self._optimizers.append(st)
        self._covered = False
        self._mask_tensors(st)

    def detach(self) -> None:
        """Remove every optimizer hook; the engine keeps its state (``state_dict`` still works)."""
        for st in self._optimizers:
            for h in st.handles:
                h.remove()
        self._loaded_steps = [st.step for st in self._optimizers] or self._loaded_steps
        self._optimizers = []

    @property
    def holds_dense_gradients(self) -> bool:
        """True only between a RigL update step's ``prepare_step`` and its ``after_step``: no dense
        gradient outlives its step (DESIGN.md: no persistent dense-gradient buffer)."""
        return any(st.pending is not None for st in self._optimizers)

    @property
    def steps(self) -> list[int]:
        """Each attached optimizer's step count, in attach order."""
        return [st.step for st in self._optimizers] or list(self._loaded_steps or [0])

    @property
    def end_steps(self) -> list[int]:
        """Where each attached optimizer's masks stop changing (``end`` of its ``total_steps``), in attach order."""
        return [st.end_step for st in self._optimizers]

    def _state(self, optimizer: torch.optim.Optimizer) -> _OptimizerState:
        for st in self._optimizers:  # every step: the hooks pass the torch optimizer itself
            if st.optimizer is optimizer:
                return st
        inner = _unwrap(optimizer)  # a wrapper handed to prepare_step/after_step by the user
        for st in self._optimizers:
            if st.optimizer is inner:
                return st
        raise ValueError("this optimizer is not attached to the engine; call attach(optimizer, total_steps)")

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        # args are step's own: (optimizer, closure?)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        st = self._state(optimizer)
        if closure is None or st.prepared:
            self.prepare_step(optimizer)
            return None

        def prepared_closure() -> Any:  # backward runs inside step(): score and mask after it
            loss = closure()
            self.prepare_step(optimizer)
            return loss

        if len(args) > 1:
            return (args[0], prepared_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": prepared_closure}

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.after_step(optimizer)

    def prepare_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Score (RigL, update steps only) and mask the gradients of ``optimizer``'s coming step.

        Call after backward and before the step; a second call before the step does nothing.
        """
        st = self._state(optimizer)
        if st.prepared:
            return
        if not self._covered:
            self.check_coverage()
        st.prepared = True
        if self.settings.algorithm == "rigl" and is_update_step(st.step + 1, self.settings.update_frequency, st.end_step):
            # the full, synchronised dense gradient: scored now, dropped after the update
            st.pending = {e.name: e.param.grad.abs() for e in st.entries if e.param.grad is not None}
        for e in st.entries:
            if e.param.grad is not None:
                zero_masked_(local_tensor(e.param.grad), e.keep)  # NaN-safe, unlike multiplying by the mask

    def discard_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Forget a prepared step that never ran (the GradScaler skipped it): its scores and gradients."""
        optimizer = None if optimizer is None else _unwrap(optimizer)
        for st in self._optimizers:
            if optimizer is None or st.optimizer is optimizer:
                st.prepared, st.pending = False, None

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s step, update masks on update steps, and re-mask weights and state."""
        st = self._state(optimizer)
        st.step += 1
        s = self.settings
        updated = s.algorithm != "static" and is_update_step(st.step, s.update_frequency, st.end_step)
        if updated:
            self._update(st)
        st.prepared, st.pending = False, None
        if updated or not isinstance(optimizer, _ZERO_PRESERVING):
            self._mask_tensors(st)

    def check_coverage(self) -> None:
        """Raise when a sparse parameter is in no attached optimizer (its masks would never be kept)."""
        attached = {id(e.param) for st in self._optimizers for e in st.entries}
        missing = [(full, p) for full, *_, p in sparse_parameters(self.model) if id(p) not in attached]
        frozen = [full for full, p in missing if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"{len(frozen)} sparse parameters ({frozen[0]}, ...) are frozen (requires_grad=False) and in no "
                "optimizer: masked, their weights could never recover or move; "
                + exclude_hint(sorted({full.rsplit(".", 1)[0] for full in frozen}))
            )
        missing = [full for full, _ in missing]
        if missing:
            raise ValueError(
                f"{len(missing)} sparse parameters ({missing[0]}, ...) are in no optimizer attached to the engine; "
                "pass all of model.parameters() to your optimizer(s) and attach each one"
            )
        self._covered = True

    @torch.no_grad()
    def _mask_tensors(self, st: _OptimizerState) -> None:
        """Zero masked weights and every optimizer-state tensor shaped like them."""
        for e in st.entries:
            keep = e.keep  # sharded parameters: every tensor below is this rank's shard
            zero_masked_(local_tensor(e.param), keep)
            for value in st.optimizer.state.get(e.param, {}).values():
                if torch.is_tensor(value) and value.shape == e.param.shape:
                    zero_masked_(local_tensor(value), keep)

    @torch.no_grad()
    def _update(self, st: _OptimizerState) -> None:
        s = self.settings
        bad = [e.name for e in st.entries if not all_finite(e.param)
               or (st.pending and e.name in st.pending and not all_finite(st.pending[e.name]))]
        if bad:  # NaN |w| or scores would rank arbitrarily: keep the masks, say so once per run
            self.skipped_updates += 1
            if self.skipped_updates == 1:
                warnings.warn(f"non-finite weights or gradients in {bad[0]} at optimizer step {st.step}: the mask update "
                              "was skipped (lower the learning rate, check the inputs for NaN/inf)", stacklevel=2)
            return
        fraction = drop_fraction_at(st.step, s.drop_fraction, st.end_step, s.drop_schedule)
        before, grow_values = [], []
        for e in st.entries:
            # sharded (FSDP2): the whole layer, gathered on every rank on update steps only, so the
            # choice is one process's; each rank then keeps its slice (the loop below works on slices)
            whole, weight = full_tensor(e.mask), full_tensor(e.param)
            scores = grow_scores(s.algorithm, weight, full_tensor((st.pending or {}).get(e.name)), self.generator)
            new, _ = drop_and_grow(whole, weight, scores, fraction)
            grow_values.append(scores[new & ~whole].float().flatten())  # before write_shard: whole may be the mask
            before.append(local_tensor(e.mask).clone())
            write_shard(e.mask, new)
            del whole, weight, scores
        self._broadcast(st.entries)
        changed = active = survived = last_grown = 0
        for e, old in zip(st.entries, before):
            mask = local_tensor(e.mask)
            if e.grown is not None:  # positions grown at this layer's previous update, still active now
                survived += int(mask.flatten()[e.grown].sum())
                last_grown += e.grown.numel()
            grown = mask & ~old  # inactive before, active now: start at 0 with empty state (regrown keep theirs)
            e.grown = grown.flatten().nonzero().squeeze(1)
            local_tensor(e.param).masked_fill_(grown, 0.0)
            for value in st.optimizer.state.get(e.param, {}).values():
                if torch.is_tensor(value) and value.shape == e.param.shape:
                    local_tensor(value).masked_fill_(grown, 0)
            changed += int((mask ^ old).sum())
            active += int(mask.sum())
            self._ever_active[e.name] |= mask.cpu()
        changed, active, survived, last_grown = sum_over_ranks(  # counted on shards: whole-layer totals
            [changed, active, survived, last_grown], any(is_sharded(e.mask) for e in st.entries))
        self._last_update = {"sift/drop_fraction": fraction, "sift/mask_change": changed / max(active, 1)}
        if last_grown:
            self._last_update["sift/grown_survival"] = survived / last_grown
        self._last_histograms = {
            "sift_hist/active_weights": _sample(torch.cat([local_tensor(e.param)[local_tensor(e.mask)].abs().float().flatten()
                                                           for e in st.entries])),  # sharded: this rank's slices
            "sift_hist/grow_scores": _sample(torch.cat(grow_values)) if grow_values else torch.zeros(0),
        }
        self.updates += 1
        self.dense_gradient_steps += s.algorithm == "rigl"

    def _broadcast(self, entries: list[_Entry]) -> None:
        """Rank 0's masks everywhere: equal by construction, broadcast so they cannot drift."""
        entries = [e for e in entries if not is_sharded(e.mask)]  # a sharded mask has one owner per slice
        if not entries or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([e.mask.flatten() for e in entries]).to(torch.uint8)
        dist.broadcast(flat, src=0)
        offset = 0
        for e in entries:
            n = e.mask.numel()
            e.mask.copy_(flat[offset:offset + n].view_as(e.mask).bool())
            offset += n

    # ------------------------------------------------------------ what a logger shows
    def metrics(self) -> dict[str, float]:
        """Density and ITOP rate (share of the sparse weights ever active) over every sparse layer."""
        stats = self.layer_stats()
        total = max(sum(n for _, _, n in stats.values()), 1)
        return {"sift/density": sum(d * n for d, _, n in stats.values()) / total,
                "sift/itop_rate": sum(i * n for _, i, n in stats.values()) / total}

    def layer_stats(self) -> dict[str, tuple[float, float, int]]:
        """Each sparse parameter's ``(density, ITOP rate, numel)``, in model order."""
        out = {}
        for full, owner, local, p in sparse_parameters(self.model):
            mask = get_mask(owner, local)
            active = int(local_tensor(mask).sum())
            ever = int(self._ever_active[full].sum()) if full in self._ever_active else active
            if is_sharded(mask):  # counted on this rank's slices (every rank logs, so every rank sums)
                active, ever = sum_over_ranks([active, ever], True)
            out[full] = (active / p.numel(), ever / p.numel(), p.numel())
        return out

    def take_update_metrics(self) -> dict[str, float]:
        """The last mask update's drop fraction, mask change (share of active positions that moved) and
        the share of the previous update's grown weights still active (``sift/grown_survival``), once."""
        out, self._last_update = self._last_update, {}
        return out

    def take_update_histograms(self) -> dict[str, torch.Tensor]:
        """The last update's |active weights| and the grow scores of the positions it grew (CPU, sampled), once."""
        out, self._last_histograms = self._last_histograms, {}
        return {k: v.cpu() for k, v in out.items()}

    # ------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "ever_active": gather_all(self._ever_active, self.model),  # sharded: whole, gathered on every rank
            "steps": self.steps,
            "step": self.steps[0],  # the first optimizer's, for readers of older checkpoints
            "settings": self.settings.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the engine; before ``attach`` the step counts wait for the optimizers, in attach order."""
        saved = state.get("settings")  # absent from states written before it was recorded
        other = SparsitySettings.from_dict(saved) if saved is not None else None
        if other is not None and other.structure() != self.settings.structure():
            raise ValueError(f"engine state was saved with transform={other.transform!r}, sparsity={other.sparsity} "
                             f"(and its layer selection) but this engine has transform={self.settings.transform!r}, "
                             f"sparsity={self.settings.sparsity}; build the engine and the model with the saved settings")
        if self.model is not None and state["ever_active"]:  # empty when saved before any attach
            ours = {full for full, *_ in sparse_parameters(self.model)}
            if set(state["ever_active"]) != ours:
                extra = sorted(set(state["ever_active"]) ^ ours)
                raise ValueError(f"engine state belongs to another model: its sparse layers differ from this model's "
                                 f"(first difference: {extra[0]}); load it into the engine of the model it was saved with")
        self.generator.set_state(state["generator"])
        self._ever_active = localize({k: v.clone() for k, v in state["ever_active"].items()}, self.model)
        steps = list(state.get("steps") or [state["step"]])
        if not self._optimizers:
            self._loaded_steps = steps
            return
        if len(steps) not in (1, len(self._optimizers)):
            raise ValueError(f"engine state holds {len(steps)} optimizers' steps but {len(self._optimizers)} are attached")
        for i, st in enumerate(self._optimizers):
            st.step = steps[i] if len(steps) > 1 else steps[0]


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): its ``step`` is the one that runs, so the hooks go on it."""
    seen = set()
    while (isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "LightningOptimizer") and \
            isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))  # a wrapper is itself an optimizer (not, say, an LR scheduler holding one)
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) or not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        raise ValueError(f"attach needs a torch.optim.Optimizer (or a wrapper holding one in .optimizer), got "
                         f"{type(optimizer).__name__}")
    return optimizer


def _sample(values: torch.Tensor, limit: int = 65536) -> torch.Tensor:
    """At most ``limit`` evenly spaced values: enough for a histogram, cheap to log."""
    if values.numel() <= limit:
        return values.detach()
    return values.detach()[:: values.numel() // limit][:limit]


def check_checkpoint_fits(model: nn.Module, state_dict: dict[str, Any], saved: dict[str, Any] | None,
                          settings: SparsitySettings, source: str) -> None:
    """Raise one line when a checkpoint's masks or Sparse-IFT settings do not fit ``model``.

    Args:
        model: the model as this run built it.
        state_dict: the checkpoint's model state dict (keys relative to ``model``).
        saved: the settings the checkpoint was trained with (``SparsitySettings.to_dict``), if recorded.
        settings: this run's settings.
        source: how to name the checkpoint in the message (its path).
    """
    theirs = {}
    for k, v in state_dict.items():
        if k.endswith(MASK_SUFFIX) or (k.endswith(LEGACY_MASK_SUFFIX) and torch.is_tensor(v) and v.dtype == torch.bool):
            theirs[k.removesuffix(MASK_SUFFIX).removesuffix(LEGACY_MASK_SUFFIX)] = tuple(v.shape)
    ours = {full: tuple(p.shape) for full, _, _, p in sparse_parameters(model)}
    # equal mask shapes are not enough: transform=None (or Doped's W_sparse) keeps every shape at any
    # sparsity, so compare the settings that built the structure too
    other = SparsitySettings.from_dict(saved) if saved else None
    if theirs == ours and (other is None or other.structure() == settings.structure()):
        return
    trained = (f"transform={other.transform!r}, sparsity={other.sparsity}" if other
               else "no SparsityCallback" if not theirs else "other settings")
    diff = sorted(set(theirs.items()) ^ set(ours.items()))
    where = f" (first difference: mask of {diff[0][0]} {diff[0][1]})" if diff else ""
    raise ValueError(
        f"checkpoint {source} does not fit this model: it was trained with {trained} but this run uses "
        f"transform={settings.transform!r}, sparsity={settings.sparsity}{where}; resume with the checkpoint's "
        "sparsity settings"
    )


def _refuse_torch_pruning(model: nn.Module) -> None:
    """torch.nn.utils.prune (Lightning's ModelPruning) replaces ``weight`` by ``weight_orig * weight_mask``."""
    for name, module in model.named_modules():
        if any(k.endswith("_orig") for k in module._parameters) and any(
                k.endswith(LEGACY_MASK_SUFFIX) and not k.endswith(MASK_SUFFIX) for k in module._buffers):
            raise ValueError(
                f"{name or 'the model'} is pruned with torch.nn.utils.prune (ModelPruning): it cannot be combined with "
                "Sparse-IFT masks; remove the pruning (prune.remove) or the ModelPruning callback"
            )


def _warn_hand_marked(model: nn.Module, s: SparsitySettings) -> None:
    levels = sorted({round(v, 6) for _, o in sparse_modules(model) for v in o.sift_sparsity.values()})
    if levels != [round(s.sparsity, 6)]:
        warnings.warn(
            f"the model's layers were marked sparse by hand (sparsity {', '.join(map(str, levels))}); they keep "
            f"their own sparsity, and sparsity={s.sparsity} applies to none of them", stacklevel=3
        )


def _warn_unreachable(model: nn.Module, sparsity: float) -> None:
    """Every layer keeps at least one weight: say so when that changes the sparsity a user asked for."""
    short = [(full, p.numel()) for full, owner, local, p in sparse_parameters(model)
             if keep_count(p.numel(), owner.sift_sparsity[local]) > round((1 - owner.sift_sparsity[local]) * p.numel())]
    if not short:
        return
    params = list(sparse_parameters(model))
    total = sum(p.numel() for *_, p in params)
    active = sum(int(get_mask(o, loc).sum()) for _, o, loc, _ in params)
    name, numel = min(short, key=lambda t: t[1])
    warnings.warn(
        f"sparsity {sparsity} leaves less than one weight in {len(short)} layer(s) (e.g. {name}, {numel} weights): "
        f"each keeps one, so the model's sparsity is {1 - active / total:.4f}; choose a lower sparsity", stacklevel=3
    )
