"""Memory per rank of Sparse Wide gpt_mini (s=0.75, RigL, AdamW): one process vs two FSDP2 processes.

    python bench/fsdp2_memory.py            # 1 process, then 2 processes (torchrun, gloo); ~2 min
    python bench/fsdp2_memory.py --write    # also write docs/results/fsdp2_memory_cpu.md
    python bench/fsdp2_memory.py --smoke    # gpt_tiny, 2 steps: only checks that it runs

Each run is a fresh process (2 ranks: ``torchrun --nproc_per_node 2``) training the same plain loop:
``DynamicSparsity(transform="sparse_wide", sparsity=0.75, algorithm="rigl")`` on gpt_mini (d_model
128 -> 256), AdamW, a few steps with RigL updates among them (each gathers one layer at a time);
under 2 processes the model is sharded per transformer block with ``shard_model``. Per rank:

- ``state``: bytes of the rank's own parameters, gradients, optimizer state and masks (local
  shards under FSDP2), counted from the tensors themselves (exact);
- ``masks``: bytes of the rank's mask shards (``sparse.sharded.mask_bytes``);
- ``peak RSS``: the process's peak resident set (``ru_maxrss``), and ``peak - base`` where ``base``
  is the RSS after the imports (Python, torch, Lightning: hundreds of MiB no variant changes).
  glibc maps allocations of 64 KiB or more on their own (``MALLOC_MMAP_THRESHOLD_``), so RSS
  follows live memory. On CPU, activations and the all-gathered blocks of FSDP2 count here too.

The last line reads ``fsdp2 memory state_ratio=<2-proc state / 1-proc state> mask_ratio=<...>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "fsdp2_memory_cpu.md"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(model_name: str, steps: int, batch: int) -> None:
    """One rank's run; prints one JSON line."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from sift_lightning import GPT, DynamicSparsity, SparsitySettings, gpt_config
    from sift_lightning.parallel import shard_model
    from sift_lightning.sparse.sharded import local_tensor, mask_bytes

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    base = _rss_mib()
    torch.manual_seed(0)
    config = gpt_config(model_name)
    ds = DynamicSparsity(SparsitySettings(sparsity=0.75, transform="sparse_wide", algorithm="rigl",
                                          update_frequency=2, drop_fraction=0.3, end=1.0, seed=0))
    model = ds.apply(GPT(config))
    if world > 1:
        shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ds.attach(opt, total_steps=steps)
    tokens = torch.randint(0, config.vocab_size, (steps, batch, config.block_size + 1),
                           generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        x = tokens[step].chunk(world)[rank]  # this rank's share of the global batch
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        if step < steps - 1:
            opt.zero_grad()  # the last step's gradients stay: they are part of the state a step holds

    def nbytes(t: torch.Tensor) -> int:
        return local_tensor(t).numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    states = sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    masks, whole_masks = mask_bytes(model)
    print(json.dumps({"rank": rank, "world": world, "params": params, "grads": grads, "optimizer": states,
                      "masks": masks, "whole_masks": whole_masks, "state": params + grads + states + masks,
                      "base_rss_mib": base, "peak_rss_mib": _rss_mib(), "updates": ds.updates,
                      "numel": sum(p.numel() for p in model.parameters()), "d_model": config.d_model,
                      "wide_d_model": model.config.d_model}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def _launch(world: int, args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--steps", str(args.steps),
           "--batch", str(args.batch)]
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def _table(rows: list[dict]) -> str:
    mib = 1 << 20
    lines = ["| run | rank | params | grads | AdamW state | masks | state total | peak RSS | peak - base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run = "1 process" if r["world"] == 1 else f"{r['world']} x FSDP2"
        lines.append(f"| {run} | {r['rank']} | {r['params'] / mib:.2f} | {r['grads'] / mib:.2f} | "
                     f"{r['optimizer'] / mib:.2f} | {r['masks'] / mib:.3f} | {r['state'] / mib:.2f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['base_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="gpt_mini", help="GPT preset (gpt_mini: d_model 128, 4 blocks, 256 tokens)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (RigL updates every 2)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (global: each of 2 ranks takes half)")
    p.add_argument("--smoke", action="store_true", help="gpt_tiny, 2 steps, batch 2: checks that it runs")
    p.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(ROOT)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: what the figures use)")
    args = p.parse_args()
    if args.worker:
        worker(args.model, args.steps, args.batch)
        return
    if args.smoke:
        args.model, args.steps, args.batch = "gpt_tiny", 2, 4
    rows = _launch(1, args) + _launch(2, args)
    one, two = rows[0], rows[1:]
    table = _table(rows)
    print(table)
    state_ratio = max(r["state"] for r in two) / one["state"]
    mask_ratio = max(r["masks"] for r in two) / one["masks"]
    if args.write:
        import torch

        OUT.write_text(_report(args, rows, table, state_ratio, mask_ratio, torch.__version__))
        print(f"wrote {OUT.relative_to(ROOT)}")
    print(f"fsdp2 memory state_ratio={state_ratio:.3f} mask_ratio={mask_ratio:.3f}")


def _report(args: argparse.Namespace, rows: list[dict], table: str, state_ratio: float, mask_ratio: float,
            torch_version: str) -> str:
    one = rows[0]
    above = [r["peak_rss_mib"] - r["base_rss_mib"] for r in rows]
    rss_ratio = max(above[1:]) / above[0]
    return f"""# FSDP2 memory per rank on CPU: Sparse Wide {args.model}, s=0.75

Measured with `python bench/fsdp2_memory.py --write` on a 2-core AMD EPYC VM (no GPU), torch
{torch_version}, Python {platform.python_version()}, gloo; shared with other jobs. Plain loop:
`DynamicSparsity(transform="sparse_wide", sparsity=0.75, algorithm="rigl", update_frequency=2)`, AdamW,
{args.steps} steps ({one['updates']} RigL updates), a global batch of {args.batch} sequences of 256 tokens per step;
the model has {one['numel'] / 1e6:.2f}M stored parameters
(d_model {one['d_model']} -> {one['wide_d_model']}). 2 processes:
`shard_model` (fully_shard per transformer block, then the root), each rank half of each batch.
Sizes in MiB; "state" counts the rank's own tensors exactly (local shards under FSDP2); RSS is the
process's peak resident set, "base" its RSS after the imports.

{table}

- Parameters, gradients, AdamW state and masks per rank: {state_ratio:.3f} x the one-process run
  (ideal 0.5; tied embeddings, norms and biases are sharded too, all by dim 0).
- Masks per rank: {mask_ratio:.3f} x (each mask is a `DTensor` sharded like its parameter; a
  replicated mask would cost 1 byte per sparse weight on every rank). The engine's ever-active
  record (ITOP) is sharded the same way. RigL's update gathers one layer's weights, mask and
  scores at a time, on update steps only.
- Peak RSS above the post-import base: {rss_ratio:.2f} x the one-process run per rank. Beside
  its half of the state, each rank holds the activations of half the batch and, during each
  block's forward and backward, that block's all-gathered parameters (FSDP2 frees them after);
  the base itself (~{one['base_rss_mib']:.0f} MiB of Python, torch and Lightning) is paid per process.
  At this size the activations dominate; at GPT-3 Small Sparse Wide sizes the state column is what
  decides whether a rank fits.
- No GPU was available: step time and memory per GPU against DDP are not measured here.
"""


if __name__ == "__main__":
    main()
