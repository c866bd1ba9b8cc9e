"""SparsityCallback driven by a real Trainer on tiny models: the invariants of DESIGN.md section 2.

Every fit here runs a handful of optimizer steps on a few-thousand-parameter model on the CPU. An
``InvariantChecker`` placed after the SparsityCallback asserts, after every training batch (so
after every optimizer step), that masked weights and optimizer state are exactly zero, that each
layer's active count is unchanged, and that weights grown by an update start at zero.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import sift_lightning.sparse.engine as engine_module
from sift_lightning import SparsityCallback, count_flops, sparse_targets
from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.sparse.masks import MASK_SUFFIX, get_mask, sparse_parameters
from sift_lightning.sparse.schedules import is_update_step

MEMBERS_IN_PLACE = [None, "sparse_parallel", "sparse_factorized", "sparse_doped"]

pytestmark = [
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
]



# ---------------------------------------------------------------- tiny user modules
def _optimizer(params: Any, name: str) -> torch.optim.Optimizer:
    if name == "sgd":  # Nesterov momentum and coupled weight decay: both would revive masked weights
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    if name == "adam":  # L2 decay folded into the gradient
        return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)
    if name == "adamw":  # decoupled weight decay, and amsgrad's extra state tensor
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    if name == "adagrad":  # not zero-preserving: its accumulator starts non-zero, so it is re-masked
        return torch.optim.Adagrad(params, lr=1e-2, initial_accumulator_value=0.1, weight_decay=1e-2)
    return torch.optim.SGD(params, lr=0.1)


class _Base(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.optimizer_name = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if out.ndim == 3:  # language model: (B, T, V) logits
            return F.cross_entropy(out.flatten(0, 1), y.flatten())
        return F.cross_entropy(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _optimizer(self.parameters(), self.optimizer_name)


class MLP(_Base):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer)
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(_Base):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(optimizer)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Wrapped(_Base):
    """A user's module around a third-party backbone, with no transform_backbone."""

    def __init__(self, backbone: nn.Module, optimizer: str = "adamw") -> None:
        super().__init__(optimizer)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class Swappable(Wrapped):
    """The same, implementing SupportsTransform so sparse_wide can swap the backbone."""

    def transform_backbone(self, fn: Any) -> None:
        self.backbone = fn(self.backbone)


def _tiny_resnet() -> nn.Module:
    return timm.create_model("resnet18", channels=(8, 16, 32, 64), num_classes=4)


def _tiny_gpt() -> nn.Module:
    return GPT(gpt_config("gpt_tiny", n_layer=1))


# ---------------------------------------------------------------- data
def _vectors(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def _images(n: int = 32, size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))


def _tokens(n: int = 16, T: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 256, (n, T + 1), generator=g)
    return TensorDataset(seq[:, :-1], seq[:, 1:])


def _data_for(model: nn.Module) -> TensorDataset:
    if isinstance(model, MLP):
        return _vectors()
    if isinstance(model, CNN):
        return _images()
    if isinstance(getattr(model, "backbone", None), GPT):
        return _tokens()
    return _images(16, size=16)


def _loader(ds: TensorDataset, batch_size: int = 8, stateful: bool = False, shuffle: bool = False) -> DataLoader:
    if stateful:
        # torchdata restores a seeded ``shuffle=True`` loader exactly only until the epoch ends (its
        # generator is not advanced as in the uninterrupted run); a sampler that shuffles by
        # (seed, epoch) -- Lightning calls set_epoch -- makes every later epoch match as well.
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=shuffle, seed=0)
        return StatefulDataLoader(ds, batch_size=batch_size, sampler=sampler)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


# ---------------------------------------------------------------- the invariant checker
def _state_like(trainer: pl.Trainer, param: torch.Tensor) -> list[torch.Tensor]:
    """Every optimizer-state tensor of ``param`` shaped like it (momentum, Adam moments, ...)."""
    out = []
    for opt in trainer.optimizers:
        for value in opt.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                out.append(value)
    return out


