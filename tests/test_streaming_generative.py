"""Streaming for the generative models: GAN images in [-1, 1] and a character LM's text windows from chunks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from tests.conftest import QUICK, checkpoint, compose_config, every_n_steps, run_script
from tests.test_gan import column, epoch_rows
from tests.test_streaming import CLASSES, band_images
from tests.test_streaming import samples as rows
from zoo.errors import UserError

litdata = pytest.importorskip("litdata", reason="streaming needs LitData (a dependency of the zoo)")

SIZE, BLOCK = 16, 16
# a text a small model learns within seconds: a unigram model of it scores a perplexity of about 18
TEXT = "".join(f"the {a} fox jumps over the {b} dog. " for a in ("quick", "brown", "red") for b in ("lazy", "old")) * 40


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return band_images(tmp_path_factory.mktemp("images"), SIZE)  # 16: a size the DCGAN networks take


@pytest.fixture(scope="module")
def image_chunks(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zoo.data.streaming import prepare

    out = tmp_path_factory.mktemp("prepared") / "images"
    prepare(str(image_folder), str(out), image_size=SIZE, channels=1)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "fox.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text_chunks(text_file: Path) -> Path:
    from zoo.data.streaming import prepare

    out = text_file.parent / "chunks"
    prepare(str(text_file), str(out), data_format="text", block_size=BLOCK)
    return out


def test_the_gan_stream_holds_the_in_memory_gan_images(image_folder: Path, image_chunks: Path) -> None:
    from zoo.data.gan import ImageFolderGANDataModule
    from zoo.data.streaming import StreamingGANDataModule

    memory = ImageFolderGANDataModule(str(image_folder), input_shape=[1, SIZE, SIZE], num_classes=CLASSES)
    memory.setup()
    stream = StreamingGANDataModule(str(image_chunks), [1, SIZE, SIZE], CLASSES, batch_size=7, num_workers=0)
    streamed = {split: rows(getattr(stream, f"{split}_dataloader")()) for split in ("train", "val", "test")}
    in_memory = {split: rows([memory.splits[split]]) for split in ("train", "val", "test")}
    # bit for bit: the test split, and the images of train and val together (the stream cuts val as data=image_folder)
    assert streamed["test"] == in_memory["test"]
    assert sorted(streamed["train"] + streamed["val"]) == sorted(in_memory["train"] + in_memory["val"])
    pixels = np.stack([np.frombuffer(x, np.float32) for x, _ in streamed["train"]])
    assert pixels.min() == -1.0 and 0.9 < pixels.max() <= 1.0


def test_the_scorer_learns_from_a_bounded_seeded_draw_keyed_by_path_count_and_seed(image_chunks: Path) -> None:
    from zoo.data.streaming import StreamingGANDataModule
    from zoo.metrics.scorer import TRAINING_SETTINGS, scorer_key, scoring_splits

    def stream(**settings) -> StreamingGANDataModule:
        return StreamingGANDataModule(str(image_chunks), [1, SIZE, SIZE], CLASSES, num_workers=0, **settings)

    drawn = scoring_splits(stream(score_samples=10))
    assert [len(drawn[s][0]) for s in ("train", "val", "test")] == [10, 5, 10]  # val holds 5 images in all
    assert torch.equal(drawn["train"][0], scoring_splits(stream(score_samples=10))["train"][0])  # seeded
    assert not torch.equal(drawn["train"][0], scoring_splits(stream(score_samples=10, score_seed=1))["train"][0])
    key = scorer_key(TRAINING_SETTINGS, stream(score_samples=10))
    assert key["split"] == {"path": str(image_chunks), "score_samples": 10, "score_seed": 0}
    assert key != scorer_key(TRAINING_SETTINGS, stream(score_samples=11))
    with pytest.raises(UserError, match=r"data.score_samples: expected an integer >= 1, got 0"):
        stream(score_samples=0)


def gan_config(tmp_path: Path, chunks: Path, *overrides: str, folder: str = "gan"):
    cfg = compose_config(
        "train",
        [*QUICK, "experiment=dcgan_mnist", "data=streaming_gan", f"data.path={chunks}", "data.num_workers=0",
         "data.batch_size=8", "data.score_samples=30", "model.generator.base_channels=8",
         "model.generator.latent_dim=16", "model.discriminator.base_channels=8", "model.scorer.channels=[8,16]",
         "model.scorer.hidden=32", "model.scorer.max_steps=5", "trainer.num_sanity_val_steps=0", "logger=csv",
         *overrides],
        tmp_path,
    )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / folder)
    return cfg


def test_a_gan_trains_and_is_scored_from_the_stream(tmp_path: Path, image_chunks: Path) -> None:
    from zoo.run import train

    cfg = gan_config(tmp_path, image_chunks, "trainer.max_epochs=4", "model.score_samples=50")
    assert cfg.data.input_shape == [1, SIZE, SIZE] and cfg.data.num_classes == CLASSES  # from zoo.json
    train(cfg)
    losses_d = column(epoch_rows(cfg), "train/loss_d")
    assert len(losses_d) == 4 and all(math.isfinite(v) for v in losses_d)
    assert losses_d[-1] < losses_d[0] and losses_d[-1] < math.log(4), losses_d  # ln 4: D learned nothing
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("test/fid", "test/fid_real_floor", "test/precision"))
    (cached,) = (Path(cfg.paths.data_dir) / "scorers").glob("streaming_cnn-*.pt")
    stored = json.loads(torch.load(cached, weights_only=True)["key"])
    assert stored["split"]["score_samples"] == 30 and stored["train"]["shape"] == [30, 1, SIZE, SIZE]


def assert_resumed_equals_full(full, resumed) -> None:
    a, b = checkpoint(full), checkpoint(resumed)
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_a_gan_resumed_in_mid_epoch_equals_the_uninterrupted_one(tmp_path: Path, image_chunks: Path) -> None:
    from zoo.run import train

    # 43 training images in batches of 8: 6 batches an epoch, each one critic and one generator step
    full = gan_config(tmp_path, image_chunks, *every_n_steps(tmp_path, 6), "trainer.max_epochs=2", folder="full")
    train(full)
    mid_epoch = tmp_path / "steps" / "step_6.ckpt"
    state = torch.load(mid_epoch, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["gan_steps"] == {"d_steps": 3, "g_steps": 3}
    resumed = gan_config(tmp_path, image_chunks, f"ckpt_path={mid_epoch}", "trainer.max_epochs=2", folder="resumed")
    train(resumed)
    assert_resumed_equals_full(full, resumed)


def test_the_text_stream_holds_char_texts_windows(text_file: Path, text_chunks: Path) -> None:
    from zoo.data.char_lm import CharTextDataModule
    from zoo.data.streaming import StreamingTextDataModule

    meta = json.loads((text_chunks / "zoo.json").read_text())
    memory = CharTextDataModule(str(text_file), block_size=BLOCK)
    assert meta["vocab"] == memory.vocab.chars and meta["block_size"] == BLOCK
    stream = StreamingTextDataModule(str(text_chunks), meta["vocab"], BLOCK, batch_size=5, num_workers=0)
    for split in ("train", "val", "test"):
        streamed = sorted(tuple(w.tolist()) for windows, _ in getattr(stream, f"{split}_dataloader")() for w in windows)
        assert streamed == sorted(tuple(w.tolist()) for w in memory.splits[split]), split
    assert stream.prompt(8) == memory.prompt(8) == TEXT[int(len(TEXT) * 0.9) :][:8]


def test_a_text_is_prepared_in_parts_with_the_windows_of_reading_it_whole(tmp_path: Path, monkeypatch) -> None:
    """Parts of 7 characters: CRLF pairs and multi-byte characters fall across part boundaries, and the windows, the
    vocabulary and the error for a bad byte past the first part are those of reading the whole file."""
    from zoo.data import streaming
    from zoo.data.char_lm import CharTextDataModule

    monkeypatch.setattr(streaming, "TEXT_PART_CHARS", 7)
    text = "".join(f"Ünïcode {n} → 日本語 line\r\n" for n in range(60))
    source = tmp_path / "crlf.txt"
    source.write_bytes(text.encode("utf-8"))
    meta = streaming.prepare(str(source), str(tmp_path / "out"), data_format="text", block_size=BLOCK)
    memory = CharTextDataModule(str(source), block_size=BLOCK)
    assert meta["vocab"] == memory.vocab.chars and "\r" not in meta["vocab"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train", "val", "zoo.json"]
    stream = streaming.StreamingTextDataModule(str(tmp_path / "out"), meta["vocab"], BLOCK, batch_size=7, num_workers=0)
    for split in ("train", "val", "test"):
        streamed = sorted(tuple(w.tolist()) for windows, _ in getattr(stream, f"{split}_dataloader")() for w in windows)
        assert streamed == sorted(tuple(w.tolist()) for w in memory.splits[split]), split
    broken = text.encode("utf-8")[:99] + b"\xff" + text.encode("utf-8")[99:]
    source.write_bytes(broken)
    with pytest.raises(UnicodeDecodeError) as whole:
        broken.decode("utf-8")
    assert whole.value.start == 99
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 99\)"):
        streaming.prepare(str(source), str(tmp_path / "again"), data_format="text", block_size=BLOCK)
    assert not (tmp_path / "again").exists()
    # a file that changes between the two passes: refused, and the half-written ids file and folder are gone
    source.write_text(text, encoding="utf-8")
    passes = iter([text, text.replace("line", "lime")])
    monkeypatch.setattr(streaming, "_text_parts", lambda file: iter([next(passes)]))
    with pytest.raises(UserError, match="changed while it was read; prepare it again"):
        streaming.prepare(str(source), str(tmp_path / "again"), data_format="text", block_size=BLOCK)
    assert not (tmp_path / "again").exists()


def lm_config(tmp_path: Path, chunks: Path, *overrides: str, folder: str = "lm"):
    cfg = compose_config(
        "train",
        [*QUICK, "experiment=char_lm", "data=streaming_text", f"data.path={chunks}", f"data.block_size={BLOCK}",
         "data.num_workers=0", "data.batch_size=16", "model.net.d_model=32", "model.net.n_heads=2",
         "model.net.n_layers=1", "model.sample_tokens=8", "optimizer.lr=1e-2", "trainer.max_epochs=3",
         "trainer.num_sanity_val_steps=0", "logger=csv", *overrides],
        tmp_path,
    )  # fmt: skip
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / folder)
        cfg.optimized_metric = "test/ppl"
    return cfg


def test_a_char_lm_trains_from_the_stream_and_resumes_in_mid_epoch(tmp_path: Path, text_chunks: Path) -> None:
    from zoo.run import train

    full = lm_config(tmp_path, text_chunks, *every_n_steps(tmp_path, 4), folder="full")
    assert full.data.vocab == sorted(set(TEXT))  # the model's vocabulary, from zoo.json
    perplexity = train(full)
    assert perplexity < 6, perplexity  # a unigram model of the text scores about 18
    losses = column(epoch_rows(full), "train/loss")
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    # about 500 training windows in batches of 16: step 4 is in the middle of the first epoch
    mid_epoch = tmp_path / "steps" / "step_4.ckpt"
    assert torch.load(mid_epoch, map_location="cpu", weights_only=True)["epoch"] == 0
    resumed = lm_config(tmp_path, text_chunks, f"ckpt_path={mid_epoch}", folder="resumed")
    train(resumed)
    assert_resumed_equals_full(full, resumed)
    windows = json.loads((text_chunks / "zoo.json").read_text())["samples"]["train"]
    assert checkpoint(resumed)["global_step"] == 3 * math.ceil(windows / 16)


def test_bad_text_and_a_wrong_block_size_are_one_line(tmp_path: Path, text_chunks: Path, capsys) -> None:
    from zoo.data.prepare import main
    from zoo.data.streaming import StreamingTextDataModule

    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SystemExit) as exit_code:
        main([str(tmp_path / "weights.bin"), str(tmp_path / "out"), "--format", "text"])
    assert exit_code.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: prepare: ") and "is not UTF-8 text (byte 128); allowed: a UTF-8 text file" in line
    (tmp_path / "nul.txt").write_text("a\x00b" * 100)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nul.txt"), str(tmp_path / "out"), "--format", "text"])
    assert "holds NUL characters, so it is binary" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("abc" * 10)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "short.txt"), str(tmp_path / "out"), "--format", "text", "--block-size", "8"])
    assert "the val part of the text has 1 characters, fewer than block_size + 1 = 9" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    vocab = sorted(set(TEXT))
    with pytest.raises(UserError, match=r"data.block_size: 32 given, .* prepare the text again with --block-size 32"):
        StreamingTextDataModule(str(text_chunks), vocab, 32, num_workers=0)


def test_streams_of_the_wrong_kind_are_one_line(tmp_path: Path, image_chunks: Path, text_chunks: Path) -> None:
    from zoo.cli import describe
    from zoo.data.streaming import StreamingDataModule, StreamingGANDataModule, prepare

    torch.save({"x": torch.randn(40, 6), "y": torch.arange(40) % 2}, tmp_path / "table.pt")
    prepare(str(tmp_path / "table.pt"), str(tmp_path / "table"), data_format="tensor")
    with pytest.raises(UserError) as error:
        StreamingGANDataModule(str(tmp_path / "table"), [6], 2, num_workers=0)
    assert describe(error.value).startswith("data.path: ") and "not images; data=streaming_gan reads uint8" in str(
        error.value
    )
    with pytest.raises(UserError, match=r"holds 'text' data .* data=streaming reads .*--format image_folder or"):
        StreamingDataModule(str(text_chunks), [BLOCK + 1], len(set(TEXT)), num_workers=0)
    # through train.py: a GAN on a text stream, a language model on an image stream
    for args in (
        ["experiment=dcgan_mnist", "data=streaming_gan", f"data.path={text_chunks}"],
        ["experiment=char_lm", "data=streaming_text", f"data.path={image_chunks}"],
    ):
        result = run_script("train.py", *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in result.stderr
        expected = "data.vocab: " if "char_lm" in args[0] else "holds 'text' data (its zoo.json); data=streaming_gan"
        assert expected in line, line


def test_pggan_refuses_a_stream_in_one_line(tmp_path: Path, image_chunks: Path) -> None:
    from zoo.data.streaming import StreamingGANDataModule
    from zoo.tasks.pggan import require_images_in_memory

    with pytest.raises(UserError, match=r"PGGAN needs an in-memory datamodule"):
        require_images_in_memory(StreamingGANDataModule(str(image_chunks), [1, SIZE, SIZE], CLASSES, num_workers=0))
