"""Which layers a member replaces: ends dense, depthwise dense, include/exclude, GPT, and no re-transform."""

import pytest
import torch
from torch import nn

from sift_lightning import DynamicSparsity, SparsitySettings, sparse_targets, transform
from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.transforms.parallel import parallel_branches
from transform_models import (
    MEMBERS,
    RESNET18_LAYERS,
    RESNET18_SPARSE,
    USER_CNN_SPARSE,
    expected_targets,
    tiny_resnet,
    user_cnn,
)

GPT_LAYERS = [f"blocks.{b}.{l}" for b in range(2) for l in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


@pytest.mark.parametrize("family", MEMBERS)
def test_resnet_stem_and_classifier_stay_dense(family):
    model = transform(tiny_resnet(), family, 0.5)
    assert sparse_targets(model) == expected_targets(family, RESNET18_SPARSE, 0.5, conv_bn=True)
    assert type(model.conv1) is nn.Conv2d and not hasattr(model.conv1, "sift_sparsity")
    assert type(model.fc) is nn.Linear and not hasattr(model.fc, "sift_sparsity")


@pytest.mark.parametrize("family", MEMBERS)
def test_depthwise_conv_never_transformed(family):
    model = transform(user_cnn(), family, 0.5)
    conv_then_bn, conv_then_relu = USER_CNN_SPARSE
    expected = expected_targets(family, [conv_then_bn], 0.5, conv_bn=True)
    expected.update(expected_targets(family, [conv_then_relu], 0.5))
    assert sparse_targets(model) == expected
    dw = model[6]
    assert type(dw) is nn.Conv2d and dw.groups == dw.in_channels == dw.out_channels
    assert not hasattr(dw, "sift_sparsity")


def test_depthwise_stays_dense_even_with_include_everything():
    model = transform(user_cnn(), "sparse_factorized", 0.5, include=["*"], keep_ends_dense=False)
    assert type(model[6]) is nn.Conv2d
    assert {n.split(".")[0] for n in sparse_targets(model)} == {"0", "3", "7", "11"}


@pytest.mark.parametrize("family", MEMBERS)
def test_keep_ends_dense_false_transforms_stem_and_classifier(family):
    model = transform(tiny_resnet(), family, 0.5, keep_ends_dense=False)
    # the stem is followed by bn1, so it is conv_bn too; fc has no norm
    expected = expected_targets(family, RESNET18_LAYERS[:-1], 0.5, conv_bn=True)
    expected.update(expected_targets(family, ["fc"], 0.5))
    assert sparse_targets(model) == expected


def test_include_patterns():
    model = transform(tiny_resnet(), "sparse_doped", 0.5, include=["layer1.*", "layer3.1.conv?"])
    # the shortcut conv stays one sparse conv (layer1.0.downsample.0.weight), the others are doped
    layers = sorted(n.removesuffix(".weight").removesuffix(".sparse") for n in sparse_targets(model))
    assert layers == [
        "layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0", "layer1.1.conv1", "layer1.1.conv2",
        "layer3.1.conv1", "layer3.1.conv2",
    ]


def test_include_does_not_override_kept_ends():
    model = transform(tiny_resnet(), "sparse_doped", 0.5, include=["conv1", "layer1.0.conv1"])
    assert list(sparse_targets(model)) == ["layer1.0.conv1.sparse.weight"]


def test_exclude_patterns():
    model = transform(tiny_resnet(), "sparse_factorized", 0.5, exclude=["layer4.*", "*downsample*"])
    layers = {n.rsplit(".", 2)[0] for n in sparse_targets(model)}
    assert layers == {n for n in RESNET18_SPARSE if not n.startswith("layer4") and "downsample" not in n}
    assert type(model.layer4[0].conv1) is nn.Conv2d


def test_selection_that_leaves_nothing_raises():
    with pytest.raises(ValueError, match="no Conv2d/Linear layer left to make sparse"):
        transform(tiny_resnet(), "sparse_parallel", 0.5, include=["nothing*"])
    with pytest.raises(ValueError, match="no Conv2d/Linear layer left"):
        transform(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "sparse_doped", 0.5)


@pytest.mark.parametrize("family", MEMBERS)
def test_gpt_blocks_sparse_embeddings_head_norms_dense(family):
    model = transform(GPT(gpt_config("gpt_tiny")), family, 0.5)
    assert sparse_targets(model) == expected_targets(family, GPT_LAYERS, 0.5)
    assert type(model.lm_head) is nn.Linear and not hasattr(model.lm_head, "sift_sparsity")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            assert not hasattr(module, "sift_sparsity"), name
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)} == {"wte", "wpe"}
    logits = model(torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, 256)


