"""ImageClassifier: any timm backbone (or nn.Module), cross-entropy, top-1/top-5 accuracy."""

from __future__ import annotations

import inspect

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
from sift_lightning.transforms._probe import meta_copy

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
            backbone = _timm_backbone(backbone, num_classes, cifar_stem, in_chans, image_size, dict(backbone_kwargs or {}))
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


def _timm_backbone(name: str, num_classes: int, cifar_stem: bool, in_chans: int, image_size: int,
                   kwargs: dict[str, Any]) -> nn.Module:
    """``create_backbone``, built for ``image_size`` when the model fixes its input size (ViT, Swin, ...).

    A timm model that takes ``img_size`` sizes its patch grid and position embeddings for it and
    refuses other inputs (a ViT made for 224 px asserts on CIFAR's 32 px), so it is built at
    ``image_size`` unless ``backbone_kwargs`` sets ``img_size`` itself.
    """
    model = create_backbone(name, num_classes, cifar_stem=cifar_stem, in_chans=in_chans, **kwargs)
    takes_size = any("img_size" in inspect.signature(cls.__init__).parameters  # a subclass may take **kwargs
                     for cls in type(model).__mro__ if "__init__" in vars(cls) and cls is not object)
    built_for = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (in_chans, image_size, image_size))
    if "img_size" in kwargs or not takes_size or tuple(built_for[-2:]) == (image_size, image_size):
        return model
    try:
        model = create_backbone(name, num_classes, cifar_stem=cifar_stem, in_chans=in_chans, img_size=image_size,
                                **kwargs)
        with torch.no_grad():  # built is not runnable: a 16 px patch does not fit an 8 px image
            meta_copy(model).eval()(torch.zeros(1, in_chans, image_size, image_size, device="meta"))
        return model
    except (AssertionError, ValueError, RuntimeError, TypeError, IndexError) as err:
        raise ValueError(f"{name} is built for {built_for[-1]} px inputs and cannot be built for image_size="
                         f"{image_size} ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}); "
                         "pick an image_size it accepts (a multiple of its patch and window sizes) or set "
                         "backbone_kwargs.img_size") from None