class InvariantChecker(pl.Callback):
    """Asserts DESIGN.md invariants 1 and 2 after every training batch."""

    def __init__(self, sparsity_cb: SparsityCallback) -> None:
        self.cb = sparsity_cb
        self.updates = 0  # layer-updates that changed a mask
        self.checked = 0
        self.states_seen = 0
        self.masks: list[dict[str, torch.Tensor]] = []  # masks after every batch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prev = {n: get_mask(o, loc).clone() for n, o, loc, _ in sparse_parameters(pl_module)}
        self.active = {n: int(m.sum()) for n, m in self.prev.items()}
        assert self.prev, "the callback made no parameter sparse"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        for name, owner, local, param in sparse_parameters(pl_module):
            mask = get_mask(owner, local)
            dead, prev = ~mask, self.prev[name]
            assert torch.isfinite(param).all(), name
            assert torch.count_nonzero(param[dead]) == 0, f"masked weights of {name} revived"
            states = _state_like(trainer, param)
            self.states_seen += len(states)
            for state in states:
                assert torch.count_nonzero(state[dead]) == 0, f"optimizer state of {name} revived"
            assert int(mask.sum()) == self.active[name], f"active count of {name} changed"
            if not torch.equal(mask, prev):
                grown, dropped = mask & ~prev, prev & ~mask
                assert int(grown.sum()) == int(dropped.sum()) > 0
                assert torch.count_nonzero(param[grown]) == 0, "grown weights must start at 0"
                for state in states:
                    assert torch.count_nonzero(state[grown]) == 0, "grown weights must start with empty state"
                self.updates += 1
            self.prev[name] = mask.clone()
        assert not self.cb.engine.holds_dense_gradients, "a dense gradient outlived its step"
        self.masks.append({n: m.clone() for n, m in self.prev.items()})
        self.checked += 1


def _fit(
    model: pl.LightningModule,
    cb: SparsityCallback,
    data: Any = None,
    *,
    max_steps: int = 12,
    callbacks: tuple[pl.Callback, ...] = (),
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, InvariantChecker]:
    checker = InvariantChecker(cb)
    kwargs: dict[str, Any] = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[cb, checker, *callbacks], **kwargs
    )
    if data is None:
        data = _loader(_data_for(model))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, checker


# ---------------------------------------------------------------- invariants 1 and 2
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adagrad"])
@pytest.mark.parametrize("algorithm", ["static", "set", "rigl"])
def test_masked_weights_and_state_stay_zero(algorithm, optimizer):
    torch.manual_seed(0)
    model = MLP(optimizer)
    cb = SparsityCallback(0.75, algorithm=algorithm, update_frequency=2, drop_fraction=0.5, end=1.0)
    trainer, checker = _fit(model, cb, max_steps=12)
    assert cb.step == trainer.global_step == 12
    assert checker.checked == 12 and checker.states_seen > 0
    if algorithm == "static":
        assert checker.updates == 0
    else:
        assert checker.updates >= 2 * 5  # 2 sparse layers, updates at steps 2..10 (12: fraction 0)
    assert set(sparse_targets(model)) == {"net.2.weight", "net.4.weight"}  # first and last stay dense


def test_cnn_erk_magnitude_init_and_scaled_init():
    torch.manual_seed(0)
    model = CNN("sgd")
    cb = SparsityCallback(
        0.8, algorithm="rigl", distribution="erk", init="magnitude", sparse_init_scale=True,
        update_frequency=2, drop_fraction=0.5,
    )
    _, checker = _fit(model, cb, max_steps=8)
    assert checker.updates > 0
    params = {n: p for n, _, _, p in sparse_parameters(model)}
    targets = sparse_targets(model)
    assert set(targets) == {"net.3.weight", "net.6.weight"}
    assert targets["net.3.weight"] != targets["net.6.weight"]  # ERK: per-layer sparsities differ
    total = sum(p.numel() for p in params.values())
    active = sum(int(get_mask(o, loc).sum()) for _, o, loc, _ in sparse_parameters(model))
    assert abs(active - 0.2 * total) <= len(params) / 2  # global budget up to per-layer rounding


def test_erk_on_mlp_meets_global_density():
    model = MLP()
    cb = SparsityCallback(0.75, algorithm="static", distribution="erk")
    _fit(model, cb, max_steps=1)
    masks = [get_mask(o, loc) for _, o, loc, _ in sparse_parameters(model)]
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == pytest.approx(0.25 * total, abs=len(masks) / 2)
    assert len(set(sparse_targets(model).values())) == 2


