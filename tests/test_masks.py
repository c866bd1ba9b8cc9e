"""Masks and sparse targets: exact active counts, zeros stay zero, and the per-layer distributions."""

import math

import pytest
import torch
from torch import nn

from sift_lightning import count_flops, mark_sparse, sparse_targets, transform
from sift_lightning.sparse.distribution import distribute
from sift_lightning.sparse.masks import (
    SparseOwner,
    upgrade_mask_keys,
    keep_bits,
    zero_masked_,
    apply_masks,
    get_mask,
    init_masks,
    keep_count,
    set_mask,
    sparse_parameters,
)

MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")


def _model() -> nn.Module:
    """Stem conv, a conv + BN, a 1x1 conv, pooling, two Linear layers (the last one dense)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 5),
    )


X = torch.zeros(1, 3, 6, 6)


def _expected_targets(member: str, s: float) -> dict[str, float]:
    """Conv "3" (followed by BN "4"), conv "6" and Linear "10" are replaced; "0" and "12" stay dense."""
    n = round(1 / (1 - s))
    names = {
        "sparse_wide": ["3.weight", "6.weight", "10.weight"],
        "sparse_parallel": [f"3.branches.{i}.0.weight" for i in range(n)]
        + [f"{layer}.branches.{i}.weight" for layer in ("6", "10") for i in range(n)],
        "sparse_factorized": [f"{layer}.{f}.weight" for layer in ("3", "6", "10") for f in ("u", "v")],
        "sparse_doped": ["3.sparse.weight", "6.sparse.weight", "10.sparse.weight"],
    }[member]
    return {name: s for name in names}


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("member", MEMBERS)
def test_targets_before_masks_are_the_sparsity(member, s):
    assert sparse_targets(transform(_model(), member, s)) == _expected_targets(member, s)


@pytest.mark.parametrize("s", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("member", MEMBERS)
def test_init_masks_exact_counts_and_zeros(member, s):
    model = transform(_model(), member, s)
    init_masks(model, generator=torch.Generator().manual_seed(0))
    targets = sparse_targets(model)
    report = count_flops(model, X)
    densities = {row.name: row.density for row in report.layers}
    owners = 0
    for full, owner, local, param in sparse_parameters(model):
        mask = get_mask(owner, local)
        assert mask.dtype == torch.bool and mask.shape == param.shape
        keep = round((1 - s) * param.numel())
        assert mask.sum().item() == keep, full
        assert param[~mask].eq(0).all() and param[mask].ne(0).all(), full
        assert targets[full] == 1 - keep / param.numel()
        owner_name = full.rsplit(".", 1)[0]
        assert densities[owner_name] == keep / param.numel()
        owners += 1
    assert owners == len(targets)
    assert report.sparse_macs == pytest.approx(sum(r.dense_macs * r.density for r in report.layers))


def test_doped_masks_only_the_sparse_weight():
    model = transform(_model(), "sparse_doped", 0.75)
    init_masks(model)
    doped = model[3]
    assert set(sparse_targets(model)) == {"3.sparse.weight", "6.sparse.weight", "10.sparse.weight"}
    assert get_mask(doped.sparse, "weight") is not None
    assert get_mask(doped.u, "weight") is None and get_mask(doped.v, "weight") is None
    assert doped.u.weight.ne(0).all() and doped.v.weight.ne(0).all()
    assert not hasattr(doped.u, "sift_sparsity") and not hasattr(doped.v, "sift_sparsity")


def test_parallel_masks_every_branch_independently():
    model = transform(_model(), "sparse_parallel", 0.75)
    init_masks(model, generator=torch.Generator().manual_seed(0))
    masks = [get_mask(b[0], "weight") for b in model[3].branches]
    assert len(masks) == 4 and all(m is not None for m in masks)
    assert not all(torch.equal(masks[0], m) for m in masks[1:])


def test_factorized_masks_u_and_v():
    model = transform(_model(), "sparse_factorized", 0.5)
    init_masks(model)
    f = model[3]
    assert get_mask(f.u, "weight") is not None and get_mask(f.v, "weight") is not None
    assert f.v.bias is not None and "3.v.bias" not in sparse_targets(model)  # biases stay dense


def test_magnitude_init_keeps_largest():
    w = torch.randn(12, 8, 3, 3)
    layer = mark_sparse(nn.Conv2d(8, 12, 3), 0.75)
    layer.weight.data.copy_(w)
    init_masks(layer, init="magnitude")
    mask = get_mask(layer, "weight")
    assert mask.sum().item() == round(0.25 * w.numel())
    assert w.abs()[mask].min() >= w.abs()[~mask].max()
    assert torch.equal(layer.weight, torch.where(mask, w, 0))


def test_generator_makes_masks_reproducible():
    masks = []
    for seed in (0, 0, 1):
        model = transform(_model(), "sparse_factorized", 0.75)
        init_masks(model, generator=torch.Generator().manual_seed(seed))
        masks.append(get_mask(model[3].u, "weight").clone())
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_masks_ride_in_state_dict():
    model = transform(_model(), "sparse_parallel", 0.5)
    init_masks(model, generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    assert "3.branches.0.0.weight_sift_mask" in state and state["3.branches.0.0.weight_sift_mask"].dtype == torch.bool
    assert not any(k.endswith(".weight_mask") for k in state)  # torch.nn.utils.prune's name stays free
    other = transform(_model(), "sparse_parallel", 0.5)
    init_masks(other, generator=torch.Generator().manual_seed(1))
    other.load_state_dict(state)
    assert torch.equal(get_mask(other[3].branches[0][0], "weight"), state["3.branches.0.0.weight_sift_mask"])
    assert sparse_targets(other) == sparse_targets(model)


def test_state_dict_with_the_old_mask_name_still_loads():
    model = transform(_model(), "sparse_parallel", 0.5)
    init_masks(model, generator=torch.Generator().manual_seed(0))
    old = {k.replace("_sift_mask", "_mask"): v for k, v in model.state_dict().items()}  # sift_lightning <= 0.1
    assert "3.branches.0.0.weight_mask" in old
    other = transform(_model(), "sparse_parallel", 0.5)
    init_masks(other, generator=torch.Generator().manual_seed(1))
    other.load_state_dict(old)  # strict: every legacy key is consumed
    for (_, o1, l1, _), (_, o2, l2, _) in zip(sparse_parameters(model), sparse_parameters(other)):
        assert torch.equal(get_mask(o1, l1), get_mask(o2, l2))
    assert upgrade_mask_keys(old).keys() == model.state_dict().keys()


def test_apply_masks_rezeroes():
    model = transform(_model(), "sparse_doped", 0.5)
    init_masks(model)
    layer = model[10].sparse
    with torch.no_grad():
        layer.weight.add_(1.0)
    apply_masks(model)
    mask = get_mask(layer, "weight")
    assert layer.weight[~mask].eq(0).all() and layer.weight[mask].ne(0).all()


def test_set_mask_changes_reported_sparsity():
    layer = mark_sparse(nn.Linear(10, 4), 0.5)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0] = True
    set_mask(layer, "weight", mask)
    assert sparse_targets(layer) == {"weight": 0.75}
    assert count_flops(layer, torch.zeros(1, 10)).sparse_macs == pytest.approx(10)
    mask[1] = True
    set_mask(layer, "weight", mask)  # overwrites the same buffer
    assert sparse_targets(layer) == {"weight": 0.5}
    with pytest.raises(ValueError, match=r"mask shape \(10, 4\) does not match weight \(4, 10\)"):
        set_mask(layer, "weight", mask.T)


def test_keep_count_keeps_at_least_one():
    assert keep_count(600, 0.9) == 60
    assert keep_count(4, 0.9) == 1  # round(0.4) would be 0
    layer = mark_sparse(nn.Linear(2, 2), 0.9)
    init_masks(layer)
    assert get_mask(layer, "weight").sum().item() == 1


def test_any_module_can_own_sparse_params():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(100))

    module = mark_sparse(Scale(), 0.3, names=("gain",))
    assert isinstance(module, SparseOwner)
    assert sparse_targets(nn.Sequential(nn.Linear(2, 2), module)) == {"1.gain": 0.3}
    init_masks(module)
    assert module.gain.eq(0).sum().item() == 30


def test_mark_sparse_and_init_masks_errors():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        mark_sparse(nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match="Linear has no parameter 'scale'"):
        mark_sparse(nn.Linear(2, 2), 0.5, names=("scale",))
    with pytest.raises(ValueError, match=r"init must be one of \('random', 'magnitude'\)"):
        init_masks(mark_sparse(nn.Linear(2, 2), 0.5), init="topk")


# ---- per-layer distributions ---------------------------------------------------------------

SHAPES = {
    "stem": (64, 3, 3, 3),
    "l1": (64, 64, 3, 3),
    "l2": (128, 64, 3, 3),
    "l3": (256, 128, 3, 3),
    "l4": (512, 256, 3, 3),
    "fc": (100, 512),
}
NUMEL = {n: math.prod(s) for n, s in SHAPES.items()}


def test_uniform():
    assert distribute(SHAPES, 0.8) == {n: 0.8 for n in SHAPES}
    assert distribute(SHAPES, 0.8, "uniform") == distribute(SHAPES, 0.8)


@pytest.mark.parametrize("s", [0.5, 0.8, 0.9, 0.99])
def test_erk_meets_budget(s):
    sparsity = distribute(SHAPES, s, "erk")
    assert set(sparsity) == set(SHAPES)
    assert all(0.0 <= v < 1.0 for v in sparsity.values())  # density in (0, 1]
    total = sum(NUMEL.values())
    active = sum((1 - sparsity[n]) * NUMEL[n] for n in SHAPES)
    assert active == pytest.approx((1 - s) * total, rel=1e-9)
    rounded = sum(keep_count(NUMEL[n], sparsity[n]) for n in SHAPES)
    assert abs(rounded - (1 - s) * total) <= len(SHAPES)  # at most one weight of rounding per layer


@pytest.mark.parametrize("s", [0.8, 0.9, 0.99])
def test_erk_larger_layers_sparser(s):
    sparsity = distribute(SHAPES, s, "erk")
    assert sparsity["stem"] <= sparsity["l1"] < sparsity["l2"] < sparsity["l3"] < sparsity["l4"]
    # uncapped layers follow density ~ sum(shape) / prod(shape) exactly
    d = {n: 1 - sparsity[n] for n in ("l1", "l4")}
    raw = {n: sum(SHAPES[n]) / NUMEL[n] for n in d}
    assert d["l1"] / d["l4"] == pytest.approx(raw["l1"] / raw["l4"], rel=1e-9)


def test_erk_caps_small_layers_dense():
    # layers that would need density > 1 are made dense and the budget is re-solved over the rest
    assert distribute(SHAPES, 0.9, "erk")["stem"] == 0.0
    at_half = distribute(SHAPES, 0.5, "erk")
    assert [n for n, v in at_half.items() if v == 0.0] == ["stem", "l1", "l2", "fc"]
    assert 0.0 < at_half["l3"] < at_half["l4"] < 1.0


def test_erk_edge_cases():
    assert distribute({}, 0.9, "erk") == {}
    assert distribute(SHAPES, 0.0, "erk") == {n: 0.0 for n in SHAPES}
    one = distribute({"w": (30, 20)}, 0.75, "erk")
    assert one["w"] == pytest.approx(0.75)


def test_unknown_distribution():
    with pytest.raises(ValueError, match=r"distribution must be one of \('uniform', 'erk'\)"):
        distribute(SHAPES, 0.5, "snip")


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("s", [1.5, -0.1])
def test_distribute_rejects_bad_sparsity(distribution, s):
    with pytest.raises(ValueError, match="sparsity"):
        distribute(SHAPES, s, distribution)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_zero_masked_is_exact_and_nan_safe(dtype):
    mask = torch.tensor([[True, False, True], [False, True, False]])
    t = torch.tensor([[1.5, float("nan"), -2.0], [float("inf"), 3.0, -0.5]], dtype=dtype)
    bits = keep_bits(mask, dtype)
    assert bits.element_size() == t.element_size()
    zero_masked_(t, bits)
    expected = torch.tensor([[1.5, 0.0, -2.0], [0.0, 3.0, 0.0]], dtype=dtype)
    assert torch.equal(t, expected) and not torch.signbit(t[~mask]).any()


def test_zero_masked_falls_back_for_other_widths():
    mask = torch.tensor([True, False])
    state = torch.tensor([1.0, float("nan")], dtype=torch.float32)
    zero_masked_(state, keep_bits(mask, torch.bfloat16))  # fp32 state beside bf16 weights
    assert torch.equal(state, torch.tensor([1.0, 0.0]))
