"""Datasets small enough to live whole in (GPU) memory, batched by indexing instead of a DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from zoo.data.augment import BatchAugment
from zoo.errors import UserError, check_holdout_fraction, check_split_fractions


class TensorBatches:
    """An epoch of batches cut from tensors by index: one gather per batch instead of one call per sample.

    The order of epoch e comes from a generator seeded with (seed, e), so a resumed run sees the same
    batches as an uninterrupted one. Lightning calls `sampler.set_epoch(e)` before each epoch, as it does
    for a DistributedSampler. Under DDP each rank takes every world_size-th index of the permutation.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augment: BatchAugment | None = None,
    ) -> None:
        self.tensors = tuple(tensors)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.augment = augment if augment is not None and augment.active else None
        self.epoch = 0
        self.per_rank = -(-len(self.tensors[0]) // world_size)

    batch_sampler = None  # Lightning inspects DataLoader-like attributes; there is no batch sampler here

    @property
    def sampler(self) -> TensorBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def _indices(self) -> torch.Tensor:
        total = len(self.tensors[0])
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        if self.world_size > 1:
            padded = self.per_rank * self.world_size
            order = torch.cat([order, order[: padded - total]])[self.rank :: self.world_size]
        return order.to(self.tensors[0].device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            batch = [t[index] for t in self.tensors]
            if self.augment is not None:
                batch[0] = self.augment(batch[0])
            yield tuple(batch)


class InMemoryDataModule(L.LightningDataModule):
    """A datamodule whose splits are tensors in memory (`self.splits[name]`: a tensor or a tuple of them).

    Every loader cuts its batches by indexing, for the trainer that asks: on its device, this process's share
    under DDP, shuffled (and augmented, where the datamodule has `augment`) only for training, and in a fixed
    order when it overfits a few batches (`trainer.overfit_batches`). Subclasses fill `splits` in `setup` and
    set `batch_size`, `eval_batch_size` and `shuffle_seed`.
    """

    splits: dict[str, Any]

    def _batches(self, split: str, train: bool) -> TensorBatches:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        overfit = trainer is not None and trainer.overfit_batches > 0
        tensors = self.splits[split]
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tensors
        return TensorBatches(
            [t.to(device) for t in tensors],
            self.batch_size if train else self.eval_batch_size,
            shuffle=train and not overfit,
            seed=self.shuffle_seed,
            rank=rank,
            world_size=world,
            augment=getattr(self, "augment", None) if train else None,
        )

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val", train=False)

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test", train=False)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Cut indices into len(fractions)+1 parts with the class proportions of `labels` in each."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(len(labels))
    parts = []
    remaining = 1.0
    for fraction in fractions:
        if fraction <= 0:
            parts.append(np.array([], dtype=int))
            continue
        rest, part = train_test_split(rest, test_size=fraction / remaining, random_state=seed, stratify=labels[rest])
        remaining -= fraction
        parts.append(np.sort(part))
    return [np.sort(rest), *parts]


class TensorDataModule(InMemoryDataModule):
    """Base for in-memory classification data: subclasses return arrays, this class splits and batches.

    `load()` returns (x, y) for the data pool and, when the dataset has an official test split,
    (x_test, y_test); otherwise a stratified `test_fraction` of the pool becomes the test set.
    `val_fraction` of what remains is held out for validation (checkpoint choice, early stopping).
    Splits depend on `split_seed` only, so every training seed is scored on the same test set.
    With `folds > 1`, fold `fold` of a stratified k-fold over all the data is the test set. With
    `holdout_fraction > 0` as well, a stratified share of all the data is cut first as the `holdout` split, the
    same rows for every fold (the outer test split of `cv.ensemble`), and the k-fold runs over the rest.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        augment: dict[str, Any] | None = None,
        folds: int = 1,
        fold: int = 0,
        data_dir: str = "data",
        train_fraction: float = 1.0,
        holdout_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        check_split_fractions(val_fraction, test_fraction)
        check_holdout_fraction(holdout_fraction, folds)
        if (
            isinstance(train_fraction, bool)
            or not isinstance(train_fraction, int | float)
            or not 0 < train_fraction <= 1
        ):
            raise UserError(f"data.train_fraction: expected a number in (0, 1], got {train_fraction!r}")
        self.train_fraction = float(train_fraction)
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0 <= fold < max(folds, 1):
            raise ValueError(f"data.fold must be in [0, {folds}), got {fold}")
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed, self.shuffle_seed = split_seed, shuffle_seed
        self.augment = BatchAugment(**(augment or {}))
        self.folds, self.fold, self.data_dir = folds, fold, data_dir
        self.holdout_fraction = float(holdout_fraction)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # each dataset subclass defines load() -> (x, y, x_test or None, y_test or None)
    load: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y, x_test, y_test = self.load()
        if tuple(x.shape[1:]) != self.input_shape:
            raise UserError(
                f"data.input_shape is {list(self.input_shape)} but the data has samples of shape {list(x.shape[1:])}"
            )
        holdout = None
        if self.folds > 1:
            from sklearn.model_selection import StratifiedKFold

            if x_test is not None:
                x, y = np.concatenate([x, x_test]), np.concatenate([y, y_test])
            if self.holdout_fraction > 0:  # the outer test split: the same rows, whichever the fold
                rest, kept = stratified_split(y, [self.holdout_fraction], self.split_seed)
                holdout, x, y = (x[kept], y[kept]), x[rest], y[rest]
            folds = StratifiedKFold(self.folds, shuffle=True, random_state=self.split_seed)
            pool, test = list(folds.split(x, y))[self.fold]
            x_test, y_test, x, y = x[test], y[test], x[pool], y[pool]
        elif x_test is None:
            pool, test = stratified_split(y, [self.test_fraction], self.split_seed)
            x_test, y_test, x, y = x[test], y[test], x[pool], y[pool]
        train, val = stratified_split(y, [self.val_fraction], self.split_seed)
        if self.train_fraction < 1:  # learning curves: a stratified share of the training rows, the same val and test
            try:
                kept, _ = stratified_split(y[train], [1 - self.train_fraction], self.split_seed)
            except ValueError as error:  # fewer rows than classes on one side of the cut
                raise UserError(f"data.train_fraction: {self.train_fraction} keeps too few rows ({error})") from error
            train = train[kept]
        parts = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x_test, y_test)}
        if holdout is not None:
            parts["holdout"] = holdout
        for name, (xs, ys) in parts.items():
            self.splits[name] = (torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys, dtype=torch.long))
