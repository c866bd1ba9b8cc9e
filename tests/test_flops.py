"""count_flops: per-layer rows, dense/sparse totals, attention MACs, meta device, and the CLI table."""

import re
import runpy
import sys

import pytest
import torch
from torch import nn

from sift_lightning import count_flops, create_backbone, transform
from sift_lightning.flops.table import main
from sift_lightning.models.gpt import GPT, gpt_config, gpt_forward_macs
from sift_lightning.sparse.masks import init_masks, set_mask

CIFAR_MACS = 555_468_800


def _cifar_resnet18(device: str = "cpu") -> nn.Module:
    with torch.device(device):
        return create_backbone("resnet18", 100, cifar_stem=True)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_per_layer_rows_of_dense_resnet18(device):
    report = count_flops(_cifar_resnet18(device), torch.zeros(1, 3, 32, 32, device=device))
    names = [r.name for r in report.layers]
    assert len(names) == 21  # stem, 16 block convs, 3 downsample convs, fc
    assert names[:4] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert names[-1] == "fc"
    rows = {r.name: r for r in report.layers}
    assert rows["conv1"].dense_macs == 3 * 3 * 3 * 64 * 32 * 32
    assert rows["layer1.0.conv1"].dense_macs == 3 * 3 * 64 * 64 * 32 * 32
    assert rows["layer2.0.conv1"].dense_macs == 3 * 3 * 64 * 128 * 16 * 16  # stride 2
    assert rows["layer2.0.downsample.0"].dense_macs == 64 * 128 * 16 * 16
    assert rows["fc"].dense_macs == 512 * 100
    assert rows["fc"].kind == "Linear" and rows["conv1"].kind == "Conv2d"
    assert all(r.density == 1.0 and r.sparse_macs == r.dense_macs for r in report.layers)
    assert report.other_macs == 0
    assert report.dense_macs == report.sparse_macs == CIFAR_MACS
    assert report.params == report.active_params == 11_220_132


def test_batch_scales_macs_not_params():
    model = _cifar_resnet18("meta")
    one = count_flops(model, torch.zeros(1, 3, 32, 32, device="meta"))
    three = count_flops(model, torch.zeros(3, 3, 32, 32, device="meta"))
    assert three.dense_macs == 3 * one.dense_macs
    assert three.params == one.params


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))


@pytest.mark.parametrize(
    ("member", "s", "middle_dense", "middle_sparse", "sparse_part"),
    [
        ("dense", 0.5, 600, 600, 0),
        ("sparse_parallel", 0.75, 4 * 600, 600, 4 * 600),  # 4 branches of 20x30 at density 1/4
        ("sparse_factorized", 0.5, 20 * 24 + 24 * 30, 600, 20 * 24 + 24 * 30),  # d_h = ceil(600/25)
        ("sparse_doped", 0.5, 600 + 6 * 20 + 6 * 30, 300 + 6 * 50, 600),  # r = floor(300/50); U, V dense
    ],
)
def test_hand_computed_sparse_macs(member, s, middle_dense, middle_sparse, sparse_part):
    report = count_flops(transform(_mlp(), member, s), torch.zeros(1, 10))
    ends = 10 * 20 + 30 * 5
    assert report.dense_macs == ends + middle_dense
    assert report.sparse_macs == pytest.approx(ends + middle_sparse, abs=1e-9)
    assert report.sparse_layer_macs == sparse_part


def test_mask_density_overrides_target():
    model = transform(_mlp(), "sparse_doped", 0.5)
    mask = torch.zeros(30, 20, dtype=torch.bool)
    mask[:, :5] = True  # density 1/4 instead of the target 1/2
    set_mask(model[2].sparse, "weight", mask)
    report = count_flops(model, torch.zeros(1, 10))
    row = next(r for r in report.layers if r.name == "2.sparse")
    assert row.density == 0.25
    assert report.sparse_macs == pytest.approx(200 + 150 + 150 + 300)
    params = sum(p.numel() for p in model.parameters())
    assert report.params == params
    assert report.active_params == pytest.approx(params - 600 + 150)


def test_init_masks_rounding_shows_in_flops():
    model = transform(_mlp(), "sparse_parallel", 0.9)
    init_masks(model, generator=torch.Generator().manual_seed(0))
    report = count_flops(model, torch.zeros(1, 10))
    branch_rows = [r for r in report.layers if ".branches." in r.name]
    assert len(branch_rows) == 10
    assert all(r.density == round(0.1 * 600) / 600 for r in branch_rows)


