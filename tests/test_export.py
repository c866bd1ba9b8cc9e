"""Fold (exact, to the original architecture), sparse export (CSR where faster) and checkpoint export."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import ImageClassifier, SparsityCallback, create_backbone, transform
from sift_lightning.export import (
    CSRConv2d,
    CSRLinear,
    dense_state_dict,
    export_checkpoint,
    export_main,
    fold,
    format_summary,
    sparse_export,
)
from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.sparse.masks import MASK_SUFFIX, SparseOwner, get_mask, init_masks, mark_sparse
from sift_lightning.transforms.doped import SparseDoped
from sift_lightning.transforms.parallel import NormActTail, SparseParallel

FOLDABLE = [("sparse_parallel", {}), ("sparse_parallel", {"branch_norm": False}), ("sparse_doped", {})]



def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest output."""
    return float((a - b).abs().max() / b.abs().max())


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)


def _sparse_ift(model: nn.Module, family: str, s: float = 0.5, **options) -> nn.Module:
    torch.manual_seed(0)
    model = transform(model, family, s, **options)
    init_masks(model, generator=torch.Generator().manual_seed(0))
    _randomise_norms(model)
    return model.eval()


def _assert_plain(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not isinstance(m, (SparseParallel, SparseDoped, SparseOwner)), name
        assert not any(b.endswith(MASK_SUFFIX) for b in m._buffers), name


# ---------------------------------------------------------------- fold: exactness per layer
@pytest.mark.parametrize("family,options", FOLDABLE, ids=["parallel_bn", "parallel_no_bn", "doped"])
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 2, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_conv_is_exact(family, options, kernel, stride, padding, bias):
    # odd everything: 5 -> 7 channels, a 9x11 input
    net = nn.Sequential(nn.Conv2d(5, 7, kernel, stride, padding, bias=bias), nn.BatchNorm2d(7), nn.ReLU())
    model = _sparse_ift(net, family, 0.75, keep_ends_dense=False, **options)
    folded = fold(model)
    assert type(folded[0]) is nn.Conv2d and folded[0].weight.shape == (7, 5, kernel, kernel)
    assert (folded[0].stride, folded[0].padding) == ((stride, stride), (padding, padding))
    _assert_plain(folded)
    x = torch.randn(3, 5, 9, 11)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-5
        model64, x64 = copy.deepcopy(model).double(), x.double()
        assert _rel(fold(model64)(x64), model64(x64)) <= 1e-12


@pytest.mark.parametrize("family,options", FOLDABLE[1:], ids=["parallel", "doped"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_linear_is_exact(family, options, bias):
    net = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 3, bias=bias))
    model = _sparse_ift(net, family, 0.9, keep_ends_dense=False, **options)
    folded = fold(model)
    assert [type(m) for m in folded] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [m.bias is not None for m in folded[::2]] == [bias, bias]
    _assert_plain(folded)
    x = torch.randn(2, 4, 5)  # (B, T, C): any leading dims
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-5


def test_parallel_branch_norms_fold_and_block_norm_stays_identity():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    model = _sparse_ift(net, "sparse_parallel", 0.9, keep_ends_dense=False)
    assert len(model[0].branches) == 10 and type(model[1]) is nn.Identity
    folded = fold(model)
    assert type(folded[1]) is nn.Identity
    assert folded[0].bias is not None  # the branch norms' shifts
    assert type(model[0]) is SparseParallel  # fold works on a copy by default
    assert fold(model, inplace=True) is model and type(model[0]) is nn.Conv2d


def test_factorized_without_nonlinearity_folds():
    net = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4))
    model = _sparse_ift(net, "sparse_factorized", 0.5, keep_ends_dense=False, linear_norm="none", linear_act="none")
    folded = fold(model)
    _assert_plain(folded)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-5


def test_plain_sparse_layers_just_lose_their_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    for layer in model[::2]:
        mark_sparse(layer, 0.75)
    init_masks(model)
    folded = fold(model)
    _assert_plain(folded)
    assert int((folded[0].weight == 0).sum()) == 36
    x = torch.randn(2, 6)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------- fold: members that cannot
def test_fold_refuses_sparse_wide():
    model = transform(create_backbone("resnet18", 10, cifar_stem=True, channels=(8, 16, 32, 64)), "sparse_wide", 0.5)
    with pytest.raises(ValueError, match="Wide.*wider than the original.*sparse_export"):
        fold(model, member="sparse_wide")
    model.sift_member = "sparse_wide"  # what transform() records
    with pytest.raises(ValueError, match="wider than the original"):
        fold(model)


