"""SµPar: closed-form multipliers per member, exact init rescaling, optimizer groups, the switch
in our LightningModules, and a coordinate-check smoke test."""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sift_lightning import LanguageModel, OptimConfig, SparsityCallback
from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.sparse.masks import init_masks, mark_sparse, set_mask, sparse_parameters
from sift_lightning.sparse.supar import SuparScale, supar_init_, supar_multipliers, supar_param_groups, uses_supar
from sift_lightning.transforms import transform

ROOT = Path(__file__).resolve().parents[1]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _member(model: nn.Module, member: str, s: float) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Parallel warns about Linear branches without a norm
        return transform(model, member, s)


def _values(scales: dict[str, SuparScale]) -> set[tuple[float, float]]:
    return {(round(v.init_std, 9), round(v.lr, 9)) for v in scales.values()}


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
def test_sparse_wide_multipliers_are_k(s):
    k = math.sqrt(1 / (1 - s))  # s=0.75: k=2, init std x2, Adam lr x2; s=0.9: k=sqrt(10)
    wide = _member(_mlp(), "sparse_wide", s)
    assert wide.sift_width_factor == pytest.approx(k)
    # layers a member builds in a user's module keep the replaced layer's std (README, Fidelity): std
    # x sqrt(k) reaches SµPar's 1/sqrt(k rho) d_in; a width-scaled init (fan_in) needs x k
    assert _values(supar_multipliers(wide)) == {(round(math.sqrt(k), 9), round(k, 9))}  # targets, before masks
    assert _values(supar_multipliers(wide, init_scheme="fan_in")) == {(round(k, 9), round(k, 9))}
    gpt = _member(GPT(gpt_config("gpt_tiny")), "sparse_wide", s)  # std 0.02 whatever the width: x sqrt(k)
    assert _values(supar_multipliers(gpt)) == {(round(math.sqrt(k), 9), round(k, 9))}
    assert _values(supar_multipliers(wide, init_scheme="fixed")) == {(round(math.sqrt(k), 9), round(k, 9))}


def test_multipliers_use_the_real_density_of_the_mask():
    wide = _member(_mlp(), "sparse_wide", 0.9)  # 202 x 202 at density 0.1: 4,080 of 40,804 kept
    init_masks(wide, generator=torch.Generator().manual_seed(0))
    rho = 4080 / 40804
    k = math.sqrt(10)
    assert supar_multipliers(wide, init_scheme="fan_in")["2.weight"] == SuparScale(
        pytest.approx(1 / math.sqrt(rho)), pytest.approx(1 / (k * rho)))
    assert supar_multipliers(wide)["2.weight"] == SuparScale(  # the keep-std default: relative to the base std
        pytest.approx(1 / math.sqrt(k * rho)), pytest.approx(1 / (k * rho)))
    plain = mark_sparse(nn.Linear(10, 10), 0.5)
    set_mask(plain, "weight", torch.arange(100).view(10, 10) < 20)  # density 0.2, not the target 0.5
    assert supar_multipliers(plain) == {"weight": SuparScale(pytest.approx(math.sqrt(5)), pytest.approx(5.0))}


def test_sparse_parallel_multipliers_with_and_without_branch_norms():
    bare = _member(_mlp(), "sparse_parallel", 0.75)  # Linear branches summed: F_eff = 4 * 0.25 * F = F
    assert _values(supar_multipliers(bare)) == {(1.0, 1.0)}
    normed = _member(_cnn(), "sparse_parallel", 0.75)  # conv -> BN per branch: each its own layer
    assert len(supar_multipliers(normed)) == 8 and _values(supar_multipliers(normed)) == {(2.0, 4.0)}
    normed = _member(_cnn(), "sparse_parallel", 0.9)  # 10 branches at density 0.1
    assert _values(supar_multipliers(normed)) == {(round(math.sqrt(10), 9), 10.0)}


def test_sparse_factorized_multipliers():
    model = _member(_mlp(), "sparse_factorized", 0.75)  # 64 -> d_h = 128 -> 64
    scales = supar_multipliers(model, init_scheme="fan_in")
    assert scales["2.u.weight"] == SuparScale(2.0, 4.0)  # F = F_base = 64 at density 1/4
    assert scales["2.v.weight"] == SuparScale(2.0, 2.0)  # lr: 64 / (0.25 * 128)
    kept = supar_multipliers(model)  # V starts at the replaced layer's std: sqrt(64 / (0.25 * 128))
    assert kept["2.u.weight"] == SuparScale(2.0, 4.0) and kept["2.v.weight"] == SuparScale(pytest.approx(math.sqrt(2)), 2.0)
    gpt = _member(GPT(gpt_config("gpt_tiny")), "sparse_factorized", 0.75)  # qkv: 64 -> 192 -> 192
    v = supar_multipliers(gpt)["blocks.0.attn.qkv.v.weight"]
    assert (v.init_std, v.lr) == (pytest.approx(math.sqrt(4 / 3)), pytest.approx(4 / 3))  # 64 / (0.25 * 192)


def test_sparse_doped_and_plain_layer_multipliers():
    doped = _member(_mlp(), "sparse_doped", 0.75)
    assert list(supar_multipliers(doped)) == ["2.sparse.weight", "4.sparse.weight"]  # U, V stay dense
    assert _values(supar_multipliers(doped)) == {(2.0, 4.0)}
    plain = mark_sparse(nn.Conv2d(8, 8, 3), 0.5)
    assert supar_multipliers(plain) == {"weight": SuparScale(pytest.approx(math.sqrt(2)), pytest.approx(2.0))}


