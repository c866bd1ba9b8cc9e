"""Sparse Parallel: conv branches carry their own BatchNorm and the block sums them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sift_lightning import transform
from sift_lightning.transforms.parallel import SparseParallel
from transform_models import RESNET18_SPARSE, tiny_resnet


@pytest.mark.parametrize("transform_shortcuts", [False, True])
def test_timm_resnet_branches_are_conv_bn_and_original_bn_is_identity(transform_shortcuts):
    model = transform(tiny_resnet(), "sparse_parallel", 0.75, transform_shortcuts=transform_shortcuts)
    for name in RESNET18_SPARSE:
        if "downsample" in name and not transform_shortcuts:  # one sparse conv + its BN, as the official code
            assert type(model.get_submodule(name)) is nn.Conv2d and model.get_submodule(name).sift_sparsity
            assert type(model.get_submodule(name[:-1] + "1")) is nn.BatchNorm2d
            continue
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseParallel), name
        assert len(layer.branches) == 4
        for branch in layer.branches:
            assert isinstance(branch, nn.Sequential) and len(branch) == 2
            assert type(branch[0]) is nn.Conv2d and type(branch[1]) is nn.BatchNorm2d
        # the norm that followed the conv: bn1/bn2 in a block, index 1 in the downsample
        parent, _, child = name.rpartition(".")
        bn_name = {"conv1": "bn1", "conv2": "bn2", "0": "1"}[child]
        assert type(model.get_submodule(f"{parent}.{bn_name}")) is nn.Identity, name
    # the stem keeps its conv and norm
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d
    # branches are independent copies with their own initialisation
    w = [b[0].weight for b in model.layer1[0].conv1.branches]
    assert all(a is not b and not torch.equal(a, b) for a, b in zip(w, w[1:]))


def test_output_is_sum_of_conv_bn_branches():
    torch.manual_seed(0)
    model = transform(tiny_resnet(), "sparse_parallel", 0.5).eval()
    layer = model.layer2[0].conv1
    for branch in layer.branches:  # non-trivial norm statistics
        branch[1].running_mean.uniform_(-1, 1)
        branch[1].running_var.uniform_(0.5, 2)
        branch[1].weight.data.uniform_(0.5, 2)
        branch[1].bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 16, 16)
    expected = sum(
        F.batch_norm(
            F.conv2d(x, conv.weight, None, conv.stride, conv.padding),
            bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps,
        )
        for conv, bn in layer.branches
    )
    torch.testing.assert_close(layer(x), expected)
    # and the block puts its activation after the sum: bn1 is now the identity
    block = model.layer2[0]
    h = block.act1(block.bn1(layer(x)))
    torch.testing.assert_close(h, F.relu(expected))


def test_linear_branches_sum_with_their_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    model = transform(model, "sparse_parallel", 0.9)
    layer = model[1]
    assert len(layer.branches) == 10
    assert all(type(b) is nn.Linear and b.bias is not None for b in layer.branches)
    x = torch.randn(4, 8)
    expected = sum(F.linear(x, b.weight, b.bias) for b in layer.branches)
    torch.testing.assert_close(layer(x), expected)


def test_branch_norm_false_keeps_the_original_bn():
    model = transform(tiny_resnet(), "sparse_parallel", 0.5, branch_norm=False)
    assert all(type(b) is nn.Conv2d for b in model.layer1[0].conv1.branches)
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d


def test_conv_not_followed_by_its_norm_gets_plain_branches():
    # conv "1" feeds a ReLU, not a norm; the BN registered later has other features
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
        nn.Conv2d(4, 2, 1),
    )
    model = transform(model, "sparse_parallel", 0.5)
    assert all(type(b) is nn.Conv2d for b in model[1].branches)
    assert all(isinstance(b, nn.Sequential) for b in model[3].branches)
    assert type(model[4]) is nn.Identity
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 2, 4, 4)


@pytest.mark.parametrize("transform_shortcuts", [False, True])
@pytest.mark.parametrize("s", [0.5, 0.75])
def test_parallel_param_count(s, transform_shortcuts):
    # every candidate conv and its norm are copied n times (shortcut convs only when told to)
    dense = tiny_resnet()
    sparse = transform(tiny_resnet(), "sparse_parallel", s, transform_shortcuts=transform_shortcuts)
    n = round(1 / (1 - s))
    per_layer = 0
    for name in (n for n in RESNET18_SPARSE if transform_shortcuts or "downsample" not in n):
        conv = dense.get_submodule(name)
        per_layer += conv.weight.numel() + 2 * conv.out_channels  # conv + BN affine
    total_dense = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in sparse.parameters()) == total_dense + (n - 1) * per_layer


def test_branches_without_a_norm_warn_that_they_sum_to_one_matrix():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"sparse_parallel: 2 layer\(s\) \(1, \.\.\.\) have no norm of their own"):
        transform(model, "sparse_parallel", 0.5)
    with pytest.warns(UserWarning, match="no norm of their own"):
        transform(tiny_resnet(), "sparse_parallel", 0.5, branch_norm=False)


def test_conv_bn_branches_do_not_warn(recwarn):
    transform(tiny_resnet(), "sparse_parallel", 0.5)
    assert not [w for w in recwarn if "sparse_parallel" in str(w.message)]


class _ListedConvs(nn.Module):
    """Res2Net's layout: convs[i] feeds bns[i], the two kept in lists registered one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(2)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(4) for _ in range(2)])
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return self.head(x)


def test_norms_kept_in_a_sibling_list_go_into_the_branches_and_fold_back():
    from sift_lightning import dense_state_dict

    torch.manual_seed(0)
    model = transform(_ListedConvs(), "sparse_parallel", 0.5)
    for i in range(2):
        assert model.convs[i].norm_slot == f"../bns.{i}"
        assert all(isinstance(b, nn.Sequential) and type(b[1]) is nn.BatchNorm2d for b in model.convs[i].branches)
        assert type(model.bns[i]) is nn.Identity
    plain = _ListedConvs()
    plain.load_state_dict(dense_state_dict(model.eval()), strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-5, atol=1e-5)
