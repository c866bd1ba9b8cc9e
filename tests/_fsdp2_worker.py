"""One training run of a tiny Sparse Wide GPT with RigL, for tests/test_fsdp2.py.

``python tests/_fsdp2_worker.py MODES OUT`` with MODES ``single`` (one process), or under
``torchrun --nproc_per_node 2`` with MODES ``ddp`` (torch DDP), ``fsdp2`` (``shard_model``) and/or
``lightning`` (below), comma-separated, in one launch.
Every mode sees the same global batches (each of two ranks takes half of each). After every step
each rank checks its own shards: masked weights and every optimizer-state tensor exactly 0, the
active count per layer unchanged. Rank 0 writes the whole masks and weights at the end to OUT/MODE.pt.

MODE ``lightning`` (2 processes) trains ``LanguageModel`` with ``SparsityCallback`` under Lightning's
``ModelParallelStrategy``: 8 steps straight (``lightning.pt``), and 4 steps, a distributed
checkpoint (OUT/sharded.ckpt/), then a resume to 8 (``resumed``; the state at 4: ``at4``); and the
same through one gathered checkpoint file (OUT/whole.ckpt, ``from_file``); all in OUT/lightning.pt.
``lightning_run`` is the same run in one process, for the test to compare against.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import (
    GPT, DynamicSparsity, GPTConfig, LanguageModel, OptimConfig, SparsityCallback, SparsitySettings,
)
from sift_lightning.parallel import FSDP2Strategy, shard_model
from sift_lightning.sparse.masks import get_mask, sparse_parameters
from sift_lightning.sparse.sharded import full_tensor, is_sharded, local_tensor, mask_bytes

SETTINGS = dict(sparsity=0.75, transform="sparse_wide", algorithm="rigl", update_frequency=2, drop_fraction=0.5,
                end=1.0, seed=3)
STEPS, BATCH, T = 8, 8, 16
WORLD = 1  # processes of the Lightning run being built


def _violations(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """This rank's masked weights or state entries that are not exactly 0."""
    bad = []
    for name, owner, local, param in sparse_parameters(model):
        off = ~local_tensor(get_mask(owner, local))
        for what, t in [("weight", param), *opt.state.get(param, {}).items()]:
            if torch.is_tensor(t) and t.shape == param.shape and bool((local_tensor(t)[off] != 0).any()):
                bad.append(f"{name}.{what}")
    return bad


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed = mode in ("ddp", "fsdp2")
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    ds = DynamicSparsity(SparsitySettings(**SETTINGS))
    model = ds.apply(GPT(GPTConfig(vocab_size=64, block_size=T, n_layer=2, n_head=2, d_model=16)))
    counts = {name: int(get_mask(o, loc).sum()) for name, o, loc, _ in sparse_parameters(model)}
    net = model
    if mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        shard_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    ds.attach(opt, total_steps=STEPS)
    tokens = torch.randint(0, 64, (STEPS * BATCH, T + 1), generator=torch.Generator().manual_seed(1))
    violations, changes = [], 0
    for batch in tokens.split(BATCH):
        x = batch.chunk(world)[rank]  # this rank's half of the global batch
        logits = net(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        violations += _violations(model, opt)
        now = {name: int(local_tensor(get_mask(o, loc)).sum()) for name, o, loc, _ in sparse_parameters(model)}
        if mode == "fsdp2":  # per-layer counts over the shards
            flat = torch.tensor(list(now.values()))
            dist.all_reduce(flat)
            now = dict(zip(now, flat.tolist()))
        assert now == counts, f"active counts changed: {now} != {counts}"
        changes += ds.take_update_metrics().get("sift/mask_change", 0.0) > 0
    here, whole = mask_bytes(model)
    state = {k: full_tensor(v).detach().clone() for k, v in model.state_dict().items()}  # collective when sharded
    report = {"violations": violations, "mask_bytes": here, "mask_bytes_whole": whole, "updates": ds.updates,
              "changes": changes, "steps": ds.steps, "sharded_masks": [type(get_mask(o, loc)).__name__
                                                                       for _, o, loc, _ in sparse_parameters(model)]}
    reports = [None] * world
    if distributed:
        dist.all_gather_object(reports, report)
    else:
        reports = [report]
    if rank == 0:
        torch.save({"state": state, "reports": reports}, os.path.join(out, f"{mode}.pt"))


# ---------------------------------------------------------------- the same under Lightning
LM_SETTINGS = dict(SETTINGS, drop_schedule="constant")  # the 4-step part of a resumed run places `end` alike


def lightning_data() -> DataLoader:
    """4 global batches of 8 (an epoch); of 2 processes, rank r takes rows r, r+2, ... of each.

    Lightning's own distributed sampler would shuffle the training set (it does so for any train
    loader), so the run sets ``use_distributed_sampler=False`` and each rank slices its rows here.
    """
    tokens = torch.randint(0, 64, (4 * BATCH, T + 1), generator=torch.Generator().manual_seed(1))
    tokens = tokens[int(os.environ.get("RANK", 0)) % WORLD::WORLD]
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=BATCH // WORLD)


def lightning_run(epochs: int, devices: int, ckpt_path: str | None = None, save: str | None = None,
                  checks: list | None = None, ours: bool = False, logs: str | None = None,
                  one_file: bool = False) -> LanguageModel:
    """Fit a tiny Sparse Wide GPT for ``epochs`` epochs of 4 steps; 2 devices: FSDP2 with Lightning's
    ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, or ``ours``: ``FSDP2Strategy()``
    (``one_file``: checkpoints gathered into one file on rank 0 instead of a folder of shards)."""
    global WORLD
    WORLD = devices
    torch.manual_seed(0)
    model = LanguageModel(GPTConfig(vocab_size=64, block_size=T, n_layer=2, n_head=2, d_model=16),
                          optim=OptimConfig(name="sgd", lr=0.5, momentum=0.9, nesterov=False, weight_decay=1e-2,
                                            schedule="constant"))
    strategy = ("auto" if devices == 1 else FSDP2Strategy(save_distributed_checkpoint=not one_file) if ours
                else ModelParallelStrategy(2, 1))
    logger = TensorBoardLogger(logs) if logs else False  # logs: per-layer images at updates (rank 0 only)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, logger=logger,
                         use_distributed_sampler=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Seed(), SparsityCallback(**LM_SETTINGS), Check([] if checks is None else checks)])
    trainer.fit(model, lightning_data(), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model


class Seed(pl.Callback):
    """Seed just before SparsityCallback's setup builds the wide GPT (its init draws from torch's generator),
    so 1 and 2 processes start from the same weights whatever the launch drew before."""

    def setup(self, trainer, pl_module, stage) -> None:
        torch.manual_seed(0)


class Check(pl.Callback):
    """After every step: this rank's masked weights and optimizer-state shards exactly 0."""

    def __init__(self, found: list) -> None:
        self.found = found

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.found += _violations(pl_module, trainer.optimizers[0])
        self.found += [f"{name} mask not sharded" for name, o, loc, p in sparse_parameters(pl_module)
                       if is_sharded(p) and not is_sharded(get_mask(o, loc))]


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: full_tensor(v).detach().clone() for k, v in model.state_dict().items()}  # collective when sharded


def lightning_main(out: str) -> None:
    torch.set_num_threads(1)
    checks: list = []
    straight = whole_state(lightning_run(2, 2, checks=checks, logs=os.path.join(out, "logs")))
    at4 = whole_state(lightning_run(1, 2, save=os.path.join(out, "sharded.ckpt"), checks=checks, ours=True))
    resumed = whole_state(lightning_run(2, 2, ckpt_path=os.path.join(out, "sharded.ckpt"), checks=checks, ours=True))
    lightning_run(1, 2, save=os.path.join(out, "whole.ckpt"), checks=checks, ours=True, one_file=True)
    from_file = whole_state(lightning_run(2, 2, ckpt_path=os.path.join(out, "whole.ckpt"), checks=checks, ours=True))
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, checks)
    if dist.get_rank() == 0:
        torch.save({"straight": straight, "at4": at4, "resumed": resumed, "from_file": from_file, "violations": found},
                   os.path.join(out, "lightning.pt"))


if __name__ == "__main__":  # MODES: comma-separated, run in order in one launch (python starts slowly here)
    for name in sys.argv[1].split(","):
        lightning_main(sys.argv[2]) if name == "lightning" else main(name, sys.argv[2])
    if dist.is_initialized():
        dist.destroy_process_group()
