"""Every member on real tiny models: same output shape, a finite gradient for every parameter."""

import pytest
import torch

from sift_lightning import count_flops, create_backbone, sparse_targets, transform
from transform_models import IN_PLACE, MEMBERS, SPARSITIES, tiny_resnet, tiny_vit, user_cnn, user_mlp

MODELS = {
    "resnet18": (lambda: tiny_resnet("resnet18"), (2, 3, 16, 16), (2, 10)),
    "resnet50": (lambda: tiny_resnet("resnet50"), (2, 3, 16, 16), (2, 10)),
    "vit": (tiny_vit, (2, 3, 32, 32), (2, 10)),
    "cnn": (user_cnn, (2, 3, 8, 8), (2, 10)),
    "mlp": (user_mlp, (2, 3, 4, 4), (2, 10)),
}
CASES = [
    pytest.param(model, family)
    for model in MODELS
    for family in MEMBERS
    if not (model == "vit" and family == "sparse_wide")  # raises, tested below
]


@pytest.mark.parametrize(("model_name", "family"), CASES)
def test_shape_and_gradients(model_name, family):
    build, in_shape, out_shape = MODELS[model_name]
    model = transform(build(), family, 0.75)
    assert sparse_targets(model), "nothing was made sparse"
    torch.manual_seed(1)
    out = model.train()(torch.randn(in_shape))
    assert out.shape == out_shape
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("family", IN_PLACE)
def test_vit_iso_flop(family, s):
    # full-depth vit_tiny, 17 tokens of width 192; attention matmuls stay dense in both totals
    x = torch.zeros(1, 3, 32, 32, device="meta")
    with torch.device("meta"):
        dense = count_flops(tiny_vit(depth=12), x)
        model = transform(tiny_vit(depth=12), family, s)
    report = count_flops(model, x)
    assert dense.other_macs > 0
    assert report.other_macs == dense.other_macs
    assert report.sparse_macs == pytest.approx(dense.dense_macs, rel=0.02)


def test_vit_keeps_patch_embed_and_head_dense():
    targets = sparse_targets(transform(tiny_vit(), "sparse_doped", 0.5))
    layers = {n.removesuffix(".sparse.weight") for n in targets}
    assert layers == {f"blocks.{b}.{l}" for b in range(2) for l in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def test_sparse_wide_on_vit_names_supported_models():
    with pytest.raises(ValueError, match="sparse_wide cannot widen VisionTransformer.*supported:.*timm ResNets"):
        transform(tiny_vit(), "sparse_wide", 0.5)


def test_in_place_members_return_the_same_module_and_wide_a_new_one():
    for family in IN_PLACE:
        model = user_cnn()
        assert transform(model, family, 0.5) is model
    model = user_cnn()
    wide = transform(model, "sparse_wide", 0.5)
    assert wide is not model
    assert not sparse_targets(model)  # the input model is left dense
    assert model[3].out_channels == 16 and wide[3].out_channels == 22  # floor(16 sqrt 2)


def test_dense_family_returns_model_unchanged():
    model = user_cnn()
    assert transform(model, "dense", 0.5) is model
    assert not sparse_targets(model)


def test_timm_channels_kwarg_gives_tiny_resnet():
    model = create_backbone("resnet18", 10, cifar_stem=True, channels=(8, 16, 32, 64))
    assert model.conv1.out_channels == 64  # timm's single-conv stem is always 64 wide
    assert [model.get_submodule(f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [8, 16, 32, 64]
    assert sum(p.numel() for p in model.parameters()) == 182_586


def test_factorized_linear_batchnorm_on_sequences():
    from sift_lightning.models.gpt import GPT, gpt_config

    with pytest.raises(ValueError, match=r"linear_norm must be one of \('layernorm', 'none'\)"):
        transform(GPT(gpt_config("gpt_tiny")), "sparse_factorized", 0.5, linear_norm="batchnorm")
