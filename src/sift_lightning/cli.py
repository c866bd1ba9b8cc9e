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
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from sift_lightning.callback import SparsityCallback
from sift_lightning.sparse.settings import SparsitySettings
from sift_lightning.transforms import MEMBERS, check_sparsity
from sift_lightning.checkpointing import ModelCheckpoint

__all__ = ["SiftCLI", "error_line", "main"]


class SiftCLI(LightningCLI):
    """LightningCLI plus the ``sift`` group, turned into a ``SparsityCallback`` on the Trainer.

    Its trainer defaults include a TensorBoard logger saving to ``runs`` (under
    ``--trainer.default_root_dir``), which the configs rely on: they name their run, not the folder.
    """

    def __init__(self, *args: Any, trainer_defaults: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, trainer_defaults={**_trainer_defaults(), **(trainer_defaults or {})}, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # not instantiated by jsonargparse: "dense" must mean "no callback", which the settings reject
        parser.add_class_arguments(SparsitySettings, "sift", instantiate=False)
        parser.add_argument("--sift.log_per_layer", type=bool, default=True, help="Log each layer's density too.")
        parser.set_defaults({"sift.sparsity": 0.5, "sift.transform": "dense"})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        settings = dict(self._get(self.config, "sift") or {})
        log_per_layer = settings.pop("log_per_layer", True)
        if settings.get("transform") not in ("dense", "none", None, *MEMBERS[1:]):
            raise ValueError(f"--sift.transform must be one of dense (the baseline), none (the model's own layers "
                             f"trained sparse), {', '.join(MEMBERS[1:])}; got {settings.get('transform')!r}")
        if settings.get("transform") == "dense":
            check_sparsity(settings.get("sparsity"), "--sift.sparsity")  # a typo must not pass silently
        else:
            # first, so checkpoints taken at a batch end see the callback's state of that batch
            cb = SparsityCallback(settings=SparsitySettings(**settings), log_per_layer=log_per_layer)
            callbacks = [cb, *callbacks]
        return super()._instantiate_trainer(config, [*callbacks, *_default_callbacks(config)])


    def before_instantiate_classes(self) -> None:
        # a relative logger save_dir (the configs' "runs", from _trainer_defaults) lives under
        # --trainer.default_root_dir, so that flag moves logs, config.yaml and checkpoints together
        trainer = self._get(self.config, "trainer") or {}
        root, loggers = trainer.get("default_root_dir"), trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            save_dir = init_args.get("save_dir") if init_args is not None else None
            if root and isinstance(save_dir, str) and not os.path.isabs(save_dir) and "://" not in save_dir:
                init_args["save_dir"] = os.path.join(root, save_dir)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here first: one line for a missing or
        # corrupt --ckpt_path, before any work
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if isinstance(ckpt_path, str) and ckpt_path not in ("last", "best", "hpc") and "://" not in ckpt_path \
                and not ckpt_path.startswith("registry"):
            from sift_lightning.export.checkpoint import check_checkpoint

            check_checkpoint(ckpt_path)
        super()._parse_ckpt_path()


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


class _SaveConfigOnce(SaveConfigCallback):
    """Writes ``config.yaml`` into the run's log folder, and refuses (one line) to replace another run's."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and trainer.log_dir is not None:
            path = os.path.join(trainer.log_dir, self.config_filename)
            ckpt = self.config.get("ckpt_path") if hasattr(self.config, "get") else None
            if stage != "fit" or (ckpt and os.path.abspath(str(ckpt)).startswith(os.path.abspath(trainer.log_dir) + os.sep)):
                # evaluation writes no checkpoints; a fit resumed from its own last.ckpt is the same run
                self.overwrite = True
            elif trainer.strategy.broadcast(trainer.is_global_zero and os.path.isfile(path)):
                raise ValueError(
                    f"{path} exists: a previous run wrote it, and its checkpoints belong to it; give this run its "
                    "own folder (--trainer.default_root_dir, or keep the TensorBoard logger: it makes version_<n>) "
                    "or delete that file")
        super().setup(trainer, pl_module, stage)


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
            save_config_callback=_SaveConfigOnce,
            args=args,
        )
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get("SIFT_DEBUG"):
            raise
        print(f"sift-fit: error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


def error_line(err: BaseException) -> str:
    """What ``sift-fit`` prints after ``error:``: our own message, found under jsonargparse's "Does not
    validate against any of the Union subtypes" dump or under a DataLoader worker's traceback."""
    while str(err).startswith("Does not validate against any of the Union subtypes") and err.__cause__ is not None:
        err = err.__cause__
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:  # raised in a DataLoader worker: its last line
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    main()
