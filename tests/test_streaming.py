"""Streaming data: prepare -> chunks -> the same samples as the folder, training, and resume in mid-epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from tests.conftest import QUICK, checkpoint, compose_config, every_n_steps, run_script
from zoo.errors import UserError

litdata = pytest.importorskip("litdata", reason="data=streaming needs LitData (a dependency of the zoo)")

CLASSES, PER_CLASS, SIZE = 3, 20, 12


def band_images(root: Path, size: int) -> Path:
    """Grayscale PNGs in root/class<c>/ whose class is a bright band at a class-specific height."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            pixels = (rng.random((size, size)) * 90).astype(np.uint8)
            pixels[4 * c : 4 * c + 4] = 250
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return band_images(tmp_path_factory.mktemp("images"), SIZE)


@pytest.fixture(scope="module")
def chunks(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zoo.data.streaming import prepare

    out = tmp_path_factory.mktemp("prepared") / "chunks"
    prepare(str(image_folder), str(out), image_size=SIZE, channels=1, num_workers=1)
    return out


def streaming_config(tmp_path: Path, chunks: Path, *overrides: str, folder: str = "run"):
    cfg = compose_config(
        "train",
        [*QUICK, "data=streaming", f"data.path={chunks}", "data.num_workers=0", "data.batch_size=8", "model=cnn",
         "model.net.channels=[8,16]", "trainer.max_epochs=2", "logger=none", *overrides],
        tmp_path,
    )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / folder)
    return cfg


def samples(loader) -> list[tuple[bytes, int]]:
    return sorted((x.numpy().tobytes(), int(y)) for xs, ys in loader for x, y in zip(xs, ys, strict=True))


def test_the_stream_holds_the_folders_samples(image_folder: Path, chunks: Path) -> None:
    from zoo.data.streaming import StreamingDataModule
    from zoo.data.vision import ImageFolderDataModule

    folder = ImageFolderDataModule(str(image_folder), [1, SIZE, SIZE], CLASSES, batch_size=7, eval_batch_size=7)
    folder.setup()
    stream = StreamingDataModule(str(chunks), [1, SIZE, SIZE], CLASSES, batch_size=7, eval_batch_size=7, num_workers=0)
    loaders = {"train": stream.train_dataloader(), "val": stream.val_dataloader(), "test": stream.test_dataloader()}
    for split, loader in loaders.items():
        expected = samples(torch.utils.data.DataLoader(folder.datasets[split], batch_size=7))
        # stored as uint8: the folder's floats come back within half a grey level
        got = samples(loader)
        assert [y for _, y in got] == [y for _, y in expected], split
        ours = np.stack([np.frombuffer(x, np.float32) for x, _ in got])
        theirs = np.stack([np.frombuffer(x, np.float32) for x, _ in expected])
        assert np.abs(np.sort(ours, 0) - np.sort(theirs, 0)).max() <= 0.5 / 255 + 1e-6, split


def test_a_streamed_run_learns(tmp_path: Path, chunks: Path) -> None:
    from zoo.run import train

    cfg = streaming_config(tmp_path, chunks, "trainer.max_epochs=6", "optimizer.lr=3e-3")
    cfg.optimized_metric = "test/acc"
    assert cfg.model.net.input_shape == [1, SIZE, SIZE] and cfg.data.num_classes == CLASSES  # from zoo.json
    assert train(cfg) >= 0.9  # chance is 1/3


def test_a_run_resumed_in_mid_epoch_equals_the_uninterrupted_one(tmp_path: Path, chunks: Path) -> None:
    from zoo.run import train

    full = streaming_config(tmp_path, chunks, *every_n_steps(tmp_path, 3), folder="full")
    train(full)
    # 43 training samples in batches of 8: 6 steps an epoch, so step 3 is in the middle of the first
    mid_epoch = tmp_path / "steps" / "step_3.ckpt"
    state = torch.load(mid_epoch, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 3
    resumed = streaming_config(tmp_path, chunks, f"ckpt_path={mid_epoch}", folder="resumed")
    train(resumed)
    a, b = checkpoint(full), checkpoint(resumed)
    train_samples = json.loads((chunks / "zoo.json").read_text())["samples"]["train"]
    assert a["global_step"] == b["global_step"] == 2 * math.ceil(train_samples / 8)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_prepare_refuses_a_used_folder_and_bad_input(tmp_path: Path, image_folder: Path, chunks: Path) -> None:
    from zoo.data.streaming import prepare

    before = sorted(p.name for p in chunks.iterdir())
    with pytest.raises(UserError, match="is not empty"):
        prepare(str(image_folder), str(chunks), image_size=SIZE, channels=1)
    assert sorted(p.name for p in chunks.iterdir()) == before
    with pytest.raises(UserError, match="unknown; allowed: image_folder, tensor, csv"):
        prepare(str(image_folder), str(tmp_path / "new"), data_format="parquet")
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="cannot read .* as a weights-only tensor file"):
        prepare(str(tmp_path / "bad.pt"), str(tmp_path / "new"), data_format="tensor")


