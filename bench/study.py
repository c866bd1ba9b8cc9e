"""Offline mini reproduction of the paper's claim: Sparse-IFT vs dense at equal training FLOPs.

    python bench/study.py vision            # Fashion-MNIST, narrow CIFAR ResNet-20, every member
    python bench/study.py lm                # byte-level GPTs on the King James Bible
    python bench/study.py vision --report   # table + plots from what has finished

Every run is ``sift-fit fit`` then ``sift-fit test`` on the same config with ``--sift.*``
overrides, so the study exercises exactly what users run. A run whose result file exists is
skipped; a run that was interrupted resumes from its ``last.ckpt``. Results land in
``docs/results/study_<task>/`` (one JSON per run) and the report in ``docs/results/study_<task>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

# What each study runs: name -> --sift overrides. Every sparse run uses match_flops, so each model's
# sparse forward MACs equal the dense model's to rounding: the comparison is at equal FLOPs.
RIGL = ["--sift.algorithm", "rigl", "--sift.update_frequency", "100", "--sift.match_flops", "true"]
STUDIES = {
    "vision": {
        "config": "bench/configs/study_vision.yaml",
        "metric": "test/acc1",
        "runs": {
            "dense": ["--sift.transform", "dense"],
            **{f"{fam}_{s}": ["--sift.transform", fam, "--sift.sparsity", str(s), *RIGL]
               for s in (0.5, 0.75) for fam in ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
               if s == 0.5 or fam in ("sparse_wide", "sparse_parallel")},
            "sparse_wide_0.9": ["--sift.transform", "sparse_wide", "--sift.sparsity", "0.9", *RIGL],
            "sparse_wide_0.5_static": ["--sift.transform", "sparse_wide", "--sift.sparsity", "0.5",
                                       "--sift.algorithm", "static", "--sift.match_flops", "true"],
        },
    },
    "lm": {
        "config": "bench/configs/study_lm.yaml",
        "metric": "test/ppl",
        "runs": {
            "dense": ["--sift.transform", "dense"],
            **{f"{fam}_{s}": ["--sift.transform", fam, "--sift.sparsity", str(s), *RIGL]
               for fam in ("sparse_wide", "sparse_parallel") for s in (0.5, 0.75)},
        },
    },
}


def _run_dir(task: str, name: str, seed: int) -> Path:
    return RESULTS / f"study_{task}" / f"{name}_seed{seed}"


def _sift_fit(*args: str) -> None:
    cmd = [sys.executable, "-m", "sift_lightning.cli", *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def run_one(task: str, name: str, seed: int, extra: list[str]) -> dict:
    """Fit (resuming if a last.ckpt exists), test, and write the run's JSON; return it."""
    study = STUDIES[task]
    out = _run_dir(task, name, seed)
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    common = ["--config", study["config"], *study["runs"][name], "--seed_everything", str(seed),
              "--sift.seed", str(seed), "--trainer.logger.init_args.save_dir", str(out),
              "--trainer.logger.init_args.version", "v0", *extra]
    last = out / "fit" / "v0" / "checkpoints" / "last.ckpt"
    start = time.time()
    _sift_fit("fit", *common, "--trainer.logger.init_args.name", "fit",
              *(["--ckpt_path", str(last)] if last.exists() else []))
    fit_s = time.time() - start
    _sift_fit("test", *common, "--trainer.logger.init_args.name", "test", "--ckpt_path", str(last))
    import torch

    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    sift_state = next((v for k, v in ckpt.get("callbacks", {}).items() if k.startswith("SparsityCallback")), {})
    result = {
        "name": name, "seed": seed, "fit_seconds": round(fit_s, 1),
        "test": _scalars(out / "test" / "v0", "test/"),
        "train_flops": sift_state.get("train_flops"),
        "params": sum(v.numel() for k, v in ckpt["state_dict"].items()
                      if not k.endswith("_mask") and "running_" not in k and "num_batches" not in k),
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _scalars(logdir: Path, prefix: str) -> dict[str, float]:
    """The last value of every TensorBoard scalar under ``logdir`` whose tag starts with ``prefix``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {t: events.Scalars(t)[-1].value for t in events.Tags()["scalars"] if t.startswith(prefix)}


def report(task: str) -> str:
    """Markdown table (mean ± std over seeds) and plots of the finished runs."""
    study = STUDIES[task]
    metric = study["metric"]
    rows = {}
    for name in study["runs"]:
        found = [json.loads(f.read_text()) for f in sorted((RESULTS / f"study_{task}").glob(f"{name}_seed*/result.json"))]
        if found:
            rows[name] = found
    lines = [f"| run | seeds | {metric} mean ± std | params | fit time (s) |", "|---|---|---|---|---|"]
    for name, found in rows.items():
        vals = [r["test"][metric] for r in found]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        scale = 100.0 if "acc" in metric else 1.0
        lines.append(f"| {name} | {len(vals)} | {scale * statistics.mean(vals):.2f} ± {scale * std:.2f} | "
                     f"{found[0]['params']:,} | {statistics.mean(r['fit_seconds'] for r in found):.0f} |")
    _plot(task, rows, metric)
    return "\n".join(lines)


def _plot(task: str, rows: dict, metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = rows.get("dense")
    if dense:
        ax.axhline(statistics.mean(r["test"][metric] for r in dense), color="k", ls="--", label="dense")
    for fam in ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped"):
        pts = sorted((float(n.split("_")[-1]), statistics.mean(r["test"][metric] for r in rs))
                     for n, rs in rows.items() if n.startswith(fam) and not n.endswith("static"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=fam)
    ax.set_xlabel("sparsity s")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: Sparse-IFT at equal forward FLOPs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"study_{task}.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(STUDIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", help="run only these run names")
    p.add_argument("--report", action="store_true", help="only write the report of finished runs")
    a, extra = p.parse_known_args()  # anything else goes to sift-fit, e.g. --trainer.max_epochs 2
    extra = [x for x in extra if x != "--"]
    if not a.report:
        for seed in a.seeds:
            for name in a.only or STUDIES[a.task]["runs"]:
                r = run_one(a.task, name, seed, extra)
                print(f"{name} seed {seed}: {r['test']} ({r['fit_seconds']} s)", flush=True)
    table = report(a.task)
    header = (f"# Study: {a.task}\n\nMachine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores. Command: `python bench/study.py {a.task}`.\n\n")
    (RESULTS / f"study_{a.task}.md").write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