def test_training_mode_restored():
    model = _cifar_resnet18("meta").train()
    count_flops(model, torch.zeros(1, 3, 32, 32, device="meta"))
    assert model.training and model.layer1[0].bn1.training
    model.eval()
    count_flops(model, torch.zeros(1, 3, 32, 32, device="meta"))
    assert not model.training


def test_tuple_and_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    x, y = torch.zeros(2, 4), torch.zeros(2, 5)
    assert count_flops(TwoInputs(), (x, y)).dense_macs == 2 * (12 + 15)
    assert count_flops(TwoInputs(), {"x": x, "y": y}).dense_macs == 2 * (12 + 15)


@pytest.mark.parametrize("T", [64, 17])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_gpt_attention_is_other_macs(device, T):
    config = gpt_config("gpt_tiny")
    expected = gpt_forward_macs(config, T)
    report = count_flops(GPT(config, device=device), torch.zeros(1, T, dtype=torch.long, device=device))
    # the CPU flash-attention kernel is counted, with the formula of every other SDPA kernel
    assert report.other_macs == expected["attention"] > 0
    assert report.dense_macs == expected["total"]
    assert [r.name for r in report.layers][-1] == "lm_head"
    assert len(report.layers) == 2 * 4 + 1


def test_gpt_attention_stays_dense_when_sparse():
    config = gpt_config("gpt_tiny")
    idx = torch.zeros(1, 64, dtype=torch.long)
    macs = gpt_forward_macs(config, 64)
    report = count_flops(transform(GPT(config), "sparse_parallel", 0.5), idx)
    assert report.other_macs == macs["attention"]
    assert report.sparse_macs == pytest.approx(macs["total"])  # n (1 - s) = 1 exactly at s=0.5


def _table(capsys, argv):
    main(argv)
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        member, s, params, dense, sparse, ratio = line.split()
        rows[(member, float(s))] = (int(params.replace(",", "")), float(ratio))
    return rows


def test_cli_table_three_members(capsys):
    members = ["sparse_parallel", "sparse_factorized", "sparse_doped"]
    rows = _table(capsys, ["resnet18", "--cifar-stem", "--sparsity", "0.5", "--members", *members])
    assert rows[("dense", 0.0)] == (11_220_132, 1.0)
    assert set(rows) == {("dense", 0.0)} | {(f, 0.5) for f in members}
    for member in members:
        assert rows[(member, 0.5)][1] == pytest.approx(1.0, abs=0.02)


def test_cli_table_default_members(capsys):
    rows = _table(capsys, ["resnet18", "--cifar-stem", "--sparsity", "0.5"])
    assert {f for f, _ in rows} == {"dense", "sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"}
    assert all(s == 0.5 for f, s in rows if f != "dense")
    for key, (_, ratio) in rows.items():
        assert ratio == pytest.approx(1.0, abs=0.02), key
    assert rows[("sparse_wide", 0.5)][0] == pytest.approx(22_152_430, rel=0.02)  # the official model


def test_cli_gpt_with_match_flops(capsys):
    rows = _table(capsys, ["gpt_tiny", "--sparsity", "0.5", "--members", "sparse_factorized", "sparse_doped",
                           "--match-flops"])
    assert rows[("dense", 0.0)][0] == GPT(gpt_config("gpt_tiny"), device="meta").num_params(non_embedding=False)
    assert rows[("sparse_factorized", 0.5)][1] == rows[("sparse_doped", 0.5)][1] == 1.0


def test_cli_module_entry_point(capsys, monkeypatch):
    # what `python -m sift_lightning.flops ...` runs, in-process (a subprocess costs seconds)
    argv = ["sift_lightning.flops", "gpt_tiny", "--sparsity", "0.75", "--members", "sparse_wide"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module("sift_lightning.flops", run_name="__main__")
    out = capsys.readouterr().out
    wide = next(line for line in out.splitlines() if line.startswith("sparse_wide"))
    assert re.search(r"\s0\.75\s", wide)
    assert float(wide.split()[-1]) == pytest.approx(1.25, abs=1e-4)  # attention and lm_head grow dense
