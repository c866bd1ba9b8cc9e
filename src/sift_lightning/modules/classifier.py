"""ImageClassifier: any timm backbone (or nn.Module), cross-entropy, top-1/top-5 accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from sift_lightning.models.backbones import create_backbone
from sift_lightning.modules._optim import OptimConfig, as_optim_config, configure_optim
from sift_lightning.modules._restore import SiftCheckpointMixin
from sift_lightning.parallel import configure_fsdp2

__all__ = ["ImageClassifier"]


class ImageClassifier(SiftCheckpointMixin, pl.LightningModule):
    """Image classification with a timm backbone.

    Args:
        backbone: a timm model name (built with ``create_backbone``) or a ready ``nn.Module``.
        num_classes: classes of the data set.
        cifar_stem: 3x3 stride-1 ResNet stem without max-pool, for 32x32 images.
        in_chans: image channels (1 for Fashion-MNIST).
        image_size: side of the input images; sets ``example_input_array`` (FLOPs, summaries).
        label_smoothing: cross-entropy label smoothing (0.1 in the ImageNet recipe).
        optim: optimizer and LR schedule (defaults: the paper's CIFAR-100 recipe).
        backbone_kwargs: extra ``timm.create_model`` arguments (``drop_rate``, ``channels``, ...).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 100,
        cifar_stem: bool = True,
        in_chans: int = 3,
        image_size: int = 32,
        label_smoothing: float = 0.0,
        optim: OptimConfig | dict | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.optim = as_optim_config(optim)
        self.save_hyperparameters(ignore=["optim"] if isinstance(backbone, str) else ["optim", "backbone"])
        self.hparams["optim"] = asdict(self.optim)  # plain data: checkpoints load with weights_only
        if isinstance(backbone, str):
            backbone = create_backbone(backbone, num_classes, cifar_stem=cifar_stem, in_chans=in_chans,
                                       **(backbone_kwargs or {}))
        self.backbone = backbone
        self.label_smoothing = label_smoothing
        self.example_input_array = torch.zeros(1, in_chans, image_size, image_size)
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{split}_acc{k}": MulticlassAccuracy(num_classes, top_k=k)
            for split in ("train", "val", "test") for k in sorted({1, top5})
        })

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard the backbone per top-level stage or block; otherwise nothing."""
        configure_fsdp2(self)

    def transform_backbone(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Let ``SparsityCallback`` replace the backbone (Sparse Wide builds a wider one)."""
        self.backbone = fn(self.backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, C, H, W) -> (B, num_classes)

    def _step(self, batch: Any, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if split == "train" else 0.0)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        for name, metric in self.metrics.items():
            if name.startswith(split):
                metric(logits, y)
                self.log(f"{split}/{name.split('_')[1]}", metric, on_step=False, on_epoch=True, prog_bar=name.endswith("acc1"))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim)
