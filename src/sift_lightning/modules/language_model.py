"""LanguageModel: next-token prediction with the project's GPT; loss and perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from sift_lightning.models.gpt import GPT, GPTConfig, gpt_config
from sift_lightning.modules._optim import OptimConfig, as_optim_config, configure_optim
from sift_lightning.modules._restore import SiftCheckpointMixin
from sift_lightning.parallel import configure_fsdp2

__all__ = ["LanguageModel"]


def _gpt3_optim() -> OptimConfig:
    # GPT-3 Small: AdamW, peak 6e-4, warmup then cosine to 10 %, no decay on norms/biases/embeddings
    return OptimConfig(name="adamw", lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, decay_norm_and_bias=False,
                       schedule="cosine", warmup_steps=100, min_lr_ratio=0.1)


class LanguageModel(SiftCheckpointMixin, pl.LightningModule):
    """A GPT trained on next-token prediction.

    Args:
        model: a preset name (``gpt_tiny``, ``gpt_mini``, ``gpt3_small``) or a full ``GPTConfig``.
        vocab_size: overrides the preset's vocabulary (match the data module's tokenizer).
        block_size: overrides the preset's context length (match the data module).
        dropout: overrides the preset's dropout.
        optim: optimizer and LR schedule (default: GPT-3's AdamW + warmup + cosine).
    """

    def __init__(
        self,
        model: str | GPTConfig | dict = "gpt_tiny",
        vocab_size: int | None = None,
        block_size: int | None = None,
        dropout: float | None = None,
        optim: OptimConfig | dict | None = None,
    ) -> None:
        super().__init__()
        self.optim = as_optim_config(optim, default=_gpt3_optim())
        self.save_hyperparameters(ignore=["optim"])
        # plain data in checkpoints, so they load with weights_only
        self.hparams["optim"] = asdict(self.optim)
        if isinstance(model, GPTConfig):
            self.hparams["model"] = asdict(model)
        overrides = {k: v for k, v in dict(vocab_size=vocab_size, block_size=block_size, dropout=dropout).items()
                     if v is not None}
        if isinstance(model, str):
            config = gpt_config(model, **overrides)
        else:
            config = GPTConfig(**{**(model if isinstance(model, dict) else asdict(model)), **overrides})
        self.backbone = GPT(config)
        self.example_input_array = torch.zeros(1, config.block_size, dtype=torch.long)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard the GPT per transformer block; otherwise nothing."""
        configure_fsdp2(self)

    def transform_backbone(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Let ``SparsityCallback`` replace the GPT (Sparse Wide builds a wider one)."""
        self.backbone = fn(self.backbone)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.backbone(idx)  # (B, T) -> (B, T, vocab)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch  # (B, T) each; y is x shifted by one token
        logits = self(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/ppl", torch.exp(loss.detach()), on_step=True)
        return loss

    def _eval_step(self, batch: Any, split: str) -> None:
        metric = self.val_loss if split == "val" else self.test_loss
        metric.update(self._loss(batch))
        self.log(f"{split}/loss", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log("val/ppl", math.exp(min(self.val_loss.compute().item(), 50.0)), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log("test/ppl", math.exp(min(self.test_loss.compute().item(), 50.0)))

    def configure_optimizers(self) -> dict:
        return configure_optim(self, self.optim)
