"""Coordinate check: does SµPar keep every sparse layer on the dense model's scale?

    python bench/coord_check.py --quick          # ~1 min on 2 cores: one seed, 3 steps
    python bench/coord_check.py                  # 3 seeds, 5 steps; writes docs/results/coord_check.{md,png}
    python bench/coord_check.py --optimizer sgd  # the same with SGD (SµPar's SGD rule)

As in the muP papers: build the dense model and each Sparse-IFT member at s = 0.5/0.75/0.9, with
the standard parameterization and with SµPar (``supar_init_`` after random masks, then
``supar_param_groups``). For every sparse layer record, on one fixed probe batch, the RMS of its
output at init and the RMS of the change of that output after a few optimizer steps (AdamW, lr
2e-3, no weight decay, fresh random batches; the masked part of each gradient is zeroed before the
step and the weights re-masked after). Each figure is divided by the same figure of the dense
model's layer that the structure replaced. Flat at 1 across s is what SµPar promises.

A layer's output is what the next norm or nonlinearity sees: Sparse Wide's layer itself; each
Sparse Parallel branch before its own BatchNorm (branches are pooled into one RMS), or the sum of
the branches when they have no norm; Sparse Factorized's U (before its norm) and V; Sparse
Doped's ``W_sparse x + V U x``. Subjects: an MLP (Linear/ReLU, widths 64), a small CNN
(conv-BN-ReLU, 16 channels, 8x8 inputs) and ``gpt_tiny`` on random bytes.

The last line reads ``coord check: standard max ratio <x>, supar max ratio <y>``: over every
subject, member, s and layer, the ratio farthest from 1, as ``exp(max |log ratio|)`` (so >= 1; a
ratio of 0.5 counts as 2), init and update alike.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from sift_lightning.models.gpt import GPT, gpt_config
from sift_lightning.sparse.masks import apply_masks, get_mask, init_masks, sparse_parameters
from sift_lightning.sparse.supar import supar_init_, supar_param_groups
from sift_lightning.transforms import transform
from sift_lightning.transforms.doped import SparseDoped
from sift_lightning.transforms.parallel import SparseParallel

MEMBERS = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
SPARSITIES = (0.5, 0.75, 0.9)
PARAMETRIZATIONS = ("standard", "supar")
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@dataclass(frozen=True)
class Subject:
    """A small model, the random batches it trains on, and its loss."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 16), *block(16, 16), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


SUBJECTS = {
    "mlp": Subject(_mlp, lambda g: (torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))),
    "cnn": Subject(_cnn, lambda g: (torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))),
    "gpt": Subject(lambda: GPT(gpt_config("gpt_tiny")),
                   lambda g: (torch.randint(0, 256, (8, 32), generator=g), torch.randint(0, 256, (8, 32), generator=g))),
}


def build(subject: str, member: str, sparsity: float, parametrization: str, seed: int) -> nn.Module:
    """The dense subject, or the member at ``sparsity`` with random masks, under ``parametrization``."""
    torch.manual_seed(seed)
    model = SUBJECTS[subject].build()
    if member == "dense":
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Parallel's note on Linear branches, Wide's on dense-layer FLOPs
        model = transform(model, member, sparsity)
    init_masks(model, generator=torch.Generator().manual_seed(seed))
    if parametrization == "supar":
        supar_init_(model)
    return model


