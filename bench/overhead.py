"""What SparsityCallback's own work costs: step time and peak memory with it vs without it.

    python bench/overhead.py                  # full run (~6 min on 2 quiet cores)
    python bench/overhead.py --quick          # under a minute; fewer steps and repetitions
    python bench/overhead.py --smoke          # seconds, tiny batches: only checks that it runs
    python bench/overhead.py --quick --write  # also write docs/results/overhead_cpu.md

The last line reads ``overhead ratio static=<x> rigl=<y> memory=<z>``: the worst of the models.

Same architecture, same masks, so only the callback's own work differs:

- ``baseline``: the same layers marked sparse (``mark_sparse``) and the same random masks
  (``init_masks``, same seed) applied once by hand, trained with no callback: every tensor the
  sparse run holds exists here too, and the arithmetic is identical (masks are simulated).
- ``static``: ``SparsityCallback(0.5, transform=None, algorithm="static")``: whatever the callback
  does every step (mask the gradients; re-mask weights and optimizer state where the optimizer
  could revive them). After each fit the script checks that every masked-out weight is exactly 0.
- ``rigl``: ``algorithm="rigl"`` with a constant drop fraction 0.3 (the initial and largest value
  of the paper's cosine schedule) and ``end=1.0``, run with ``update_frequency`` of a few steps so
  that one fit yields several update-step samples. RigL at frequency 100 is then amortised as
  ``(99 * median plain step + median update step) / 100``.

Each (model, variant) lives in its own worker process (forked from this one before any torch
work), which runs one fit per request; requests are interleaved (for each repetition, for each
model, the variants in a rotating order), so slow drift of the machine's load hits every variant
alike. A ratio is ``median(variant steps) / median(baseline steps)`` within one repetition; the
reported figure is the median over repetitions. Warm-up steps are discarded.

The "callback hooks" columns time the callback's own methods directly (``on_train_batch_start``,
``on_before_optimizer_step``, the optimizer step post-hook ``_after_step`` and
``on_train_batch_end``): the same overhead without the run-to-run noise of whole steps (a few per
cent on a shared 2-core machine), relative to the baseline step. It misses only indirect costs
(caches the callback's passes over the weights evict), which interleaved whole steps would show.

Memory is the process's peak resident set (``ru_maxrss``): torch's CPU allocations do not go
through tracemalloc and CPU tensors have no allocator statistics, so RSS is what can be compared.
Each variant gets a fresh process running one short fit (with a RigL update in it) in which glibc
maps every allocation of 64 KiB or more on its own and unmaps it on free: RSS then follows live
memory and repeats within a MiB, where with malloc's defaults it wanders by +-5 % from run to run.
Because the RSS also holds Python, torch and Lightning (hundreds of MiB that no variant changes),
the ratio is given twice: of the whole peak, and of the growth during training (peak minus the
RSS at ``on_train_start``, when model, masks and optimizer exist); ``memory=`` on the last line is
the larger of the two.
"""

from __future__ import annotations

import gc
import hashlib
import math
import multiprocessing as mp
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sift_lightning.sparse.masks import MASK_SUFFIX, get_mask, sparse_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    bench_parser,
    CpuLoad,
    StepTimer,
    cifar_resnet18_w16,
    code_version,
    fit,
    instrument,
    machine_line,
    median,
    malloc_returns_memory,
    peak_rss_mib,
    pre_batched,
    quiet,
)

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = ROOT / "docs" / "results" / "overhead_cpu.md"
SPARSITY = 0.5
SEED = 0
VARIANTS = ("baseline", "static", "rigl")
MODELS = ("resnet18_w16", "gpt_tiny")
# the callback's per-step hooks, and the engine's work after each optimizer step (its step post-hook)
HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")
ENGINE_HOOKS = ("after_step",)
AMORTISE = 100  # RigL's update frequency in the paper


