"""The LightningModules train with every member, rebuild themselves from a checkpoint, and follow
the paper's optimizer recipes."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import MEMBERS, ImageClassifier, LanguageModel, OptimConfig, SparsityCallback, sparse_targets

TINY_RESNET = {"channels": (8, 16, 32, 64)}


def _classifier() -> ImageClassifier:
    return ImageClassifier("resnet18", 10, in_chans=1, image_size=16, backbone_kwargs=TINY_RESNET,
                           optim=OptimConfig(lr=0.05, schedule="cosine", warmup_steps=1))


def _image_data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=8)


def _text_data(n: int = 16, block: int = 64) -> DataLoader:
    x = torch.randint(0, 256, (n, block + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)


def _fit(module: pl.LightningModule, data: DataLoader, callbacks: list, tmp_path, steps: int = 3) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                         default_root_dir=tmp_path, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, data, data)
    return trainer


@pytest.mark.parametrize("member", MEMBERS)
def test_classifier_trains_with_every_member(member, tmp_path):
    module = _classifier()
    callbacks = [] if member == "dense" else [SparsityCallback(0.5, transform=member, update_frequency=1)]
    trainer = _fit(module, _image_data(), callbacks, tmp_path)
    assert math.isfinite(trainer.callback_metrics["train/loss"])
    assert {"val/loss", "val/acc1", "val/acc5"} <= set(trainer.callback_metrics)
    assert (len(sparse_targets(module)) > 0) == (member != "dense")


@pytest.mark.parametrize("member", MEMBERS)
def test_language_model_trains_with_every_member(member, tmp_path):
    module = LanguageModel("gpt_tiny", optim=OptimConfig(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=1))
    callbacks = [] if member == "dense" else [SparsityCallback(0.5, transform=member, update_frequency=1)]
    trainer = _fit(module, _text_data(), callbacks, tmp_path)
    loss = float(trainer.callback_metrics["val/loss"])
    assert float(trainer.callback_metrics["val/ppl"]) == pytest.approx(math.exp(loss), rel=1e-5)
    if member == "sparse_wide":
        assert module.backbone.config.d_model == 92  # 64 * sqrt(2) = 90.5 -> 4 heads * round(22.63) = 92


@pytest.mark.parametrize(("make", "data"), [(_classifier, _image_data), (lambda: LanguageModel("gpt_tiny"), _text_data)])
def test_load_from_checkpoint_rebuilds_the_sparse_structure(make, data, tmp_path):
    module = make()
    trainer = _fit(module, data(), [SparsityCallback(0.75, transform="sparse_parallel", update_frequency=1)], tmp_path)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = type(module).load_from_checkpoint(path)
    assert sparse_targets(loaded) == sparse_targets(module)
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = next(iter(data()))[0]
    module.eval(), loaded.eval()
    assert torch.equal(module(x), loaded(x))


def test_classifier_accepts_a_module_backbone(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10))
    module = ImageClassifier(net, 10, in_chans=1, image_size=16)
    _fit(module, _image_data(), [SparsityCallback(0.5, algorithm="set", update_frequency=1)], tmp_path)
    assert list(sparse_targets(module)) == ["backbone.2.weight"]  # first and last layer stay dense


def test_no_weight_decay_on_norms_biases_and_embeddings(tmp_path):
    module = LanguageModel("gpt_tiny")  # GPT-3 recipe: decay_norm_and_bias=False
    _fit(module, _text_data(), [], tmp_path, steps=1)
    decay, no_decay = module.trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert all(n.endswith("bias") or ".ln" in n or "wte" in n or "wpe" in n for n in map(names.get, map(id, no_decay["params"])))
    assert sorted(names[id(p)].rsplit(".", 2)[-2] for p in decay["params"])[:2] == ["fc", "fc"]


def test_lr_schedules():
    step = OptimConfig(schedule="multistep", milestones=[60, 120, 160], gamma=0.2)
    per_epoch = 391.0  # CIFAR at batch 128
    assert step.lr_factor(int(59.9 * per_epoch), 200 * 391, per_epoch) == 1.0
    assert step.lr_factor(60 * 391, 200 * 391, per_epoch) == pytest.approx(0.2)
    assert step.lr_factor(170 * 391, 200 * 391, per_epoch) == pytest.approx(0.2 ** 3)
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert cos.lr_factor(0, 110, 1.0) == pytest.approx(0.1)  # warmup from 1/10
    assert cos.lr_factor(10, 110, 1.0) == pytest.approx(1.0)
    assert cos.lr_factor(60, 110, 1.0) == pytest.approx(0.55)
    assert cos.lr_factor(110, 110, 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "adam"}, "optim.name must be one of sgd, adamw; got 'adam'"),
    ({"schedule": "step"}, "optim.schedule must be one of multistep, cosine, constant; got 'step'"),
    ({"lr": 0.0}, "optim.lr must be > 0"),
])
def test_optim_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        OptimConfig(**kwargs)


@pytest.mark.parametrize("member", ["sparse_wide", "sparse_parallel"])
def test_logged_flops_count_attention_like_count_flops(member, tmp_path):
    """The callback's per-sample FLOPs include the attention scores (activation x activation), as
    ``count_flops`` does: a GPT's train FLOPs are not undercounted."""
    from lightning.pytorch.loggers import CSVLogger

    from sift_lightning import count_flops

    module = LanguageModel("gpt_tiny", block_size=64, optim=OptimConfig(name="adamw", lr=1e-3))
    cb = SparsityCallback(0.5, transform=member, algorithm="static")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[cb], limit_val_batches=0)
    trainer.fit(module, _text_data())
    report = count_flops(module, torch.zeros(1, 64, dtype=torch.long))
    assert report.other_macs > 0.2 * report.dense_macs / 4  # attention is a real share of this GPT
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    per_sample = {k: float(v) for m in rows for k, v in m.items() if k.startswith("sift/flops_per_sample") and v}
    assert per_sample["sift/flops_per_sample_dense"] == 2 * report.dense_macs
    assert per_sample["sift/flops_per_sample_sparse"] == pytest.approx(2 * report.sparse_macs, rel=1e-9)
    assert cb.train_flops == pytest.approx(2 * 8 * 3 * 2 * report.sparse_macs, rel=1e-9)  # 2 steps of 8 samples


