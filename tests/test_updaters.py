"""Drop-and-grow, grow scores, schedules, masks and ERK, checked with exact numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sift_lightning.sparse.distribution import distribute
from sift_lightning.sparse.masks import apply_masks, get_mask, init_masks, keep_count, mark_sparse, sparse_targets
from sift_lightning.sparse.schedules import drop_fraction_at, is_update_step
from sift_lightning.sparse.updaters import drop_and_grow, grow_scores


def _random_mask(shape: tuple[int, ...], active: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=g)[:active]] = True
    return mask.view(shape)


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 12x10 layer with 40 active weights (masked weights are 0, as in training) and a dense gradient."""
    g = torch.Generator().manual_seed(1)
    mask = _random_mask((12, 10), 40)
    weight = torch.randn(12, 10, generator=g) * mask
    grad = torch.randn(12, 10, generator=g)
    return mask, weight, grad


# ---------------------------------------------------------------- drop_and_grow
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 1.0])
def test_drop_and_grow_exact_counts(layer, fraction):
    mask, weight, grad = layer
    new, k = drop_and_grow(mask, weight, grad.abs(), fraction)
    assert k == int(fraction * 40)
    dropped, grown = mask & ~new, new & ~mask
    assert int(new.sum()) == int(mask.sum()) == 40
    assert int(dropped.sum()) == int(grown.sum()) <= k  # a dropped weight may be regrown at once
    # the k weights of smallest |w| leave the kept set; the k best scores among all the rest enter
    kept = torch.zeros(120, dtype=torch.bool)
    kept[torch.topk(torch.where(mask.flatten(), weight.abs().flatten(), -1.0), 40 - k).indices] = True
    grow = torch.zeros(120, dtype=torch.bool)
    grow[torch.topk(torch.where(kept, float("-inf"), grad.abs().flatten()), k).indices] = True
    assert torch.equal(new.flatten(), kept | grow)
    assert new.dtype == torch.bool and new.shape == mask.shape
    assert torch.equal(mask, layer[0])  # the input mask is untouched


def test_drop_and_grow_drops_smallest_magnitudes(layer):
    mask, weight, grad = layer
    new, k = drop_and_grow(mask, weight, grad.abs() * ~mask, 0.3)  # no regrowth: inactive positions score higher
    dropped, kept = mask & ~new, mask & new
    assert weight[dropped].abs().max() <= weight[kept].abs().min()
    expected = torch.topk(weight.abs()[mask], k, largest=False).values
    assert torch.equal(weight[dropped].abs().sort().values, expected.sort().values)


def test_rigl_grows_top_gradient_among_positions_not_kept(layer):
    mask, weight, grad = layer
    scores = grow_scores("rigl", weight, grad, torch.Generator())
    assert torch.equal(scores, grad.abs())
    new, k = drop_and_grow(mask, weight, scores, 0.3)
    kept = torch.zeros(120, dtype=torch.bool)  # the 40 - k largest |w| of the old mask
    kept[torch.topk(torch.where(mask.flatten(), weight.abs().flatten(), -1.0), 40 - k).indices] = True
    grown = new.flatten() & ~kept  # the grow set, dropped-and-regrown weights included
    candidates = torch.where(kept, float("-inf"), grad.abs().flatten())
    top = torch.zeros(120, dtype=torch.bool)
    top[torch.topk(candidates, k).indices] = True
    assert int(grown.sum()) == k and torch.equal(grown, top)


def test_rigl_regrows_a_just_dropped_weight_with_the_largest_gradient():
    # RigL Algorithm 1: grow among `not (active minus dropped)`: the weakest active weight is dropped,
    # but its gradient is the largest of all, so it comes straight back
    mask = torch.tensor([True, True, True, False, False, False])
    weight = torch.tensor([0.01, 0.5, 0.6, 0.0, 0.0, 0.0])
    grad = torch.tensor([9.0, 0.1, 0.1, 1.0, 2.0, 0.5])
    new, k = drop_and_grow(mask, weight, grad, 0.34)  # k = int(0.34 * 3) = 1
    assert k == 1 and torch.equal(new, mask)
    new, k = drop_and_grow(mask, weight, grad, 0.67)  # k = 2: drops 0 and 1; grows 0 (9.0) and 4 (2.0)
    assert k == 2 and new.tolist() == [True, False, True, False, True, False]


def test_rigl_without_gradient_scores_zero(layer):
    mask, weight, _ = layer
    assert torch.equal(grow_scores("rigl", weight, None, torch.Generator()), torch.zeros(12, 10))


def test_set_uses_the_generator(layer):
    mask, weight, _ = layer

    def run(seed: int) -> torch.Tensor:
        scores = grow_scores("set", weight, None, torch.Generator().manual_seed(seed))
        return drop_and_grow(mask, weight, scores, 0.3)[0]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    new = run(0)
    assert int(new.sum()) == 40 and 0 < int((new & ~mask).sum()) <= 12  # 12 grown, a few of them regrown


def test_static_does_not_grow(layer):
    mask, weight, _ = layer
    with pytest.raises(ValueError, match="set, rigl"):
        grow_scores("static", weight, None, torch.Generator())