@dataclass(frozen=True)
class Setting:
    """One model's run length in one mode."""

    batch: int
    warmup: int  # steps discarded
    steps: int  # steps measured
    rigl_every: int  # update_frequency of the RigL runs (several update samples per fit)


MODES: dict[str, dict[str, Any]] = {
    "full": {"reps": 8, "resnet18_w16": Setting(128, 4, 25, 5), "gpt_tiny": Setting(32, 10, 150, 10)},
    "quick": {"reps": 3, "resnet18_w16": Setting(128, 2, 4, 2), "gpt_tiny": Setting(32, 5, 30, 5)},
    "smoke": {"reps": 1, "resnet18_w16": Setting(8, 1, 4, 2), "gpt_tiny": Setting(4, 1, 4, 2)},
}
MODEL_NOTES = {
    "resnet18_w16": "CIFAR ResNet-18 at width 16 (stem 16, stages 16/32/64/128, 100 classes), 3x32x32 inputs, "
                    "SGD (Nesterov momentum, weight decay): one state tensor per weight",
    "gpt_tiny": "gpt_tiny (2 layers, d_model 64, 4 heads, vocabulary 256), sequences of 64 tokens, AdamW: two "
                "state tensors per weight",
}


# ---------------------------------------------------------------- worker side (one process per model x variant)
def _build(model: str, batch: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    from sift_lightning.modules import ImageClassifier, LanguageModel

    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(SEED)
    if model == "resnet18_w16":
        module = ImageClassifier(cifar_resnet18_w16(), num_classes=100)
        return module, torch.randn(4, batch, 3, 32, 32, generator=g), torch.randint(0, 100, (4, batch), generator=g)
    module = LanguageModel("gpt_tiny")
    tokens = torch.randint(0, 256, (4, batch, 65), generator=g)
    return module, tokens[..., :-1].clone(), tokens[..., 1:].clone()


def _mask_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, buf in module.named_buffers():
        if name.endswith(MASK_SUFFIX):
            h.update(name.encode())
            h.update(buf.numpy().tobytes())
    return h.hexdigest()[:12]


def _run_once(model: str, variant: str, setting: Setting) -> dict[str, Any]:
    gc.collect()  # the previous fit's trainer/module cycles, so they cannot raise this fit's peak
    from sift_lightning import DynamicSparsity, SparsityCallback, SparsitySettings

    module, inputs, targets = _build(model, setting.batch)
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if variant == "baseline":
        # what SparsityCallback(transform=None) does at setup, done once with no callback after it
        DynamicSparsity(SparsitySettings(SPARSITY, algorithm="static", seed=SEED)).apply(module)
        digest = _mask_digest(module)
    else:
        cb = SparsityCallback(SPARSITY, transform=None, algorithm=variant, update_frequency=setting.rigl_every,
                              drop_schedule="constant", end=1.0, seed=SEED)
        instrument(cb, timer, HOOKS)
        instrument(cb.engine, timer, ENGINE_HOOKS)
        callbacks.append(cb)
    total = setting.warmup + setting.steps + 1  # the last interval also holds the epoch's end: dropped
    fit(module, pre_batched(inputs, targets, total), callbacks, total)
    if variant != "baseline":
        # what is timed must do the callback's job: every masked-out weight exactly 0
        for name, owner, local, param in sparse_parameters(module):
            if param[~get_mask(owner, local)].any():
                raise RuntimeError(f"{variant}: masked-out weights of {name} are not zero after training")
        # static masks never change: they must equal the baseline's
        digest = _mask_digest(module) if variant == "static" else ""
    measured = range(setting.warmup, setting.warmup + setting.steps)
    step_s = timer.step_seconds()
    # batch i performs optimizer step i + 1; RigL updates after steps that are multiples of the frequency
    update = [variant == "rigl" and (i + 1) % setting.rigl_every == 0 for i in measured]
    return {
        "plain": [step_s[i] for i, u in zip(measured, update) if not u],
        "update": [step_s[i] for i, u in zip(measured, update) if u],
        "hook_plain": [timer.hook_s[i] for i, u in zip(measured, update) if not u],
        "hook_update": [timer.hook_s[i] for i, u in zip(measured, update) if u],
        "rss_start_mib": timer.rss_start_mib,
        "digest": digest,
    }


def _worker(conn: Any, model: str, variant: str, setting: Setting, threads: int) -> None:
    """Time one fit per request until it receives None."""
    quiet()
    torch.set_num_threads(threads)
    try:
        while conn.recv() is not None:
            conn.send(_run_once(model, variant, setting))
    except Exception:  # report, do not hang the parent
        conn.send({"error": traceback.format_exc()})


def _memory_worker(conn: Any, model: str, variant: str, setting: Setting, threads: int) -> None:
    """One short fit in a fresh process (including a RigL update); reply with its memory."""
    quiet()
    torch.set_num_threads(threads)
    try:
        exact = malloc_returns_memory()
        run = _run_once(model, variant, Setting(setting.batch, 1, setting.rigl_every, setting.rigl_every))
        conn.send({"peak_rss_mib": peak_rss_mib(), "rss_start_mib": run["rss_start_mib"], "mmap": exact})
    except Exception:
        conn.send({"error": traceback.format_exc()})


# ---------------------------------------------------------------- parent side
def _amortised(plain: float, update: float) -> float:
    return ((AMORTISE - 1) * plain + update) / AMORTISE


def measure(mode: str, threads: int) -> dict[str, Any]:
    cfg = MODES[mode]
    # import once here rather than in every worker; this process runs no torch op, so forking is safe
    import sift_lightning.callback  # noqa: F401
    import sift_lightning.modules  # noqa: F401

    ctx = mp.get_context("fork")
    workers = {}
    for model in MODELS:
        for variant in VARIANTS:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(there, model, variant, cfg[model], threads), daemon=True)
            proc.start()
            workers[model, variant] = (proc, here)

    def reply(key: tuple[str, str], conn: Any) -> dict[str, Any]:
        answer = conn.recv()
        if "error" in answer:
            raise RuntimeError(f"worker {key} failed:\n{answer['error']}")
        return answer

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in workers}
    for rep in range(cfg["reps"]):
        for model in MODELS:
            for k in range(len(VARIANTS)):
                variant = VARIANTS[(k + rep) % len(VARIANTS)]  # rotate who goes first
                workers[model, variant][1].send("run")
                runs[model, variant].append(reply((model, variant), workers[model, variant][1]))
        print(f"repetition {rep + 1}/{cfg['reps']} done", file=sys.stderr, flush=True)
    for proc, conn in workers.values():
        conn.send(None)
        proc.join()
    memory = {}
    for key in workers:  # one at a time, each in a fresh process
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_memory_worker, args=(there, *key, cfg[key[0]], threads), daemon=True)
        proc.start()
        memory[key] = reply(key, here)
        proc.join()
    return {"runs": runs, "memory": memory}


