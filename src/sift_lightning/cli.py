"""``sift-fit``: LightningCLI with Sparse-IFT as a first-class ``sift`` group.

    sift-fit fit --config configs/resnet18_sparse_par.yaml
    sift-fit fit --config configs/resnet18_dense.yaml --sift.transform sparse_wide --sift.sparsity 0.9
    sift-fit export --ckpt_path runs/.../last.ckpt --out model.pt   # fold Parallel/Doped to dense

``--sift.*`` are the fields of ``SparsitySettings`` (their docstrings are the help), plus
``--sift.log_per_layer``; ``--sift.transform dense`` (the default) trains without ``SparsityCallback``,
``none`` trains the existing layers sparse. Seed, checkpoints (last + best ``val/loss``),
an LR monitor and a TensorBoard logger under ``runs/`` are on by default.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from sift_lightning.callback import SparsityCallback
from sift_lightning.sparse.settings import SparsitySettings
from sift_lightning.transforms import check_sparsity
from sift_lightning.checkpointing import ModelCheckpoint

__all__ = ["SiftCLI", "main"]


class SiftCLI(LightningCLI):
    """LightningCLI plus the ``sift`` group, turned into a ``SparsityCallback`` on the Trainer."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        # not instantiated by jsonargparse: "dense" must mean "no callback", which the settings reject
        parser.add_class_arguments(SparsitySettings, "sift", instantiate=False)
        parser.add_argument("--sift.log_per_layer", type=bool, default=True, help="Log each layer's density too.")
        parser.set_defaults({"sift.sparsity": 0.5, "sift.transform": "dense"})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        settings = dict(self._get(self.config, "sift") or {})
        log_per_layer = settings.pop("log_per_layer", True)
        if settings.get("transform") == "dense":
            check_sparsity(settings.get("sparsity"), "--sift.sparsity")  # a typo must not pass silently
        else:
            # first, so checkpoints taken at a batch end see the callback's state of that batch
            cb = SparsityCallback(settings=SparsitySettings(**settings), log_per_layer=log_per_layer)
            callbacks = [cb, *callbacks]
        return super()._instantiate_trainer(config, [*callbacks, *_default_callbacks(config)])


def _default_callbacks(config: dict[str, Any]) -> list[Callback]:
    """Checkpoints (last + best ``val/loss``) and an LR monitor, unless the run opts out of them.

    ``--trainer.enable_checkpointing false`` drops the checkpoint, ``--trainer.logger false`` the LR
    monitor (it needs a logger), and a callback of the same kind in the config replaces ours.
    """
    given = config.get("callbacks") or []
    given = given if isinstance(given, list) else [given]
    defaults: list[Callback] = []
    if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, _LightningModelCheckpoint) for c in given):
        defaults.append(ModelCheckpoint(monitor="val/loss", mode="min", save_last=True, filename="best-{epoch}-{step}"))
    if config.get("logger") not in (False, []) and not any(isinstance(c, LearningRateMonitor) for c in given):
        defaults.append(LearningRateMonitor(logging_interval="step"))
    return defaults


def _trainer_defaults() -> dict[str, Any]:
    return {"logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}}}


def main(args: list[str] | None = None) -> None:
    """Entry point of ``sift-fit``; our errors print as one line (``SIFT_DEBUG=1`` for tracebacks)."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv[:1] == ["export"]:  # sift-fit export --ckpt_path X --out Y.pt: fold and ship
            from sift_lightning.export import export_main

            export_main(argv[1:])
            return
        SiftCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=42,
            trainer_defaults=_trainer_defaults(),
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get("SIFT_DEBUG"):
            raise
        print(f"sift-fit: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
