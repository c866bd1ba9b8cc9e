"""Invariant 4: under DDP every rank holds identical masks at every step.

Two CPU processes (gloo) train a tiny MLP, each on its own shard of the data. Every rank writes a
hash of all its masks after every batch to a file; the test compares the files. The run uses
``strategy="ddp"`` from a script in a subprocess: ``ddp_spawn`` cannot pass the model to its
children in this sandbox (torch's shared-memory file descriptors fail with "unable to resize file").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    '''
    import hashlib, json, os, sys

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from sift_lightning import SparsityCallback
    from sift_lightning.sparse.masks import get_mask, sparse_parameters

    out, algorithm, broadcast, accumulate = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])


    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                     nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


    def digest(tensors):
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().contiguous().numpy().tobytes())
        return h.hexdigest()


    class Record(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            masks = [get_mask(o, loc) for _, o, loc, _ in sparse_parameters(pl_module)]
            self.rows.append({"step": trainer.global_step, "masks": digest(masks), "batch": digest(batch),
                              "sparse_step": sparsity.step})

        def on_train_end(self, trainer, pl_module):
            weights = digest(p for p in pl_module.parameters())
            with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump({"rows": self.rows, "weights": weights, "world": trainer.world_size}, f)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts them)
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(128, 8, generator=g), torch.randint(0, 4, (128,), generator=g))
        sparsity = SparsityCallback(0.75, algorithm=algorithm, update_frequency=2, drop_fraction=0.5, end=1.0)
        if not broadcast:  # masks must then agree by construction: scores from the all-reduced gradient
            sparsity._broadcast_masks = lambda: None
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=10, accumulate_grad_batches=accumulate,
            callbacks=[sparsity, Record()], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(MLP(), DataLoader(data, batch_size=4))
    '''
)


@pytest.mark.parametrize(
    "algorithm, broadcast, accumulate",
    [("rigl", False, 2), ("set", True, 1)],
    ids=["rigl-no-broadcast-accumulate", "set"],
)
def test_masks_identical_on_every_rank(tmp_path: Path, algorithm: str, broadcast: bool, accumulate: int):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, str(script), str(tmp_path), algorithm, "1" if broadcast else "0", str(accumulate)]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    rows0, rows1 = ranks[0]["rows"], ranks[1]["rows"]
    assert len(rows0) == len(rows1) == 10 * accumulate
    for a, b in zip(rows0, rows1):
        assert a["step"] == b["step"] and a["sparse_step"] == b["sparse_step"]
        assert a["masks"] == b["masks"], f"masks differ between ranks after step {a['step']}"
        assert a["batch"] != b["batch"], "both ranks saw the same batch"
    assert rows0[-1]["sparse_step"] == 10
    assert len({r["masks"] for r in rows0}) >= 4  # the masks did change: updates at steps 2, 4, 6, 8
    assert ranks[0]["weights"] == ranks[1]["weights"]
