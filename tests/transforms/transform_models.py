"""Small models and expectations shared by the transform tests (imported, not collected)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sift_lightning import create_backbone
from sift_lightning.transforms.parallel import parallel_branches

MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
IN_PLACE = ("sparse_parallel", "sparse_factorized", "sparse_doped")  # Wide returns a new model
SPARSITIES = (0.5, 0.75, 0.9)

# Copied from shared/reference/ so the tests do not depend on shared/ at CI time.
REFERENCE = json.loads((Path(__file__).parent / "official_resnet18_cifar100.json").read_text())
REFERENCE_ROWS = {(r["family"], r["sparsity"]): r for r in REFERENCE["models"]}
DENSE_PARAMS = 11_220_132
DENSE_MACS = 555_468_800

# conv/linear names of a timm ResNet-18 in registration order: the stem and fc stay dense
RESNET18_LAYERS = ["conv1"] + [
    f"layer{i}.{b}.{c}"
    for i in range(1, 5)
    for b in range(2)
    for c in (("conv1", "conv2", "downsample.0") if b == 0 else ("conv1", "conv2"))
] + ["fc"]
RESNET18_SPARSE = RESNET18_LAYERS[1:-1]


def cifar_resnet18(device: str = "cpu") -> nn.Module:
    """The paper's CIFAR-100 ResNet-18 (11,220,132 params)."""
    with torch.device(device):
        return create_backbone("resnet18", 100, cifar_stem=True)


def tiny_resnet(name: str = "resnet18", dtype: torch.dtype | None = None) -> nn.Module:
    """A CIFAR ResNet with stage widths 8..64 (timm's single-conv stem stays 64 wide)."""
    torch.manual_seed(0)
    model = create_backbone(name, 10, cifar_stem=True, channels=(8, 16, 32, 64))
    return model.to(dtype) if dtype is not None else model


def tiny_vit(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=depth)


def user_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def user_cnn() -> nn.Module:
    """Conv/BN blocks, a depthwise-separable pair, global pooling and a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


USER_CNN_SPARSE = ["3", "7"]  # stem "0", depthwise "6" and head "11" stay dense
USER_MLP_SPARSE = ["3"]  # first "1" and last "5" stay dense


def expected_targets(
    family: str, layers: list[str], sparsity: float, conv_bn: bool = False, transform_shortcuts: bool = False
) -> dict[str, float]:
    """The sparse parameters each member must declare for the replaced ``layers``.

    ``conv_bn``: the layers are convs followed by a BatchNorm, so Parallel branches are
    ``Sequential(conv, bn)`` and the weight lives at ``branches.i.0``. Shortcut convs (``downsample``)
    stay one sparse conv unless ``transform_shortcuts``.
    """
    shortcuts = [] if transform_shortcuts else [n for n in layers if "downsample" in n.split(".")]
    if shortcuts:
        out = {f"{n}.weight": sparsity for n in shortcuts}
        rest = [n for n in layers if n not in shortcuts]
        return {**out, **expected_targets(family, rest, sparsity, conv_bn, transform_shortcuts=True)}
    if family == "sparse_parallel":
        inner = ".0" if conv_bn else ""
        names = [f"{n}.branches.{i}{inner}.weight" for n in layers for i in range(parallel_branches(sparsity))]
    elif family == "sparse_factorized":
        names = [f"{n}.{f}.weight" for n in layers for f in ("u", "v")]
    elif family == "sparse_doped":
        names = [f"{n}.sparse.weight" for n in layers]
    else:
        names = [f"{n}.weight" for n in layers]
    return {n: sparsity for n in names}
