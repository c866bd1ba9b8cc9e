"""Shared helpers for the CPU step-time benchmarks (``overhead.py``, ``member_cost.py``).

Every measurement is a real Lightning ``Trainer.fit`` on in-memory, pre-batched random tensors
(``DataLoader(batch_size=None)`` over a ``TensorDataset`` whose items are whole batches), so data
loading costs an index lookup and no collation. ``StepTimer`` goes first in the callback list and
records ``time.perf_counter`` at every ``on_train_batch_start``: the step time is the interval from
one batch start to the next, which covers every hook of every callback, backward, the optimizer
step and its hooks, and Lightning's own per-batch work.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "CpuLoad",
    "StepTimer",
    "cifar_resnet18_w16",
    "code_version",
    "fit",
    "instrument",
    "machine_line",
    "malloc_returns_memory",
    "median",
    "peak_rss_mib",
    "pre_batched",
    "quiet",
    "rss_mib",
]


def quiet() -> None:
    """Silence Lightning's advice (few workers, no val loop): it is noise in benchmark output."""
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- machine and load
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """CPU model, cores, library versions and torch threads, on one line."""
    import lightning

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), torch {torch.__version__}, "
            f"lightning {lightning.__version__}, Python {platform.python_version()}")


def code_version() -> str:
    """The repository's commit, with "+ local changes" when the working tree differs from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{sha}{' + local changes in src/' if dirty else ''}"


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


class CpuLoad:
    """How many cores *other* processes kept busy while this benchmark ran.

    ``/proc/stat`` gives the machine's busy time; our own CPU time (this process and its reaped
    children) is subtracted. Call ``stop()`` after every worker has exited.
    """

    def __init__(self) -> None:
        self.load_before = load_average()
        self._t0 = time.monotonic()
        self._busy0 = self._busy()
        self._ours0 = self._ours()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self._t0
        others = ((self._busy() - self._busy0) - (self._ours() - self._ours0)) / max(wall, 1e-9)
        return {"load_before": self.load_before, "load_after": load_average(), "others_cores": max(0.0, others),
                "wall_s": wall}

    @staticmethod
    def describe(load: dict[str, Any]) -> str:
        fmt = lambda t: " ".join(f"{v:.2f}" for v in t)  # noqa: E731
        return (f"load average before {fmt(load['load_before'])}, after {fmt(load['load_after'])}; other processes "
                f"kept {load['others_cores']:.2f} cores busy on average during the {load['wall_s']:.0f} s run")

    @staticmethod
    def banner(load: dict[str, Any]) -> str:
        """A warning to print above the figures, or "" when the machine was quiet throughout."""
        if load["others_cores"] > 0.2:
            return "> **Developer machine under load; to be rerun on a quiet machine.** These figures are noisy."
        if load["load_before"][0] > 0.5:
            return (f"> Developer machine: quiet during the run (other processes used {load['others_cores']:.2f} "
                    "cores), "
                    f"but the load average was {load['load_before'][0]:.2f} just before it; to be rerun on a "
                    "dedicated machine.")
        return ""


# ---------------------------------------------------------------- memory
def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def malloc_returns_memory() -> bool:
    """Make glibc serve every allocation of 64 KiB or more with its own mmap, unmapped on free.

    Freed tensor memory then leaves the process at once instead of lingering in malloc's arenas
    (how much lingers depends on thread timing), so the peak RSS follows the peak of live memory
    and repeats to a fraction of a MiB. Slower allocation: use it in memory-only runs, not for
    timing. Returns False where the C library is not glibc (RSS is then noisier).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- data, models, fits
def pre_batched(inputs: torch.Tensor, targets: torch.Tensor, steps: int) -> DataLoader:
    """A loader yielding ``steps`` batches, cycling through the ``len(inputs)`` given ones.

    ``inputs[i]``/``targets[i]`` are whole batches; ``batch_size=None`` turns off collation.
    """
    order = [i % len(inputs) for i in range(steps)]
    return DataLoader(TensorDataset(inputs, targets), batch_size=None, sampler=order)


def cifar_resnet18_w16() -> torch.nn.Module:
    """The CIFAR ResNet-18 of the official overhead figure: stem 16, stages 16/32/64/128, 100 classes."""
    from sift_lightning.models.backbones import create_backbone
    from sift_lightning.transforms.wide import widened

    model = widened(create_backbone("resnet18", 100, cifar_stem=True), 0.25)
    widths = [model.conv1.out_channels] + [getattr(model, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)]
    assert widths == [16, 16, 32, 64, 128], widths
    return model


class StepTimer(pl.Callback):
    """Batch-start timestamps (place it first in ``callbacks``) and callback hook time per batch.

    Attributes:
        starts: ``perf_counter`` at each ``on_train_batch_start``, then one at ``on_train_end``.
        hook_s: seconds spent inside ``instrument``-ed callback methods, per batch.
        rss_start_mib: resident memory when training starts (model, optimizer and masks exist).
    """

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.hook_s: list[float] = []
        self.rss_start_mib = float("nan")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rss_start_mib = rss_mib()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.hook_s.append(0.0)
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Seconds per batch; batch ``i`` performed optimizer step ``i + 1``."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def instrument(obj: Any, timer: StepTimer, methods: Sequence[str]) -> None:
    """Time ``obj``'s public ``methods`` into ``timer.hook_s`` (instance attributes shadow the class's).

    ``obj`` is a callback (its hooks) or the engine (``after_step``, which its optimizer step
    post-hook calls through the instance, so the instance attribute is what runs).
    """
    for name in methods:
        original: Callable[..., Any] = getattr(obj, name)

        def timed(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                if timer.hook_s:
                    timer.hook_s[-1] += time.perf_counter() - t

        setattr(obj, name, timed)


def fit(module: pl.LightningModule, loader: DataLoader, callbacks: list[pl.Callback], steps: int) -> None:
    """One quiet single-process CPU fit of ``steps`` optimizer steps, no validation, no logging."""
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, callbacks=callbacks,
        enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)


def bench_parser(doc: str, result_file: Any, root: Any, quick_help: str) -> argparse.ArgumentParser:
    """The command line every benchmark shares: --quick/--smoke, --threads, --write [PATH]."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_const", dest="mode", const="quick", help=quick_help)
    group.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="seconds; checks it runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per fit (default 2: the machine's cores)")
    parser.add_argument("--write", nargs="?", const=str(result_file), default=None, metavar="PATH",
                        help=f"write the markdown report (default {result_file.relative_to(root)})")
    parser.set_defaults(mode="full")
    return parser

