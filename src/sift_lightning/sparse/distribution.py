"""Per-layer sparsity distributions: uniform and ERK (Erdos-Renyi-Kernel, Evci et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["DISTRIBUTIONS", "distribute"]

DISTRIBUTIONS = ("uniform", "erk")


def _erk(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """ERK densities: d_l = eps * sum(shape_l) / prod(shape_l), capped at 1.

    ``eps`` is solved so the active count equals ``density * total``; layers that would exceed
    density 1 are made dense and eps is solved again over the rest (the RigL reference does this).
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        remaining = budget - sum(numel[n] for n in dense)
        eps = remaining / sum(raw[n] * numel[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def distribute(
    shapes: Mapping[str, tuple[int, ...]], sparsity: float, distribution: str = "uniform"
) -> dict[str, float]:
    """Per-layer sparsities whose active total matches ``1 - sparsity`` of all weights.

    Args:
        shapes: parameter name -> shape of each sparse parameter.
        sparsity: the global target sparsity in [0, 1).
        distribution: ``"uniform"`` (every layer at ``sparsity``) or ``"erk"``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "uniform" or not shapes:
        return {n: sparsity for n in shapes}
    return {n: 1.0 - d for n, d in _erk(shapes, 1.0 - sparsity).items()}
