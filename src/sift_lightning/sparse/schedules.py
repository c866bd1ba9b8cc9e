"""When masks change and by how much: pure functions of the optimizer step."""

from __future__ import annotations

import math

__all__ = ["DROP_SCHEDULES", "drop_fraction_at", "is_update_step"]

DROP_SCHEDULES = ("constant", "cosine", "exponential")
# exponential decay rate: the fraction falls to e^-5 (0.7 %) of its initial value at `end`
_EXP_RATE = 5.0


def is_update_step(step: int, frequency: int, end_step: int) -> bool:
    """Masks change after optimizer step ``step`` (1-based) every ``frequency`` steps up to ``end_step``."""
    return 0 < step <= end_step and step % frequency == 0


def drop_fraction_at(step: int, initial: float, end_step: int, schedule: str = "cosine") -> float:
    """The share of each layer's active weights to drop (and regrow) at ``step``.

    ``cosine``: ``initial * (1 + cos(pi t)) / 2`` with ``t = step / end_step`` (RigL's default);
    ``exponential``: ``initial * exp(-5 t)``; ``constant``: ``initial``. Zero after ``end_step``
    (cosine reaches 0 at ``end_step`` itself).
    """
    if schedule not in DROP_SCHEDULES:
        raise ValueError(f"drop_schedule must be one of {DROP_SCHEDULES}, got {schedule!r}")
    if step > end_step or end_step <= 0:
        return 0.0
    t = step / end_step
    if schedule == "cosine":
        return initial * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "exponential":
        return initial * math.exp(-_EXP_RATE * t)
    return initial
