"""SparsityCallback under Lightning's manual optimization (a GAN: two optimizers, stepped by hand).

Under manual optimization ``max_steps`` counts every optimizer's steps, so Lightning's
``estimated_stepping_batches`` is not one optimizer's run: the callback places ``end`` on one step
per optimizer per batch, checks that assumption, and takes ``optimizer_steps`` when it does not hold.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import SparsityCallback
from sift_lightning.sparse.masks import get_mask, sparse_parameters

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


class GAN(pl.LightningModule):
    """A generator and a critic; the generator steps every ``gen_every`` batches."""

    def __init__(self, gen_every: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen_every = gen_every
        self.g = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        self.d = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x = batch[0]
        z = torch.randn_like(x)
        loss_d = F.softplus(-self.d(x)).mean() + F.softplus(self.d(self.g(z).detach())).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        if batch_idx % self.gen_every == 0:
            loss_g = F.softplus(-self.d(self.g(z))).mean()
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.g.parameters(), 1e-2), torch.optim.SGD(self.d.parameters(), 0.05, momentum=0.9)


class _MaskedStayZero(pl.Callback):
    """After every batch: each masked weight is exactly 0 and each layer keeps its active count."""

    def __init__(self, cb: SparsityCallback) -> None:
        self.cb = cb
        self.counts: dict[str, int] = {}
        self.batches = 0
        self.end_steps: list[int] = []  # where each attached optimizer's `end` was placed

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.batches += 1
        self.end_steps = self.cb.engine.end_steps
        for full, owner, local, p in sparse_parameters(pl_module):
            mask = get_mask(owner, local)
            assert not p[~mask].any(), f"{full}: a masked weight is non-zero after batch {self.batches}"
            assert self.counts.setdefault(full, int(mask.sum())) == int(mask.sum()), f"{full}: active count changed"


def _fit(module: GAN, cb: SparsityCallback, **trainer_kwargs: Any) -> tuple[pl.Trainer, _MaskedStayZero]:
    torch.manual_seed(0)
    checker = _MaskedStayZero(cb)
    trainer = pl.Trainer(callbacks=[cb, checker], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         **trainer_kwargs)
    data = DataLoader(TensorDataset(torch.randn(160, 8)), batch_size=8)  # 20 batches an epoch
    trainer.fit(module, data)
    return trainer, checker


def _rigl(**kwargs: Any) -> SparsityCallback:
    return SparsityCallback(0.75, algorithm="rigl", update_frequency=4, end=0.75, **kwargs)


def test_max_steps_counts_every_optimizer():
    # max_steps=40 with two optimizers stepped per batch is 20 batches: each optimizer runs 20 steps,
    # so end=0.75 is its step 15 (Lightning's estimate, 40, would put it at 30: never reached)
    cb = _rigl()
    trainer, checker = _fit(GAN(), cb, max_steps=40)
    assert trainer.global_step == 40 and checker.batches == 20
    assert cb.engine.steps == [20, 20]
    assert checker.end_steps == [15, 15]
    assert cb.engine.updates == 2 * 3  # steps 4, 8, 12 of each optimizer (16 is past end)


def test_max_epochs_places_end_on_batches():
    cb = _rigl()
    trainer, checker = _fit(GAN(), cb, max_epochs=2)
    assert checker.batches == 40 and cb.engine.steps == [40, 40]
    assert checker.end_steps == [30, 30]


def test_an_optimizer_off_the_batch_rate_is_refused_with_what_to_pass():
    with pytest.raises(ValueError, match=r"optimizer 0 took 2 steps in 10 batches.*optimizer_steps=\["):
        _fit(GAN(gen_every=5), _rigl(), max_epochs=1)


def test_optimizer_steps_given_places_end_per_optimizer():
    cb = _rigl(optimizer_steps=[4, 20])
    trainer, checker = _fit(GAN(gen_every=5), cb, max_epochs=1)
    assert cb.engine.steps == [4, 20]
    assert checker.end_steps == [3, 15]
    assert cb.engine.updates == 3  # the critic's steps 4, 8, 12; the generator's end comes before step 4


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, [], [10, "x"], "20"])
def test_optimizer_steps_checked(bad):
    with pytest.raises(ValueError, match="optimizer_steps must be a positive int"):
        SparsityCallback(0.5, optimizer_steps=bad)


def test_optimizer_steps_must_match_the_optimizers():
    with pytest.raises(ValueError, match="optimizer_steps has 3 entries but the module has 2 optimizers"):
        _fit(GAN(), _rigl(optimizer_steps=[5, 5, 5]), max_steps=10)


def test_no_flops_are_invented_for_a_manual_step():
    # a manual training_step runs its own forward and backward passes: nothing to count them by
    cb = _rigl()
    _fit(GAN(), cb, max_steps=16)
    assert cb.flops.per_sample is None and cb.flops.total == 0.0
    assert not any(k.startswith("sift/flops") or k == "sift/train_flops" for k in cb.flops.metrics())
