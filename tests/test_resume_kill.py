"""A run killed with ``kill -9`` mid-epoch and resumed from ``last.ckpt`` loses at most the steps since
that checkpoint, leaks no mask (every masked weight exactly 0, the same number of active weights
per layer) and ends where one uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sift_lightning.cli import main
from sift_lightning.sparse.masks import MASK_SUFFIX

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS, EVERY = 40, 5  # about 180 batches an epoch of the KJV at batch 32 x 128: all of it is mid-epoch


def _args(root: Path) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), "--data.init_args.root", str(root / "data"),
        "--data.init_args.batch_size", "4", "--trainer.max_steps", str(STEPS), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root), "--sift.update_frequency", "4",
        # our checkpoint, every EVERY steps: it replaces sift-fit's default (best val/loss + last)
        "--trainer.callbacks+=sift_lightning.checkpointing.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps", str(EVERY), "--trainer.callbacks.save_last", "true",
    ]  # fmt: skip


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError):  # not written yet, or being replaced
        return -1


def _masks(state: dict) -> dict[str, torch.Tensor]:
    return {k[: -len(MASK_SUFFIX)]: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}


def test_kill_9_mid_epoch_then_resume_from_last(tmp_path, monkeypatch):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sift_lightning.cli", *_args(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = killed / "runs" / "quickstart_gpt" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    try:
        while _step(last) < 2 * EVERY:  # two checkpoints in: the RigL updates at steps 4 and 8 are in it
            assert proc.poll() is None, f"sift-fit ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no last.ckpt at step 10 within 240 s"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    saved = torch.load(last, map_location="cpu", weights_only=False)
    at = saved["global_step"]
    assert at % EVERY == 0 and 2 * EVERY <= at < STEPS  # what survived: the last multiple of EVERY

    monkeypatch.chdir(tmp_path)
    main([*_args(killed), "--ckpt_path", str(last)])  # resumed: a new version folder of the same run
    resumed = torch.load(last.parents[2] / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False)
    assert resumed["global_step"] == STEPS and resumed["epoch"] == 0  # still the first epoch: nothing skipped

    main(_args(tmp_path / "one"))  # the uninterrupted run
    one = torch.load(tmp_path / "one" / "runs" / "quickstart_gpt" / "version_0" / "checkpoints" / "last.ckpt",
                     map_location="cpu", weights_only=False)
    state, masks = resumed["state_dict"], _masks(resumed["state_dict"])
    assert masks and all(m.dtype == torch.bool for m in masks.values())
    active, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    assert active == pytest.approx(0.5 * total, abs=len(masks))  # s = 0.5, each layer rounded once
    for name, mask in masks.items():
        assert int(state[name][~mask].count_nonzero()) == 0, name  # no masked weight came back
        assert int(mask.sum()) == int(_masks(saved["state_dict"])[name].sum()), name  # active count per layer kept
        assert torch.equal(mask, _masks(one["state_dict"])[name]), name  # the same mask updates as one run
    for key, value in one["state_dict"].items():
        assert torch.equal(state[key], value), key  # bit for bit where one run ends