@pytest.mark.parametrize("conv", [True, False])
def test_fold_refuses_factorized_with_a_nonlinearity(conv):
    net = (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()) if conv
           else nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4)))
    model = transform(net, "sparse_factorized", 0.5, keep_ends_dense=False)
    with pytest.raises(ValueError, match="Factorized.*nonlinearity sits between U and V.*sparse_export"):
        fold(model)


def test_fold_rejects_unknown_member():
    with pytest.raises(ValueError, match="unknown member 'sparse_deep'; valid: dense, sparse_wide"):
        fold(nn.Linear(2, 2), member="sparse_deep")


# ---------------------------------------------------------------- fold: back to the plain timm / GPT model
def _tiny_resnet() -> nn.Module:
    return create_backbone("resnet18", 10, cifar_stem=True, channels=(8, 16, 32, 64))


@pytest.mark.parametrize("transform_shortcuts", [False, True])
@pytest.mark.parametrize("family", ["sparse_parallel", "sparse_doped"])
def test_round_trip_with_single_or_transformed_shortcuts(family, transform_shortcuts):
    model = _sparse_ift(_tiny_resnet(), family, 0.75, transform_shortcuts=transform_shortcuts)
    shortcut = model.layer2[0].downsample[0]
    assert (type(shortcut) is nn.Conv2d) is not transform_shortcuts
    expected = shortcut.weight.detach() * get_mask(shortcut, "weight") if not transform_shortcuts else None
    plain = _tiny_resnet()
    plain.load_state_dict(dense_state_dict(fold(model)), strict=True)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _rel(plain.eval()(x), model(x)) <= 1e-5
    if expected is not None:  # a single sparse conv folds to itself: its masked weight, its own BN
        assert torch.equal(plain.layer2[0].downsample[0].weight, expected)
        assert torch.equal(plain.layer2[0].downsample[1].weight, model.layer2[0].downsample[1].weight)


@pytest.mark.parametrize("family", ["sparse_parallel", "sparse_doped"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_timm_round_trip_loads_strictly_into_the_plain_backbone(family, dtype, tol):
    model = _sparse_ift(_tiny_resnet().to(dtype), family, 0.75)
    state = dense_state_dict(fold(model))
    plain = _tiny_resnet().to(dtype)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    with torch.no_grad():
        assert _rel(plain(x), model(x)) <= tol
    if family == "sparse_parallel":  # the replaced norm is an identity carrying the folded shift
        eps = plain.layer1[0].bn1.eps
        torch.testing.assert_close(plain.layer1[0].bn1.running_var, torch.full((8,), 1 - eps, dtype=dtype))
        assert torch.all(plain.layer1[0].bn1.weight == 1) and torch.all(plain.layer1[0].bn1.running_mean == 0)
        assert plain.layer2[0].conv1.weight.abs().sum() > 0
        assert plain.layer2[0].bn1.bias.abs().sum() > 0  # the folded branches' shift
    assert dense_state_dict(model).keys() == state.keys()  # unfolded input: folded on a copy first


@pytest.mark.parametrize("family", ["sparse_parallel", "sparse_doped"])
def test_gpt_round_trip(family):
    torch.manual_seed(0)
    cfg = gpt_config("gpt_tiny", n_layer=1)
    model = _sparse_ift(GPT(cfg), family, 0.5)
    plain = GPT(cfg)
    plain.load_state_dict(dense_state_dict(model), strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert _rel(plain.eval()(idx), model(idx)) <= 1e-5


# ---------------------------------------------------------------- sparse export
def _factorized_cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, 1, 0), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 7),
    )
    return _sparse_ift(net, "sparse_factorized", 0.75, keep_ends_dense=False)


def test_sparse_export_csr_matches_the_masked_model():
    model = _factorized_cnn()
    x = torch.randn(3, 3, 10, 10)
    exported = sparse_export(model, x, batch_sizes=(1, 2), min_speedup=0.0, repeats=1)
    kinds = {type(m) for m in exported.modules()}
    assert CSRConv2d in kinds and CSRLinear in kinds
    _assert_plain(exported)
    report = exported.sift_export_report
    assert len(report) == 6 and all(d.csr for d in report)  # U and V of three layers
    assert all(set(d.dense_ms) == {1, 2} and d.speedup(2) > 0 for d in report)
    assert all(abs(d.density - 0.25) < 0.05 for d in report)
    with torch.no_grad():
        assert _rel(exported(x), model(x)) <= 1e-5
        again = copy.deepcopy(exported)  # CSR kept as dense buffers: copies, moves and saves
        assert _rel(again(x), model(x)) <= 1e-5
    assert {"crow_indices", "col_indices", "values"} <= {k.rpartition(".")[2] for k in exported.state_dict()}