def _spread(ratios: list[float]) -> str:
    return f" [{min(ratios):.3f}-{max(ratios):.3f}]" if len(ratios) > 1 else ""


def summarise(raw: dict[str, Any], mode: str) -> dict[str, dict[str, float]]:
    out = {}
    for model in MODELS:
        base, static, rigl = (raw["runs"][model, v] for v in VARIANTS)
        if base[0]["digest"] != static[0]["digest"]:
            raise RuntimeError(f"{model}: baseline and static masks differ; the comparison would not be like for like")
        b = [median(r["plain"]) for r in base]
        s = [median(r["plain"]) for r in static]
        plain = [median(r["plain"]) for r in rigl]
        upd = [median(r["update"]) for r in rigl]
        r_amort = [_amortised(p, u) for p, u in zip(plain, upd)]
        hook_s = median([h for r in static for h in r["hook_plain"]])
        hook_p = median([h for r in rigl for h in r["hook_plain"]])
        hook_u = median([h for r in rigl for h in r["hook_update"]])
        mem = {v: raw["memory"][model, v] for v in VARIANTS}
        grow = {v: mem[v]["peak_rss_mib"] - mem[v]["rss_start_mib"] for v in VARIANTS}
        base_ms = median(b)
        out[model] = {
            "batch": MODES[mode][model].batch,
            "baseline_ms": 1e3 * base_ms,
            "static": median([x / y for x, y in zip(s, b)]),
            "rigl": median([x / y for x, y in zip(r_amort, b)]),
            "static_range": _spread([x / y for x, y in zip(s, b)]),
            "rigl_range": _spread([x / y for x, y in zip(r_amort, b)]),
            "rigl_plain": median([x / y for x, y in zip(plain, b)]),
            "rigl_update_ms": 1e3 * median(upd),
            "rigl_update_ratio": median([x / y for x, y in zip(upd, b)]),
            "hook_static_ms": 1e3 * hook_s,
            "hook_rigl_plain_ms": 1e3 * hook_p,
            "hook_rigl_update_ms": 1e3 * hook_u,
            "direct_static": 1 + hook_s / base_ms,
            "direct_rigl": 1 + _amortised(hook_p, hook_u) / base_ms,
            "peak_mib": mem["baseline"]["peak_rss_mib"],
            "mmap": all(m["mmap"] for m in mem.values()),
            "grow_mib": grow["baseline"],
            **{f"peak_{v}": mem[v]["peak_rss_mib"] / mem["baseline"]["peak_rss_mib"] for v in ("static", "rigl")},
            **{f"grow_{v}": grow[v] / grow["baseline"] for v in ("static", "rigl")},
        }
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    rows = [
        "| model | batch | baseline step | static [range over reps] | RigL@100 amortised [range] | RigL update step "
        "| callback hooks: static / RigL plain / RigL update | hooks alone: static / RigL@100 | peak RSS baseline "
        "| peak RSS static / RigL | training growth baseline | growth static / RigL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, r in summary.items():
        rows.append(
            f"| {model} | {r['batch']} | {r['baseline_ms']:.1f} ms | {r['static']:.3f}{r['static_range']} | "
            f"{r['rigl']:.3f}{r['rigl_range']} | "
            f"{r['rigl_update_ms']:.1f} ms ({r['rigl_update_ratio']:.2f}x) | "
            f"{r['hook_static_ms']:.2f} / {r['hook_rigl_plain_ms']:.2f} / {r['hook_rigl_update_ms']:.1f} ms | "
            f"{r['direct_static']:.4f} / {r['direct_rigl']:.4f} | {r['peak_mib']:.0f} MiB | "
            f"{r['peak_static']:.3f} / {r['peak_rigl']:.3f} | {r['grow_mib']:.0f} MiB | "
            f"{r['grow_static']:.3f} / {r['grow_rigl']:.3f} |"
        )
    return "\n".join(rows)


def worst(summary: dict[str, dict[str, float]]) -> tuple[float, float, float]:
    static = max(r["static"] for r in summary.values())
    rigl = max(r["rigl"] for r in summary.values())
    memory = max(r[f"{kind}_{v}"] for r in summary.values() for kind in ("peak", "grow") for v in ("static", "rigl"))
    return static, rigl, memory


def report(summary: dict[str, dict[str, float]], mode: str, threads: int, load: dict[str, Any], argv: list[str]) -> str:
    cfg = MODES[mode]
    static, rigl, memory = worst(summary)
    hooks_static = max(r["direct_static"] for r in summary.values())
    hooks_rigl = max(r["direct_rigl"] for r in summary.values())
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    settings = "; ".join(
        f"{m}: batch {s.batch}, {s.warmup} warm-up + {s.steps} measured steps per fit, RigL updates every "
        f"{s.rigl_every} steps while measuring" for m, s in ((m, cfg[m]) for m in MODELS))
    lines = [
        "# SparsityCallback overhead on CPU",
        "",
        *([CpuLoad.banner(load), ""] if CpuLoad.banner(load) else []),
        f"Command: `python bench/overhead.py {' '.join(argv)}`",
        "",
        f"Machine: {machine_line()}; torch threads: {threads}. Code: {code_version()}.",
        "",
        f"Load: {CpuLoad.describe(load)}.",
        "",
        f"Mode `{mode}`: {cfg['reps']} interleaved repetitions; {settings}.",
        "",
        "Models: " + "; ".join(f"`{m}`: {MODEL_NOTES[m]}" for m in MODEL_NOTES) + ".",
        "",
        f"Every variant trains the same layers (all Conv2d/Linear but the stem/first and the classifier/LM head) "
        f"with the same random masks at sparsity {SPARSITY}; the baseline has no callback. Step time is "
        "batch start to batch start in a real `Trainer.fit` (all hooks, backward, optimizer step); ratios are "
        "medians over repetitions of per-repetition median ratios to the baseline. RigL@100 is amortised from "
        "its measured plain and update steps as (99 plain + 1 update) / 100. \"Hooks alone\" is 1 + the time "
        "spent inside the callback's methods / the baseline step: the same overhead measured without the "
        "noise of whole-step timing. Memory: peak RSS (`ru_maxrss`; torch CPU tensors are invisible to tracemalloc) "
        "of a fresh process per variant running one short fit with a RigL update, glibc set to mmap (and unmap on "
        "free) every allocation >= 64 KiB so that RSS follows live memory; \"growth\" is peak RSS minus the RSS at "
        "`on_train_start` (model, masks and optimizer built).",
        "",
        table(summary),
        "",
        *([] if all(r["mmap"] for r in summary.values()) else
          ["Memory caveat: the C library is not glibc, so freed memory may linger and RSS varies by a few per "
           "cent.", ""]),
        f"Worst of the two models, whole step: static {static:.3f} (target <= 1.02: {met(static <= 1.02)}), RigL@100 "
        f"{rigl:.3f} (target <= 1.03: {met(rigl <= 1.03)}), memory {memory:.3f}x (target <= 1.10: "
        f"{met(memory <= 1.10)}). Callback hooks alone: static {hooks_static:.4f} ({met(hooks_static <= 1.02)}), "
        f"RigL@100 {hooks_rigl:.4f} ({met(hooks_rigl <= 1.03)}). Whole-step ratios carry the run-to-run noise of "
        "the machine (see the ranges; a few per cent on a shared machine), the hooks-alone figures do not. "
        "Reference: the official Sparse-IFT code measured 1.008 (static) and 1.002 (RigL@100) on the width-16 "
        "CIFAR ResNet-18, batch 128, 2 CPU cores.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, RESULT_FILE, ROOT, "under a minute")
    args = parser.parse_args(argv)
    mode = args.mode
    quiet()
    load = CpuLoad()
    raw = measure(mode, args.threads)
    load = load.stop()
    summary = summarise(raw, mode)
    text = report(summary, mode, args.threads, load, sys.argv[1:] if argv is None else argv)
    if args.write:
        Path(args.write).write_text(text)
    print(text)
    for model, r in summary.items():
        if not all(math.isfinite(v) and v > 0 for v in (r["static"], r["rigl"])):
            raise SystemExit(f"{model}: non-finite ratio; see the table above")
    hooks_static = max(r["direct_static"] for r in summary.values())
    hooks_rigl = max(r["direct_rigl"] for r in summary.values())
    print(f"callback hooks alone static={hooks_static:.4f} rigl={hooks_rigl:.4f}")
    static, rigl, memory = worst(summary)
    print(f"overhead ratio static={static:.3f} rigl={rigl:.3f} memory={memory:.3f}")


if __name__ == "__main__":
    main()
