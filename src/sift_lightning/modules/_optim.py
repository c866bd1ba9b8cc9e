"""Optimizers and LR schedules for the paper's recipes, shared by both LightningModules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch import nn

from sift_lightning.sparse.supar import supar_param_groups, uses_supar

__all__ = ["OptimConfig", "as_optim_config", "configure_optim"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass
class OptimConfig:
    """Optimizer and LR schedule. The defaults are the paper's CIFAR-100 ResNet recipe."""

    name: str = "sgd"
    """``sgd`` (momentum, optionally Nesterov) or ``adamw``."""
    lr: float = 0.1
    """Peak learning rate (reached after warmup)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum for SGD (the paper's CIFAR recipe)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (GPT-3 uses 0.9, 0.95)."""
    weight_decay: float = 5e-4
    """L2 (SGD) or decoupled (AdamW) weight decay."""
    decay_norm_and_bias: bool = True
    """Apply weight decay to norms, biases and embeddings too; the ImageNet and GPT recipes say no."""
    schedule: str = "multistep"
    """``multistep`` (x gamma at each milestone), ``cosine`` (to ``min_lr_ratio * lr``) or ``constant``."""
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    """Epochs at which ``multistep`` multiplies the LR by ``gamma``."""
    gamma: float = 0.2
    """``multistep`` factor."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 (ImageNet: ~5 epochs; GPT: a few hundred steps)."""
    min_lr_ratio: float = 0.0
    """Final LR of ``cosine`` as a fraction of ``lr`` (GPT-3 decays to 10 %)."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {', '.join(OPTIMIZERS)}; got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"optim.lr must be > 0, weight_decay and warmup_steps >= 0; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, warmup_steps={self.warmup_steps}")

    def lr_factor(self, step: int, total_steps: int, steps_per_epoch: float) -> float:
        """The learning rate at optimizer ``step`` as a multiple of ``lr`` (warmup, then the schedule)."""
        return _lr_factor(step, self, total_steps, steps_per_epoch)


def as_optim_config(optim: OptimConfig | dict | None, default: OptimConfig | None = None) -> OptimConfig:
    """An ``OptimConfig`` from itself, from a dict (as saved in checkpoints), or the default."""
    if optim is None:
        return default or OptimConfig()
    if isinstance(optim, dict):
        return OptimConfig(**optim)
    return optim


def _param_groups(module: nn.Module, cfg: OptimConfig) -> list[dict]:
    if cfg.decay_norm_and_bias:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    no_decay = set()
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, (*_NORMS, nn.Embedding)) or name == "bias":
                no_decay.add(id(p))
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in no_decay]},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


def _lr_factor(step: int, cfg: OptimConfig, total: int, per_epoch: float) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "multistep":
        epoch = step / per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def configure_optim(module: pl.LightningModule, cfg: OptimConfig) -> dict:
    """The ``configure_optimizers`` return value: optimizer and a per-step LambdaLR.

    A model that ``supar_init_`` marked (``sift_parametrization == "supar"`` on any submodule)
    gets SµPar's per-layer learning rates (``supar_param_groups``: the Adam rule for ``adamw``,
    the SGD rule for ``sgd``), so the dense recipe in ``cfg`` needs no change.
    """
    groups = _param_groups(module, cfg)
    if uses_supar(module):
        groups = supar_param_groups(module, groups, lr=cfg.lr, optimizer="sgd" if cfg.name == "sgd" else "adam")
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    trainer = module.trainer
    total = int(trainer.estimated_stepping_batches)
    per_epoch = total / trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else float(total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg, total, per_epoch))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
