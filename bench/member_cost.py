"""What masked training costs per step: each Sparse-IFT member at s = 0.5/0.75/0.9 vs dense.

    python bench/member_cost.py                  # full run (~5 min on 2 quiet cores)
    python bench/member_cost.py --quick          # one repetition, two measured steps per config
    python bench/member_cost.py --smoke          # seconds: batch 8, s = 0.5 only; checks that it runs
    python bench/member_cost.py --quick --write  # also write docs/results/member_cost_cpu.md

Sparse-IFT keeps the *sparse* FLOPs equal to the dense model's, but CPUs and GPUs simulate
unstructured sparsity with masks (DESIGN.md section 3): a member at sparsity ``s`` runs the dense
arithmetic of its larger structure, about ``1/(1-s)`` times the dense model's (Sparse Doped less:
its sparse matrix keeps the original shape and only the low-rank path is added). This script
measures it, so nobody is surprised: the step time of the width-16 CIFAR ResNet-18 (the model of
the official overhead figure) with each member, relative to the dense model, beside the ratio of
dense forward MACs that explains it.

Every configuration is a real ``Trainer.fit`` with ``SparsityCallback(s, transform=member,
algorithm="static")`` (RigL at frequency 100 adds the callback overhead of ``bench/overhead.py``,
about nothing), the dense one without a callback. The configurations are interleaved within each
repetition, warm-up steps are discarded, and the ratio is the median over repetitions of
``median(member steps) / median(dense steps)`` of the same repetition.

The last line reads ``member cost vs dense (s=0.5/0.75/0.9) sparse_wide=a/b/c sparse_parallel=...``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    bench_parser,
    CpuLoad,
    StepTimer,
    cifar_resnet18_w16,
    code_version,
    fit,
    machine_line,
    median,
    pre_batched,
    quiet,
)

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = ROOT / "docs" / "results" / "member_cost_cpu.md"
MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
MODES: dict[str, dict[str, Any]] = {
    "full": {"reps": 2, "batch": 128, "warmup": 2, "steps": 5, "sparsities": (0.5, 0.75, 0.9)},
    "quick": {"reps": 1, "batch": 128, "warmup": 1, "steps": 2, "sparsities": (0.5, 0.75, 0.9)},
    "smoke": {"reps": 1, "batch": 8, "warmup": 1, "steps": 1, "sparsities": (0.5,)},
}
SEED = 0


def _run(member: str | None, sparsity: float, cfg: dict[str, Any]) -> dict[str, Any]:
    """One fit; returns the measured step seconds and the model's size and dense arithmetic."""
    from sift_lightning.callback import SparsityCallback
    from sift_lightning.flops import count_flops
    from sift_lightning.modules import ImageClassifier

    torch.manual_seed(SEED)
    module = ImageClassifier(cifar_resnet18_w16(), num_classes=100)
    g = torch.Generator().manual_seed(1234)
    inputs = torch.randn(2, cfg["batch"], 3, 32, 32, generator=g)
    targets = torch.randint(0, 100, (2, cfg["batch"]), generator=g)
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if member is not None:
        callbacks.append(SparsityCallback(sparsity, transform=member, algorithm="static", seed=SEED))
    total = cfg["warmup"] + cfg["steps"] + 1  # the last interval also holds the epoch's end: dropped
    fit(module, pre_batched(inputs, targets, total), callbacks, total)
    flops = count_flops(module.backbone, torch.zeros(1, 3, 32, 32))
    return {
        "steps": timer.step_seconds()[cfg["warmup"]:cfg["warmup"] + cfg["steps"]],
        "params": flops.params,
        "dense_macs": flops.dense_macs,
        "sparse_macs": flops.sparse_macs,
    }


def measure(mode: str) -> dict[tuple[str, float], list[dict[str, Any]]]:
    cfg = MODES[mode]
    configs: list[tuple[str | None, float]] = [(None, 0.0)] + [(m, s) for s in cfg["sparsities"] for m in MEMBERS]
    runs: dict[tuple[str | None, float], list[dict[str, Any]]] = {c: [] for c in configs}
    for rep in range(cfg["reps"]):
        shift = rep * 5 % len(configs)  # a different order each repetition
        for member, s in configs[shift:] + configs[:shift]:
            runs[member, s].append(_run(member, s, cfg))
            print(f"rep {rep + 1}: {member or 'dense'} s={s} done", file=sys.stderr, flush=True)
    return runs


