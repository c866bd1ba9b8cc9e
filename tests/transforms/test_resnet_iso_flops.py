"""Whole-model parameter and MAC counts against the official CIFAR ResNet-18, and ResNet-50 at 224.

Counts run on the meta device (shapes only, instant); test_wide_limits.py checks that meta and CPU
give the same counts.
"""

import pytest
import torch

from sift_lightning import count_flops, create_backbone, transform
from transform_models import (
    DENSE_MACS,
    DENSE_PARAMS,
    IN_PLACE,
    MEMBERS,
    REFERENCE_ROWS,
    SPARSITIES,
    cifar_resnet18,
)

def _x(device: str, size: int = 32) -> torch.Tensor:
    return torch.zeros(1, 3, size, size, device=device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_dense_cifar_resnet18_matches_reference(device):
    report = count_flops(cifar_resnet18(device), _x(device))
    assert report.params == DENSE_PARAMS == REFERENCE_ROWS[("dense", 0)]["params"]
    assert report.dense_macs == DENSE_MACS == REFERENCE_ROWS[("dense", 0)]["dense_macs"]
    assert report.sparse_macs == DENSE_MACS
    assert report.other_macs == 0


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("family", MEMBERS)
def test_cifar_resnet18_iso_flop_and_params(family, s):
    report = count_flops(transform(cifar_resnet18("meta"), family, s), _x("meta"))
    ref = REFERENCE_ROWS[(family, s)]
    assert report.sparse_macs == pytest.approx(DENSE_MACS, rel=0.02)
    # with the official shortcuts (one sparse 1x1 conv + BN) Parallel, Factorized and Doped land on the
    # official model: measured within 0.035% of its params and 0.08% of its MACs (they were 0.4% .. 1.4%
    # off when the shortcut was transformed too); Sparse Wide's floor(k c) widths stay within 2%
    rel = 0.02 if family == "sparse_wide" else 0.001
    assert report.params == pytest.approx(ref["params"], rel=rel)
    assert report.dense_macs == pytest.approx(ref["dense_macs"], rel=rel)
    assert report.sparse_macs == pytest.approx(ref["sparse_macs"], rel=rel)


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("family", IN_PLACE)
def test_cifar_resnet18_transformed_shortcuts_cost_more(family, s):
    # transform_shortcuts=True restores the former structure: the shortcut convs grow like the others
    x = _x("meta")
    default = count_flops(transform(cifar_resnet18("meta"), family, s), x)
    report = count_flops(transform(cifar_resnet18("meta"), family, s, transform_shortcuts=True), x)
    assert report.params > default.params and report.dense_macs > default.dense_macs
    assert report.sparse_macs == pytest.approx(DENSE_MACS, rel=0.02)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_cifar_resnet18_sparse_wide_075_is_exact(device):
    # k = 2 exactly: every hidden width doubles, as in the official model
    report = count_flops(transform(cifar_resnet18(device), "sparse_wide", 0.75), _x(device))
    ref = REFERENCE_ROWS[("sparse_wide", 0.75)]
    assert report.params == 44_755_172 == ref["params"]
    assert report.dense_macs == 2_218_233_856 == ref["dense_macs"]
    # widened layers cost exactly dense; the stem (3->128) and fc (1024->100) double, dense
    assert report.sparse_macs == DENSE_MACS + 3 * 3 * 3 * 64 * 32 * 32 + 512 * 100 == ref["sparse_macs"]


# the three 1x1 shortcut convs of a CIFAR ResNet-18: 64->128 at 16x16, 128->256 at 8x8, 256->512 at 4x4
SHORTCUT_MACS = 3 * 64 * 128 * 16 * 16


@pytest.mark.parametrize("s", SPARSITIES)
def test_cifar_resnet18_sparse_parallel_is_exactly_iso_flop(s):
    # n (1 - s) = 1 for 0.5, 0.75 and 0.9: the branched convs cost exactly dense; stem and fc stay
    # dense; the shortcut convs stay single and sparse at s, so they cost (1 - s) of their dense MACs
    report = count_flops(transform(cifar_resnet18("meta"), "sparse_parallel", s), _x("meta"))
    stem_fc = 3 * 3 * 3 * 64 * 32 * 32 + 512 * 100
    assert report.sparse_macs == pytest.approx(DENSE_MACS - s * SHORTCUT_MACS, rel=1e-12)
    assert report.sparse_macs == pytest.approx(REFERENCE_ROWS[("sparse_parallel", s)]["sparse_macs"], abs=1)
    n = round(1 / (1 - s))
    assert report.dense_macs == stem_fc + SHORTCUT_MACS + n * (DENSE_MACS - stem_fc - SHORTCUT_MACS)
    model = transform(cifar_resnet18("meta"), "sparse_parallel", s, transform_shortcuts=True)
    shortcuts = count_flops(model, _x("meta"))
    assert shortcuts.sparse_macs == pytest.approx(DENSE_MACS, rel=1e-12)


def _resnet50(device: str) -> torch.nn.Module:
    with torch.device(device):
        return create_backbone("resnet50", 1000)


RESNET50_MACS = 4_089_184_256  # timm resnet50, one 3x224x224 image


def test_resnet50_dense_macs():
    report = count_flops(_resnet50("meta"), _x("meta", 224))
    assert report.dense_macs == RESNET50_MACS
    assert report.params == 25_557_032


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("family", IN_PLACE)
def test_resnet50_iso_flop(family, s):
    x = _x("meta", 224)
    report = count_flops(transform(_resnet50("meta"), family, s, transform_shortcuts=True), x)
    assert report.sparse_macs == pytest.approx(RESNET50_MACS, rel=0.02)
    # the official shortcuts (one sparse 1x1 conv each) leave a bottleneck ResNet under budget: its four
    # shortcut convs are 8.8% of the dense MACs, so the model lands at 1 - s * 8.8% plus each member's
    # own rounding (measured: 0.918 .. 0.958); match_flops (below) meets the budget instead
    default = count_flops(transform(_resnet50("meta"), family, s), x).sparse_macs / RESNET50_MACS
    shortcut_share = sum(
        r.dense_macs for r in count_flops(_resnet50("meta"), x).layers if "downsample" in r.name
    ) / RESNET50_MACS
    assert default == pytest.approx(report.sparse_macs / RESNET50_MACS - s * shortcut_share, abs=0.005)


@pytest.mark.parametrize(
    ("s", "low", "high"),
    # measured: +1.03%, +2.94%, +6.17%. Not iso-FLOP: the dense 7x7 stem (118M MACs at 112x112)
    # grows by k in its output width, which a 32x32 CIFAR stem does not make visible.
    [(0.5, 1.009, 1.012), (0.75, 1.029, 1.030), (0.9, 1.060, 1.064)],
)
def test_resnet50_plain_sparse_wide_overshoots(s, low, high):
    report = count_flops(transform(_resnet50("meta"), "sparse_wide", s), _x("meta", 224))
    assert low < report.sparse_macs / RESNET50_MACS < high
    if s == 0.75:
        # k = 2: widened layers are exactly iso-FLOP; the stem (3->128 at 112x112) and fc
        # (4096->1000) double and stay dense
        assert report.sparse_macs == RESNET50_MACS + 7 * 7 * 3 * 64 * 112 * 112 + 2048 * 1000


@pytest.mark.parametrize("family", MEMBERS)
def test_resnet50_match_flops_meets_dense_budget(family):
    x = _x("meta", 224)
    model = transform(_resnet50("meta"), family, 0.75, match_flops=True, example_input=x)
    report = count_flops(model, x)
    assert report.sparse_macs == pytest.approx(RESNET50_MACS, rel=1e-3)
    # the retuned sparsity is one value, shared by every sparse layer, near the requested one
    sparsities = {m.sift_sparsity["weight"] for m in model.modules() if hasattr(m, "sift_sparsity")}
    assert len(sparsities) == 1
    # Doped's floor(r) keeps it a little under budget, and its sparse shortcut convs more so (0.679)
    assert 0.65 < sparsities.pop() < 0.8


@pytest.mark.parametrize("s", SPARSITIES)
def test_cifar_resnet18_match_flops(s):
    x = _x("meta")
    for family in MEMBERS:
        model = transform(cifar_resnet18("meta"), family, s, match_flops=True, example_input=x)
        assert count_flops(model, x).sparse_macs == pytest.approx(DENSE_MACS, rel=1e-3), family
