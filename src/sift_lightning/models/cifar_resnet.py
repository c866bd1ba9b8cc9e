"""The CIFAR ResNets of He et al. 2016 (ResNet-20/32/56: three stages of 3x3 basic blocks).

Small and capacity-limited at width 16 (ResNet-20: 0.27M parameters), so they show what Sparse-IFT
adds when the model, not the data, is the bottleneck; ``width`` narrows them further for CPU
studies. Registered with timm, so ``create_backbone("cifar_resnet20", 10, width=8)`` builds one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

__all__ = ["CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``depth`` blocks at widths ``w, 2w, 4w``, global pool, linear head."""

    cifar_native = True  # already has the CIFAR stem: create_backbone(cifar_stem=True) is a no-op
    # every conv, and every conv a Sparse-IFT member builds, is drawn kaiming normal fan_out (as timm's
    # ResNets and the official Sparse-IFT code); norms start at 1/0, the Linear head at PyTorch's default
    sift_init = "kaiming_fan_out"

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16, **_: Any) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))  # (B, 4w, H/4, W/4)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (B, num_classes)


def _build(depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    if pretrained:
        raise ValueError("cifar_resnet models have no pretrained weights; pass pretrained=False")
    return CifarResNet(depth, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for 32x32 images (0.27M parameters at width 16)."""
    return _build(20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for 32x32 images (0.46M parameters at width 16)."""
    return _build(32, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for 32x32 images (0.85M parameters at width 16)."""
    return _build(56, pretrained, **kwargs)
