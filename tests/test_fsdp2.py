"""Sparse-IFT under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) on 2 CPU processes.

One ``torchrun`` launch of tests/_fsdp2_worker.py (gloo) runs a tiny Sparse Wide GPT with RigL as a
plain loop under torch DDP and under ``shard_model``, then under Lightning's ``ModelParallelStrategy``
(8 steps straight; 4 steps, a distributed checkpoint, a resume to 8). The one-process runs happen in
this process. Exactness across process counts: identical masks after several RigL updates, weights
equal to 1e-6 (two ranks average gradients in another order than one process sums them); DDP and
FSDP2 agree bitwise, and so do a resumed and an uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from sift_lightning import (
    GPT, DynamicSparsity, LanguageModel, SparsityCallback, create_backbone, export_checkpoint, gpt_config,
)
from sift_lightning.parallel import consolidate_checkpoint, is_fully_sharded, shard_units

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

WORKER = Path(__file__).with_name("_fsdp2_worker.py")
_spec = importlib.util.spec_from_file_location("fsdp2_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The 2-process runs (one launch), and the 1-process plain loop; their results' folder."""
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), str(WORKER), "ddp,fsdp2,lightning", str(out)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    worker.main("single", str(out))
    return out


def _load(runs: Path, name: str) -> dict:
    return torch.load(runs / f"{name}.pt", weights_only=False)


def _assert_same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    masks = [k for k in a if k.endswith("_sift_mask")]
    assert len(masks) == 8
    for k in masks:
        assert torch.equal(a[k], b[k]), f"{k} differs"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{k} differs")


def test_rigl_makes_one_process_choices_under_ddp_and_fsdp2(runs):
    single, ddp, fsdp2 = (_load(runs, m) for m in ("single", "ddp", "fsdp2"))
    for run in (single, ddp, fsdp2):
        for report in run["reports"]:
            assert report["updates"] == 4 and report["steps"] == [8]
            assert report["changes"] >= 3  # the masks really moved at (almost) every update
    _assert_same_run(single["state"], ddp["state"], atol=1e-6)
    _assert_same_run(single["state"], fsdp2["state"], atol=1e-6)
    for k in ddp["state"]:  # two ranks: the same gradient sums, so DDP and FSDP2 agree bitwise
        assert torch.equal(ddp["state"][k], fsdp2["state"][k]), k


def test_masked_weights_and_every_optimizer_state_shard_stay_zero(runs):
    for mode in ("single", "ddp", "fsdp2"):
        assert [r["violations"] for r in _load(runs, mode)["reports"]] in ([[]], [[], []]), mode
    assert _load(runs, "lightning")["violations"] == [[], []]  # Lightning: masks sharded too, checked every step


def test_each_rank_stores_its_share_of_the_masks(runs):
    for report in _load(runs, "fsdp2")["reports"]:
        assert set(report["sharded_masks"]) == {"DTensor"}
        assert report["mask_bytes"] == report["mask_bytes_whole"] // 2  # every sharded dim is even here
    for report in _load(runs, "ddp")["reports"]:
        assert report["mask_bytes"] == report["mask_bytes_whole"]  # DDP replicates them


def test_lightning_fsdp2_logs_whole_layer_figures(runs):
    # the per-layer images are drawn on rank 0 from counts summed over the ranks (no rank waits alone)
    events = b"".join(p.read_bytes() for p in (runs / "logs").rglob("events.out.tfevents*"))
    for tag in (b"sift/density", b"sift/mask_change", b"sift/layer_density", b"sift_mask/"):
        assert tag in events, tag


def test_lightning_fsdp2_matches_one_process(runs):
    straight = _load(runs, "lightning")["straight"]
    one = worker.lightning_run(2, 1)
    _assert_same_run(straight, one.state_dict(), atol=1e-6)


def test_sharded_checkpoint_resumes_exactly(runs):
    run = _load(runs, "lightning")
    for k in run["straight"]:
        assert torch.equal(run["straight"][k], run["resumed"][k]), k  # from the folder of shards
        assert torch.equal(run["straight"][k], run["from_file"][k]), k  # from one gathered file
    masks = [k for k in run["at4"] if k.endswith("_sift_mask")]
    assert any(not torch.equal(run["at4"][k], run["straight"][k]) for k in masks)  # updates after the checkpoint


def test_sharded_checkpoint_loads_resumes_and_exports_in_one_process(runs, tmp_path):
    run = _load(runs, "lightning")
    path = consolidate_checkpoint(runs / "sharded.ckpt", tmp_path / "one.ckpt")
    loaded = LanguageModel.load_from_checkpoint(path)
    for k, v in run["at4"].items():
        assert torch.equal(loaded.state_dict()[k], v), k
    checks: list = []
    resumed = worker.lightning_run(2, 1, ckpt_path=str(path), checks=checks)  # optimizer and engine state too
    assert checks == [] and resumed.trainer.global_step == 8
    _assert_same_run(run["straight"], resumed.state_dict(), atol=1e-6)
    summary = export_checkpoint(path, tmp_path / "model.pt", program=False)
    assert summary["max_rel_error"] == 0.0
    export_checkpoint(runs / "sharded.ckpt", tmp_path / "direct.pt", program=False)  # sift-fit export on the folder
    shipped, direct = torch.load(tmp_path / "model.pt"), torch.load(tmp_path / "direct.pt")
    assert shipped.keys() == direct.keys() and all(torch.equal(shipped[k], direct[k]) for k in shipped)


def test_consolidate_refuses_a_file(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="not a distributed checkpoint folder"):
        consolidate_checkpoint(tmp_path / "x.ckpt", tmp_path / "out.ckpt")


def test_deepspeed_is_refused_at_setup_pointing_to_fsdp2():
    trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy), callbacks=[])
    with pytest.raises(ValueError, match="does not support DeepSpeed.*fsdp2.yaml"):
        SparsityCallback(0.5).setup(trainer, LanguageModel(), "fit")


def test_shard_units_are_gpt_blocks_and_timm_stages():
    gpt = GPT(gpt_config("gpt_tiny"))
    assert shard_units(gpt) == list(gpt.blocks)
    resnet = create_backbone("resnet18", 10)
    assert shard_units(resnet) == [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    assert shard_units(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []  # no blocks: the root is the one unit


def test_configure_model_shards_nothing_outside_model_parallel():
    module = LanguageModel()
    module.configure_model()  # no trainer, or another strategy: FSDP2 is not asked for
    assert not is_fully_sharded(module.backbone)


def test_the_engine_refuses_a_model_sharded_before_it():
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = fully_shard(GPT(gpt_config("gpt_tiny")))
        with pytest.raises(ValueError, match="apply the sparsity engine first, then shard"):
            DynamicSparsity(sparsity=0.5, transform="sparse_wide").apply(model)
    finally:
        torch.distributed.destroy_process_group()
