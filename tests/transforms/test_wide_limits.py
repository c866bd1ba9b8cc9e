"""Sparse Wide beyond the timm ResNets: what it widens, and what it refuses by name."""

import pytest
import torch
from torch import nn

from sift_lightning import count_flops, sparse_targets, transform
from transform_models import cifar_resnet18, tiny_resnet, user_cnn


@pytest.mark.parametrize(("s", "width"), [(0.5, 90), (0.75, 128), (0.9, 202)])
def test_widths_are_floor_k_c(s, width):
    model = transform(tiny_resnet(), "sparse_wide", s)
    assert model.conv1.in_channels == 3  # input width fixed by the data
    assert model.conv1.out_channels == width  # floor(64 k)
    assert model.fc.out_features == 10  # output width fixed by the classes
    assert model.fc.in_features == model.num_features == int(64 * (1 / (1 - s)) ** 0.5 + 1e-6)


def test_zero_init_of_last_norm_is_kept():
    model = transform(tiny_resnet(), "sparse_wide", 0.5)
    assert not model.layer1[0].bn2.weight.any()  # timm zero-inits each block's last BN
    assert model.layer1[0].bn1.weight.eq(1).all()


def test_depthwise_stays_depthwise_and_dense():
    model = transform(user_cnn(), "sparse_wide", 0.5)
    dw = model[6]
    assert dw.groups == dw.in_channels == dw.out_channels == 22
    assert "6.weight" not in sparse_targets(model)


@pytest.mark.parametrize("s", [0.5, 0.9])  # 0.75: test_cifar_resnet18_sparse_wide_075_is_exact
def test_sparse_wide_on_meta_counts_like_cpu(s):
    meta = count_flops(transform(cifar_resnet18("meta"), "sparse_wide", s), torch.zeros(1, 3, 32, 32, device="meta"))
    cpu = count_flops(transform(cifar_resnet18("cpu"), "sparse_wide", s), torch.zeros(1, 3, 32, 32))
    assert (meta.params, meta.dense_macs, meta.sparse_macs) == (cpu.params, cpu.dense_macs, cpu.sparse_macs)
    assert {p.device.type for p in transform(cifar_resnet18("meta"), "sparse_wide", s).parameters()} == {"meta"}


def test_sparse_wide_keeps_dtype_of_non_affine_norm():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).double()
    wide = transform(model, "sparse_wide", 0.5)
    assert wide[1].running_mean.dtype == torch.float64


def _widen_or_refuse(model: nn.Module, x: torch.Tensor) -> None:
    """Sparse Wide must either refuse the model with a ValueError or return one that runs."""
    try:
        wide = transform(model, "sparse_wide", 0.5)
    except ValueError as err:
        assert str(err).startswith("sparse_wide cannot widen")
        return
    assert wide(x).shape == model(x).shape


def test_sparse_wide_mlp():
    _widen_or_refuse(nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)),
                     torch.randn(2, 48))


def test_sparse_wide_cnn_with_flatten_of_spatial_map():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    _widen_or_refuse(model, torch.randn(2, 3, 4, 4))


def test_sparse_wide_depthwise_multiplier():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.Conv2d(32, 32, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    _widen_or_refuse(model, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"features_only": True}])
def test_sparse_wide_refuses_a_headless_backbone_and_says_why(kwargs):
    # without a classifier the model returns its features, which Sparse Wide would widen
    import timm

    model = timm.create_model("resnet18", **kwargs)
    with pytest.raises(ValueError, match=r"sparse_wide cannot widen .*no Conv2d/Linear layer writes this model's output"
                                         r".*num_classes=0 or features_only=True.*together with its head"):
        transform(model, "sparse_wide", 0.5, example_input=torch.zeros(1, 3, 64, 64))
    with_head = transform(timm.create_model("resnet18", num_classes=10), "sparse_wide", 0.5,
                          example_input=torch.zeros(1, 3, 64, 64))
    assert with_head(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
