"""sift-fit end to end: the quickstarts run, on one process and on two (DDP over gloo), and our
errors print as one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sift_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not DEBIAN_FMNIST.exists(), reason="Debian's dataset-fashion-mnist not installed")
FAST = ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "4",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _sift_fit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sift_lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@needs_fmnist
def test_quickstart_runs_and_logs_sparsity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *FAST, "--data.init_args.batch_size", "32",
          "--trainer.log_every_n_steps", "1"])
    (version,) = (tmp_path / "runs" / "quickstart").iterdir()
    assert (version / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    masks = {k: v for k, v in ckpt["state_dict"].items() if k.endswith("_mask")}
    assert masks and all(v.dtype == torch.bool for v in masks.values())
    active = sum(int(v.sum()) for v in masks.values())
    assert active == pytest.approx(0.5 * sum(v.numel() for v in masks.values()), abs=len(masks))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"sift/density", "sift/flops_per_sample_sparse", "train/loss_step", "val/acc1"} <= tags

    # train sparse, ship dense: the Sparse Parallel checkpoint folds into the plain timm ResNet
    out = _sift_fit("export", "--ckpt_path", str(version / "checkpoints" / "last.ckpt"), "--out", "shipped.pt",
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("sparse_parallel s=0.5 folded -> shipped.pt")
    from sift_lightning import create_backbone

    plain = create_backbone("resnet18", 10, cifar_stem=True, in_chans=1, channels=[16, 32, 64, 128])
    plain.load_state_dict(torch.load(tmp_path / "shipped.pt", map_location="cpu"), strict=True)


@needs_fmnist
def test_quickstart_under_ddp_two_cpu_processes(tmp_path):
    out = _sift_fit("fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config",
                    str(CONFIGS / "strategies" / "cpu_ddp.yaml"), *FAST, "--data.init_args.batch_size", "16",
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in out.stdout + out.stderr
    (version,) = (tmp_path / "runs" / "quickstart").iterdir()
    assert (version / "checkpoints" / "last.ckpt").exists()


def test_quickstart_gpt_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), *FAST, "--data.init_args.batch_size", "8"])
    (version,) = (tmp_path / "runs" / "quickstart_gpt").iterdir()
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    masks = {k: v for k, v in ckpt["state_dict"].items() if k.endswith("weight_sift_mask")}  # Sparse Wide, s=0.5
    assert "backbone.blocks.0.attn.qkv.weight_sift_mask" in masks, sorted(masks)[:3]
    assert ckpt["state_dict"]["backbone.blocks.0.attn.qkv.weight"].shape[1] == 92  # d_model 64 * sqrt(2), rounded to 4 heads of 23
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(0.5 * sum(m.numel() for m in masks.values()), abs=len(masks))
    assert "val/ppl" in str(ckpt["callbacks"]) or ckpt["global_step"] == 4


def test_quickstart_gpt_under_ddp_two_cpu_processes(tmp_path):
    out = _sift_fit("fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), "--config",
                    str(CONFIGS / "strategies" / "cpu_ddp.yaml"), *FAST, "--data.init_args.batch_size", "8",
                    "--data.init_args.root", str(tmp_path / "data"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "`Trainer.fit` stopped: `max_steps=4` reached." in out.stdout + out.stderr


def test_missing_data_is_one_line(tmp_path):
    out = _sift_fit("fit", "--config", str(CONFIGS / "resnet18_dense.yaml"), "--data.init_args.root", str(tmp_path / "nowhere"),
                    "--data.init_args.download", "false", "--trainer.accelerator", "cpu", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("sift-fit: error: CIFAR-100 not found under ")
    assert "Traceback" not in out.stderr


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    out = _sift_fit("export", "--ckpt_path", "nowhere.ckpt", "--out", "x.pt", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("sift-fit: error: ")
    assert "Traceback" not in out.stderr


def test_bad_sift_value_is_one_line(tmp_path):
    out = _sift_fit("fit", "--config", str(CONFIGS / "quickstart.yaml"), "--sift.sparsity", "1.5",
                    "--trainer.accelerator", "cpu", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "sift-fit: error: sparsity must be a number in (0, 1) such as 0.5, 0.75 or 0.9, got 1.5")
    assert "Traceback" not in out.stderr


def test_transform_typo_lists_the_cli_values(tmp_path, monkeypatch, capsys):
    # on the command line the baseline is "dense" (no callback), which the settings' own list lacks
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--sift.transform", "sparse_wid",
              "--trainer.accelerator", "cpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sift-fit: error: --sift.transform must be one of dense (the baseline), none (the model's own layers trained "
        "sparse), sparse_wide, sparse_parallel, sparse_factorized, sparse_doped; got 'sparse_wid'")


def test_last_ckpt_is_the_final_step_after_a_mid_epoch_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), *FAST, "--trainer.max_steps", "5",
          "--trainer.val_check_interval", "2", "--data.init_args.batch_size", "8"])
    (version,) = (tmp_path / "runs" / "quickstart_gpt").iterdir()
    ckpt = torch.load(version / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5  # Lightning's own ModelCheckpoint leaves it at the step-4 validation


@needs_fmnist
def test_finished_run_resumes_with_more_steps(tmp_path, monkeypatch):
    """quickstart.yaml (max_epochs: 1) stopped by max_steps=4, resumed from its last.ckpt with max_steps=8:
    Lightning 2.6 had counted epoch 0 as done and trained 0 more steps."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), *FAST, "--data.init_args.batch_size", "8"]
    main(args)
    last = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    main([*args, "--trainer.max_steps", "8", "--ckpt_path", str(last)])
    resumed = torch.load(tmp_path / "runs" / "quickstart" / "version_1" / "checkpoints" / "last.ckpt",
                         map_location="cpu", weights_only=False)
    assert (resumed["global_step"], resumed["epoch"]) == (8, 0)
    assert resumed["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 8  # batch 8 of 150


def test_checkpointing_and_logger_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), *FAST, "--data.init_args.batch_size", "8",
          "--trainer.enable_checkpointing", "false", "--trainer.logger", "false"])
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "runs").exists()


def test_a_configured_checkpoint_or_lr_monitor_replaces_ours(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from sift_lightning.checkpointing import ModelCheckpoint as FinalModelCheckpoint
    from sift_lightning.cli import SiftCLI

    monkeypatch.chdir(tmp_path)

    def kinds(*args: str) -> set[type]:
        cli = SiftCLI(subclass_mode_model=True, subclass_mode_data=True, run=False,
                      args=["--config", str(CONFIGS / "quickstart_gpt.yaml"), "--sift.transform", "dense", *args])
        found = [type(c) for c in cli.trainer.callbacks if isinstance(c, (ModelCheckpoint, LearningRateMonitor))]
        assert len(found) == len(set(found))  # one of each at most
        return set(found)

    assert kinds() == {FinalModelCheckpoint, LearningRateMonitor}
    assert kinds("--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks+=LearningRateMonitor") == {
        ModelCheckpoint, LearningRateMonitor}
    assert kinds("--trainer.enable_checkpointing", "false", "--trainer.logger", "false") == set()


def test_lightning_misconfiguration_is_one_line(tmp_path):
    out = _sift_fit("fit", "--config", str(CONFIGS / "quickstart_gpt.yaml"), "--trainer.val_check_interval", "1.5",
                    cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("sift-fit: error: You have passed invalid value 1.5")
