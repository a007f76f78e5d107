"""The standard vision datasets from their official files on disk, and image folders with one sub-folder per class."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from zoo.data.tensor import TensorDataModule, stratified_split
from zoo.errors import UserError, check_split_fractions

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

# name -> (torchvision class, folder under data_dir, files expected there, shape, per-channel mean, per-channel std)
DATASETS: dict[str, tuple[str, str, tuple[str, ...], tuple[int, int, int], tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ("MNIST", "MNIST/raw", MNIST_FILES, (1, 28, 28), (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", MNIST_FILES, (1, 28, 28), (0.2860,), (0.3530,)),
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        CIFAR10_FILES,
        (3, 32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
}


class TorchvisionDataModule(TensorDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 read by torchvision from `data_dir`, held whole in memory.

    The official test split is the test set; `val_fraction` of the official training split is held out.
    Pixels are in [0, 1] unless `normalize`, which standardises each channel with the dataset's published
    mean and std. Nothing is fetched unless `download` is true, so a run without a network fails at once
    with the list of files to copy instead of a download traceback.
    """

    def __init__(
        self,
        name: str,
        input_shape: Sequence[int] | None = None,
        num_classes: int = 10,
        download: bool = False,
        normalize: bool = False,
        **kwargs: Any,
    ) -> None:
        if name not in DATASETS:
            raise ValueError(f"data.name must be one of {', '.join(DATASETS)}; got '{name}'")
        super().__init__(input_shape=input_shape or DATASETS[name][3], num_classes=num_classes, **kwargs)
        self.name, self.download, self.normalize = name, download, normalize
        self.classes: list[str] = []

    @property
    def folder(self) -> Path:
        return Path(self.data_dir).expanduser() / DATASETS[self.name][1]

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        import torchvision.datasets

        class_name, _, _, _, mean, std = DATASETS[self.name]
        dataset_class = getattr(torchvision.datasets, class_name)
        if class_name != "CIFAR10":
            self._gunzip_idx_files()
        try:
            train = dataset_class(str(self.data_dir), train=True, download=self.download)
            test = dataset_class(str(self.data_dir), train=False, download=self.download)
        except RuntimeError as error:
            if "not found" in str(error) or "corrupted" in str(error):
                raise UserError(self._missing_message()) from None
            if self.download:
                raise UserError(self._download_failed_message(error)) from None
            raise
        except OSError as error:  # urllib's URLError: no network, or the server refused
            if not self.download:
                raise
            raise UserError(self._download_failed_message(error)) from None
        self.classes = list(train.classes)
        x, y = self._arrays(train)
        x_test, y_test = self._arrays(test)
        if self.normalize:
            mean_, std_ = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
            x, x_test = (x - mean_) / std_, (x_test - mean_) / std_
        return x, y, x_test, y_test

    @staticmethod
    def _arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
        """Straight from the decoded uint8 arrays: one conversion, not a PIL round trip per image."""
        data = dataset.data.numpy() if isinstance(dataset.data, torch.Tensor) else np.asarray(dataset.data)
        images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)
        return x, np.asarray(dataset.targets, dtype=np.int64)

    def _gunzip_idx_files(self) -> None:
        """torchvision reads only the decompressed IDX files; the official downloads are the .gz ones."""
        for name in DATASETS[self.name][2]:
            target, packed = self.folder / name, self.folder / f"{name}.gz"
            if target.is_file() or not packed.is_file():
                continue
            partial = target.with_name(f"{name}.partial")
            try:
                with gzip.open(packed, "rb") as source, open(partial, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                os.replace(partial, target)
            except (OSError, EOFError) as error:
                partial.unlink(missing_ok=True)
                reason = " ".join(str(error).split())
                raise UserError(f"data: cannot decompress {packed}: {reason}; gunzip it in {self.folder}") from None

    def _missing_message(self) -> str:
        class_name, _, files, _, _, _ = DATASETS[self.name]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if class_name == "CIFAR10":
            expected = f"{', '.join(files)} (the contents of cifar-10-python.tar.gz)"
        else:
            expected = f"{', '.join(files)} (each may be .gz)"
        if not missing:
            state = "all are there but fail torchvision's md5 check (corrupted or not the official files)"
        else:
            state = "none is there" if len(missing) == len(files) else f"missing: {', '.join(missing)}"
        return (
            f"data: {class_name} not found in {self.folder}: expected {expected}; {state}; "
            f"set data.download=true where a network exists, or copy the files there"
        )

    def _download_failed_message(self, error: BaseException) -> str:
        reason = " ".join(str(error).split())[:300]
        return (
            f"data: downloading {DATASETS[self.name][0]} into {self.data_dir} failed ({reason}); "
            f"copy {', '.join(DATASETS[self.name][2])} into {self.folder} and set data.download=false"
        )


class _Loader:
    """Opens an image in one colour mode, so that grayscale and RGB files batch together; picklable for workers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:
            return Image.open(f).convert(self.mode)


def file_loader(dataset: Any, batch_size: int, num_workers: int, **order: Any) -> torch.utils.data.DataLoader:
    """Images decoded from files per batch: workers kept between epochs, pinned memory where a GPU will take them."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        **order,
    )