def summarise(runs: dict[tuple[str | None, float], list[dict[str, Any]]]) -> dict[str, Any]:
    dense = runs[None, 0.0]
    base = [median(r["steps"]) for r in dense]
    out: dict[str, Any] = {"dense_ms": 1e3 * median(base), "dense_params": dense[0]["params"],
                           "dense_macs": dense[0]["dense_macs"], "rows": {}}
    for (member, s), rs in runs.items():
        if member is None:
            continue
        out["rows"][member, s] = {
            "time": median([median(r["steps"]) / b for r, b in zip(rs, base)]),
            "ms": 1e3 * median([median(r["steps"]) for r in rs]),
            "arith": rs[0]["dense_macs"] / out["dense_macs"],
            "iso": rs[0]["sparse_macs"] / out["dense_macs"],
            "params": rs[0]["params"] / out["dense_params"],
        }
    return out


def table(summary: dict[str, Any], sparsities: tuple[float, ...]) -> str:
    head = "| member | " + " | ".join(f"s={s}: step vs dense (arithmetic) | s={s}: ms/step, params" for s in sparsities)
    rows = [head + " |", "|---|" + "---:|---:|" * len(sparsities)]
    for member in MEMBERS:
        cells = []
        for s in sparsities:
            r = summary["rows"][member, s]
            cells += [f"{r['time']:.2f}x ({r['arith']:.2f}x)", f"{r['ms']:.0f} ms, {r['params']:.2f}x"]
        rows.append(f"| {member} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(summary: dict[str, Any], mode: str, threads: int, load: dict[str, Any], argv: list[str]) -> str:
    cfg = MODES[mode]
    iso = [r["iso"] for r in summary["rows"].values()]
    lines = [
        "# Step time of each Sparse-IFT member on CPU",
        "",
        *([CpuLoad.banner(load), ""] if CpuLoad.banner(load) else []),
        f"Command: `python bench/member_cost.py {' '.join(argv)}`",
        "",
        f"Machine: {machine_line()}; torch threads: {threads}. Code: {code_version()}.",
        "",
        f"Load: {CpuLoad.describe(load)}.",
        "",
        f"Mode `{mode}`: {cfg['reps']} repetition(s), batch {cfg['batch']}, {cfg['warmup']} warm-up + "
        f"{cfg['steps']} measured steps per configuration, static masks (`SparsityCallback(s, transform=member, "
        "algorithm=\"static\")`; the dense model trains without a callback).",
        "",
        "Model: CIFAR ResNet-18 at width 16 (stem 16, stages 16/32/64/128, 100 classes), 3x32x32 inputs, SGD. "
        f"Dense: {summary['dense_ms']:.0f} ms/step, {summary['dense_params'] / 1e6:.2f}M parameters, "
        f"{summary['dense_macs'] / 1e6:.1f}M forward MACs per image.",
        "",
        "Each cell: measured step time relative to dense, and in brackets the dense forward MACs of the "
        "member's structure relative to dense (what the masked simulation computes); then the member's "
        "ms/step and parameters (stored dense, masked) relative to dense. Counted sparse, every member "
        f"lands at {min(iso):.3f}x..{max(iso):.3f}x the dense MACs (iso-FLOP): the sparsity is real only "
        "in the arithmetic a sparse kernel would do.",
        "",
        table(summary, cfg["sparsities"]),
        "",
        "Read it as: on CPUs and GPUs, a Sparse-IFT member at sparsity s trains about 1/(1-s) times slower "
        "than dense per step (Sparse Doped about 1+s) and holds about as many times the weights; only "
        "hardware that skips zeros (Cerebras) turns the iso-FLOP budget into iso-time. Sparse Parallel and "
        "Sparse Doped fold back to a dense layer of the original shape for inference (dense cost).",
    ]
    return "\n".join(lines) + "\n"


def last_line(summary: dict[str, Any], sparsities: tuple[float, ...]) -> str:
    cells = " ".join(
        f"{m}=" + "/".join(f"{summary['rows'][m, s]['time']:.2f}" for s in sparsities) for m in MEMBERS)
    return f"member cost vs dense (s={'/'.join(str(s) for s in sparsities)}) {cells}"


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, RESULT_FILE, ROOT, "one short repetition")
    args = parser.parse_args(argv)
    mode = args.mode
    quiet()
    torch.set_num_threads(args.threads)
    load = CpuLoad()
    runs = measure(mode)
    load = load.stop()
    summary = summarise(runs)
    text = report(summary, mode, args.threads, load, sys.argv[1:] if argv is None else argv)
    if args.write:
        Path(args.write).write_text(text)
    print(text)
    if not all(math.isfinite(r["time"]) and r["time"] > 0 for r in summary["rows"].values()):
        raise SystemExit("non-finite step-time ratio; see the table above")
    print(last_line(summary, MODES[mode]["sparsities"]))


if __name__ == "__main__":
    main()