# ---------------------------------------------------------------- RigL sees the full dense gradient
def test_rigl_scores_are_the_accumulated_dense_gradient(monkeypatch):
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = engine_module.grow_scores

    def spy(algorithm, weight, dense_grad, generator):
        seen.append((cb.step, weight, dense_grad.clone()))
        return original(algorithm, weight, dense_grad, generator)

    monkeypatch.setattr(engine_module, "grow_scores", spy)
    torch.manual_seed(0)
    model = MLP("plain")
    cb = SparsityCallback(0.75, algorithm="rigl", update_frequency=1, end=1.0)

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    snap = Snapshot()
    ds = _vectors(32)
    _fit(model, cb, _loader(ds, batch_size=8), max_steps=2, callbacks=(snap,), accumulate_grad_batches=2)

    # the first update (after optimizer step 1) scores with the gradient of micro-batches 0 and 1
    reference = MLP("plain")
    reference.load_state_dict(snap.state, strict=False)  # masks are buffers of the sparse run only
    x, y = ds.tensors
    for lo in (0, 8):  # Lightning divides each micro-batch loss by accumulate_grad_batches
        (F.cross_entropy(reference(x[lo:lo + 8]), y[lo:lo + 8]) / 2).backward()
    first = [g for step, _, g in seen if step == 1]
    assert len(first) == 2
    for got, layer in zip(first, (reference.net[2], reference.net[4])):
        torch.testing.assert_close(got, layer.weight.grad.abs(), rtol=1e-6, atol=0)
    # ... and not only the last micro-batch's
    last = MLP("plain")
    last.load_state_dict(snap.state, strict=False)
    (F.cross_entropy(last(x[8:16]), y[8:16]) / 2).backward()
    assert not torch.allclose(first[0], last.net[2].weight.grad.abs())
    # scores include masked-out positions: the gradient is dense
    assert torch.count_nonzero(first[0]) > int(get_mask(model.net[2], "weight").sum())


def test_no_persistent_dense_gradient_buffer():
    model = MLP("adamw")
    cb = SparsityCallback(0.75, algorithm="rigl", update_frequency=2)
    _fit(model, cb, max_steps=6)
    assert not cb.engine.holds_dense_gradients
    for _, owner, local, param in sparse_parameters(model):
        same_shape = [n for n, b in owner.named_buffers(recurse=False) if b.shape == param.shape]
        assert same_shape == [local + MASK_SUFFIX]
    tensors = [v for obj in (cb, cb.engine, cb.flops) for v in vars(obj).values() if torch.is_tensor(v)]
    assert tensors == []


# ---------------------------------------------------------------- AMP and non-finite gradients
def test_bf16_mixed_trains():
    torch.manual_seed(0)
    model = CNN("sgd")
    cb = SparsityCallback(0.5, algorithm="rigl", update_frequency=2)
    trainer, checker = _fit(model, cb, max_steps=6, precision="bf16-mixed")
    assert cb.step == 6 and checker.updates > 0


