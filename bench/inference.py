"""CPU inference of Sparse-IFT models: dense vs. masked vs. shipped (folded or sparse-exported).

    python bench/inference.py --quick                   # < 1 min, a smoke test of the whole path
    python bench/inference.py --out docs/results/inference_cpu.md

For every model, member and sparsity it times three networks at each batch size:

- dense: the original model (the iso-FLOP baseline);
- masked: the Sparse-IFT network as trained, masked weights stored dense (what training runs);
- shipped: Parallel and Doped folded back to the dense architecture (``fold``; target: the dense
  latency +-5 %), Wide and Factorized through ``sparse_export`` (CSR where measured faster).

The three are timed round-robin (one sample of each in turn, medians kept), so load from other
processes on a shared machine hits them alike. Peak memory is the peak of tensor bytes live during
one forward pass as ``torch.profiler``'s memory timeline sees them: the weights and input it reads,
activations and scratch tensors (oneDNN's reordered conv weights too); allocations made inside MKL's
sparse routines are not seen. "Weights" is the bytes of parameters and buffers (masks and CSR
indices included). One thread by default: see ``--threads``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sift_lightning import create_backbone, transform
from sift_lightning.export import fold, sparse_export
from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.sparse.masks import init_masks, mark_sparse
from sift_lightning.transforms.wide import wide_factor

MEMBERS = ("sparse_parallel", "sparse_doped", "sparse_wide", "sparse_factorized")
FOLDED = ("sparse_parallel", "sparse_doped")


# ---------------------------------------------------------------- models
@dataclass
class Bench:
    """A dense model, a way to get its Sparse-IFT form, and one input sample."""

    name: str
    build: Callable[[], nn.Module]
    sample: Callable[[int], torch.Tensor]  # batch size -> input
    sparse_ift: Callable[[str, float], nn.Module] | None = None  # default: transform(build(), ...)

    def member(self, member: str, s: float) -> nn.Module:
        torch.manual_seed(0)
        model = self.sparse_ift(member, s) if self.sparse_ift else transform(self.build(), member, s)
        init_masks(model, generator=torch.Generator().manual_seed(0))
        _randomise_norms(model)
        return model.eval()


def _randomise_norms(model: nn.Module) -> None:
    """Trained-looking BatchNorm statistics, so folding has real work to get right."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _mlp(width: int, depth: int = 3, d_in: int = 784, d_out: int = 10) -> nn.Sequential:
    dims = [d_in] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def _mlp_member(width: int) -> Callable[[str, float], nn.Module]:
    def build(member: str, s: float) -> nn.Module:
        if member != "sparse_wide":
            return transform(_mlp(width), member, s)
        # widened by hand: sparse_wide would widen this MLP's input too (a Linear-first model)
        wide = _mlp(int(width * wide_factor(s) + 1e-6))
        for layer in [m for m in wide if isinstance(m, nn.Linear)][1:-1]:
            mark_sparse(layer, s)
        return wide

    return build


def benches(quick: bool, seq_len: int) -> list[Bench]:
    torch.manual_seed(0)
    if quick:
        channels = dict(channels=(16, 32, 64, 128))
        return [
            Bench("mlp-256", lambda: _mlp(256), lambda b: torch.randn(b, 784), _mlp_member(256)),
            Bench("resnet18-cifar-w16", lambda: create_backbone("resnet18", 100, cifar_stem=True, **channels),
                  lambda b: torch.randn(b, 3, 32, 32)),
        ]
    cfg = gpt_config("gpt_mini", block_size=seq_len)
    return [
        Bench("mlp-1024", lambda: _mlp(1024), lambda b: torch.randn(b, 784), _mlp_member(1024)),
        Bench(f"gpt_mini (T={seq_len})", lambda: GPT(cfg), lambda b: torch.randint(0, cfg.vocab_size, (b, seq_len))),
        Bench("resnet18-cifar100", lambda: create_backbone("resnet18", 100, cifar_stem=True),
              lambda b: torch.randn(b, 3, 32, 32)),
    ]


