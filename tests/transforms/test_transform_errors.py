"""Invalid arguments fail loudly, naming what is allowed."""

import pytest
import torch

from sift_lightning import create_backbone, transform
import sift_lightning.transforms as transforms
from transform_models import MEMBERS, user_cnn


@pytest.mark.parametrize("family", MEMBERS)
@pytest.mark.parametrize("sparsity", [0, 0.0, 1, 1.0, -0.1, 1.5, "0.5", True, False, float("nan"), None])
def test_bad_sparsity(family, sparsity):
    model = user_cnn()
    with pytest.raises(ValueError, match=r"sparsity must be a number in \(0, 1\).*got"):
        transform(model, family, sparsity)
    assert not any(hasattr(m, "sift_sparsity") for m in model.modules())  # nothing half-done


def test_unknown_member_lists_all_members():
    with pytest.raises(ValueError, match="unknown Sparse-IFT member 'sparse_magic'") as info:
        transform(user_cnn(), "sparse_magic", 0.5)
    for member in transforms.MEMBERS:
        assert member in str(info.value)
    assert transforms.MEMBERS == transforms.FAMILIES == ("dense", "sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")


@pytest.mark.parametrize(
    ("family", "option", "valid"),
    [
        ("sparse_parallel", "linear_act", "branch_norm"),
        ("sparse_factorized", "branch_norm", "conv_norm, conv_act, linear_norm, linear_act"),
        ("sparse_doped", "rank", "include, exclude, keep_ends_dense, match_flops"),
        ("sparse_wide", "factor", "include, exclude"),
    ],
)
def test_unknown_option(family, option, valid):
    with pytest.raises(ValueError, match=f"{family} does not take option.*{option}.*valid: .*{valid}"):
        transform(user_cnn(), family, 0.5, **{option: 1})


@pytest.mark.parametrize(("option", "value"), [("conv_norm", "groupnorm"), ("linear_act", "tanh")])
def test_bad_factorized_option_value(option, value):
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        transform(user_cnn(), "sparse_factorized", 0.5, **{option: value})


def test_match_flops_without_example_input():
    with pytest.raises(ValueError, match="match_flops=True needs example_input"):
        transform(user_cnn(), "sparse_parallel", 0.5, match_flops=True)


def test_cifar_stem_on_vit():
    with pytest.raises(ValueError, match="cifar_stem applies to timm ResNets.*'vit_tiny_patch16_224'"):
        create_backbone("vit_tiny_patch16_224", 10, cifar_stem=True, img_size=32, patch_size=8)


def test_unknown_timm_name():
    with pytest.raises(ValueError, match=r"^unknown backbone 'resnet_does_not_exist'; pick a name from timm\.list_models\(\)"):
        create_backbone("resnet_does_not_exist", 10)


def test_match_flops_budget_out_of_reach():
    # Sparse Wide on a model that is almost all stem: the stem alone, widened by k and dense,
    # costs more than the whole dense model, so no sparsity in (0, 1) meets the budget
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.Conv2d(64, 8, 1), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 10),
    )
    with pytest.raises(ValueError, match="cannot meet a budget"):
        transform(model, "sparse_wide", 0.9, match_flops=True, example_input=torch.zeros(1, 3, 8, 8))
