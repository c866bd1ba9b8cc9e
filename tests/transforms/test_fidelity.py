"""Fidelity to the official Sparse-IFT code: init of built layers, shortcuts, zero-init of last norms."""

import math
import warnings

import pytest
import torch
from torch import nn

from sift_lightning import create_backbone, transform
from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.transforms.doped import SparseDoped
from sift_lightning.transforms.factorized import SparseFactorized
from sift_lightning.transforms.parallel import SparseParallel
from transform_models import cifar_resnet18, tiny_resnet, user_cnn

TOL = 0.10  # std of a built layer vs the model's own draw for that shape


def _fan_out_std(conv: nn.Conv2d) -> float:
    # timm's ResNet.init_weights: kaiming_normal_(mode="fan_out", nonlinearity="relu")
    return math.sqrt(2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]))


def _built_layers(model: nn.Module):
    """``(name, layer)`` for every layer a member built: branches, U, V (not Doped's own sparse layer)."""
    for name, m in model.named_modules():
        if isinstance(m, SparseParallel):
            for i, b in enumerate(m.branches):
                yield f"{name}.branches.{i}", b[0] if isinstance(b, nn.Sequential) else b
        elif isinstance(m, (SparseFactorized, SparseDoped)) and m.u is not None:
            yield f"{name}.u", m.u
            yield f"{name}.v", m.v


def test_cifar_stem_is_drawn_like_timm_convs():
    torch.manual_seed(0)
    stem = create_backbone("resnet18", 100, cifar_stem=True).conv1
    assert float(stem.weight.std()) == pytest.approx(_fan_out_std(stem), rel=TOL)  # 0.059, PyTorch's default 0.111
    torch.manual_seed(0)
    for name, conv in create_backbone("cifar_resnet20", 10).named_modules():
        if isinstance(conv, nn.Conv2d) and conv.weight.numel() > 400:
            assert float(conv.weight.std()) == pytest.approx(_fan_out_std(conv), rel=TOL), name


def test_sparse_wide_layers_match_a_fresh_timm_model_of_that_width():
    torch.manual_seed(0)
    wide = transform(tiny_resnet(), "sparse_wide", 0.75)  # k = 2: every width doubles
    torch.manual_seed(1)
    # timm's single-conv stem is 64 wide whatever the channels; the widened model's is 128
    timm_wide = create_backbone("resnet18", 10, cifar_stem=True, channels=(16, 32, 64, 128))
    theirs = dict(timm_wide.named_modules())
    compared = 0
    for name, m in wide.named_modules():
        if isinstance(m, nn.Conv2d):
            ref = theirs[name]
            assert m.out_channels == (128 if name == "conv1" else ref.out_channels), name
            assert m.kernel_size == ref.kernel_size, name
            want = _fan_out_std(m) if name == "conv1" else float(ref.weight.std())
            assert float(m.weight.std()) == pytest.approx(want, rel=TOL), name
            compared += 1
    assert compared == 21  # stem, 16 block convs, 4 shortcut convs


