"""FLOPs of a training run, counted as they happen (the curves behind ``sift/train_flops``).

A training step costs about three forward passes (forward, and a backward that computes input and
weight gradients), each at the model's *sparse* MACs. A RigL update reads one dense gradient: that
step's weight-gradient pass runs dense, which costs ``dense - sparse`` forward MACs more per sample.
The per-sample MACs are measured once, on the first real forward pass of the run (``LayerRecorder``:
attention scores included), so they match the model as trained, not a nominal shape.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sift_lightning.flops import LayerRecorder

__all__ = ["TrainingFlops"]


class TrainingFlops:
    """Cumulative training FLOPs (multiply and add counted as 2), with its own checkpointed state."""

    def __init__(self) -> None:
        self.total = 0.0
        self.per_sample: tuple[float, float] | None = None  # forward MACs per sample: (dense, sparse)
        self._recorder: LayerRecorder | None = None
        self._dense_seen = 0  # dense-gradient steps already counted (the engine's counter, this process)

    def start_forward(self, model: nn.Module) -> None:
        """Record the coming forward pass, once per run (a no-op once the MACs are known)."""
        if self.per_sample is None and self._recorder is None:
            self._recorder = LayerRecorder(model).__enter__()

    def end_forward(self) -> None:
        """Stop recording before backward: attention's backward must not count as forward."""
        if self._recorder is not None:
            self._recorder.__exit__()

    def close(self) -> None:
        """Leave no FlopCounterMode on the dispatch stack (a step failed; the run ends)."""
        if self._recorder is not None:
            self._recorder.__exit__()
            self._recorder = None

    def add_batch(self, per_rank: int, world_size: int, accumulate: int, dense_gradient_steps: int) -> None:
        """Count one training batch of ``per_rank`` samples on each of ``world_size`` ranks.

        Args:
            per_rank: the batch size on this rank.
            world_size: data-parallel ranks.
            accumulate: micro-batches per optimizer step (a dense gradient covers all of them).
            dense_gradient_steps: the engine's running count of RigL updates (``DynamicSparsity.dense_gradient_steps``).
        """
        if self._recorder is not None:
            self._recorder.__exit__()  # a no-op when end_forward closed it
            report, self._recorder = self._recorder.report(), None
            self.per_sample = (report.dense_macs / per_rank, report.sparse_macs / per_rank)
        if self.per_sample is None:
            raise RuntimeError("TrainingFlops.add_batch before any recorded forward pass: call start_forward first")
        dense, sparse = self.per_sample
        samples = per_rank * world_size
        self.total += 3 * 2 * sparse * samples
        new = dense_gradient_steps - self._dense_seen
        if new > 0:
            self.total += new * 2 * (dense - sparse) * samples * accumulate
            self._dense_seen = dense_gradient_steps

    def metrics(self) -> dict[str, float]:
        if self.per_sample is None:
            return {}
        return {
            "sift/flops_per_sample_dense": 2 * self.per_sample[0],
            "sift/flops_per_sample_sparse": 2 * self.per_sample[1],
            "sift/train_flops": self.total,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_flops": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = state["train_flops"]