def transformed_layers(subject: str) -> list[str]:
    """Names of the dense layers every member replaces (Sparse Wide keeps them, marked sparse)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Wide's note on the FLOPs of the layers that stay dense
        wide = transform(SUBJECTS[subject].build(), "sparse_wide", 0.5)
    return [full.rpartition(".")[0] for full, *_ in sparse_parameters(wide)]


def probes(model: nn.Module, dense_names: list[str]) -> list[tuple[str, nn.Module]]:
    """``(key, module)`` whose outputs the check records (see the module docstring).

    Keys are module names with Parallel branch indices pooled (``branches.*``); a key maps to the
    dense layer whose name is its longest prefix.
    """
    owners = {name.rpartition(".")[0] for name, *_ in sparse_parameters(model)} or set(dense_names)  # dense: itself
    seen, out = set(), []
    for name in sorted(owners):
        module = model.get_submodule(name)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else None
        grand = name.split(".branches.")[0]
        host = model.get_submodule(grand) if ".branches." in name else None
        if isinstance(host, SparseParallel) and any(b is module for b in host.branches):
            name, module = grand, host  # bare branches meet in the sum
        elif isinstance(parent, SparseDoped):
            name, module = name.rpartition(".")[0], parent
        key = re.sub(r"branches\.\d+", "branches.*", name)
        if (key, id(module)) not in seen:
            seen.add((key, id(module)))
            out.append((key, module))
    return out


def dense_layer(key: str, dense_names: list[str]) -> str:
    """The dense layer a probe key stands in for: the longest dense name that prefixes it."""
    return max((n for n in dense_names if key == n or key.startswith(n + ".")), key=len)


def _masked_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for _, owner, local, param in sparse_parameters(model):
        mask = get_mask(owner, local)
        if param.grad is not None and mask is not None:
            param.grad.masked_fill_(~mask, 0.0)
    opt.step()
    apply_masks(model)


def measure(model: nn.Module, subject: str, parametrization: str, dense_names: list[str], *, steps: int,
            lr: float, optimizer: str, seed: int) -> dict[str, tuple[float, float]]:
    """``{key: (output RMS at init, RMS of its change after `steps` steps)}`` on a fixed probe batch."""
    data = SUBJECTS[subject].batch
    gen = torch.Generator().manual_seed(1000 + seed)
    probe_x, _ = data(gen)
    recorded: dict[str, list[torch.Tensor]] = defaultdict(list)
    points = probes(model, dense_names)
    hooks = [m.register_forward_hook(lambda _m, _i, out, key=key: recorded[key].append(out.detach().clone()))
             for key, m in points]

    def snapshot() -> dict[str, list[torch.Tensor]]:
        recorded.clear()
        with torch.no_grad():
            model(probe_x)
        return {k: list(v) for k, v in recorded.items()}

    model.train()
    before = snapshot()
    groups: list = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    kind = "sgd" if optimizer == "sgd" else "adam"
    if parametrization == "supar":
        groups = supar_param_groups(model, groups, lr=lr, optimizer=kind)
    opt = (torch.optim.SGD(groups, lr=lr, momentum=0.9) if kind == "sgd"
           else torch.optim.AdamW(groups, lr=lr, weight_decay=0.0))
    for _ in range(steps):
        x, y = data(gen)
        with torch.enable_grad():
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _masked_step(model, opt)
    after = snapshot()
    for h in hooks:
        h.remove()

    def rms(ts: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in ts) / sum(t.numel() for t in ts))

    return {k: (rms(before[k]), rms([a - b for a, b in zip(after[k], before[k])])) for k in before}


def check(subjects: list[str], members: tuple[str, ...] = MEMBERS, sparsities: tuple[float, ...] = SPARSITIES,
          *, seeds: int = 1, steps: int = 3, lr: float = 2e-3, optimizer: str = "adamw") -> list[dict]:
    """Rows ``{subject, member, s, parametrization, layer, init, update}`` (ratios to dense, seed-averaged RMS)."""
    rows = []
    for subject in subjects:
        dense_names = transformed_layers(subject)
        kw = dict(steps=steps, lr=lr, optimizer=optimizer)
        dense = [measure(build(subject, "dense", 0.0, "standard", s), subject, "standard", dense_names, seed=s, **kw)
                 for s in range(seeds)]
        for member in members:
            for sparsity in sparsities:
                for par in PARAMETRIZATIONS:
                    runs = [measure(build(subject, member, sparsity, par, s), subject, par, dense_names, seed=s, **kw)
                            for s in range(seeds)]
                    for key in runs[0]:
                        ref = dense_layer(key, dense_names)
                        mean = [sum(r[key][i] for r in runs) / seeds for i in (0, 1)]
                        base = [sum(d[ref][i] for d in dense) / seeds for i in (0, 1)]
                        rows.append(dict(subject=subject, member=member, s=sparsity, parametrization=par, layer=key,
                                         init=mean[0] / base[0], update=mean[1] / base[1]))
    return rows


def max_ratio(rows: list[dict], parametrization: str) -> float:
    """``exp(max |log ratio|)`` over the rows of one parameterization, init and update alike."""
    logs = [abs(math.log(r[q])) for r in rows if r["parametrization"] == parametrization for q in ("init", "update")]
    return math.exp(max(logs))


def _gmean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _worst(values: list[float]) -> float:
    return max(values, key=lambda v: abs(math.log(v)))


def summary(rows: list[dict]) -> dict[tuple, dict[str, tuple[float, float]]]:
    """Per (subject, member, s, parametrization): ``{"init"|"update": (geometric mean, worst layer)}``."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["subject"], r["member"], r["s"], r["parametrization"])].append(r)
    return {k: {q: (_gmean([r[q] for r in rs]), _worst([r[q] for r in rs])) for q in ("init", "update")}
            for k, rs in cells.items()}


NOTES = "<!-- notes: everything below this line is kept when the tables are rewritten -->"


