"""Each member's size rule as a pure function, with exact values and the iso-FLOP identity."""

import math

import pytest
from torch import nn

from sift_lightning.transforms.doped import doped_rank
from sift_lightning.transforms.factorized import factorized_hidden, layer_dims
from sift_lightning.transforms.parallel import parallel_branches
from sift_lightning.transforms.wide import wide_factor


@pytest.mark.parametrize(("s", "n"), [(0.5, 2), (0.75, 4), (0.8, 5), (0.9, 10), (0.95, 20)])
def test_parallel_branches(s, n):
    # 1 / (1 - 0.9) is 10.000000000000002 in floating point: still 10
    assert parallel_branches(s) == n


@pytest.mark.parametrize(
    ("d_in", "d_out", "s", "d_h"),
    [
        (576, 64, 0.5, 116),  # 576*64 / (640*0.5) = 115.2 -> 116
        (576, 64, 0.75, 231),  # 36864 / 160 = 230.4 -> 231
        (576, 64, 0.9, 576),  # 36864 / 64 = 576 exactly: float noise must not round it up to 577
        (512, 512, 0.5, 512),  # 262144 / 512 = 512 exactly
        (512, 512, 0.75, 1024),
        (4608, 512, 0.9, 4608),  # layer4 3x3 conv 512->512: 4608*512/(5120*0.1) = 4608
    ],
)
def test_factorized_hidden(d_in, d_out, s, d_h):
    assert factorized_hidden(d_in, d_out, s) == d_h
    # iso-FLOP: the smallest hidden width whose sparse cost reaches the dense cost
    assert (1 - s) * d_h * (d_in + d_out) >= d_in * d_out - 1e-6
    assert (1 - s) * (d_h - 1) * (d_in + d_out) < d_in * d_out


@pytest.mark.parametrize(
    ("d_in", "d_out", "s", "r"),
    [
        (576, 64, 0.5, 28),  # 0.5*36864/640 = 28.8 -> 28
        (576, 64, 0.75, 43),  # 43.2 -> 43
        (576, 64, 0.9, 51),  # 51.84 -> 51
        (512, 512, 0.5, 128),  # exactly 128
        (512, 512, 0.75, 192),  # exactly 192
        (27, 64, 0.5, 9),  # 0.5*1728/91 = 9.49 -> 9
        (3, 2, 0.5, 0),  # tiny layers get no low-rank path
    ],
)
def test_doped_rank(d_in, d_out, s, r):
    assert doped_rank(d_in, d_out, s) == r
    # iso-FLOP: the largest rank whose low-rank path fits in the budget the sparsity freed
    assert (1 - s) * d_in * d_out + r * (d_in + d_out) <= d_in * d_out + 1e-6
    assert (1 - s) * d_in * d_out + (r + 1) * (d_in + d_out) > d_in * d_out


@pytest.mark.parametrize(("s", "k"), [(0.5, math.sqrt(2)), (0.75, 2.0), (0.9, math.sqrt(10))])
def test_wide_factor(s, k):
    assert wide_factor(s) == pytest.approx(k, rel=1e-12)
    assert wide_factor(s) ** 2 * (1 - s) == pytest.approx(1.0, rel=1e-12)


def test_wide_factor_at_075_is_exactly_two():
    # the reference's exact Wide s=0.75 parameter count depends on floor(2 c) == 2 c
    assert wide_factor(0.75) == 2.0


def test_layer_dims():
    assert layer_dims(nn.Conv2d(64, 128, 3)) == (576, 128)
    assert layer_dims(nn.Conv2d(64, 128, (1, 3))) == (192, 128)
    assert layer_dims(nn.Linear(20, 30)) == (20, 30)
