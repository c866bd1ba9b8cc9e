"""Backbones: any timm model by name, plus the CIFAR form of ResNets."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from sift_lightning.models import cifar_resnet  # noqa: F401  registers cifar_resnet* with timm

__all__ = ["create_backbone", "has_cifar_stem", "unknown_backbone_message"]


def _is_resnet(model: nn.Module) -> bool:
    from timm.models.resnet import ResNet

    return isinstance(model, ResNet)


def has_cifar_stem(model: nn.Module) -> bool:
    """True for a timm ResNet whose stem is a single 3x3 stride-1 conv with no max-pool."""
    conv = getattr(model, "conv1", None)
    return (
        _is_resnet(model)
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and isinstance(getattr(model, "maxpool", None), nn.Identity)
    )


def _apply_cifar_stem(model: nn.Module, name: str) -> None:
    conv = getattr(model, "conv1", None)
    if not _is_resnet(model) or not isinstance(conv, nn.Conv2d):
        raise ValueError(
            f"cifar_stem applies to timm ResNets with a single-conv stem (resnet18, resnet34, "
            f"resnet50, ...); {name!r} has none: pass cifar_stem=False"
        )
    # 32x32 inputs: a 7x7 stride-2 conv and a max-pool would leave 8x8 maps before layer1.
    model.conv1 = nn.Conv2d(
        conv.in_channels, conv.out_channels, 3, 1, 1, bias=False,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    # drawn as timm's ResNet draws every conv (kaiming normal, fan_out): std sqrt(2 / (64 * 9)) = 0.059
    # for the 64-wide stem, where PyTorch's default would give 1 / sqrt(3 * 27) = 0.111
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def unknown_backbone_message(name: str, limit: int = 5) -> str:
    """``unknown backbone 'resnt18'; did you mean resnet18, resnet10t, ...?``: timm's names, most similar first."""
    names = timm.list_models()
    # a name cut short ("vit_tiny") first, shortest first; then spelling mistakes, most similar first
    close = sorted((n for n in names if n.startswith(name.lower())), key=len)[:limit]
    close += [n for n in difflib.get_close_matches(name.lower(), names, n=limit, cutoff=0.6) if n not in close]
    close = close[:limit]
    if close:
        return f"unknown backbone {name!r}; did you mean {', '.join(close)}?"
    return f"unknown backbone {name!r}; pick a name from timm.list_models() (e.g. resnet18, resnet50, vit_small_patch16_224)"


def create_backbone(
    name: str,
    num_classes: int,
    *,
    cifar_stem: bool = False,
    in_chans: int = 3,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a timm model by name (randomly initialised unless ``pretrained=True`` is passed).

    Args:
        name: any name ``timm.list_models()`` knows, including this project's ``cifar_resnet20``,
            ``cifar_resnet32`` and ``cifar_resnet56`` (``width=`` narrows them).
        num_classes: classifier outputs.
        cifar_stem: for ResNets, a 3x3 stride-1 stem with no max-pool (the CIFAR ResNets of the
            paper: ``resnet18`` with 100 classes has 11,220,132 parameters).
        in_chans: input channels (1 for Fashion-MNIST).
        **timm_kwargs: passed to ``timm.create_model`` (``drop_rate``, ``channels``, ...).

    Raises:
        ValueError: unknown model name (with close matches), or ``cifar_stem`` on a non-ResNet.
    """
    if not timm.is_model(name):
        raise ValueError(unknown_backbone_message(name))
    try:
        model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    except OSError as err:  # pretrained weights: offline, not in the Hugging Face cache (hub errors are OSErrors)
        if not timm_kwargs.get("pretrained"):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"pretrained weights for {name} could not be downloaded or found in the Hugging Face cache "
                         f"({type(err).__name__}: {first[:200]}); connect once to download them, copy the cache "
                         "(~/.cache/huggingface/hub, or $HF_HOME) from a machine that has them, or set "
                         "pretrained: false") from None
    if cifar_stem and not getattr(model, "cifar_native", False):
        _apply_cifar_stem(model, name)
    return model