def test_tensor_files_stream_too(tmp_path: Path) -> None:
    from zoo.data.streaming import StreamingDataModule, prepare

    x = torch.arange(60 * 5, dtype=torch.float32).reshape(60, 5)
    torch.save({"x": x, "y": torch.arange(60) % 3}, tmp_path / "table.pt")
    meta = prepare(str(tmp_path / "table.pt"), str(tmp_path / "chunks"), data_format="tensor")
    assert meta["input_shape"] == [5] and meta["num_classes"] == 3 and sum(meta["samples"].values()) == 60
    stream = StreamingDataModule(str(tmp_path / "chunks"), [5], 3, batch_size=4, eval_batch_size=4, num_workers=0)
    rows = [r for split in ("train", "val", "test") for xs, _ in getattr(stream, f"{split}_dataloader")() for r in xs]
    assert sorted(r[0].item() for r in rows) == sorted(x[:, 0].tolist())  # every row once, over the three splits


def streamed_run(tmp_path: Path, chunks: str, model: str, epochs: int, metric: str) -> float:
    """`metric` of a run of `model` trained from the chunks in tmp_path/chunks."""
    from zoo.run import train

    cfg = compose_config(
        "train",
        [*QUICK, "data=streaming", f"data.path={tmp_path / chunks}", "data.num_workers=0", "data.batch_size=8",
         f"model={model}", f"trainer.max_epochs={epochs}", "optimizer.lr=1e-2", "logger=none"],
        tmp_path,
    )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / f"{chunks}_run")
        cfg.optimized_metric = metric
    return train(cfg)


def test_csv_tables_stream_as_the_tabular_module_reads_them_and_runs_learn(tmp_path: Path) -> None:
    from zoo.data.streaming import StreamingDataModule, prepare
    from zoo.data.tabular import TabularDataModule

    rng = np.random.default_rng(0)
    labels = rng.choice(["cat", "dog", "owl"], 90)
    centre = {"cat": 0.0, "dog": 4.0, "owl": 8.0}
    lines = ["size,weight,colour,animal"] + [
        f"{centre[a] + rng.normal():.3f},{100 * rng.random():.2f},{rng.choice(['red', 'blue'])},{a}" for a in labels
    ]
    (tmp_path / "animals.csv").write_text("\n".join(lines) + "\n")
    meta = prepare(str(tmp_path / "animals.csv"), str(tmp_path / "chunks"), data_format="csv", target="animal")
    assert meta["input_shape"] == [4] and meta["classes"] == ["cat", "dog", "owl"]  # size, weight, one-hot colour
    table = TabularDataModule("csv", str(tmp_path / "animals.csv"), "animal", input_shape=[4], num_classes=3)
    table.setup()
    stream = StreamingDataModule(str(tmp_path / "chunks"), [4], 3, batch_size=8, eval_batch_size=8, num_workers=0)
    for split in ("train", "val", "test"):
        x, y = table.splits[split]
        expected = sorted((row.numpy().tobytes(), int(label)) for row, label in zip(x, y))
        assert samples(getattr(stream, f"{split}_dataloader")()) == expected, split  # standardized, bit for bit
    assert streamed_run(tmp_path, "chunks", "mlp", 15, "test/acc") >= 0.8  # chance 1/3; size separates the classes
    with pytest.raises(UserError, match="--target <column>"):
        prepare(str(tmp_path / "animals.csv"), str(tmp_path / "more"), data_format="csv")

    # a number to regress: the target standardized as the tabular module does, its scale in zoo.json
    meta = prepare(str(tmp_path / "animals.csv"), str(tmp_path / "sizes"), data_format="csv", target="size")
    assert meta["num_classes"] == 1 and meta["input_shape"] == [6]  # weight, colour and animal one-hot
    table = TabularDataModule("csv", str(tmp_path / "animals.csv"), "size", input_shape=[6], num_classes=1)
    table.setup()
    stream = StreamingDataModule(str(tmp_path / "sizes"), [6], 1, batch_size=8, eval_batch_size=8, num_workers=0)
    assert stream.target_scale == pytest.approx(table.target_scale)
    x, y = table.splits["test"]
    expected = sorted((row.numpy().tobytes(), float(value)) for row, value in zip(x, y))
    got = sorted(
        (row.numpy().tobytes(), float(value)) for xs, ys in stream.test_dataloader() for row, value in zip(xs, ys)
    )
    assert got == expected
    # the mean scores R² 0; the animal explains about 0.9 of the size's variance (centres 4 apart, noise std 1)
    assert streamed_run(tmp_path, "sizes", "mlp_regressor", 40, "test/r2") >= 0.6


def test_a_missing_prepared_folder_is_one_line(tmp_path: Path) -> None:
    result = run_script("train.py", "data=streaming", f"data.path={tmp_path}/nothing", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "data.path: no zoo.json in" in line and "python -m zoo.data.prepare" in line
