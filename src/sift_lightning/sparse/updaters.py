"""One drop-and-grow update; each algorithm only supplies its grow scores.

- static: masks never change.
- SET (Mocanu et al. 2018): drop the smallest |w|, grow at random among inactive positions.
- RigL (Evci et al. 2020): drop the smallest |w|, grow where the dense gradient |g| is largest.

Growth picks among every position not kept after the drop -- inactive ones and the ones just
dropped -- as in RigL's Algorithm 1 and the official Sparse-IFT code: a dropped weight whose grow
score is among the highest comes straight back, keeping its value and optimizer state (the caller
zeroes only positions that were inactive before the update). Each layer's active count never changes.
"""

from __future__ import annotations

import torch

__all__ = ["ALGORITHMS", "drop_and_grow", "grow_scores"]

ALGORITHMS = ("static", "set", "rigl")


def grow_scores(
    algorithm: str, weight: torch.Tensor, dense_grad: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """Scores of candidate positions to grow; higher grows first."""
    if algorithm == "rigl":
        if dense_grad is None:
            return torch.zeros_like(weight, dtype=torch.float32)
        return dense_grad.abs().float()
    if algorithm == "set":
        return torch.rand(weight.shape, generator=generator).to(weight.device)
    raise ValueError(f"{algorithm!r} does not grow weights; valid: set, rigl")


@torch.no_grad()
def drop_and_grow(
    mask: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, int]:
    """The new mask after dropping ``fraction`` of the active weights and growing as many.

    Args:
        mask: current boolean mask.
        weight: the parameter (its |w| ranks the drops).
        scores: grow scores, same shape (every position not kept after the drop competes).
        fraction: share of active weights to replace, in [0, 1].

    Returns:
        ``(new_mask, k)``: the mask (same active count) and the number of weights dropped (= grown);
        some of the grown may be the dropped ones, so fewer than ``k`` positions may really change.
    """
    flat = mask.flatten()
    active = int(flat.sum().item())
    k = min(int(fraction * active), active)
    if k <= 0:
        return mask.clone(), 0
    magnitude = torch.where(flat, weight.detach().flatten().abs().float(), -1.0)
    keep = torch.topk(magnitude, active - k, sorted=False).indices
    new = torch.zeros_like(flat)
    new[keep] = True
    grow_rank = torch.where(new, float("-inf"), scores.flatten().float())
    grow = torch.topk(grow_rank, k, sorted=False).indices
    new[grow] = True
    return new.view_as(mask), k