def write_markdown(rows: list[dict], path: Path, header: str) -> None:
    """The tables, then whatever follows ``NOTES`` in the existing file (the hand-written reading)."""
    notes = path.read_text().split(NOTES, 1)[1] if path.exists() and NOTES in path.read_text() else "\n"
    summ = summary(rows)
    lines = [header, "",
             "Each cell: geometric mean over the member's sparse layers of (layer figure / dense layer figure), "
             "with the layer farthest from 1 in brackets. 1.00 = the dense model's scale.", "",
             "| subject | member | s | standard init | standard update | SµPar init | SµPar update |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({k[:3] for k in summ}, key=lambda k: (k[0], MEMBERS.index(k[1]), k[2]))
    for subject, member, s in keys:
        cells = []
        for par in PARAMETRIZATIONS:
            for q in ("init", "update"):
                g, w = summ[(subject, member, s, par)][q]
                cells.append(f"{g:.2f} [{w:.2f}]")
        lines.append(f"| {subject} | {member} | {s} | " + " | ".join(cells) + " |")
    lines += ["", "Every layer (ratios to dense):", "",
              "| subject | member | s | layer | standard init | standard update | SµPar init | SµPar update |",
              "|---|---|---|---|---|---|---|---|"]
    by_layer: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        by_layer[(r["subject"], r["member"], r["s"], r["layer"])][r["parametrization"]] = r
    for (subject, member, s, layer), pr in sorted(by_layer.items(), key=lambda kv: (kv[0][0], MEMBERS.index(kv[0][1]), kv[0][2], kv[0][3])):
        vals = " | ".join(f"{pr[p][q]:.2f}" for p in PARAMETRIZATIONS for q in ("init", "update"))
        lines.append(f"| {subject} | {member} | {s} | {layer} | {vals} |")
    path.write_text("\n".join(lines) + "\n\n" + NOTES + notes)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = summary(rows)
    subjects = sorted({r["subject"] for r in rows})
    fig, axes = plt.subplots(2, len(MEMBERS), figsize=(4 * len(MEMBERS), 6.5), sharex=True, sharey=True)
    colors = dict(zip(subjects, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for j, member in enumerate(MEMBERS):
        for i, q in enumerate(("init", "update")):
            ax = axes[i, j]
            for subject in subjects:
                for par, style in (("standard", "--"), ("supar", "-")):
                    xs = [0.0] + [s for s in SPARSITIES if (subject, member, s, par) in summ]
                    ys = [1.0] + [summ[(subject, member, s, par)][q][0] for s in xs[1:]]
                    ax.plot(xs, ys, style, marker="o", color=colors[subject], label=f"{subject} {par}")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{member}: {'output RMS at init' if q == 'init' else 'RMS of output change'}", fontsize=9)
            if i == 1:
                ax.set_xlabel("sparsity s (0 = dense)")
            if j == 0:
                ax.set_ylabel("ratio to dense layer (geo. mean)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Coordinate check: dashed = standard, solid = SµPar; flat at 1 = the dense model's scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 3 steps; writes nothing")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3, --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 5, --quick 3)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--lr", type=float, default=None, help="base LR (default 2e-3 AdamW, 0.05 SGD)")
    parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (3 if args.quick else 5)
    lr = args.lr or (0.05 if args.optimizer == "sgd" else 2e-3)
    start = time.perf_counter()
    rows = check(args.subjects, seeds=seeds, steps=steps, lr=lr, optimizer=args.optimizer)
    took = time.perf_counter() - start
    summ = summary(rows)
    for (subject, member, s, par), v in sorted(summ.items()):
        print(f"{subject:4s} {member:18s} s={s:<4} {par:8s} init {v['init'][0]:.2f} [{v['init'][1]:.2f}]  "
              f"update {v['update'][0]:.2f} [{v['update'][1]:.2f}]")
    if not args.quick:
        suffix = "" if args.optimizer == "adamw" else f"_{args.optimizer}"
        header = (f"# Coordinate check ({args.optimizer}, lr {lr}, {steps} steps, {seeds} seeds)\n\n"
                  f"`python bench/coord_check.py{'' if args.optimizer == 'adamw' else ' --optimizer sgd'}` "
                  f"({took:.0f} s, {args.threads} threads, torch {torch.__version__}, CPU, code {_commit()}). "
                  "What it measures: the docstring of bench/coord_check.py.")
        write_markdown(rows, RESULTS / f"coord_check{suffix}.md", header)
        if args.optimizer == "adamw":
            plot(rows, RESULTS / "coord_check.png")
    for member in MEMBERS:
        part = [r for r in rows if r["member"] == member]
        print(f"{member}: standard max ratio {max_ratio(part, 'standard'):.2f}, supar max ratio {max_ratio(part, 'supar'):.2f}")
    print(f"({took:.0f} s)")
    print(f"coord check: standard max ratio {max_ratio(rows, 'standard'):.2f}, "
          f"supar max ratio {max_ratio(rows, 'supar'):.2f}")


if __name__ == "__main__":
    main()