SPLIT_FOLDERS = {"val": ("val", "valid", "validation"), "test": ("test",)}
AUGMENT_KEYS = ("hflip", "crop_padding")


class ImageFolderDataModule(L.LightningDataModule):
    """Images in `<root>/<class>/*`, or in `<root>/{train,val,test}/<class>/*` when the split is given.

    Without a `train` folder, a stratified split that depends on `split_seed` only holds out
    `test_fraction` of the images for testing and `val_fraction` of the rest for validation, as the
    in-memory datasets do; a missing `val` or `test` folder is cut from `train` the same way. Classes
    are numbered in the sorted order of the training folder's class names.
    """

    def __init__(
        self,
        root: str,
        input_shape: Sequence[int],
        num_classes: int,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        augment: dict[str, Any] | None = None,
        image_size: int | Sequence[int] | None = None,
        channels: int | None = None,
        shuffle_seed: int = 0,
        data_dir: str = "data",
    ) -> None:
        super().__init__()
        check_split_fractions(val_fraction, test_fraction)
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.root, self.input_shape, self.num_classes = Path(str(root)).expanduser(), tuple(input_shape), num_classes
        if len(self.input_shape) != 3:
            raise UserError(f"data.input_shape must be [channels, height, width], got {list(self.input_shape)}")
        self.channels = channels if channels is not None else self.input_shape[0]
        if self.channels not in (1, 3):
            raise UserError(f"data.channels must be 1 or 3, got {self.channels}")
        if image_size is None:
            image_size = self.input_shape[1:]
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if (self.channels, *size) != self.input_shape:
            raise UserError(
                f"data.input_shape is {list(self.input_shape)} but channels={self.channels} and "
                f"image_size={list(size)} make images of shape {[self.channels, *size]}"
            )
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        augment = dict(augment or {})
        unknown = sorted(set(augment) - set(AUGMENT_KEYS))
        if unknown:
            raise UserError(f"data.augment: unknown keys {', '.join(unknown)}; allowed: {', '.join(AUGMENT_KEYS)}")
        self.hflip, self.crop_padding = bool(augment.get("hflip", False)), int(augment.get("crop_padding", 0))
        if self.crop_padding < 0:
            raise UserError(f"data.augment.crop_padding must be >= 0, got {self.crop_padding}")
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.shuffle_seed, self.data_dir = shuffle_seed, data_dir
        self.classes: list[str] = []
        self.datasets: dict[str, torch.utils.data.Dataset] = {}

    def _transform(self, train: bool) -> Any:
        from torchvision import transforms

        steps: list[Any] = [transforms.Resize(self.image_size, antialias=True)]
        if train and self.crop_padding > 0:
            steps.append(transforms.RandomCrop(self.image_size, padding=self.crop_padding))
        if train and self.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        steps.append(transforms.ToTensor())
        return transforms.Compose(steps)

    def _folder(self, path: Path, train: bool = False) -> Any:
        """An ImageFolder numbered like the training folder, even where some classes are absent from it."""
        from torchvision.datasets import ImageFolder

        loader = _Loader("L" if self.channels == 1 else "RGB")
        dataset = ImageFolder(str(path), transform=self._transform(train), loader=loader, allow_empty=True)
        index = {name: i for i, name in enumerate(self.classes)}
        dataset.samples = [(p, index[dataset.classes[t]]) for p, t in dataset.samples if dataset.classes[t] in index]
        dataset.imgs, dataset.targets = dataset.samples, [t for _, t in dataset.samples]
        dataset.classes, dataset.class_to_idx = list(self.classes), index
        return dataset

    @staticmethod
    def _scan(path: Path) -> dict[str, int]:
        """Image count of each class folder, to report a bad layout in one line before torchvision does."""
        from torchvision.datasets.folder import IMG_EXTENSIONS

        counts = {}
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                counts[entry.name] = sum(
                    1 for _, _, files in os.walk(entry.path) for f in files if f.lower().endswith(IMG_EXTENSIONS)
                )
        return counts

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self.root.is_dir():
            raise UserError(f"data.root: no folder {self.root}; expected {self.root}/<class>/<image> files")
        train_root = self.root / "train"
        split_given = train_root.is_dir()
        source = train_root if split_given else self.root
        counts = self._scan(source)
        if not counts:
            raise UserError(f"data.root: no class folders in {source}; expected {source}/<class>/<image> files")
        empty = [name for name, n in counts.items() if n == 0]
        if sum(counts.values()) == 0:
            raise UserError(f"data.root: no images (png, jpg, ...) in the class folders of {source}")
        if empty:
            raise UserError(f"data.root: class folders with no images in {source}: {', '.join(empty)}")
        self.classes = list(counts)
        if len(self.classes) != self.num_classes:
            shown = ", ".join(self.classes[:20]) + (", ..." if len(self.classes) > 20 else "")
            raise UserError(
                f"data.num_classes is {self.num_classes} but {source} has {len(self.classes)} class folders: {shown}"
            )

        folders = {"train": source}
        if split_given:
            for split, names in SPLIT_FOLDERS.items():
                found = next((self.root / n for n in names if (self.root / n).is_dir()), None)
                if found is not None:
                    extra = sorted(set(self._scan(found)) - set(self.classes))
                    if extra:
                        raise UserError(f"data.root: {found} has classes not in {source}: {', '.join(extra)}")
                    folders[split] = found

        train_set = self._folder(source, train=True)
        labels = np.asarray(train_set.targets)
        pool, parts = np.arange(len(labels)), {}
        try:
            if "test" not in folders:
                pool, parts["test"] = stratified_split(labels, [self.test_fraction], self.split_seed)
            if "val" not in folders:
                rest, val = stratified_split(labels[pool], [self.val_fraction], self.split_seed)
                pool, parts["val"] = pool[rest], pool[val]
        except ValueError as error:
            raise UserError(
                f"data: cannot split the {len(labels)} images of {source} by class ({' '.join(str(error).split())}); "
                f"add images, change data.val_fraction/test_fraction, or give {self.root}/train, val, test folders"
            ) from None

        self.datasets["train"] = torch.utils.data.Subset(train_set, pool.tolist())
        for split in ("val", "test"):
            if split in folders:
                self.datasets[split] = self._folder(folders[split])
            else:
                self.datasets[split] = torch.utils.data.Subset(self._folder(source), parts[split].tolist())

    def _loader(self, split: str, train: bool) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(self.shuffle_seed) if train else None
        batch_size = self.batch_size if train else self.eval_batch_size
        return file_loader(self.datasets[split], batch_size, self.num_workers, shuffle=train, generator=generator)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", train=False)