def test_a_failing_first_step_leaves_no_flop_counter_or_hooks_behind(tmp_path):
    """The FLOP recorder spans the first forward pass; if that step raises, the callback closes it."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    class Failing(LanguageModel):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)  # the forward pass runs under the recorder
            raise RuntimeError("boom")

    module = Failing("gpt_tiny", block_size=64, optim=OptimConfig(name="adamw", lr=1e-3))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         callbacks=[SparsityCallback(0.5, algorithm="static")], default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, _text_data())
    assert _get_current_dispatch_mode() is None
    assert not [m for m in module.modules() if m._forward_hooks]


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "levit_128s", "swin_tiny_patch4_window7_224"])
def test_a_fixed_size_timm_model_is_built_for_image_size(backbone):
    # a ViT made for 224 px asserts on CIFAR's 32 px; built at image_size it runs, and a member applies
    model = ImageClassifier(backbone, num_classes=10, cifar_stem=False, image_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    cb = SparsityCallback(0.5, transform="sparse_doped")
    trainer = pl.Trainer(max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    data = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))), batch_size=2)
    trainer.fit(model, data)
    assert sparse_targets(model)


def test_an_image_size_the_model_cannot_take_is_one_line():
    with pytest.raises(ValueError, match=r"^vit_tiny_patch16_224 is built for 224 px inputs and cannot be built for "
                                         r"image_size=8 \(RuntimeError: .*\); pick an image_size it accepts"):
        ImageClassifier("vit_tiny_patch16_224", num_classes=10, cifar_stem=False, image_size=8)
    given = ImageClassifier("vit_tiny_patch16_224", num_classes=10, cifar_stem=False, image_size=32,
                            backbone_kwargs={"img_size": 64})  # the user's own img_size wins
    assert given.backbone.patch_embed.img_size == (64, 64)