def test_supar_init_scales_exactly_once_and_marks_the_model():
    model = _member(_cnn(), "sparse_parallel", 0.75)
    init_masks(model, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    holder = nn.ModuleDict({"backbone": model})
    assert not uses_supar(holder)
    supar_init_(model)
    for name, p in model.named_parameters():
        factor = 2.0 if ".branches." in name and name.endswith(".0.weight") else 1.0  # sparse convs only
        assert torch.equal(p, before[name] * factor), name
    assert model.sift_parametrization == "supar" and uses_supar(holder)
    with pytest.raises(ValueError, match="applied to this model already"):
        supar_init_(model)


def test_param_groups_split_copy_keys_and_keep_ratios_under_lambda_lr():
    model = _member(_mlp(), "sparse_factorized", 0.75)
    sparse = {id(p) for *_, p in sparse_parameters(model)}
    decay = [p for p in model.parameters() if id(p) in sparse]
    rest = [p for p in model.parameters() if id(p) not in sparse]
    groups = supar_param_groups(model, [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=1e-3)
    assert [g["params"] for g in groups[:1]] == [rest] and groups[0]["weight_decay"] == 0.0
    by_lr = {round(g["lr"], 12): g for g in groups[1:]}
    assert set(by_lr) == {4e-3, 2e-3} and {g["weight_decay"] for g in groups[1:]} == {0.1}
    assert {id(p) for p in by_lr[4e-3]["params"]} == {id(model[2].u.weight), id(model[4].u.weight)}
    assert by_lr[2e-3]["supar_lr_scale"] == 2.0
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 / 8, 4e-3 / 8, 2e-3 / 8])


def test_param_groups_sgd_rule_parallel_biases_and_errors():
    wide = _member(_mlp(), "sparse_wide", 0.75)
    (group,) = [g for g in supar_param_groups(wide, wide.parameters(), lr=0.1, optimizer="sgd") if "supar_lr_scale" in g]
    assert group["lr"] == pytest.approx(0.4)  # SGD: 1 / density = k^2, the width part cancels as in muP
    bare = _member(_mlp(), "sparse_parallel", 0.75)
    groups = supar_param_groups(bare, [{"params": list(bare.parameters()), "lr": 0.01}])
    (biases,) = [g for g in groups if "supar_lr_scale" in g]  # 4 summed bias copies move one output
    assert biases["lr"] == pytest.approx(0.0025) and len(biases["params"]) == 8
    with pytest.raises(ValueError, match="pass lr="):
        supar_param_groups(wide, wide.parameters())
    with pytest.raises(ValueError, match="optimizer must be one of adam, sgd"):
        supar_param_groups(wide, wide.parameters(), lr=0.1, optimizer="lion")
    with pytest.raises(ValueError, match="init_scheme must be one of fan_in, fixed"):
        supar_multipliers(wide, init_scheme="kaiming")
    del wide.sift_width_factor
    wide.sift_member = "sparse_wide"
    with pytest.raises(ValueError, match="must carry sift_width_factor"):
        supar_multipliers(wide)


def _text(n: int = 8, block: int = 64) -> DataLoader:
    x = torch.randint(0, 256, (n, block + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)


def _fit(module: pl.LightningModule, callbacks: list, tmp_path) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
                         default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, _text())
    return trainer


def _sparse_lrs(module: pl.LightningModule) -> dict[str, float]:
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: g["initial_lr"] for g in module.trainer.optimizers[0].param_groups for p in g["params"]
            if "blocks" in names[id(p)] and names[id(p)].endswith("weight") and ".ln" not in names[id(p)]}


def test_configure_optim_uses_supar_groups_on_a_marked_model(tmp_path):
    optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, schedule="constant")
    module = LanguageModel("gpt_tiny", optim=optim)
    module.transform_backbone(lambda m: transform(m, "sparse_wide", 0.75))
    init_masks(module, generator=torch.Generator().manual_seed(0))
    supar_init_(module.backbone)
    _fit(module, [], tmp_path)
    lrs = _sparse_lrs(module)
    assert list(lrs.values()) == pytest.approx([2e-3] * 8)  # k = 2
    plain = LanguageModel("gpt_tiny", optim=optim)
    _fit(plain, [SparsityCallback(0.75, transform="sparse_wide", algorithm="static")], tmp_path)
    assert list(_sparse_lrs(plain).values()) == pytest.approx([1e-3] * 8)


def test_sparsity_callback_switch_applies_supar(tmp_path):
    optim = OptimConfig(name="adamw", lr=1e-3, schedule="constant")
    module = LanguageModel("gpt_tiny", optim=optim)
    _fit(module, [SparsityCallback(0.75, transform="sparse_wide", algorithm="static", parametrization="supar",
                                       match_flops=False)], tmp_path)
    assert uses_supar(module) and list(_sparse_lrs(module).values()) == pytest.approx([2e-3] * 8)


def _coord_check():
    spec = importlib.util.spec_from_file_location("coord_check", ROOT / "bench" / "coord_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["coord_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_coord_check_smoke_supar_flattens_sparse_wide():
    cc = _coord_check()
    rows = cc.check(["mlp"], members=("sparse_wide",), sparsities=(0.75,), seeds=1, steps=2)
    assert {r["layer"] for r in rows} == {"2", "4"}
    standard, supar = cc.max_ratio(rows, "standard"), cc.max_ratio(rows, "supar")
    assert standard > 1.5 and supar < standard
    for r in rows:
        assert math.isfinite(r["init"]) and math.isfinite(r["update"])
        if r["parametrization"] == "supar":
            # within e^0.25 of dense (measured: init 1.03 / 1.00, update 1.08 / 1.14 on layers 2 / 4); the built
            # layers' biases start at the replaced biases' std, as their weights do (zeroed biases put init at 0.75)
            assert abs(math.log(r["init"])) < 0.25 and abs(math.log(r["update"])) < 0.25