@pytest.mark.parametrize("family", ["sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_built_convs_of_a_timm_resnet_are_kaiming_fan_out(family):
    torch.manual_seed(0)
    model = transform(create_backbone("resnet18", 10, cifar_stem=True, channels=(32, 64, 128, 256)), family, 0.75)
    layers = list(_built_layers(model))
    assert len(layers) == {"sparse_parallel": 16 * 4, "sparse_factorized": 16 * 2, "sparse_doped": 16 * 2}[family]
    for name, conv in layers:
        assert float(conv.weight.std()) == pytest.approx(_fan_out_std(conv), rel=TOL), name


@pytest.mark.parametrize("family", ["sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_gpt_built_layers_keep_its_normal_002_and_scaled_projections(family):
    torch.manual_seed(0)
    config = gpt_config("gpt_tiny")
    model = transform(GPT(config), family, 0.75)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    if family == "sparse_wide":
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks")]
    else:
        layers = list(_built_layers(model))
    assert len(layers) == {"sparse_wide": 8, "sparse_parallel": 32, "sparse_factorized": 16, "sparse_doped": 16}[family]
    for name, layer in layers:
        expected = residual if ".proj" in name else 0.02
        assert float(layer.weight.std()) == pytest.approx(expected, rel=TOL), name


def test_user_module_keeps_the_std_of_the_replaced_layer_or_its_declared_rule():
    model = user_cnn()
    stds = {n: float(model[int(n)].weight.std()) for n in ("3", "7")}
    out = transform(model, "sparse_factorized", 0.5)
    for n, std in stds.items():
        for f in (out[int(n)].u, out[int(n)].v):
            assert float(f.weight.std()) == pytest.approx(std, rel=0.2), n  # small layers: 0.2
    calls = []
    model = user_cnn()
    model.sift_init = lambda new, old: calls.append((tuple(new.weight.shape), tuple(old.weight.shape)))
    transform(model, "sparse_parallel", 0.5)
    assert calls == [((16, 8, 3, 3), (16, 8, 3, 3))] * 2 + [((16, 16, 1, 1), (16, 16, 1, 1))] * 2
    model = user_cnn()
    model.sift_init = "xavier"
    with pytest.raises(ValueError, match="sift_init must be one of kaiming_fan_out, keep_std, torch_default"):
        transform(model, "sparse_parallel", 0.5)


def _user_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


@pytest.mark.parametrize("family", ["sparse_wide", "sparse_parallel", "sparse_factorized"])
def test_built_biases_start_at_the_replaced_biases_std(family):
    """keep_std draws biases like weights: a user's PyTorch-default biases keep their scale (not 0)."""
    original = float(_user_mlp()[2].bias.std())
    assert original == pytest.approx(1 / math.sqrt(3 * 512), rel=0.1)  # PyTorch's U(+-1/sqrt(fan_in))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Parallel's note on Linear layers without norms
        out = transform(_user_mlp(), family, 0.75)
    layer = out[2]
    if family == "sparse_wide":
        biases = [layer.bias]
        expected = original
    elif family == "sparse_parallel":  # four bare branches add their biases: each 1/sqrt(4) of it
        biases = [b.bias for b in layer.branches]
        expected = original / 2
    else:  # U has no bias; V's bias replaces the original's
        assert layer.u.bias is None
        biases = [layer.v.bias]
        expected = original
    spread = torch.cat([b.detach() for b in biases])
    assert float(spread.std()) == pytest.approx(expected, rel=0.15)
    if family == "sparse_parallel":
        assert float(sum(b.detach() for b in biases).std()) == pytest.approx(original, rel=0.15)


@pytest.mark.parametrize("family", ["sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"])
def test_gpt_built_biases_stay_zero(family):
    torch.manual_seed(0)
    model = transform(GPT(gpt_config("gpt_tiny")), family, 0.75)
    biases = [m.bias for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks")]
    assert biases and all(b is None or not b.any() for b in biases)


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_resnet18_shortcuts_stay_single_sparse_convs_by_default():
    model = transform(cifar_resnet18("meta"), "sparse_parallel", 0.75)
    assert _count(model, SparseParallel) == 16
    assert sum(len(m.branches) for m in model.modules() if isinstance(m, SparseParallel)) == 64
    for i in (2, 3, 4):
        block = model.get_submodule(f"layer{i}.0")
        assert type(block.downsample[0]) is nn.Conv2d and block.downsample[0].sift_sparsity == {"weight": 0.75}
        assert type(block.downsample[1]) is nn.BatchNorm2d
    model = transform(cifar_resnet18("meta"), "sparse_parallel", 0.75, transform_shortcuts=True)
    assert _count(model, SparseParallel) == 19
    for i in (2, 3, 4):
        shortcut = model.get_submodule(f"layer{i}.0.downsample.0")
        assert isinstance(shortcut, SparseParallel) and len(shortcut.branches) == 4
    for family, kind in (("sparse_factorized", SparseFactorized), ("sparse_doped", SparseDoped)):
        assert _count(transform(cifar_resnet18("meta"), family, 0.75), kind) == 16
        assert _count(transform(cifar_resnet18("meta"), family, 0.75, transform_shortcuts=True), kind) == 19


def _last_norm_weights(model, family):
    """Weights of the norm(s) after each block's conv2: the branch norms for Parallel, else bn2."""
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            if family == "sparse_parallel":
                out += [b[1].weight for b in block.conv2.branches]
            else:
                out.append(block.bn2.weight)
    return torch.cat([w.detach().flatten() for w in out])


@pytest.mark.parametrize(
    ("family", "option", "last"),
    [
        ("dense", False, 0.0), ("sparse_wide", False, 0.0),  # plain blocks: timm's zero-init stays
        ("sparse_parallel", False, 1.0), ("sparse_factorized", False, 1.0), ("sparse_doped", False, 1.0),
        ("sparse_parallel", True, 0.0), ("sparse_factorized", True, 0.0), ("sparse_doped", True, 0.0),
    ],
)
def test_last_norm_of_each_block_is_zero_only_in_plain_blocks(family, option, last):
    options = {"zero_init_last_norm": True} if option else {}
    model = transform(tiny_resnet(), family, 0.5, **options)
    assert torch.equal(_last_norm_weights(model, family), torch.full_like(_last_norm_weights(model, family), last))
    # every other norm starts at 1 (bn1, the shortcut's norm, Parallel's conv1 branch norms, Factorized's mid)
    last_ids = {id(m) for s in (model.layer1, model.layer2, model.layer3, model.layer4) for b in s
                for m in ([br[1] for br in b.conv2.branches] if family == "sparse_parallel" else [b.bn2])}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and id(m) not in last_ids:
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