def test_drop_and_grow_edge_cases(layer):
    mask, weight, grad = layer
    same, k = drop_and_grow(mask, weight, grad, 0.0)
    assert k == 0 and torch.equal(same, mask) and same is not mask
    # 3 inactive positions only: 8 dropped compete with them for 8 places, so at most 3 move
    almost_full = _random_mask((4, 5), 17)
    new, k = drop_and_grow(almost_full, torch.randn(4, 5) * almost_full, torch.rand(4, 5), 0.5)
    assert k == 8 and int(new.sum()) == 17 and int((new & ~almost_full).sum()) <= 3


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_exact():
    assert drop_fraction_at(0, 0.3, 100, "cosine") == 0.3
    assert drop_fraction_at(50, 0.3, 100, "cosine") == pytest.approx(0.15, rel=1e-12)
    assert drop_fraction_at(100, 0.3, 100, "cosine") == 0.0
    assert drop_fraction_at(25, 0.3, 100, "cosine") == pytest.approx(0.3 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)


def test_exponential_and_constant_schedules_exact():
    for step in (0, 10, 50, 100):
        assert drop_fraction_at(step, 0.3, 100, "exponential") == pytest.approx(0.3 * math.exp(-5 * step / 100), rel=1e-12)
        assert drop_fraction_at(step, 0.3, 100, "constant") == 0.3
    assert drop_fraction_at(0, 0.3, 100, "exponential") == 0.3


@pytest.mark.parametrize("schedule", ["constant", "cosine", "exponential"])
def test_schedules_are_zero_after_end(schedule):
    assert drop_fraction_at(101, 0.3, 100, schedule) == 0.0
    assert drop_fraction_at(10_000, 0.3, 100, schedule) == 0.0
    assert drop_fraction_at(5, 0.3, 0, schedule) == 0.0


def test_unknown_schedule_names_valid_ones():
    with pytest.raises(ValueError, match="constant.*cosine.*exponential"):
        drop_fraction_at(1, 0.3, 10, "linear")


def test_is_update_step():
    steps = [s for s in range(0, 40) if is_update_step(s, 10, 30)]
    assert steps == [10, 20, 30]
    assert not is_update_step(0, 1, 30)
    assert [s for s in range(0, 5) if is_update_step(s, 1, 3)] == [1, 2, 3]
    assert not any(is_update_step(s, 1, 0) for s in range(5))


# ---------------------------------------------------------------- masks and ERK
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = mark_sparse(nn.Conv2d(8, 16, 3), 0.8)
        self.fc1 = mark_sparse(nn.Linear(144, 64), 0.8)
        self.fc2 = mark_sparse(nn.Linear(64, 10), 0.8)
        self.head = nn.Linear(10, 2)  # dense


def test_init_masks_exact_counts_and_zeros():
    net = _Net()
    init_masks(net, "random", torch.Generator().manual_seed(0))
    for module in (net.conv, net.fc1, net.fc2):
        mask = get_mask(module, "weight")
        assert mask.dtype == torch.bool
        assert int(mask.sum()) == keep_count(mask.numel(), 0.8) == round(0.2 * mask.numel())
        assert torch.equal(module.weight[~mask], torch.zeros(int((~mask).sum())))
    assert get_mask(net.head, "weight") is None
    assert set(sparse_targets(net)) == {"conv.weight", "fc1.weight", "fc2.weight"}


def test_magnitude_init_keeps_largest():
    net = _Net()
    before = net.fc1.weight.detach().clone()
    init_masks(net, "magnitude")
    mask = get_mask(net.fc1, "weight")
    assert before[mask].abs().min() >= before[~mask].abs().max()
    with torch.no_grad():
        net.fc1.weight.fill_(1.0)
    apply_masks(net)
    assert int(net.fc1.weight.sum()) == int(mask.sum())


def test_random_init_follows_generator():
    a, b = _Net(), _Net()
    init_masks(a, "random", torch.Generator().manual_seed(3))
    init_masks(b, "random", torch.Generator().manual_seed(3))
    assert torch.equal(get_mask(a.fc1, "weight"), get_mask(b.fc1, "weight"))


def test_erk_meets_global_density_with_different_layers():
    shapes = {"conv": (16, 8, 3, 3), "fc1": (64, 144), "fc2": (10, 64), "fc3": (64, 64)}
    total = sum(math.prod(s) for s in shapes.values())
    per_layer = distribute(shapes, 0.8, "erk")
    active = sum((1 - per_layer[n]) * math.prod(s) for n, s in shapes.items())
    assert active == pytest.approx(0.2 * total, rel=1e-12)
    assert len({round(v, 9) for v in per_layer.values()}) == len(shapes)  # every layer differs
    assert all(0.0 <= v < 1.0 for v in per_layer.values())
    # ERK favours small layers: fc2 (10x64) is denser than fc1 (64x144)
    assert per_layer["fc2"] < per_layer["fc1"]
    # masks round each layer to whole weights: the total is off by at most half a weight per layer
    kept = sum(keep_count(math.prod(s), per_layer[n]) for n, s in shapes.items())
    assert abs(kept - 0.2 * total) <= len(shapes) / 2


def test_erk_caps_small_layers_dense():
    shapes = {"tiny": (2, 2), "big": (256, 256)}
    per_layer = distribute(shapes, 0.5, "erk")
    assert per_layer["tiny"] == 0.0
    active = sum((1 - per_layer[n]) * math.prod(s) for n, s in shapes.items())
    assert active == pytest.approx(0.5 * (4 + 256 * 256), rel=1e-12)


def test_uniform_and_unknown_distribution():
    assert distribute({"a": (4, 4), "b": (8, 2)}, 0.75) == {"a": 0.75, "b": 0.75}
    with pytest.raises(ValueError, match="uniform.*erk"):
        distribute({"a": (4, 4)}, 0.5, "normal")