def test_sparse_export_keeps_dense_where_csr_is_not_faster():
    model = _factorized_cnn()
    x = torch.randn(2, 3, 10, 10)
    exported = sparse_export(model, x, batch_sizes=(1, 2), min_speedup=math.inf, repeats=1)
    assert not any(isinstance(m, (CSRConv2d, CSRLinear)) for m in exported.modules())
    assert not any(d.csr for d in exported.sift_export_report)
    assert all(set(d.dense_ms) == {1} for d in exported.sift_export_report)  # lost at batch 1: stopped
    _assert_plain(exported)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))


def test_sparse_export_of_gpt_sequences():
    torch.manual_seed(0)
    model = _sparse_ift(GPT(gpt_config("gpt_tiny", n_layer=1)), "sparse_wide", 0.75)
    idx = torch.randint(0, 256, (2, 16))
    exported = sparse_export(model, idx, batch_sizes=(1,), min_speedup=0.0, repeats=1)
    assert sum(isinstance(m, CSRLinear) for m in exported.modules()) == 4
    with torch.no_grad():
        assert _rel(exported(idx), model(idx)) <= 1e-5


# ---------------------------------------------------------------- export_checkpoint (sift-fit export)
def _checkpoint(tmp_path: Path, family: str) -> Path:
    torch.manual_seed(0)
    module = ImageClassifier("resnet18", 10, in_chans=1, image_size=16, backbone_kwargs={"channels": (8, 16, 32, 64)})
    data = TensorDataset(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
    settings = {"sparsity": 0.5, "transform": family, "algorithm": "static"}
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, limit_val_batches=1,
        callbacks=[SparsityCallback(**settings), ModelCheckpoint(monitor="val/loss", dirpath=tmp_path)],
    )
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    if "sift_lightning" not in ckpt:  # until SparsityCallback writes its settings itself
        ckpt["sift_lightning"] = {"callback": settings}
        torch.save(ckpt, path)
    return path


def test_export_checkpoint_folds_parallel_to_a_plain_timm_state_dict(tmp_path, capsys):
    path = _checkpoint(tmp_path, "sparse_parallel")
    summary = export_checkpoint(path, tmp_path / "model.pt")
    assert summary["folded"] and summary["member"] == "sparse_parallel" and summary["sparsity"] == 0.5
    assert summary["max_rel_error"] <= 1e-5
    plain = create_backbone("resnet18", 10, cifar_stem=True, in_chans=1, channels=(8, 16, 32, 64))
    plain.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    assert summary["params"] == sum(p.numel() for p in plain.parameters())
    assert summary["monitor"] == "val/loss" and math.isfinite(summary["score"])
    assert summary["macs"] == summary["dense_macs"] > 0
    program = torch.export.load(summary["program"]).module()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert _rel(program(x), plain.eval()(x)) <= 1e-5  # dynamic batch
    line = format_summary(summary)
    assert "folded" in line and "M params" in line and "val/loss" in line
    export_main(["--ckpt_path", str(path), "--out", str(tmp_path / "again.pt"), "--no_program"])
    assert "sparse_parallel s=0.5 folded" in capsys.readouterr().out


def test_export_checkpoint_sparse_exports_factorized(tmp_path):
    path = _checkpoint(tmp_path, "sparse_factorized")
    summary = export_checkpoint(path, tmp_path / "model.pt", batch_sizes=(1,), min_speedup=0.0)
    assert not summary["folded"] and summary["csr_layers"] == "36/36"  # U and V of 16 convs, 4 shortcut convs; all CSR at min_speedup=0
    assert summary["max_rel_error"] <= 1e-5
    assert any("cannot fold" in n for n in summary["notes"])
    assert summary["active_params"] < summary["params"]
    state = torch.load(tmp_path / "model.pt")
    assert any(k.endswith(MASK_SUFFIX) for k in state)  # loads into the rebuilt Sparse-IFT structure


def test_parallel_on_timm_norm_act_blocks_folds_back_to_the_plain_model():
    # MobileNetV2: every conv is followed by a BatchNormAct2d (ReLU6, or Identity in the linear bottleneck)
    timm = pytest.importorskip("timm")
    build = lambda: timm.create_model("mobilenetv2_035", pretrained=False, num_classes=10)  # noqa: E731
    torch.manual_seed(0)
    model = _sparse_ift(build(), "sparse_parallel", 0.75)  # BatchNormAct2d is a BatchNorm2d: norms randomised
    assert sum(isinstance(m, NormActTail) for m in model.modules()) > 10
    plain = build()
    plain.load_state_dict(dense_state_dict(model), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(plain.eval()(x), model(x)) <= 1e-5
