"""Shared pieces of the data modules: the not-found error, loaders and a seeded split."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = ["DataNotFoundError", "EpochShuffleSampler", "SplitDataModule", "eval_loader", "one_line", "split_indices",
           "train_loader"]


class DataNotFoundError(FileNotFoundError):
    """A data set is not on disk. Its message is one line: what, where we looked, how to fix it.

    Example: ``Fashion-MNIST not found under /x/y (looked for train-images-idx3-ubyte[.gz]);
    put the IDX files there, install Debian's dataset-fashion-mnist, or set download: true
    (needs internet)``.

    When ``download: true`` was tried and failed (offline), ``download_error`` says why instead:
    ``CIFAR-100 not found under /x and the download failed (<urlopen error ...>); put ... there``.

    Args:
        dataset: Human name of the data set ("Fashion-MNIST").
        roots: Every place searched, in order.
        looked_for: The file or layout that was missing.
        hint: How to provide the data.
        download_error: The exception a failed download raised, if one was tried.
    """

    def __init__(
        self,
        dataset: str,
        roots: Sequence[str | Path],
        looked_for: str,
        hint: str,
        download_error: BaseException | None = None,
    ) -> None:
        where = ", ".join(str(r) for r in roots)
        if download_error is None:
            super().__init__(f"{dataset} not found under {where} (looked for {looked_for}); {hint}")
        else:
            super().__init__(f"{dataset} not found under {where} and the download failed "
                             f"({one_line(download_error, 400)}); {hint}")
        self.dataset = dataset
        self.roots = [str(r) for r in roots]


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its first line, cut at ``limit`` characters."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def abspath(path: str | Path) -> Path:
    """``path`` made absolute without resolving symlinks, so messages show what the user typed."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(n)`` into (train, val) index lists.

    The same ``(n, val_size, seed)`` gives the same split on every machine and rank, so the
    validation set never leaks into training after a resume or under DDP.
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for a data set of {n} items, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[val_size:]), sorted(order[:val_size])


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with an order that is a pure function of ``(seed, pass)``, and resumes mid-pass.

    Pass k (the k-th time the loader is iterated: epoch k) reads ``randperm`` seeded by
    ``(seed, k)``. The pass number and the position inside it are this sampler's state, saved in
    every checkpoint through the ``StatefulDataLoader``. The epoch Lightning passes to
    ``set_epoch`` is not used: Lightning 2.6 builds (and prefetches from) the resumed iterator
    before calling it. Instead the loader is built knowing how many epochs the trainer has
    finished (``first_pass``). Resuming from a checkpoint taken at an epoch's end, Lightning either
    does not load the loader's state (training by ``max_epochs``: the next pass is ``first_pass``)
    or loads it and replays the finished epoch (by ``max_steps``): that replay must read nothing,
    even when ``limit_train_batches`` stopped the epoch before the pass ran out, so a state from a
    finished epoch becomes "that pass read to its end". (Our ``ModelCheckpoint`` saves no loader
    state at an epoch's end at all; this rule serves checkpoints written without it.)
    """

    def __init__(self, size: int, seed: int, first_pass: int = 0) -> None:
        self.size, self.seed = size, seed
        self.first_pass = first_pass  # epochs the trainer had finished when the loader was built
        self.epoch = first_pass - 1  # the pass being read
        self._yielded = 0  # position in the current pass
        self._restore: tuple[int, int] | None = None  # (pass, position) from load_state_dict

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the pass count is kept here (see the class docstring)."""

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        # a generator: nothing below runs until the first item is asked for, so iterators that
        # the loader builds and throws away do not count as passes
        if self._restore is not None:
            (self.epoch, skip), self._restore = self._restore, None
        else:
            self.epoch, skip = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        self._yielded = skip
        for i in order[skip:]:
            self._yielded += 1
            yield i

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] >= self.first_pass:
            self._restore = (state["epoch"], state["yielded"])
        else:  # the trainer finished that epoch: its replay reads nothing, the next epoch a new pass
            self._restore = (self.first_pass - 1, self.size)


def train_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int, drop_last: bool = False, first_pass: int = 0
) -> StatefulDataLoader:
    """A shuffling train loader that Lightning can resume mid-epoch.

    ``StatefulDataLoader`` has ``state_dict``/``load_state_dict``; Lightning stores them in the
    checkpoint, so a resumed run continues with exactly the batch the interrupted run would have
    drawn next (a plain ``DataLoader`` restarts the epoch). The shuffle order comes from a
    function of ``(seed, epoch)`` (``EpochShuffleSampler``): epoch k's order is the same on every run,
    resumed or not; ``first_pass`` is the number of epochs the trainer has finished (see
    ``EpochShuffleSampler``). Under DDP Lightning swaps in its ``DistributedSampler`` (keyed by epoch too).
    """
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed, first_pass),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """An in-order loader for validation and test (no state needed: they always run whole)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class SplitDataModule(L.LightningDataModule):
    """Base of our data modules: ``setup`` fills ``train_set``/``val_set``/``test_set``; the loaders
    are built here, the train one stateful (see ``train_loader``)."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    drop_last_train = False
    batch_size: int
    num_workers: int
    seed: int

    def train_dataloader(self) -> StatefulDataLoader:
        # epochs the trainer has finished (restored from a checkpoint already when this is called)
        trainer = self.trainer
        done = trainer.fit_loop.epoch_progress.current.processed if trainer is not None else 0
        return train_loader(self.train_set, self.batch_size, self.num_workers, self.seed, self.drop_last_train, done)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_set, self.batch_size, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.test_set, self.batch_size, self.num_workers)
