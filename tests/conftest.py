"""Test-wide settings: one intra-op thread per process.

Tiny models gain nothing from two threads, and when the two cores are shared (a DDP test's second
process, another job) torch's thread pool makes small convolutions many times slower.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses (CLI, DDP workers) too

import torch  # noqa: E402

torch.set_num_threads(1)