class _InfAt(pl.Callback):
    """Puts an inf into one active gradient entry on the batch of optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step + 1 == self.at:
            mask = get_mask(pl_module.net[2], "weight")
            pl_module.net[2].weight.grad[mask.nonzero()[0].tolist()] = float("inf")


def test_fp16_skipped_step_keeps_masks_and_step():
    """16-mixed with a real GradScaler on the CPU: an overflowing step is skipped and changes nothing."""
    torch.manual_seed(0)
    model = MLP("sgd")
    cb = SparsityCallback(0.75, algorithm="rigl", update_frequency=4, drop_fraction=0.5, end=1.0)
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer, checker = _fit(model, cb, max_steps=10, plugins=[precision], callbacks=(_InfAt(4),))
    # step 4 (an update step) overflowed: the scaler skipped it, so only 9 sparse steps happened
    assert trainer.global_step == 10 and cb.step == 9
    assert precision.scaler.get_scale() < 2.0**16
    changed = [i + 1 for i in range(1, len(checker.masks))
               if any(not torch.equal(checker.masks[i][n], checker.masks[i - 1][n]) for n in checker.masks[i])]
    # masks were not updated on the skipped batch 4 but on batch 5 (sparse step 4) and 9 (step 8)
    assert changed == [5, 9]
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(weights).all()


def test_skipped_step_simulated_without_scaler():
    """The same invariant without AMP: a precision plugin that skips ``optimizer.step``."""

    class SkipStep(Precision):
        def optimizer_step(self, optimizer, model, closure, **kwargs):
            result = closure()
            self._after_closure(model, optimizer)  # on_before_optimizer_step runs, as with a GradScaler
            if model.trainer.global_step + 1 == 2:
                return result
            return optimizer.step(**kwargs)

    model = MLP("sgd")
    cb = SparsityCallback(0.75, algorithm="rigl", update_frequency=2, drop_fraction=0.5, end=1.0)
    trainer, checker = _fit(model, cb, max_steps=4, plugins=[SkipStep()])
    assert cb.step == 3
    for name in checker.masks[0]:
        assert torch.equal(checker.masks[0][name], checker.masks[1][name])  # skipped update step
        assert not torch.equal(checker.masks[1][name], checker.masks[2][name])  # done one batch later


class _NanInMasked(pl.Callback):
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for _, owner, local, param in sparse_parameters(pl_module):
            param.grad[~get_mask(owner, local)] = float("nan")


@pytest.mark.parametrize("algorithm", ["static", "set"])
def test_nan_gradient_in_masked_positions_never_reaches_weights(algorithm):
    model = MLP("adamw")
    cb = SparsityCallback(0.75, algorithm=algorithm, update_frequency=2)
    # gradient clipping takes the norm over the whole gradient: one NaN left in a masked position
    # (NaN * 0 is NaN) would turn every weight NaN
    _fit(model, cb, max_steps=6, callbacks=(_NanInMasked(),), gradient_clip_val=0.5)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the checker also checks every step


# ---------------------------------------------------------------- checkpoint and resume
def _params_and_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
@pytest.mark.parametrize("algorithm", ["rigl", "set"])
def test_resume_continues_exactly(tmp_path, algorithm, where):
    """A run resumed from step 5 (mid-epoch) or from the end of epoch 0 ends bitwise equal to the full run.

    With Lightning 2.6.6 and torchdata 0.11, a stateful loader resumed from an end-of-epoch
    checkpoint first replays the finished epoch as an empty one, and epoch 1 then runs on the
    sampler's ``set_epoch(2)`` order; the epoch-end case therefore reads the data unshuffled (the
    test is about the callback, not the loader).
    """
    shuffle = where == "mid_epoch"

    def run(ckpt_path: str | None = None, save: bool = False) -> tuple[nn.Module, SparsityCallback, pl.Trainer]:
        torch.manual_seed(0)
        model = MLP("sgd")
        cb = SparsityCallback(0.75, algorithm=algorithm, update_frequency=3, drop_fraction=0.5, end=1.0, seed=7)
        saves = (
            ModelCheckpoint(tmp_path, "mid-{step}", every_n_train_steps=5, save_top_k=-1),
            ModelCheckpoint(tmp_path, "epoch-{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True),
        ) if save else ()
        # 64 samples / 8 per batch: 8 steps per epoch, 20 steps = 2.5 epochs
        loader = _loader(_vectors(), stateful=True, shuffle=shuffle)
        trainer, _ = _fit(model, cb, loader, max_steps=20, callbacks=saves, ckpt_path=ckpt_path,
                          enable_checkpointing=save)
        return model, cb, trainer

    full_model, full_cb, _ = run(save=True)
    assert full_cb.step == 20
    ckpt = tmp_path / ("mid-step=5.ckpt" if where == "mid_epoch" else "epoch-epoch=0.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert sum(k.endswith(MASK_SUFFIX) for k in saved["state_dict"]) == 2
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("SparsityCallback")]
    assert state["step"] == saved["global_step"] == (5 if where == "mid_epoch" else 8)

    model, cb, trainer = run(str(ckpt))
    assert cb.step == full_cb.step == trainer.global_step == 20
    assert torch.equal(cb.engine.generator.get_state(), full_cb.engine.generator.get_state())
    assert cb.train_flops == full_cb.train_flops
    _assert_same(_params_and_masks(model), _params_and_masks(full_model))
    ever, full_ever = cb.engine.state_dict()["ever_active"], full_cb.engine.state_dict()["ever_active"]
    assert set(ever) == set(full_ever)
    for name in full_ever:
        assert torch.equal(ever[name], full_ever[name])


def test_resume_restores_masks_and_schedule(tmp_path):
    model = MLP("sgd")
    cb = SparsityCallback(0.75, algorithm="set", update_frequency=2, drop_fraction=0.5, end=1.0, seed=3)
    trainer, _ = _fit(model, cb, max_steps=6)
    path = tmp_path / "six.ckpt"
    trainer.save_checkpoint(path)
    masks = {n: get_mask(o, loc).clone() for n, o, loc, _ in sparse_parameters(model)}

    resumed = MLP("sgd")
    cb2 = SparsityCallback(0.75, algorithm="set", update_frequency=2, drop_fraction=0.5, end=1.0, seed=3)

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.step = cb2.step
            self.masks = {n: get_mask(o, loc).clone() for n, o, loc, _ in sparse_parameters(pl_module)}
            self.generator = cb2.engine.generator.get_state()

    probe = Probe()
    _fit(resumed, cb2, max_steps=8, callbacks=(probe,), ckpt_path=str(path))
    assert probe.step == 6
    assert torch.equal(probe.generator, cb.engine.generator.get_state())
    _assert_same(probe.masks, masks)


def _dense_checkpoint(tmp_path: Path) -> Path:
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(MLP(), _loader(_vectors()))
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    return tmp_path / "dense.ckpt"


def _sparse_checkpoint(tmp_path: Path, **kwargs: Any) -> Path:
    trainer, _ = _fit(MLP(), SparsityCallback(algorithm="static", **kwargs), max_steps=1)
    path = tmp_path / f"{kwargs['transform']}-{kwargs['sparsity']}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    "saved, run, names",
    [
        (dict(transform=None, sparsity=0.5), dict(transform=None, sparsity=0.75), ("0.5", "0.75")),
        (dict(transform="sparse_parallel", sparsity=0.5), dict(transform="sparse_parallel", sparsity=0.75),
         ("0.5", "0.75")),
        (dict(transform="sparse_doped", sparsity=0.5), dict(transform="sparse_doped", sparsity=0.75),
         ("0.5", "0.75")),
        (dict(transform="sparse_parallel", sparsity=0.5), dict(transform="sparse_factorized", sparsity=0.5),
         ("sparse_parallel", "sparse_factorized")),
        (dict(transform=None, sparsity=0.5), dict(transform="sparse_doped", sparsity=0.5), ("None", "sparse_doped")),
        ("dense", dict(transform=None, sparsity=0.5), ("no SparsityCallback", "transform=None")),
    ],
)
def test_resume_with_other_settings_fails(tmp_path, saved, run, names):
    path = _dense_checkpoint(tmp_path) if saved == "dense" else _sparse_checkpoint(tmp_path, **saved)
    pattern = "^checkpoint .*" + ".*".join(names)
    with pytest.raises(ValueError, match=pattern):
        _fit(MLP(), SparsityCallback(algorithm="static", **run), max_steps=2, ckpt_path=str(path))


# ---------------------------------------------------------------- any module, every member
@pytest.mark.parametrize("member", MEMBERS_IN_PLACE)
@pytest.mark.parametrize("make", [CNN, MLP, lambda: Wrapped(_tiny_gpt())], ids=["cnn", "mlp", "gpt"])
def test_members_on_user_modules(make, member):
    torch.manual_seed(0)
    model = make()
    cb = SparsityCallback(0.5, transform=member, algorithm="rigl", update_frequency=2, drop_fraction=0.5)
    before = sum(p.numel() for p in model.parameters())
    _, checker = _fit(model, cb, _loader(_data_for(model), batch_size=4), max_steps=6)
    assert checker.updates > 0
    if member in ("sparse_parallel", "sparse_factorized"):
        assert sum(p.numel() for p in model.parameters()) > before
    assert all(abs(s - 0.5) < 0.01 for s in sparse_targets(model).values())


@pytest.mark.parametrize("member", [*MEMBERS_IN_PLACE, "sparse_wide"])
def test_timm_resnet(member):
    torch.manual_seed(0)
    model = Swappable(_tiny_resnet(), optimizer="sgd")
    cb = SparsityCallback(0.5, transform=member, algorithm="rigl", update_frequency=2, drop_fraction=0.5)
    _, checker = _fit(model, cb, _loader(_images(8, size=16), batch_size=4), max_steps=4)
    assert checker.updates > 0
    assert "backbone.conv1.weight" not in sparse_targets(model)  # the stem stays dense
    assert "backbone.fc.weight" not in sparse_targets(model)  # so does the classifier


def test_sparse_wide_gpt_with_transform_backbone():
    torch.manual_seed(0)
    model = Swappable(_tiny_gpt())
    d_model = model.backbone.config.d_model
    cb = SparsityCallback(0.75, transform="sparse_wide", algorithm="set", update_frequency=2)
    _, checker = _fit(model, cb, _loader(_tokens(), batch_size=4), max_steps=4)
    assert model.backbone.config.d_model == 2 * d_model and checker.updates > 0


@pytest.mark.parametrize("make", [CNN, lambda: Wrapped(_tiny_gpt()), lambda: Wrapped(_tiny_resnet())],
                         ids=["cnn", "gpt", "resnet"])
def test_sparse_wide_needs_transform_backbone(make):
    with pytest.raises(ValueError, match="transform_backbone"):
        _fit(make(), SparsityCallback(0.5, transform="sparse_wide"), max_steps=1)


# ---------------------------------------------------------------- what the callback reports
@pytest.mark.parametrize("transform, distribution", [(None, "uniform"), (None, "erk"), ("sparse_parallel", "erk")])
def test_sparse_targets_and_flops_follow_the_masks(transform, distribution):
    model = CNN()
    cb = SparsityCallback(0.75, transform=transform, distribution=distribution, algorithm="static")
    _fit(model, cb, max_steps=1)
    targets = sparse_targets(model)
    owned = {n: get_mask(o, loc) for n, o, loc, _ in sparse_parameters(model)}
    assert set(targets) == set(owned) == set(cb.engine.state_dict()["ever_active"])
    for name, mask in owned.items():
        assert targets[name] == 1.0 - int(mask.sum()) / mask.numel()
    if transform is None:
        assert set(targets) == {"net.3.weight", "net.6.weight"}  # stem net.0 and head net.11 absent
    if distribution == "erk":
        assert len(set(targets.values())) > 1
    report = count_flops(model, torch.zeros(1, 3, 8, 8))
    densities = {name.removesuffix(".weight"): 1.0 - s for name, s in targets.items()}
    sparse_rows = [r for r in report.layers if r.name in densities]
    assert len(sparse_rows) == len(densities)
    for row in sparse_rows:
        assert row.density == pytest.approx(densities[row.name], rel=1e-12)
    assert all(r.density == 1.0 for r in report.layers if r.name not in densities)
    assert report.sparse_macs == pytest.approx(sum(r.dense_macs * r.density for r in report.layers) + report.other_macs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=0.0), r"sparsity must be a number in \(0, 1\)"),
        (dict(sparsity=1.0), r"sparsity must be a number in \(0, 1\)"),
        (dict(sparsity=True), r"sparsity must be a number in \(0, 1\)"),
        (dict(sparsity="0.5"), r"sparsity must be a number in \(0, 1\)"),
        (dict(transform="dense"), r"transform must be one of None .*sparse_wide, sparse_parallel, sparse_factorized, sparse_doped"),
        (dict(transform="wide"), "transform must be one of None, sparse_wide, sparse_parallel"),
        (dict(algorithm="prune"), "algorithm must be one of static, set, rigl"),
        (dict(distribution="er"), "distribution must be one of uniform, erk"),
        (dict(init="zeros"), "init must be one of random, magnitude"),
        (dict(drop_schedule="linear"), "drop_schedule must be one of constant, cosine, exponential"),
        (dict(update_frequency=0), "update_frequency must be a positive integer"),
        (dict(update_frequency=2.5), "update_frequency must be a positive integer"),
        (dict(update_frequency=True), "update_frequency must be a positive integer"),
        (dict(drop_fraction=0.0), r"drop_fraction must be in \(0, 1\]"),
        (dict(drop_fraction=1.5), r"drop_fraction must be in \(0, 1\]"),
        (dict(drop_fraction="0.3"), r"drop_fraction must be in \(0, 1\]"),
        (dict(end=0.0), r"end must be .* in \(0, 1\]"),
        (dict(end=1.2), r"end must be .* in \(0, 1\]"),
        (dict(end=None), r"end must be .* in \(0, 1\]"),
    ],
)
def test_invalid_arguments_name_valid_values(kwargs, match):
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        SparsityCallback(**kwargs)


def test_infinite_run_is_refused():
    with pytest.raises(ValueError, match="max_steps or max_epochs"):
        _fit(MLP(), SparsityCallback(0.5), max_steps=-1, max_epochs=-1)


# ---------------------------------------------------------------- logging
def _read_metrics(trainer: pl.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.parametrize("algorithm", ["static", "set", "rigl"])
def test_logged_metrics(tmp_path, algorithm):
    torch.manual_seed(0)
    model = MLP("sgd")
    cb = SparsityCallback(0.75, algorithm=algorithm, update_frequency=3, drop_fraction=0.5, end=0.75)
    trainer, checker = _fit(model, cb, max_steps=12, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    rows = _read_metrics(trainer)
    keys = ["sift/density", "sift/itop_rate", "sift/flops_per_sample_dense", "sift/flops_per_sample_sparse",
            "sift/train_flops"]
    for key in keys:
        assert set(_column(rows, key)) == set(range(1, 13)), key
    assert not any(k.startswith("sift_density/") for k in rows[0])  # per-layer: images at updates, not flat tags
    assert all(d == 0.25 for d in _column(rows, "sift/density").values())

    itop = _column(rows, "sift/itop_rate")
    flops = _column(rows, "sift/train_flops")
    assert all(flops[s] > flops[s - 1] for s in range(2, 13))
    dense, sparse = _column(rows, "sift/flops_per_sample_dense")[1], _column(rows, "sift/flops_per_sample_sparse")[1]
    # 8x32 + 16x4 dense, 32x32 + 32x16 at density 0.25 (MACs x 2)
    assert dense == 2 * (8 * 32 + 32 * 32 + 32 * 16 + 16 * 4)
    assert sparse == 2 * (8 * 32 + 0.25 * (32 * 32 + 32 * 16) + 16 * 4)

    # every step costs 3 sparse forward passes; a RigL update adds one dense weight-gradient pass
    updates = {3, 6, 9}
    for step in range(2, 13):
        extra = (dense - sparse) * 8 if algorithm == "rigl" and step in updates else 0.0
        assert flops[step] - flops[step - 1] == pytest.approx(3 * sparse * 8 + extra, rel=1e-12)
    assert flops[1] == pytest.approx(3 * sparse * 8, rel=1e-12)

    change, fraction = _column(rows, "sift/mask_change"), _column(rows, "sift/drop_fraction")
    if algorithm == "static":
        assert change == {} and fraction == {}
        assert all(v == 0.25 for v in itop.values())
        return
    assert set(change) == set(fraction) == {s for s in range(1, 13) if is_update_step(s, 3, 9)} == updates
    assert fraction[3] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 3)))
    # the share of active positions that really moved (a dropped weight RigL regrows at once does not count)
    for step in updates:
        before, after = checker.masks[step - 2], checker.masks[step - 1]
        moved = sum(int((after[n] ^ before[n]).sum()) for n in after)
        assert change[step] == moved / sum(int(m.sum()) for m in after.values())
    assert 0 < change[3] <= 2 * fraction[3] + 0.01 and change[9] == 0.0  # cosine is 0 at end
    assert itop[1] == 0.25 and itop[3] > itop[2] and itop[6] > itop[5] and itop[12] == itop[9]
    assert all(itop[s] >= itop[s - 1] for s in range(2, 13))
