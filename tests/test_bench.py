"""Smoke tests of the CPU benchmarks: their smallest mode runs and ends in the documented line.

They check the format and that every ratio is a positive finite number, never a performance
threshold (the smoke modes time a few tiny steps: their figures mean nothing).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([-+0-9.eEinfa]+)"


def _last_line(script: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _positive_finite(*values: str) -> None:
    for v in values:
        x = float(v)
        assert math.isfinite(x) and x > 0, values


def test_overhead_smoke() -> None:
    line = _last_line("overhead.py")
    m = re.fullmatch(rf"overhead ratio static={NUMBER} rigl={NUMBER} memory={NUMBER}", line)
    assert m, line
    _positive_finite(*m.groups())


def test_member_cost_smoke() -> None:
    line = _last_line("member_cost.py")
    members = ("sparse_wide", "sparse_parallel", "sparse_factorized", "sparse_doped")
    m = re.fullmatch(r"member cost vs dense \(s=([0-9./]+)\) " + " ".join(rf"{n}=(\S+)" for n in members), line)
    assert m, line
    n_sparsities = len(m.group(1).split("/"))
    for cells in m.groups()[1:]:
        values = cells.split("/")
        assert len(values) == n_sparsities, line
        _positive_finite(*values)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
