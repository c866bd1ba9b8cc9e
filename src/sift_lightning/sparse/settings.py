"""``SparsitySettings``: every setting of a Sparse-IFT run, checked once, framework-free.

The same dataclass configures the engine (``DynamicSparsity``), ``SparsityCallback``, the Hugging
Face callback and ``sift-fit``'s ``--sift.*`` group; the docstring under each field is its help
text. Every wrong value fails in ``__post_init__`` with one line naming the valid values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from sift_lightning.sparse.distribution import DISTRIBUTIONS
from sift_lightning.sparse.masks import MASK_INITS
from sift_lightning.sparse.schedules import DROP_SCHEDULES
from sift_lightning.sparse.updaters import ALGORITHMS
from sift_lightning.transforms import MEMBERS, check_sparsity

__all__ = ["PARAMETRIZATIONS", "SparsitySettings"]

PARAMETRIZATIONS = ("standard", "supar")


@dataclass
class SparsitySettings:
    """What to make sparse, how, and how its masks evolve."""

    sparsity: float = 0.5
    """s in (0, 1): the member's size rule and the share of zeros in every sparse layer (on average with ERK)."""
    transform: str | None = None
    """Sparse-IFT member: sparse_wide, sparse_parallel, sparse_factorized, sparse_doped; None trains the existing Conv2d/Linear layers sparse."""
    algorithm: Literal["static", "set", "rigl"] = "rigl"
    """Mask updates: static (none), set (random growth) or rigl (growth by dense gradient)."""
    distribution: Literal["uniform", "erk"] = "uniform"
    """Per-layer sparsity: uniform (every layer at s) or erk (Erdos-Renyi-Kernel, same global count)."""
    init: Literal["random", "magnitude"] = "random"
    """Initial masks: random, or the largest |w|."""
    update_frequency: int = 100
    """Optimizer steps between mask updates."""
    drop_fraction: float = 0.3
    """Initial share of each layer's active weights dropped (and regrown) per update."""
    drop_schedule: Literal["constant", "cosine", "exponential"] = "cosine"
    """Decay of the drop fraction to 0 at `end`."""
    end: float = 0.75
    """Fraction of each optimizer's steps after which masks freeze."""
    include: list[str] | None = None
    """fnmatch patterns of layer names to make sparse (default: every Conv2d/Linear); a single string is one pattern."""
    exclude: list[str] | None = None
    """fnmatch patterns of layer names kept dense, on top of the first/last layer; a single string is one pattern."""
    keep_ends_dense: bool = True
    """Keep the first and last layer (or the model's sift_dense_layers) dense."""
    transform_options: dict[str, Any] = field(default_factory=dict)
    """Member options, e.g. {"branch_norm": false} (Parallel) or {"linear_act": "none"} (Factorized)."""
    match_flops: bool | None = None
    """Retune the sparsity so sparse MACs equal the dense model's on the example input (one batch); None: on for sparse_wide when an example input is known (its wider dense stem/head would break the budget), off otherwise."""
    sparse_init_scale: bool = False
    """Rescale kept weights by 1/sqrt(density) at mask init, so each layer's output scale matches a dense layer's."""
    parametrization: Literal["standard", "supar"] = "standard"
    """supar: SµPar init and (Adam-family) learning-rate multipliers per sparse layer, so the dense recipe stays optimal."""
    seed: int = 0
    """Seeds the engine's own generator (random masks, SET growth); identical on every rank."""

    def __post_init__(self) -> None:
        self.sparsity = check_sparsity(self.sparsity)
        if self.transform == "dense":
            raise ValueError(
                "transform='dense' is the baseline: train without sparsity; transform must be one of "
                f"None (train the existing layers sparse), {', '.join(MEMBERS[1:])}"
            )
        if self.transform == "none":
            self.transform = None
        _check_choice("transform", self.transform, (None, *MEMBERS[1:]))
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("init", self.init, MASK_INITS)
        _check_choice("drop_schedule", self.drop_schedule, DROP_SCHEDULES)
        _check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        if isinstance(self.update_frequency, bool) or not isinstance(self.update_frequency, int) or self.update_frequency < 1:
            raise ValueError(f"update_frequency must be a positive integer (optimizer steps), got {self.update_frequency!r}")
        if not _is_number(self.drop_fraction) or not 0.0 < self.drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1], got {self.drop_fraction!r}")
        if not _is_number(self.end) or not 0.0 < self.end <= 1.0:
            raise ValueError(f"end must be a fraction of the run's steps in (0, 1], got {self.end!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.include = _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)
        if not isinstance(self.transform_options, dict):
            raise ValueError(f"transform_options must be a mapping of member options, got {self.transform_options!r}")
        self.transform_options = dict(self.transform_options)
        if self.transform is None and self.transform_options:
            raise ValueError(f"transform_options ({', '.join(self.transform_options)}) configure a member, but "
                             "transform=None trains the model's own layers and takes none; set transform= or drop them")
        if self.parametrization == "supar" and self.sparse_init_scale:
            raise ValueError("parametrization='supar' sets each sparse layer's init itself; turn sparse_init_scale off")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists and dicts only): checkpoints load it with ``weights_only=True``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsitySettings:
        """Settings from ``to_dict`` or from an older checkpoint's callback arguments (unknown keys dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def structure(self) -> tuple[Any, ...]:
        """The settings that decide the model's structure and masks' shapes: a checkpoint must agree on them."""
        matched = self.match_flops if self.match_flops is not None else self.transform == "sparse_wide"
        return (self.transform, self.sparsity, matched, self.include, self.exclude, self.keep_ends_dense,
                sorted(self.transform_options.items()))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(arg: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        names = ", ".join("None" if v is None else str(v) for v in valid)
        raise ValueError(f"{arg} must be one of {names}; got {value!r}")


def _patterns(arg: str, value: Any) -> list[str] | None:
    """A list of fnmatch patterns; one string is one pattern (not one pattern per character)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{arg} must be a list of fnmatch patterns such as ['layer4*'], got {value!r}")
    return list(value)
