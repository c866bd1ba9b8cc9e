"""bench/study.py: workers share a study through claims, runs resume/skip, the report has every column."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_claims_are_exclusive_and_stale_ones_are_taken_over(study, tmp_path: Path) -> None:
    assert study._claim(tmp_path)
    assert (tmp_path / "claim.pid").read_text() == str(os.getpid())
    assert study._claim(tmp_path)  # this worker already holds it
    (tmp_path / "claim.pid").write_text(str(os.getppid()))  # a live process: another worker
    assert not study._claim(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "claim.pid").write_text(str(dead.pid))  # its worker is gone: take it over
    assert study._claim(tmp_path)
    assert (tmp_path / "claim.pid").read_text() == str(os.getpid())


def study_families() -> set[str]:
    from sift_lightning.transforms import FAMILIES

    return set(FAMILIES)


def test_every_run_is_a_valid_sift_fit_override_list(study) -> None:
    for task in study.STUDIES:
        runs = study._all_runs(task)
        assert "dense" in runs and not set(study.STUDIES[task]["runs"]) & set(study.STUDIES[task]["extra"])
        for name, args in runs.items():
            assert args[0] == "--sift.transform" and args[1] in {"dense", *study_families()}, (task, name)
            assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), (task, name)
            if "sparse_" in args[1] and "nominal" not in name:
                assert args[args.index("--sift.match_flops") + 1] == "true", (task, name)  # equal FLOPs


def _study(results: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "bench/study.py", "lm", "--seeds", "0", "--results", str(results), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_a_tiny_study_runs_fits_tests_reports_and_skips_when_done(tmp_path: Path) -> None:
    tiny = ["--only", "dense", "sparse_parallel_0.5", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2", "--data.root", str(tmp_path / "data"),
            "--data.batch_size", "4", "--trainer.log_every_n_steps", "1"]
    proc = _study(tmp_path, *tiny)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense = json.loads((tmp_path / "study_lm" / "dense_seed0" / "result.json").read_text())
    sparse = json.loads((tmp_path / "study_lm" / "sparse_parallel_0.5_seed0" / "result.json").read_text())
    assert dense["steps"] == sparse["steps"] == 4 and dense["test"]["test/ppl"] > 1 and dense["val"]["val/ppl"] > 1 and dense["train_loss"] > 0
    assert dense["macs_dense"] == dense["macs_sparse"] and dense["train_flops"] is None
    # equal forward FLOPs by construction; the Parallel model holds more (masked) parameters
    assert sparse["macs_sparse"] == pytest.approx(dense["macs_dense"], rel=0.01)
    assert sparse["macs_dense"] > 1.5 * dense["macs_dense"] and sparse["params"] > sparse["active_params"]
    assert sparse["train_flops"] > 0 and dense["sparsity"] == 0.0 and 0.49 < sparse["sparsity"] < 0.51
    # two branches at density 0.5 sum to one kernel of density between 0.5 (same masks) and 1 (disjoint)
    assert 0.5 <= sparse["parallel_union_density"] <= 1.0 and "parallel_union_density" not in dense
    md = (tmp_path / "study_lm.md").read_text()
    assert "| dense | 1 |" in md and "| sparse_parallel_0.5 | 1 |" in md and "fwd MFLOPs sparse" in md and "final val/ppl" in md and "s in sparse layers" in md and "train loss" in md
    (tmp_path / "study_lm.md").write_text(md + "hand-written notes\n")
    assert (tmp_path / "study_lm.png").stat().st_size > 0 and (tmp_path / "study_lm_curves.png").stat().st_size > 0
    again = _study(tmp_path, *tiny)  # finished runs are skipped, notes below the marker survive
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Seed set" not in again.stderr and "hand-written notes" in (tmp_path / "study_lm.md").read_text()
    assert json.loads((tmp_path / "study_lm" / "dense_seed0" / "result.json").read_text()) == dense
    assert dense["resumed"] is False and "(resumed)" not in md


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    tiny = ["--only", "dense", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--data.root", str(tmp_path / "data"), "--data.batch_size", "4", "--trainer.log_every_n_steps", "1"]
    first = _study(tmp_path, *tiny, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "study_lm" / "dense_seed0"
    (run / "result.json").unlink()  # as if the worker had died after its last checkpoint
    (run / "claim.pid").write_text("999999999")  # ... leaving its claim behind
    again = _study(tmp_path, *tiny, "--trainer.max_steps", "5", "--trainer.val_check_interval", "5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restored all states from the checkpoint" in again.stderr
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 5 and result["resumed"] is True and not (run / "claim.pid").exists()
    # its fit time covers the last process only, so the report does not average it in
    assert "| dense | 1 |" in (tmp_path / "study_lm.md").read_text() and "| (resumed) |" in (tmp_path / "study_lm.md").read_text()


def test_unknown_run_names_fail_in_one_line(tmp_path: Path) -> None:
    proc = _study(tmp_path, "--only", "sparse_wide_0.6")
    assert proc.returncode == 2 and "unknown run name(s) ['sparse_wide_0.6']; valid for lm:" in proc.stderr


def test_the_sparsity_plot_gives_the_half_width_runs_their_own_panel(study, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    def run(acc: float, macs: float) -> dict:
        return {"seed": 0, "test": {"test/acc1": acc}, "macs_dense": macs}

    rows = {"dense": [run(0.91, 2.0)], "sparse_wide_0.5": [run(0.915, 4.0)], "dense_width11": [run(0.916, 4.0)]}
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    study._plot("vision", rows, "test/acc1")
    one = Image.open(tmp_path / "study_vision.png").size
    rows |= {"narrow_dense": [run(0.89, 1.0)], "narrow_sparse_wide_0.75": [run(0.90, 4.0)]}
    study._plot("vision", rows, "test/acc1")
    two = Image.open(tmp_path / "study_vision.png").size
    assert two[0] == 2 * one[0] and two[1] == one[1]


def test_the_lm_study_runs_sparse_wide_with_and_without_supar_and_plots_both(study, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = study.STUDIES["lm"]["runs"]
    assert list(runs) == ["dense", "sparse_wide_0.5", "sparse_wide_0.75", "sparse_wide_0.5_supar", "sparse_wide_0.75_supar"]
    for s in (0.5, 0.75):
        plain, supar = runs[f"sparse_wide_{s}"], runs[f"sparse_wide_{s}_supar"]
        assert supar == [*plain, "--sift.parametrization", "supar"] and "--sift.parametrization" not in plain
    plt = study._pyplot()
    fig, ax = plt.subplots()

    def run(ppl: float) -> dict:
        return {"seed": 0, "test": {"test/ppl": ppl}, "macs_dense": 1.0}

    rows = {"dense": [run(4.0)], "sparse_wide_0.5": [run(4.1)], "sparse_wide_0.75": [run(4.3)],
            "sparse_wide_0.5_supar": [run(4.05)], "sparse_wide_0.75_supar": [run(4.2)]}
    study._plot_panel(ax, rows, "test/ppl")
    handles, labels = ax.get_legend_handles_labels()
    assert labels.count("sparse_wide") == 1 and labels.count("sparse_wide (supar)") == 1  # one marker legend for both s
    supar, plain = handles[labels.index("sparse_wide (supar)")], handles[labels.index("sparse_wide")]
    assert list(supar[0].get_ydata()) == [4.05] and list(plain[0].get_ydata()) == [4.1, 4.3]
    # drawn beside its member's s=0.5 point (members and variants are dodged so none hides another)
    assert supar[0].get_xdata()[0] == pytest.approx(0.5, abs=0.02) and supar[0].get_xdata()[0] > plain[0].get_xdata()[0]
    plt.close(fig)
