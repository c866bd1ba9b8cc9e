"""The registry is the one list of members; each member owns its deploy form; Wide keeps layers' settings."""

import pytest
import torch
from torch import nn

import sift_lightning.transforms as transforms
from sift_lightning import count_flops, transform
from sift_lightning.sparse.masks import get_mask, init_masks
from sift_lightning.transforms import get_member, register, unregister
from sift_lightning.transforms.parallel import NormActTail, SparseParallel

timm = pytest.importorskip("timm")


def test_members_come_from_the_registry_in_order():
    assert transforms.MEMBERS == ("dense", "sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
    assert transforms.FAMILIES == transforms.MEMBERS


def test_register_accepts_a_new_name_and_lookups_list_it():
    @register("sparse_test_only")
    def member(model, sparsity, **select):
        return model

    try:
        assert transforms.MEMBERS[-1] == "sparse_test_only"
        assert transform(nn.Linear(2, 2), "sparse_test_only", 0.5).sift_member == "sparse_test_only"
        with pytest.raises(ValueError, match="unknown Sparse-IFT member 'nope'; valid: dense, .*sparse_test_only"):
            get_member("nope")
        with pytest.raises(ValueError, match="registered already"):
            register("sparse_test_only")(lambda model, sparsity: model)
    finally:
        unregister("sparse_test_only")


def test_member_positional_and_width_factor():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    wide = transform(model, "sparse_wide", 0.75)
    assert isinstance(wide.sift_width_factor, float) and wide.sift_width_factor == 2.0


def _norm_act_cnn() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mobilenetv2_035", pretrained=False, num_classes=10)


def test_wide_keeps_norm_activations_and_linear_bottleneck():
    dense = _norm_act_cnn()
    wide = transform(dense, "sparse_wide", 0.75, example_input=torch.zeros(1, 3, 32, 32))
    acts = lambda m: [(n, type(a).__name__) for n, a in m.named_modules() if n.endswith(".act")]  # noqa: E731
    assert acts(wide) == acts(dense)  # ReLU6 stays ReLU6, the linear bottleneck's Identity stays Identity
    assert type(wide.blocks[1][0].bn3.act) is nn.Identity
    assert wide.blocks[1][0].conv_pw.out_channels == 2 * dense.blocks[1][0].conv_pw.out_channels
    # match_flops is on by default with an example input: the sparse MACs meet the dense budget
    x = torch.zeros(1, 3, 32, 32)
    assert count_flops(wide, x).sparse_macs == pytest.approx(count_flops(dense, x).dense_macs, rel=1e-3)


def test_wide_keeps_same_padding_and_a_1x1_conv_classifier():
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    dense = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=10)
    wide = transform(dense, "sparse_wide", 0.75, example_input=x[:1])
    assert type(wide.conv_stem) is type(dense.conv_stem) and type(dense.conv_stem).__name__ == "Conv2dSame"
    assert wide(x).shape == (2, 10)
    torch.manual_seed(0)
    dla = timm.create_model("dla34", pretrained=False, num_classes=10)
    assert isinstance(dla.fc, nn.Conv2d)
    wide = transform(dla, "sparse_wide", 0.75, example_input=x[:1])
    assert wide.fc.out_channels == 10 and wide(x).shape == (2, 10)


def test_wide_refuses_a_split_before_building():
    model = timm.create_model("mixnet_s", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"sparse_wide cannot widen EfficientNet: blocks\.1\.0\.conv_pw fails once widened"):
        transform(model, "sparse_wide", 0.75)


def test_parallel_branches_carry_the_norm_and_the_activation_follows_the_sum():
    model = transform(_norm_act_cnn(), "sparse_parallel", 0.75)
    block = model.blocks[1][0]
    assert isinstance(block.conv_pw, SparseParallel) and block.conv_pw.norm_slot == "bn1"
    assert all(isinstance(b, nn.Sequential) and type(b[1]).__name__ == "BatchNormAct2d" and type(b[1].act) is nn.Identity
               for b in block.conv_pw.branches)
    assert isinstance(block.bn1, NormActTail) and type(block.bn1.act) is nn.ReLU6


def test_effective_weight_layers_are_refused():
    model = timm.create_model("nf_resnet26", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match="sparse_doped cannot make .* sparse: it is a ScaledStdConv2d"):
        transform(model, "sparse_doped", 0.75)


def test_weight_readers_are_refused():
    model = timm.create_model("edgenext_xx_small", pretrained=False, num_classes=10)
    with pytest.raises(ValueError, match=r"sparse_parallel cannot replace .*token_projection: .*reads token_projection\.weight"):
        transform(model, "sparse_parallel", 0.75)


@pytest.mark.parametrize("member", ["sparse_parallel", "sparse_doped"])
def test_members_fold_themselves(member):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    model = transform(net, member, 0.75).eval()
    init_masks(model, generator=torch.Generator().manual_seed(0))
    layer = model[1]
    folded = layer.fold()
    assert type(folded) is nn.Conv2d and folded.weight.shape == (6, 6, 3, 3)
    assert get_mask(folded, "weight") is None and not hasattr(folded, "sift_sparsity")
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), layer(x), rtol=1e-5, atol=1e-5)


def test_factorized_fold_refuses_the_nonlinearity():
    model = transform(nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Conv2d(6, 2, 1)), "sparse_factorized", 0.5)
    with pytest.raises(ValueError, match="cannot fold Sparse Factorized: a nonlinearity sits between U and V"):
        model[1].fold()


def test_count_flops_under_no_grad_on_cait():
    model = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=2)
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        inside = count_flops(model, x).dense_macs
    assert inside == count_flops(model, x).dense_macs > 0
    assert all(p.requires_grad for p in model.parameters())


def test_wide_without_match_flops_says_how_far_over_budget_it_is():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, channels=(16, 32, 64, 128))
    x = torch.zeros(1, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"sparse_wide: the widened model costs \+\d+\.\d% MACs over the dense one at "
                                         r"a \(1, 3, 32, 32\) input .* leave match_flops on"):
        wide = transform(model, "sparse_wide", 0.75, match_flops=False, example_input=x)
    assert count_flops(wide, x).sparse_macs > 1.02 * count_flops(model, x).dense_macs
