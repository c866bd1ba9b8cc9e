"""One training run of a tiny Sparse Wide GPT with RigL, for tests/test_fsdp2.py.

``python tests/_fsdp2_worker.py MODE OUT`` with MODE ``single`` (one process), or under
``torchrun --nproc_per_node 2`` with MODE ``ddp`` (torch DDP) or ``fsdp2`` (``shard_model``).
Every mode sees the same global batches (each of two ranks takes half of each). After every step
each rank checks its own shards: masked weights and every optimizer-state tensor exactly 0, the
active count per layer unchanged. Rank 0 writes the whole masks and weights at the end to OUT/MODE.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sift_lightning import GPT, DynamicSparsity, GPTConfig, SparsitySettings
from sift_lightning.parallel import shard_model
from sift_lightning.sparse.masks import get_mask, sparse_parameters
from sift_lightning.sparse.sharded import full_tensor, local_tensor, mask_bytes

SETTINGS = dict(sparsity=0.75, transform="sparse_wide", algorithm="rigl", update_frequency=2, drop_fraction=0.5,
                end=1.0, seed=3)
STEPS, BATCH, T = 8, 8, 16


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
    if distributed:
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
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
