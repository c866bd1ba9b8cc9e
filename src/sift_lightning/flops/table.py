"""The iso-FLOP table of every Sparse-IFT member: ``python -m sift_lightning.flops MODEL``."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from sift_lightning.flops import count_flops
from sift_lightning.models.backbones import create_backbone
from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.transforms import MEMBERS, transform

__all__ = ["format_table", "iso_flop_table", "main"]


def iso_flop_table(
    build: Any, example_input: Any, members: list[str], sparsities: list[float], **options: Any
) -> list[dict[str, Any]]:
    """Rows of (member, sparsity, params, dense MACs, sparse MACs, ratio to dense).

    Args:
        build: a callable returning a fresh dense model.
        example_input: input for ``count_flops``.
        members: members to tabulate (``dense`` is always the first row).
        sparsities: values of s.
        **options: passed to ``transform``.
    """
    base = count_flops(build(), example_input)
    rows = [dict(member="dense", sparsity=0.0, params=base.params, dense_macs=base.dense_macs,
                 sparse_macs=base.sparse_macs, ratio=1.0)]
    for member in members:
        if member == "dense":
            continue
        for s in sparsities:
            r = count_flops(transform(build(), member, s, example_input=example_input, **options), example_input)
            rows.append(dict(member=member, sparsity=s, params=r.params, dense_macs=r.dense_macs,
                             sparse_macs=r.sparse_macs, ratio=r.sparse_macs / base.dense_macs))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``iso_flop_table`` rows."""
    out = [f"{'member':<18} {'s':>5} {'params':>14} {'dense MACs':>16} {'sparse MACs':>16} {'sparse/dense':>12}"]
    for r in rows:
        out.append(
            f"{r['member']:<18} {r['sparsity']:>5.2f} {r['params']:>14,} {r['dense_macs']:>16,} "
            f"{r['sparse_macs']:>16,.0f} {r['ratio']:>12.4f}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m sift_lightning.flops MODEL``: the iso-FLOP table of every member."""
    p = argparse.ArgumentParser(prog="python -m sift_lightning.flops", description=main.__doc__)
    p.add_argument("model", help="a timm model name (resnet18, vit_tiny_patch16_224, ...) or a GPT preset (gpt_tiny, gpt3_small)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 ResNet stem, no max-pool")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None, help="default: 32 with --cifar-stem, else 224")
    p.add_argument("--seq-len", type=int, default=None, help="GPT sequence length (default: block size)")
    p.add_argument("--members", nargs="+", default=list(MEMBERS[1:]), choices=MEMBERS[1:])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    p.add_argument("--match-flops", action="store_true", help="tune s so sparse MACs meet the dense budget")
    a = p.parse_args(argv)
    if a.model.startswith("gpt"):
        cfg = gpt_config(a.model)
        build = lambda: GPT(cfg, device="meta")  # noqa: E731  shapes only: instant and memory-free
        example = torch.zeros(1, a.seq_len or cfg.block_size, dtype=torch.long, device="meta")
    else:
        size = a.image_size or (32 if a.cifar_stem else 224)
        kwargs = dict(cifar_stem=a.cifar_stem, in_chans=a.in_chans)
        if "vit" in a.model or "deit" in a.model:
            kwargs["img_size"] = size

        def build() -> nn.Module:
            with torch.device("meta"):
                return create_backbone(a.model, a.num_classes, **kwargs)

        example = torch.zeros(1, a.in_chans, size, size, device="meta")
    rows = iso_flop_table(build, example, a.members, a.sparsity, match_flops=a.match_flops)
    print(format_table(rows))
