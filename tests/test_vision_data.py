"""Tiny files in the official MNIST, Fashion-MNIST and CIFAR-10 formats and image folders, read by the real loaders."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data.vision import ImageFolderDataModule, TorchvisionDataModule
from zoo.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    """IDX files as on LeCun's site: big-endian magic (2051 images, 2049 labels) and sizes, then uint8 data."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    files = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes(),
    }
    for name, payload in files.items():
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)


def make_mnist(root: Path, folder: str = "MNIST", compress: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """20 training and 10 test images; every class appears twice in training, so a stratified half is valid."""
    rng = np.random.default_rng(seed)
    data = {
        "x": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y": np.arange(20) % 10,
        "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(10) * 3) % 10,
    }
    write_idx(root / folder / "raw", "train", data["x"], data["y"], compress)
    write_idx(root / folder / "raw", "t10k", data["x_test"], data["y_test"], compress)
    return data


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A CIFAR-10 python batch: rows of 3072 bytes (1024 red, 1024 green, 1024 blue, each row-major).

    The official pickles come from Python 2; torchvision loads them with encoding="latin1", which turns
    their byte-string keys into the str keys "data" and "labels" written here.
    """
    entry = {"batch_label": path.name, "labels": [int(v) for v in labels], "data": images.reshape(len(images), -1)}
    path.write_bytes(pickle.dumps(entry, protocol=2))


def make_cifar10(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Four images in each of the five training batches, ten in the test batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    data = {
        "x": rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8),
        "y": np.arange(20) % 10,
        "x_test": rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8),
        "y_test": (np.arange(10) * 7) % 10,
    }
    for i in range(5):
        part = slice(4 * i, 4 * i + 4)
        write_batch(folder / f"data_batch_{i + 1}", data["x"][part], data["y"][part])
    write_batch(folder / "test_batch", data["x_test"], data["y_test"])
    meta = {"label_names": CIFAR_NAMES, "num_cases_per_batch": 4, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return data


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the CIFAR files against the official md5 sums; fake files only need to exist."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def assert_one_line_user_error(error: pytest.ExceptionInfo[UserError]) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip() == message and message
    assert error.value.__cause__ is None  # no chained torchvision or sklearn traceback under it
    assert error.value.__context__ is None or error.value.__suppress_context__
    return message


# --- MNIST and Fashion-MNIST -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_files_round_trip(tmp_path: Path, name: str, folder: str, compress: bool) -> None:
    written = make_mnist(tmp_path, folder, compress)
    data = TorchvisionDataModule(name, [1, 28, 28], 10, data_dir=str(tmp_path), val_fraction=0.5)

    x, y, x_test, y_test = data.load()

    assert x.shape == (20, 1, 28, 28) and x_test.shape == (10, 1, 28, 28)
    assert x.dtype == x_test.dtype == np.float32 and y.dtype == y_test.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(np.rint(x[:, 0] * 255).astype(np.uint8), written["x"])
    np.testing.assert_array_equal(np.rint(x_test[:, 0] * 255).astype(np.uint8), written["x_test"])
    np.testing.assert_array_equal(y, written["y"])
    np.testing.assert_array_equal(y_test, written["y_test"])
    assert len(data.classes) == 10

    data.setup()
    assert [len(data.splits[s][0]) for s in ("train", "val", "test")] == [10, 10, 10]
    test_x, test_y = data.splits["test"]
    torch.testing.assert_close(test_x, torch.from_numpy(written["x_test"][:, None] / np.float32(255)))
    assert test_y.tolist() == written["y_test"].tolist()
    train_val = torch.cat([data.splits["train"][1], data.splits["val"][1]])
    assert sorted(train_val.tolist()) == sorted(written["y"].tolist())


def test_normalize_uses_published_statistics(tmp_path: Path) -> None:
    written = make_mnist(tmp_path)
    data = TorchvisionDataModule("mnist", data_dir=str(tmp_path), normalize=True)
    x, _, x_test, _ = data.load()
    np.testing.assert_allclose(x[:, 0] * 0.3081 + 0.1307, written["x"] / 255.0, atol=1e-5)
    np.testing.assert_allclose(x_test[:, 0] * 0.3081 + 0.1307, written["x_test"] / 255.0, atol=1e-5)


def test_missing_mnist_files_name_folder_and_files(tmp_path: Path) -> None:
    data = TorchvisionDataModule("mnist", data_dir=str(tmp_path))
    with pytest.raises(UserError) as error:
        data.setup()
    message = assert_one_line_user_error(error)
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels"):
        assert name in message
    assert "data.download=true" in message and "copy" in message


def test_partly_missing_fashion_mnist_names_the_missing_file(tmp_path: Path) -> None:
    make_mnist(tmp_path, "FashionMNIST")
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError) as error:
        TorchvisionDataModule("fashion_mnist", data_dir=str(tmp_path)).load()
    message = assert_one_line_user_error(error)
    assert "missing: t10k-labels-idx1-ubyte;" in message


def test_unknown_dataset_name_lists_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10"):
        TorchvisionDataModule("svhn", data_dir=str(tmp_path))


# --- CIFAR-10 --------------------------------------------------------------------------------------------------


def test_cifar10_batches_round_trip(tmp_path: Path, skip_md5: None) -> None:
    written = make_cifar10(tmp_path)
    data = TorchvisionDataModule("cifar10", [3, 32, 32], 10, data_dir=str(tmp_path), val_fraction=0.5)

    x, y, x_test, y_test = data.load()

    assert x.shape == (20, 3, 32, 32) and x_test.shape == (10, 3, 32, 32)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), written["x"])
    np.testing.assert_array_equal(np.rint(x_test * 255).astype(np.uint8), written["x_test"])
    np.testing.assert_array_equal(y, written["y"])
    np.testing.assert_array_equal(y_test, written["y_test"])
    assert data.classes == CIFAR_NAMES

    data.setup()
    assert data.splits["test"][1].tolist() == written["y_test"].tolist()
    assert len(data.splits["train"][0]) + len(data.splits["val"][0]) == 20


def test_cifar10_normalize_per_channel(tmp_path: Path, skip_md5: None) -> None:
    written = make_cifar10(tmp_path)
    x, _, _, _ = TorchvisionDataModule("cifar10", data_dir=str(tmp_path), normalize=True).load()
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(x * std + mean, written["x"] / 255.0, atol=1e-5)


def test_missing_cifar10_names_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        TorchvisionDataModule("cifar10", data_dir=str(tmp_path)).setup()
    message = assert_one_line_user_error(error)
    assert str(tmp_path / "cifar-10-batches-py") in message
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert name in message
    assert "data.download=true" in message


def test_cifar10_with_wrong_checksums_is_a_user_error(tmp_path: Path) -> None:
    make_cifar10(tmp_path)  # present, but not the official bytes: the real md5 check fails
    with pytest.raises(UserError, match="md5") as error:
        TorchvisionDataModule("cifar10", data_dir=str(tmp_path)).load()
    assert_one_line_user_error(error)


# --- image folders ---------------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, seed: int) -> None:
    """PNGs of mixed sizes and modes: grayscale and RGB in the same class must batch together."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        size = (10 + i, 12)
        if i % 2:
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(folder / f"{i}.png")
        else:
            Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), mode="L").save(
                folder / f"{i}.png"
            )