def test_gpt_keep_ends_dense_false_transforms_lm_head():
    from dataclasses import replace

    untied = GPT(replace(gpt_config("gpt_tiny"), tie_weights=False))
    model = transform(untied, "sparse_doped", 0.5, keep_ends_dense=False)
    assert "lm_head.sparse.weight" in sparse_targets(model)
    # tied to the token embedding (the default), the head would untie or mask the embedding: refused
    with pytest.raises(ValueError, match=r"^lm_head\.weight is shared with wte\.weight \(tied weights\)"):
        transform(GPT(gpt_config("gpt_tiny")), "sparse_doped", 0.5, keep_ends_dense=False)


def test_gpt_parallel_branch_count():
    model = transform(GPT(gpt_config("gpt_tiny")), "sparse_parallel", 0.9)
    assert len(model.blocks[0].mlp.fc.branches) == parallel_branches(0.9) == 10


@pytest.mark.parametrize(
"second", MEMBERS)
@pytest.mark.parametrize("first", MEMBERS)
def test_transforming_twice_raises(first, second):
    model = transform(tiny_resnet(), first, 0.5)
    with pytest.raises(ValueError, match="already has sparse layers"):
        transform(model, second, 0.5)


@pytest.mark.parametrize(
"second", MEMBERS)
def test_transforming_gpt_twice_raises(second):
    model = transform(GPT(gpt_config("gpt_tiny")), "sparse_wide", 0.5)
    with pytest.raises(ValueError, match="already has sparse layers"):
        transform(model, second, 0.5)


class _Mixed(nn.Module):
    """A 1-d conv front end, attention with a packed input projection, and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(4, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.front(x).transpose(1, 2)
        h = self.attn(h, h, h)[0]
        return self.head(self.fc2(self.fc1(h).relu())).mean(1)


@pytest.mark.parametrize("family", [None, "sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_weight_layers_no_member_handles_are_named(family):
    # Conv1d and MultiheadAttention's packed projection stay dense: said, with their names
    # (Sparse Wide refuses this model outright: it cannot widen attention)
    with pytest.warns(UserWarning, match=r"2 layer\(s\) of type Conv1d/MultiheadAttention \(front, attn\) are not "
                                         r"Conv2d or Linear.*stay dense"):
        if family is None:  # the engine marks the candidates sparse; the Conv1d front end is the stem
            model = DynamicSparsity(SparsitySettings(sparsity=0.5)).apply(_Mixed())
            assert set(sparse_targets(model)) == {"attn.out_proj.weight", "fc1.weight", "fc2.weight"}
        else:
            # MultiheadAttention reads out_proj.weight itself: the members refuse to replace it
            transform(_Mixed(), family, 0.5, example_input=torch.zeros(2, 4, 8), exclude=["attn.out_proj"])


def test_only_unhandled_layers_left_is_an_error_that_names_them():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(32, 2))
    with pytest.raises(ValueError, match=r"no Conv2d/Linear layer left to make sparse \(layers found: 3\); 2 layer\(s\) "
                                         r"of type Conv1d \(0, 1\)"):
        transform(model, "sparse_doped", 0.5)


def test_embedding_model_keeps_only_its_head_dense():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
    assert set(sparse_targets(transform(model, "sparse_doped", 0.5))) == {"1.sparse.weight"}


def _partly_frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2))
    model[1].requires_grad_(False)  # a frozen pretrained layer
    return model


@pytest.mark.parametrize("family", [None, *MEMBERS])
def test_frozen_layers_are_refused_not_silently_rebuilt_or_masked(family):
    # a member's new modules would train (requires_grad=True), a mask would zero frozen weights for good
    with pytest.raises(ValueError, match=r"1 chosen layer\(s\) are frozen \(requires_grad=False: 1\): .* would rebuild "
                                         r"or mask them.*exclude=\['1'\]"):
        DynamicSparsity(SparsitySettings(sparsity=0.5, transform=family)).apply(_partly_frozen())


@pytest.mark.parametrize("family", [None, "sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_excluded_frozen_layer_stays_dense_and_frozen(family):
    model = _partly_frozen()
    before = model[1].weight.clone()
    model = DynamicSparsity(SparsitySettings(sparsity=0.5, transform=family, exclude=["1"])).apply(model)
    assert type(model[1]) is nn.Linear and not model[1].weight.requires_grad and torch.equal(model[1].weight, before)
    assert {k.split(".")[0] for k in sparse_targets(model)} == {"2"}  # 0 and 3 are the stem and the head
