"""Offline mini reproduction of the paper's claim: Sparse-IFT vs dense at equal training FLOPs.

    python bench/study.py vision            # Fashion-MNIST, narrow CIFAR ResNet-20, every member
    python bench/study.py lm                # byte-level GPTs on the King James Bible
    python bench/study.py vision --report   # table + plots from what has finished

Every run is ``sift-fit fit`` then ``sift-fit test`` on the same config with ``--sift.*``
overrides, so the study exercises exactly what users run. A run whose result file exists is
skipped; a run that was interrupted resumes from its ``last.ckpt``. Results land in
``docs/results/study_<task>/`` (one JSON per run) and the report in ``docs/results/study_<task>.md``.

Several workers can share a study: each claims a run before it starts it, so on 2 cores
``OMP_NUM_THREADS=1 python bench/study.py vision &`` twice runs two at a time (how the recorded
results were made).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

# What each study runs: name -> --sift (and model) overrides. Every sparse run uses match_flops, so
# its sparse forward MACs equal the dense model's to rounding: the comparison is at equal FLOPs.
# Names under "extra" run only when asked for with --only (diagnostics and the costliest runs).
RIGL = ["--sift.algorithm", "rigl", "--sift.update_frequency", "100", "--sift.match_flops", "true"]
INIT_SCALE = ["--sift.sparse_init_scale", "true"]
SUPAR = ["--sift.parametrization", "supar"]
LONG = ["--trainer.max_steps", "9000"]  # 3x the LM schedule (bench/configs/study_lm.yaml: 3,000 steps)
VISION_LONG = ["--trainer.max_epochs", "12"]
VISION_NARROW = ["--model.backbone_kwargs.width", "4"]  # half the study's width 8
FAMILIES = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")


def _sparse(fam: str, s: float, *more: str) -> list[str]:
    return ["--sift.transform", fam, "--sift.sparsity", str(s), *RIGL, *more]


def _static(fam: str, s: float) -> list[str]:
    """The same member with its random initial masks kept: what dynamic masks add."""
    return ["--sift.transform", fam, "--sift.sparsity", str(s), "--sift.algorithm", "static", "--sift.match_flops", "true"]


# Unmasked control: the dense model at Sparse Wide s=0.5's nominal width (about 2x the FLOPs). If
# even this does not beat the narrow dense model, no iso-FLOP sparse variant of it can be expected to.
_GPT_WIDE = '{"vocab_size": 256, "block_size": 128, "n_layer": 2, "n_head": 4, "d_model": 92}'
STUDIES = {
    "vision": {
        "config": "bench/configs/study_vision.yaml",
        "module": "sift_lightning.ImageClassifier",
        "metric": "test/acc1",
        "curve": "val/acc1",
        "runs": {
            "dense": ["--sift.transform", "dense"],
            **{f"{fam}_0.5": _sparse(fam, 0.5) for fam in FAMILIES},
            # SµPar under SGD: init std and SGD LR of each sparse layer scaled by its fan-in change
            **{f"{fam}_0.5_supar": _sparse(fam, 0.5, *SUPAR) for fam in FAMILIES},
        },
        "extra": {
            **{f"{fam}_0.75": _sparse(fam, 0.75) for fam in FAMILIES},
            "sparse_wide_0.9": _sparse("sparse_wide", 0.9),
            "sparse_wide_0.5_static": _static("sparse_wide", 0.5),
            "dense_width11": ["--sift.transform", "dense", "--model.backbone_kwargs.width", "11"],
            # the schedule question: the same runs at 3x the epochs
            **{f"long_{name}": [*args, *VISION_LONG] for name, args in (
                ("dense", ["--sift.transform", "dense"]),
                ("dense_width11", ["--sift.transform", "dense", "--model.backbone_kwargs.width", "11"]),
                ("sparse_wide_0.5", _sparse("sparse_wide", 0.5)),
                ("sparse_wide_0.75", _sparse("sparse_wide", 0.75)),
                ("sparse_parallel_0.5", _sparse("sparse_parallel", 0.5)),
            )},
            # the capacity question: a model half as wide, where width buys more. Its Sparse Wide
            # s=0.75 (k=2) has the shape of the main dense model, its unmasked capacity control.
            **{f"narrow_{name}": [*args, *VISION_NARROW] for name, args in (
                ("dense", ["--sift.transform", "dense"]),
                ("sparse_wide_0.5", _sparse("sparse_wide", 0.5)),
                ("sparse_wide_0.75", _sparse("sparse_wide", 0.75)),
                ("sparse_wide_0.9", _sparse("sparse_wide", 0.9)),
                ("sparse_wide_0.75_static", _static("sparse_wide", 0.75)),
                ("sparse_parallel_0.5", _sparse("sparse_parallel", 0.5)),
                ("sparse_factorized_0.5", _sparse("sparse_factorized", 0.5)),
                ("sparse_doped_0.5", _sparse("sparse_doped", 0.5)),
                *((f"sparse_{m}_{s}_supar", _sparse(f"sparse_{m}", s, *SUPAR))
                  for m, s in (("wide", 0.5), ("wide", 0.75), ("parallel", 0.5))),
            )},
        },
    },
    "lm": {
        "config": "bench/configs/study_lm.yaml",
        "module": "sift_lightning.LanguageModel",
        "metric": "test/ppl",
        "curve": "val/ppl",
        "runs": {
            "dense": ["--sift.transform", "dense"],
            **{f"sparse_wide_{s}": _sparse("sparse_wide", s) for s in (0.5, 0.75)},
            # SµPar: init and AdamW LR multipliers per sparse layer, so the dense recipe stays optimal
            **{f"sparse_wide_{s}_supar": _sparse("sparse_wide", s, *SUPAR) for s in (0.5, 0.75)},
        },
        "extra": {
            **{f"sparse_parallel_{s}": _sparse("sparse_parallel", s) for s in (0.5, 0.75)},
            "dense_d92": ["--sift.transform", "dense", "--model.model", _GPT_WIDE],
            # the LR control for SµPar, which raises the sparse layers' AdamW LR (x1.87 at s=0.5, x4
            # at s=0.75): does dense gain as much from a larger LR alone? (2x the recipe's 3e-3)
            "dense_lr6e-3": ["--sift.transform", "dense", "--model.optim.lr", "6.0e-3"],
            # ... and SµPar at that LR: SµPar's claim is that the dense model's best LR is the sparse one's
            "sparse_wide_0.5_supar_lr6e-3": _sparse("sparse_wide", 0.5, *SUPAR, "--model.optim.lr", "6.0e-3"),
            **{f"sparse_wide_{s}_init_scale": _sparse("sparse_wide", s, *INIT_SCALE) for s in (0.5, 0.75)},
            "sparse_wide_0.9": _sparse("sparse_wide", 0.9),
            # the paper's accounting: s only in the sparsified layers (the wider dense head/attention
            # make it ~1.9x the dense model's whole-model forward FLOPs here; match_flops retunes s)
            "sparse_wide_0.5_nominal": ["--sift.transform", "sparse_wide", "--sift.sparsity", "0.5",
                                        "--sift.algorithm", "rigl", "--sift.update_frequency", "100"],
            "long_dense": ["--sift.transform", "dense", *LONG],
            "long_sparse_parallel_0.5": _sparse("sparse_parallel", 0.5, *LONG),
            "long_sparse_wide_0.5_init_scale": _sparse("sparse_wide", 0.5, *INIT_SCALE, *LONG),
            "long_dense_d92": ["--sift.transform", "dense", "--model.model", _GPT_WIDE, *LONG],
        },
    },
}


def _all_runs(task: str) -> dict[str, list[str]]:
    return {**STUDIES[task]["runs"], **STUDIES[task]["extra"]}


def _run_dir(task: str, name: str, seed: int) -> Path:
    return RESULTS / f"study_{task}" / f"{name}_seed{seed}"


def _sift_fit(*args: str) -> None:
    cmd = [sys.executable, "-m", "sift_lightning.cli", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def _claim(out: Path) -> bool:
    """Take the run for this process, so several ``study.py`` workers can share one study.

    A claim is a file created exclusively and holding the worker's pid; a claim whose process has
    died is taken over (the run then resumes from its ``last.ckpt``).
    """
    claim = out / "claim.pid"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(claim.read_text() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                claim.unlink(missing_ok=True)  # stale: its worker is gone
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run_one(task: str, name: str, seed: int, extra: list[str]) -> dict | None:
    """Fit (resuming if a last.ckpt exists), test, and write the run's JSON; return it.

    Returns None when another worker holds the run.
    """
    study = STUDIES[task]
    out = _run_dir(task, name, seed)
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if not _claim(out):
        return None
    common = ["--config", study["config"], *_all_runs(task)[name], "--seed_everything", str(seed),
              "--sift.seed", str(seed), "--trainer.logger.init_args.save_dir", str(out),
              "--trainer.logger.init_args.version", "v0", *extra]
    last = out / "fit" / "v0" / "checkpoints" / "last.ckpt"
    resumed = last.exists()
    start = time.time()
    _sift_fit("fit", *common, "--trainer.logger.init_args.name", "fit",
              *(["--ckpt_path", str(last)] if last.exists() else []))
    fit_s = time.time() - start
    _sift_fit("test", *common, "--trainer.logger.init_args.name", "test", "--ckpt_path", str(last))
    result = {"name": name, "seed": seed, "fit_seconds": round(fit_s, 1), "resumed": resumed, "threads": _threads(),
              "test": _scalars(out / "test" / "v0", "test/"), "val": _scalars(out / "fit" / "v0", "val/"),
              "train_loss": _train_loss(out / "fit" / "v0"),
              **_model_facts(task, last)}
    result_file.write_text(json.dumps(result, indent=1))
    (out / "claim.pid").unlink(missing_ok=True)
    return result


def _threads() -> int:
    import torch

    return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())


def _model_facts(task: str, ckpt_path: Path) -> dict:
    """Parameters, forward MACs per sample (dense and counting active weights only) and training FLOPs."""
    import importlib

    import torch

    from sift_lightning.flops import count_flops

    module_name, cls_name = STUDIES[task]["module"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    with warnings.catch_warnings():  # the transform's advice was printed when the run was built
        warnings.simplefilter("ignore")
        model = cls.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    flops = count_flops(model, model.example_input_array)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    sift_state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("SparsityCallback")), {})
    masks = [v for k, v in ckpt["state_dict"].items() if k.endswith("_mask")]
    return {
        **_parallel_union(model),
        # the sparsity the sparse layers really train at (match_flops raises it above the nominal s)
        "sparsity": 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) if masks else 0.0,
        "params": flops.params, "active_params": round(flops.active_params),
        "macs_dense": int(flops.dense_macs), "macs_sparse": float(flops.sparse_macs),
        "train_flops": sift_state.get("train_flops"), "steps": ckpt.get("global_step"),
    }


def _parallel_union(model) -> dict[str, float]:
    """Sparse Parallel's branches summed: the density of the one kernel they add up to.

    Conv branches each pass their own BatchNorm, so in training they are n separate paths; Linear
    branches (the GPT's) have no norm and always compute one matrix whose support is the union of the
    branch masks (1 - s^n: 75% at s=0.5, 68% at s=0.75). Either way, this is the folded layer's density.
    """
    from sift_lightning.sparse.masks import get_mask, sparse_parameters
    from sift_lightning.transforms.parallel import SparseParallel

    active = total = 0
    for module in model.modules():
        if isinstance(module, SparseParallel):
            union = None
            for branch in module.branches:
                for _, owner, local, _ in sparse_parameters(branch):
                    mask = get_mask(owner, local)
                    union = mask.clone() if union is None else union | mask
            active, total = active + int(union.sum()), total + union.numel()
    return {"parallel_union_density": active / total} if total else {}


def _train_loss(logdir: Path) -> float | None:
    """Training loss at the end: the last epoch's mean, or the mean of the last 10 logged steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = events.Tags()["scalars"]
    if "train/loss_epoch" in tags:
        return events.Scalars("train/loss_epoch")[-1].value
    tag = next((t for t in ("train/loss_step", "train/loss") if t in tags), None)
    return statistics.mean(p.value for p in events.Scalars(tag)[-10:]) if tag else None


def _scalars(logdir: Path, prefix: str) -> dict[str, float]:
    """The last value of every TensorBoard scalar under ``logdir`` whose tag starts with ``prefix``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {t: events.Scalars(t)[-1].value for t in events.Tags()["scalars"] if t.startswith(prefix)}


def _load_results(task: str) -> dict[str, list[dict]]:
    """Finished runs by name (every seed), back-filling model facts into results written before them."""
    rows = {}
    for name in _all_runs(task):
        found = []
        for f in sorted((RESULTS / f"study_{task}").glob(f"{name}_seed*/result.json")):
            r = json.loads(f.read_text())
            last = f.parent / "fit" / "v0" / "checkpoints" / "last.ckpt"
            stale = not {"macs_dense", "sparsity"} <= r.keys() or ("parallel" in name and "parallel_union_density" not in r)
            if stale and last.exists():
                r.update(_model_facts(task, last))
                f.write_text(json.dumps(r, indent=1))
            if "val" not in r or "train_loss" not in r:
                r["val"] = _scalars(f.parent / "fit" / "v0", "val/")
                r["train_loss"] = _train_loss(f.parent / "fit" / "v0")
                f.write_text(json.dumps(r, indent=1))
            found.append(r)
        if found:
            rows[name] = found
    return rows


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def report(task: str) -> str:
    """Markdown table (mean ± std over seeds) and plots of the finished runs."""
    metric = STUDIES[task]["metric"]
    rows = _load_results(task)
    scale = 100.0 if "acc" in metric else 1.0
    val_metric = STUDIES[task]["curve"]
    lines = [f"| run | seeds | {metric} mean ± std | per seed | final {val_metric} | train loss | s in sparse layers | params (active) | "
             f"fwd MFLOPs dense | fwd MFLOPs sparse | fit time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, found in rows.items():
        vals = [scale * r["test"][metric] for r in found]
        mean, std = _mean_std(vals)
        v_mean, v_std = _mean_std([scale * r["val"][val_metric] for r in found if val_metric in r.get("val", {})] or [0.0])
        train = [r["train_loss"] for r in found]
        train_loss = f"{statistics.mean(train):.3f}" if None not in train else "?"
        facts = found[0]
        mflops = (f"{2 * facts['macs_dense'] / 1e6:.2f} | {2 * facts['macs_sparse'] / 1e6:.2f}"
                  if "macs_dense" in facts else "? | ?")
        params = f"{facts.get('params', 0):,} ({facts.get('active_params', 0):,})"
        sparsity = f"{facts['sparsity']:.3f}" if "sparsity" in facts else "?"
        if "parallel_union_density" in facts:  # what the summed branches amount to
            sparsity += f" (sum: {1 - statistics.mean(r['parallel_union_density'] for r in found):.3f})"
        # a run resumed after an interruption timed only its last process: not comparable
        timed = [r["fit_seconds"] for r in found if not r.get("resumed")]
        fit_time = f"{statistics.mean(timed):.0f}" if timed else "(resumed)"
        d = 2 if scale != 1.0 else 3  # accuracy in % to 0.01; perplexity to 0.001
        lines.append(f"| {name} | {len(vals)} | {mean:.{d}f} ± {std:.{d}f} | {' / '.join(f'{v:.{d}f}' for v in vals)} | "
                     f"{v_mean:.{d}f} ± {v_std:.{d}f} | {train_loss} | {sparsity} | {params} | {mflops} | {fit_time} |")
    _plot(task, rows, metric)
    _plot_curves(task, rows)
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _plot(task: str, rows: dict, metric: str) -> None:
    """Test metric against sparsity per member (mean, error bars = std over seeds).

    One panel for the study's model and, when there are ``narrow_*`` runs, one for the half-width
    model, whose unmasked capacity control is the study's own dense model.
    """
    plt = _pyplot()
    if plt is None:
        return
    panels = {"": {n: rs for n, rs in rows.items() if not n.startswith("narrow_")}}
    narrow = {n[len("narrow_"):]: rs for n, rs in rows.items() if n.startswith("narrow_")}
    if narrow:
        if "dense" in rows:
            narrow["dense_full_width"] = rows["dense"]
        panels["half-width model: "] = narrow
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 * len(panels), 4), squeeze=False)
    for ax, (title, panel) in zip(axes[0], panels.items()):
        _plot_panel(ax, panel, metric)
        ax.set_title(f"{task}: {title}Sparse-IFT at equal forward FLOPs")
    fig.tight_layout()
    fig.savefig(RESULTS / f"study_{task}.png", dpi=120)
    plt.close(fig)


def _plot_panel(ax, rows: dict, metric: str) -> None:
    dense = rows.get("dense")
    if dense:
        mean, std = _mean_std([r["test"][metric] for r in dense])
        ax.axhline(mean, color="k", ls="--", label=f"dense ({len(dense)} seeds)")
        ax.axhspan(mean - std, mean + std, color="k", alpha=0.1)
    controls = [(n, rs) for n, rs in rows.items() if n.startswith("dense_")]
    styles = [("grey", ":"), ("tab:purple", "-."), ("tab:brown", ":"), ("tab:olive", "-.")]
    for (name, rs), (color, ls) in zip(controls, styles * len(controls)):  # unmasked controls: dotted
        ax.axhline(_mean_std([r["test"][metric] for r in rs])[0], color=color, ls=ls,
                   label=f"{name}, unmasked, {rs[0]['macs_dense'] / dense[0]['macs_dense']:.1f}x FLOPs"
                   if dense and "macs_dense" in rs[0] else name)
    for i, fam in enumerate(FAMILIES):
        # members side by side at each sparsity (they share the x values), each variant beside its member
        dodge = (i - (len(FAMILIES) - 1) / 2) * 0.008
        pts = []
        for name, rs in rows.items():
            tail = name[len(fam) + 1:]
            try:
                s = float(tail)  # plain RigL runs only: sparse_wide_0.5, not _static / _init_scale / long_
            except ValueError:
                continue
            if name.startswith(fam + "_"):
                pts.append((s, *_mean_std([r["test"][metric] for r in rs])))
        if pts:
            xs, ys, es = zip(*sorted(pts))
            line = ax.errorbar([x + dodge for x in xs], ys, yerr=es, marker="o", capsize=3, label=fam)
            for variant, marker in (("static", "s"), ("init_scale", "^"), ("supar", "D")):  # the same member, other settings
                for name, rs in rows.items():
                    head, _, tail = name.rpartition("_" + variant)
                    if tail == "" and head.startswith(fam + "_") and head[len(fam) + 1:].replace(".", "", 1).isdigit():
                        m, e = _mean_std([r["test"][metric] for r in rs])
                        label = f"{fam} ({variant})"
                        ax.errorbar([float(head[len(fam) + 1:]) + dodge + 0.003], [m], yerr=[e], marker=marker,
                                    mfc="none", capsize=3,
                                    color=line[0].get_color(), ls="none",
                                    label=None if label in ax.get_legend_handles_labels()[1] else label)
    ax.set_xlabel("sparsity s (members drawn side by side)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: it hid points


def _curve(task: str, name: str, seed: int, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(_run_dir(task, name, seed) / "fit" / "v0"))
    events.Reload()
    return {p.step: p.value for p in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def _plot_curves(task: str, rows: dict) -> None:
    """Validation curves, mean over seeds: the main runs, and the longer-schedule and half-width runs beside them."""
    plt = _pyplot()
    if plt is None:
        return
    tag = STUDIES[task]["curve"]
    panels = {"long_": "longer schedule", "narrow_": "half-width model"}
    groups = {"main runs": [n for n in rows if not n.startswith(tuple(panels))],
              **{title: [n for n in rows if n.startswith(prefix)] for prefix, title in panels.items()}}
    groups = {title: names for title, names in groups.items() if names}
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.5), squeeze=False)
    for ax, (title, names) in zip(axes[0], groups.items()):
        late = []
        for name in names:
            curves = [_curve(task, name, r["seed"], tag) for r in rows[name]]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            ys = [statistics.mean(c[t] for c in curves) for t in steps]
            late += ys[len(ys) // 3:]
            ax.plot(steps, ys, marker=".", ls="--" if "dense" in name else "-",
                    label=f"{name} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        if late:  # zoom past the first third of the points, where the runs separate
            lo, hi = min(late), max(late)
            pad = 0.15 * (hi - lo or abs(hi) * 0.01)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(tag)
        ax.set_title(f"{task}: {title}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / f"study_{task}_curves.png", dpi=120)
    plt.close(fig)


NOTES = "<!-- notes: everything below this line is kept when the table is rewritten -->"


def main() -> None:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(STUDIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", help="run only these run names (also the extra ones)")
    p.add_argument("--report", action="store_true", help="only write the report of finished runs")
    p.add_argument("--results", type=Path, default=RESULTS, help="where run folders and reports go")
    a, extra = p.parse_known_args()  # anything else goes to sift-fit, e.g. --trainer.max_epochs 2
    extra = [x for x in extra if x != "--"]
    RESULTS = a.results.resolve()
    unknown = sorted(set(a.only or ()) - set(_all_runs(a.task)))
    if unknown:
        p.error(f"unknown run name(s) {unknown}; valid for {a.task}: {sorted(_all_runs(a.task))}")
    if not a.report:
        for seed in a.seeds:
            for name in a.only or STUDIES[a.task]["runs"]:
                r = run_one(a.task, name, seed, extra)
                if r is None:
                    print(f"{name} seed {seed}: taken by another worker", flush=True)
                else:
                    print(f"{name} seed {seed}: {r['test']} ({r['fit_seconds']} s)", flush=True)
    table = report(a.task)
    md = RESULTS / f"study_{a.task}.md"
    notes = md.read_text().split(NOTES, 1)[1] if md.exists() and NOTES in md.read_text() else "\n"
    header = (f"# Study: {a.task}\n\nCommand: `python bench/study.py {a.task}` (table and plots: "
              f"`--report`). Plots: [metric vs sparsity](study_{a.task}.png), "
              f"[validation curves](study_{a.task}_curves.png).\n\n")
    md.write_text(header + table + "\n\n" + NOTES + notes)
    print(table)


if __name__ == "__main__":
    main()