def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fish"), per_class: int = 6) -> Path:
    for k, name in enumerate(classes):
        write_images(root / name, per_class, seed=k)
    return root


def image_folder(root: Path, num_classes: int = 3, **kwargs: object) -> ImageFolderDataModule:
    options = {"input_shape": [3, 16, 16], "batch_size": 4, "eval_batch_size": 4, "test_fraction": 1 / 3}
    options.update({"val_fraction": 0.25, **kwargs})
    return ImageFolderDataModule(str(root), num_classes=num_classes, **options)


def labels_and_paths(dataset: torch.utils.data.Dataset) -> list[tuple[int, str]]:
    """(label, class folder) of each sample, through Subset indices where the split was cut."""
    if isinstance(dataset, torch.utils.data.Subset):
        return [
            (dataset.dataset.samples[i][1], Path(dataset.dataset.samples[i][0]).parent.name) for i in dataset.indices
        ]
    return [(label, Path(path).parent.name) for path, label in dataset.samples]


@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder_split_and_batches(tmp_path: Path, channels: int) -> None:
    data = image_folder(make_folder(tmp_path), input_shape=[channels, 16, 16], image_size=16)
    data.setup()

    assert data.classes == ["cat", "dog", "fish"]
    sizes = {split: len(data.datasets[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 9, "val": 3, "test": 6}
    for split, loader in [
        ("train", data.train_dataloader()),
        ("val", data.val_dataloader()),
        ("test", data.test_dataloader()),
    ]:
        x, y = next(iter(loader))
        assert x.shape == (min(4, sizes[split]), channels, 16, 16) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and x.min() >= 0.0 and x.max() <= 1.0
        pairs = labels_and_paths(data.datasets[split])
        assert all(data.classes[label] == folder for label, folder in pairs)
        assert sorted(label for label, _ in pairs) == sorted([0, 1, 2] * (sizes[split] // 3))
    everything = [p for s in ("train", "val", "test") for p in labels_and_paths(data.datasets[s])]
    assert len(everything) == 18


def test_image_folder_split_is_deterministic(tmp_path: Path) -> None:
    make_folder(tmp_path)
    first, second, other = image_folder(tmp_path), image_folder(tmp_path), image_folder(tmp_path, split_seed=1)
    for data in (first, second, other):
        data.setup()
    assert first.datasets["test"].indices == second.datasets["test"].indices
    assert first.datasets["val"].indices == second.datasets["val"].indices
    assert (first.datasets["test"].indices, first.datasets["val"].indices) != (
        other.datasets["test"].indices,
        other.datasets["val"].indices,
    )


def test_image_folder_given_splits_keep_the_training_numbering(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", ("a", "b"), per_class=4)
    make_folder(tmp_path / "val", ("a", "b"), per_class=2)
    write_images(tmp_path / "test" / "b", 3, seed=5)  # class "a" absent: "b" must keep label 1
    data = image_folder(tmp_path, num_classes=2)
    data.setup()

    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [8, 4, 3]
    _, y = next(iter(data.test_dataloader()))
    assert y.tolist() == [1, 1, 1]
    assert sorted(label for label, _ in labels_and_paths(data.datasets["val"])) == [0, 0, 1, 1]


def test_image_folder_augment_and_workers(tmp_path: Path) -> None:
    data = image_folder(make_folder(tmp_path), augment={"hflip": True, "crop_padding": 4}, num_workers=1)
    data.setup()
    loader = data.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 9
    assert all(x.shape[1:] == (3, 16, 16) for x, _ in batches)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("missing", "no folder"),
        ("empty", "no class folders"),
        ("no_images", "no images"),
        ("wrong_count", "data.num_classes is 5 but"),
    ],
)
def test_image_folder_bad_input(tmp_path: Path, layout: str, expected: str) -> None:
    root = tmp_path / "images"
    if layout == "empty":
        root.mkdir()
    elif layout == "no_images":
        (root / "cat").mkdir(parents=True)
        (root / "cat" / "notes.txt").write_text("not an image")
    elif layout == "wrong_count":
        make_folder(root)
    with pytest.raises(UserError, match=expected) as error:
        image_folder(root, num_classes=5 if layout == "wrong_count" else 3).setup()
    message = assert_one_line_user_error(error)
    assert str(root) in message
    if layout == "wrong_count":
        assert "3 class folders: cat, dog, fish" in message


# --- Hydra configs and a one-batch fit -------------------------------------------------------------------------


def compose(overrides: list[str]):  # noqa: ANN201
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


@pytest.mark.parametrize(
    ("data_name", "model_name"),
    [("mnist", "cnn"), ("fashion_mnist", "cnn"), ("cifar10", "resnet"), ("image_folder", "cnn")],
)
def test_config_instantiates_and_fits_one_batch(
    tmp_path: Path, skip_md5: None, data_name: str, model_name: str
) -> None:
    import lightning as L
    from hydra.utils import instantiate

    overrides = [f"data={data_name}", f"model={model_name}", f"paths.data_dir={tmp_path}", "data.val_fraction=0.5"]
    if data_name == "mnist":
        make_mnist(tmp_path, compress=True)
    elif data_name == "fashion_mnist":
        make_mnist(tmp_path, "FashionMNIST")
    elif data_name == "cifar10":
        make_cifar10(tmp_path)
    else:
        make_folder(tmp_path / "pets")
        overrides += [
            f"data.root={tmp_path / 'pets'}",
            "data.num_classes=3",
            "data.input_shape=[3,16,16]",
            "data.image_size=16",
            "data.num_workers=0",
            "data.val_fraction=0.25",
            "data.test_fraction=0.34",
        ]
    cfg = compose(overrides)

    data = instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=None)
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)

    assert trainer.state.finished and trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_resnet_cifar10_experiment_composes() -> None:
    cfg = compose(["experiment=resnet_cifar10", "paths.data_dir=/nonexistent"])
    assert cfg.data.name == "cifar10" and cfg.data.batch_size == 128
    assert cfg.data.augment.shift == 4 and cfg.data.augment.hflip
    assert cfg.model.net._target_ == "zoo.nn.resnet.ResNet" and cfg.model.net.depth == 20
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.1 and cfg.optimizer.nesterov
    assert cfg.optimizer.weight_decay == 5e-4 and cfg.scheduler._target_ == "zoo.optim.warmup_cosine"
    assert cfg.task_name == "resnet_cifar10" and 150 <= cfg.trainer.max_epochs <= 200