# ---------------------------------------------------------------- measures
def _seconds(model: nn.Module, x: torch.Tensor, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        model(x)
    return (time.perf_counter() - start) / number


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per forward of each model, sampled round-robin."""
    # one call each to pick how many calls make a sample (>= ~20 ms); a call that long is already a
    # sample (the models are warm: run peak_mib first, or any call)
    number, samples = {}, {}
    for name, m in models.items():
        first = _seconds(m, x, 1)
        number[name] = max(1, min(50, int(0.02 / max(first, 1e-6))))
        samples[name] = [first] if number[name] == 1 else []
    for _ in range(repeats - min(len(v) for v in samples.values())):
        for name, m in models.items():
            samples[name].append(_seconds(m, x, number[name]))
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


@torch.inference_mode()
def peak_mib(model: nn.Module, x: torch.Tensor) -> float | None:
    """Peak MiB held by torch's CPU allocator during one forward (profiler memory timeline)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with _no_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                   with_stack=True) as prof:
            model(x)
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return max((sum(s) for s in sizes), default=0) / 2**20
    except Exception:  # noqa: BLE001  a private API: report n/a rather than fail the run
        return None


@contextlib.contextmanager
def _no_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines (written to file descriptor 2)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def weights_mib(model: nn.Module) -> float:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def shipped_as(model: nn.Module) -> str:
    report = getattr(model, "sift_export_report", None)
    if report is None:
        return "folded"
    return f"CSR {sum(d.csr for d in report)}/{len(report)}"


# ---------------------------------------------------------------- the run
def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def run_bench(bench: Bench, sparsities: list[float], batch_sizes: list[int], repeats: int,
              min_speedup: float, decision_repeats: int, memory: bool) -> list[str]:
    dense = bench.build().eval()
    _randomise_norms(dense)
    lines = [f"### {bench.name}", "",
             f"Dense: {sum(p.numel() for p in dense.parameters()) / 1e6:.2f}M params, "
             f"{weights_mib(dense):.1f} MiB of weights.", ""]
    rows: dict[int, list[str]] = {b: [] for b in batch_sizes}
    layer_rows: list[str] = []
    for member in MEMBERS:
        for s in sparsities:
            t0 = time.perf_counter()
            masked = bench.member(member, s)
            if member in FOLDED:
                shipped = fold(masked).eval()
            else:
                shipped = sparse_export(masked, bench.sample(1), batch_sizes=batch_sizes, min_speedup=min_speedup,
                                        repeats=decision_repeats)
                if s == max(sparsities):
                    layer_rows += _decision_rows(member, s, shipped.sift_export_report, batch_sizes)
            with torch.inference_mode():
                x = bench.sample(2)
                err = rel_error(shipped(x), masked(x))
            for b in batch_sizes:
                x = bench.sample(b)
                mem = [peak_mib(m, x) if memory else None for m in (dense, masked, shipped)]  # warms up too
                ms = latencies({"dense": dense, "masked": masked, "shipped": shipped}, x, repeats)
                rows[b].append(
                    f"| {member} | {s} | {shipped_as(shipped)} | {ms['dense']:.2f} | {ms['masked']:.2f} | "
                    f"{ms['shipped']:.2f} | {ms['shipped'] / ms['dense']:.2f} | "
                    f"{' / '.join(_fmt(m, '.0f') for m in mem)} | "
                    f"{weights_mib(masked):.1f} / {weights_mib(shipped):.1f} | {err:.0e} |"
                )
            print(f"  {bench.name} {member} s={s}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    for b in batch_sizes:
        lines += [f"Batch {b}:", "",
                  "| member | s | shipped as | dense ms | masked ms | shipped ms | shipped / dense | "
                  "peak MiB dense / masked / shipped | weights MiB masked / shipped | max rel. error |",
                  "|---|---|---|---|---|---|---|---|---|---|", *rows[b], ""]
    if layer_rows:
        per_batch = " | ".join(f"dense / CSR ms at {b}" for b in batch_sizes)
        lines += ["<details><summary>sparse_export's per-layer measurements at the highest sparsity</summary>", "",
                  f"| member | layer | density | {per_batch} | CSR? |",
                  "|---|---|---|" + "---|" * len(batch_sizes) + "---|", *layer_rows, "", "</details>", ""]
    return lines


def _decision_rows(member: str, s: float, report: list, batch_sizes: list[int]) -> list[str]:
    rows = []
    for d in report:
        cells = " | ".join(f"{d.dense_ms[b]:.3f} / {d.sparse_ms[b]:.3f}" if b in d.sparse_ms else "not timed"
                           for b in batch_sizes)
        rows.append(f"| {member} {s} | {d.name} | {d.density:.3f} | {cells} | {'yes' if d.csr else 'no'} |")
    return rows


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {cores} cores available, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, MKL {torch.backends.mkl.is_available()}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models, s=0.9, batches 1 and 16: under a minute")
    p.add_argument("--sparsity", nargs="+", type=float, default=None, help="default 0.5 0.75 0.9 (quick: 0.9)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default 1 64 (quick: 1 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed samples per measure (medians are kept)")
    p.add_argument("--min-speedup", type=float, default=1.1, help="sparse_export: CSR must be this much faster")
    p.add_argument("--decision-repeats", type=int, default=2, help="sparse_export: timed samples per layer")
    p.add_argument("--seq-len", type=int, default=64, help="GPT tokens per sample")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, two OpenMP threads stall whenever another "
                        "process holds a core)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiler's peak-memory pass")
    p.add_argument("--only", nargs="+", default=None, help="run only benches whose name starts with one of these")
    p.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    sparsities = a.sparsity or ([0.9] if a.quick else [0.5, 0.75, 0.9])
    batch_sizes = a.batch_sizes or ([1, 16] if a.quick else [1, 64])
    start, load0 = time.perf_counter(), os.getloadavg()
    lines = []
    for bench in benches(a.quick, a.seq_len):
        if a.only and not any(bench.name.startswith(o) for o in a.only):
            continue
        lines += run_bench(bench, sparsities, batch_sizes, a.repeats, a.min_speedup, a.decision_repeats, not a.no_memory)
    load1 = os.getloadavg()
    header = [
        "# CPU inference: dense vs. masked vs. shipped Sparse-IFT",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/inference.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"{time.perf_counter() - start:.0f} s; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end "
        "(other processes shared the machine: read ratios, not absolute times).",
        "",
        "Times are medians of round-robin samples (ms per forward, eval mode, `torch.inference_mode`). "
        "*masked*: the network as trained, masks applied to dense weights; *shipped*: Parallel and Doped "
        "folded to the dense architecture (`sift_lightning.export.fold`), Wide and Factorized through "
        f"`sparse_export` (a layer runs as CSR only where measured >= {a.min_speedup}x faster at every batch "
        "size; *CSR k/n* says how many). Peak MiB: tensor bytes live during one forward (weights, input, "
        "activations), from torch.profiler's memory timeline. "
        "Max rel. error: shipped vs. masked outputs, max |diff| / max |output|.",
        "",
    ]
    report = "\n".join(header + lines)
    print(report)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
