"""Data larger than memory: samples prepared once into LitData chunks, then streamed from disk or object storage.

    python -m zoo.data.prepare <image folder> <out> --format image_folder --image-size 28 --channels 1
    python -m zoo.data.prepare <file.pt> <out> --format tensor          # {"x": (N, ...) tensor, "y": (N,) labels}
    python -m zoo.data.prepare <table.csv> <out> --format csv --target <column>  # standardized rows and target
    python -m zoo.data.prepare <file.txt> <out> --format text --block-size 64   # a character LM's text windows
    python train.py data=streaming data.path=<out> model=cnn            # or data.path=s3://bucket/prefix
    python train.py experiment=dcgan_mnist data=streaming_gan data.path=<out>   # images in [-1, 1] for GANs
    python train.py experiment=char_lm data=streaming_text data.path=<out>

`<out>` holds one LitData dataset per split (`train/`, `val/`, `test/`) and `zoo.json` (input shape, class names,
sample counts; a text's vocabulary and block size), from which the data configs take `input_shape` and `num_classes`
(`vocab` and `block_size`). Streaming keeps only a bounded cache of chunks on local disk (`data.max_cache_size`),
reads with worker processes, hands each rank of a DDP run its own share of every epoch, and saves the loader's
position in the checkpoint, so a run resumed mid-epoch goes on with the samples the interrupted one had not seen.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from zoo.data.prepare import read_meta
from zoo.errors import UserError

SPLITS = ("train", "val", "test")


class _Decode:
    """A stored sample as the model reads it: uint8 images to floats in [0, 1] (`signed`: in [-1, 1], a tanh
    generator's range), a text window's character ids (`tokens`) as longs, the target a class (or, for a regression
    table, a float); picklable for loader workers."""

    def __init__(self, scale: float, regression: bool = False, signed: bool = False, tokens: bool = False) -> None:
        self.scale, self.target_type = scale, torch.float32 if regression else torch.long
        self.signed, self.tokens = signed, tokens

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(sample["x"])
        if self.tokens:
            x = x.long()
        elif x.dtype == torch.uint8:
            # divided, not multiplied by the scale: bit for bit the floats of torchvision's ToTensor
            x = x.float().div(round(1 / self.scale))
            x = 2.0 * x - 1.0 if self.signed else x  # as zoo.data.gan maps the in-memory images
        else:
            x = x.float()
        return x, torch.as_tensor(sample["y"], dtype=self.target_type)


class StreamingDataModule(L.LightningDataModule):
    """Samples streamed from `prepare`'s chunks with LitData's StreamingDataset and loader: classes, or a regression
    table's standardized target (`target_scale`, its training mean and std from zoo.json, maps predictions back)."""

    formats: tuple[str, ...] = ("image_folder", "tensor", "csv")  # the `prepare --format`s this module reads
    config = "data=streaming"

    def __init__(
        self,
        path: str,
        input_shape: Sequence[int],
        num_classes: int,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        max_cache_size: str = "25GB",
        cache_dir: str | None = None,
        shuffle_seed: int = 0,
        drop_last: bool = False,
        data_dir: str = "data",
    ) -> None:
        super().__init__()
        if importlib.util.find_spec("litdata") is None:
            raise UserError("data=streaming needs LitData: pip install 'litdata>=0.2.50,<0.3'")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"data.batch_size: expected an integer >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"data.num_workers: expected an integer >= 0, got {num_workers!r}")
        self.path, self.input_shape, self.num_classes = str(path), tuple(input_shape), int(num_classes)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_cache_size, self.cache_dir, self.shuffle_seed = max_cache_size, cache_dir, shuffle_seed
        self.drop_last, self.data_dir = drop_last, data_dir
        self.scale = 1.0 / 255.0
        self.target_scale: tuple[float, float] | None = None
        if "://" not in self.path:
            meta = read_meta(self.path)
            self._check_meta(meta)
            self.scale = float(meta.get("scale", self.scale))
            if meta.get("target_scale") is not None:
                self.target_scale = (float(meta["target_scale"][0]), float(meta["target_scale"][1]))
        self.loaders: dict[str, Any] = {}
        self.train_position: dict[str, Any] | None = None  # the training loader's place, from a checkpoint

    def _check_meta(self, meta: dict[str, Any]) -> None:
        """Refuses prepared data this module cannot read, or that the config describes otherwise."""
        data_format = meta.get("format")
        if data_format not in self.formats:
            raise UserError(
                f"data.path: '{self.path}' holds '{data_format}' data (its zoo.json); {self.config} reads "
                f"python -m zoo.data.prepare --format {' or '.join(self.formats)}"
            )
        if list(self.input_shape) != list(meta["input_shape"]) or self.num_classes != meta["num_classes"]:
            raise UserError(
                f"data.input_shape/num_classes: {list(self.input_shape)}/{self.num_classes} given, but "
                f"'{self.path}' holds {meta['input_shape']}/{meta['num_classes']}"
            )

    def _transform(self) -> _Decode:
        return _Decode(self.scale, regression=self.target_scale is not None)

    def _split_dir(self, split: str) -> str:
        return f"{self.path.rstrip('/')}/{split}"

    def _dataset(self, split: str, shuffle: bool) -> Any:
        from litdata import StreamingDataset

        if "://" not in self.path and not Path(self._split_dir(split)).expanduser().is_dir():
            raise UserError(f"data.path: no '{split}' split in '{self.path}'; prepare it again")
        options: dict[str, Any] = {"max_cache_size": self.max_cache_size}
        if self.cache_dir is not None:
            options["cache_dir"] = str(Path(self.cache_dir).expanduser() / split)
        dataset = StreamingDataset(
            str(Path(self._split_dir(split)).expanduser()) if "://" not in self.path else self._split_dir(split),
            shuffle=shuffle,
            seed=self.shuffle_seed,
            # None: LitData's default, which under DDP drops the last samples so that every rank takes as many
            # batches (a rank with one more would wait for the others forever)
            drop_last=(True if self.drop_last else None) if shuffle else False,
            transform=self._transform(),
            **options,
        )
        return dataset

    def _loader(self, split: str, train: bool) -> Any:
        """One loader per split for the whole run, so that its position is the run's."""
        if split not in self.loaders:
            self.loaders[split] = _resumable_loader_class()(
                self._dataset(split, shuffle=train),
                batch_size=self.batch_size if train else self.eval_batch_size,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=self.num_workers > 0,
                # the workers' seeds come from here, not from the global generator, so that opening a loader
                # (as a resumed run does at another moment) leaves dropout's random numbers as they were
                generator=torch.Generator().manual_seed(self.shuffle_seed),
            )
        if train and self.train_position is not None:
            self.loaders[split].load_state_dict(self.train_position)
            self.train_position = None
        return self.loaders[split]

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved in every checkpoint.

        Lightning saves it too, but restores its own copy only into a loader it has not yet opened, and a run whose
        schedule needs the number of steps (warmup_cosine) opens the loader before the checkpoint is read.
        """
        loader = self.loaders.get("train")
        return {"train_position": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_position = state_dict.get("train_position")
        if self.train_position is not None and "train" in self.loaders:
            self._loader("train", train=True)

    def train_dataloader(self) -> Any:
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", train=False)

    def test_dataloader(self) -> Any:
        return self._loader("test", train=False)


class StreamingGANDataModule(StreamingDataModule):
    """Images streamed in [-1, 1], a tanh generator's range, for the GAN family; the labels stay for the scoring
    classifier.

    That classifier (zoo.metrics.scorer) learns from images in memory, so it gets `scoring_sample()`: at most
    `score_samples` images of each split, drawn without replacement by `score_seed`, never the whole stream. Its cache
    key holds `path`, `score_samples` and `score_seed` beside a digest of the drawn images. Validation and test score
    every streamed image of their split.
    """

    formats = ("image_folder", "tensor")
    config = "data=streaming_gan"

    def __init__(
        self,
        path: str,
        input_shape: Sequence[int],
        num_classes: int,
        name: str = "streaming",
        score_samples: int = 5000,
        score_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if isinstance(score_samples, bool) or not isinstance(score_samples, int) or score_samples < 1:
            raise UserError(f"data.score_samples: expected an integer >= 1, got {score_samples!r}")
        super().__init__(path, input_shape, num_classes, **kwargs)
        self.name, self.score_samples, self.score_seed = name, score_samples, int(score_seed)
        self._scoring: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _check_meta(self, meta: dict[str, Any]) -> None:
        super()._check_meta(meta)
        shape, scale = meta["input_shape"], float(meta.get("scale", 1.0))
        if len(shape) != 3 or shape[0] not in (1, 3) or not math.isclose(scale, 1 / 255):
            raise UserError(
                f"data.path: '{self.path}' holds samples of shape {shape} stored as "
                f"{'uint8' if math.isclose(scale, 1 / 255) else 'floats'}, not images; {self.config} reads uint8 "
                "images (channels 1 or 3, height, width): prepare --format image_folder, or a tensor file of uint8"
            )

    def _transform(self) -> _Decode:
        return _Decode(self.scale, signed=True)

    def scoring_sample(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each split's bounded, seeded draw of images and labels, read once per run."""
        if self._scoring is None:
            self._scoring = {split: self._draw(split) for split in SPLITS}
        return self._scoring

    def _draw(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = self._dataset(split, shuffle=False)
        total = sum(end - start for start, end in dataset.region_of_interest)  # of all ranks, unlike len(dataset)
        chosen = np.random.default_rng(self.score_seed).choice(total, min(self.score_samples, total), replace=False)
        # in index order, so that the chunks are read one after another
        images, labels = zip(*(dataset[int(i)] for i in np.sort(chosen)), strict=True)
        return torch.stack(images), torch.stack(labels)


class StreamingTextDataModule(StreamingDataModule):
    """A text's windows of block_size + 1 characters streamed from `prepare --format text`'s chunks, for the
    character language models; the vocabulary and block size come from zoo.json (`vocab`, `block_size`)."""

    formats = ("text",)
    config = "data=streaming_text"

    def __init__(self, path: str, vocab: Sequence[str], block_size: int, **kwargs: Any) -> None:
        from zoo.data.char_lm import CharVocab

        if "://" not in str(path):
            meta = read_meta(str(path))
            if meta.get("format") == "text" and int(block_size) != meta["block_size"]:
                raise UserError(
                    f"data.block_size: {block_size} given, but '{path}' holds windows of block_size "
                    f"{meta['block_size']}; prepare the text again with --block-size {block_size}"
                )
            if meta.get("format") == "text" and list(vocab) != meta["vocab"]:
                raise UserError(f"data.vocab: differs from the characters in '{path}/zoo.json'; leave it unset")
        self.vocab, self.block_size = CharVocab(vocab), int(block_size)
        super().__init__(path, [self.block_size + 1], len(self.vocab), **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _transform(self) -> _Decode:
        return _Decode(1.0, tokens=True)

    def prompt(self, length: int) -> str:
        """The first `length` characters of the validation text (its first window), as data=char_text has them."""
        window, _ = self._dataset("val", shuffle=False)[0]
        return self.vocab.decode(window[:length].tolist())


@functools.cache
def _resumable_loader_class() -> type:
    """LitData's loader, with a restored position used by the next epoch only.

    LitData keeps resuming from the loaded position until an epoch's iterator runs to its end, and Lightning stops
    taking batches once it has the epoch's count, so the epoch after a resumed one would start from the old
    position again.
    """
    from litdata import StreamingDataLoader

    class ResumableLoader(StreamingDataLoader):
        resume_next_epoch = False

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self.resume_next_epoch = True

        def __iter__(self) -> Any:
            if not self.resume_next_epoch:
                self.restore = False
            self.resume_next_epoch = False
            return super().__iter__()

    return ResumableLoader


# ---- preparing: from a folder or a tensor file to chunks ----


class _Sample:
    """Sample i of a split as LitData stores it (x: uint8 image or float array, y: a class, or a float target);
    picklable for workers."""

    def __init__(self, read: Callable[[int], tuple[np.ndarray, int | float]]) -> None:
        self.read = read

    def __call__(self, index: int) -> dict[str, Any]:
        x, y = self.read(index)
        return {"x": x, "y": y if isinstance(y, float) else int(y)}


class _FolderImage:
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.dataset[index]
        return (image * 255).round().clamp(0, 255).to(torch.uint8).numpy(), label


class _TensorRow:
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __call__(self, index: int) -> tuple[np.ndarray, int | float]:
        return self.x[index], self.y[index].item()  # a Python int for classes, a float for a regression target


def _image_folder_splits(
    source: Path, image_size: int, channels: int, val_fraction: float, test_fraction: float, split_seed: int
) -> tuple[dict[str, tuple[Callable[[int], tuple[np.ndarray, int]], int]], dict[str, Any]]:
    """The splits of an image folder exactly as `data=image_folder` makes them, resized once here."""
    from zoo.data.vision import ImageFolderDataModule

    classes = ImageFolderDataModule._scan(source / "train" if (source / "train").is_dir() else source)
    folder = ImageFolderDataModule(
        root=str(source),
        input_shape=[channels, image_size, image_size],
        num_classes=len(classes),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
    )
    folder.setup()
    splits = {split: (_FolderImage(folder.datasets[split]), len(folder.datasets[split])) for split in SPLITS}
    meta = {"input_shape": [channels, image_size, image_size], "classes": folder.classes, "scale": 1.0 / 255.0}
    return splits, meta


def _tensor_splits(
    source: Path, val_fraction: float, test_fraction: float, split_seed: int
) -> tuple[dict[str, tuple[Callable[[int], tuple[np.ndarray, int]], int]], dict[str, Any]]:
    """A `.pt` file of {"x": (N, ...), "y": (N,)} (loaded weights-only), split by class as the tables are."""
    from zoo.data.tensor import stratified_split

    try:
        stored = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"prepare: cannot read '{source}' as a weights-only tensor file ({error})") from None
    if not isinstance(stored, dict) or not {"x", "y"} <= set(stored):
        raise UserError(f"prepare: '{source}' must hold a dict with tensors 'x' (N, ...) and 'y' (N,)")
    x, y = np.asarray(stored["x"]), np.asarray(stored["y"]).astype(np.int64)
    if len(x) != len(y):
        raise UserError(f"prepare: '{source}' has {len(x)} rows of x but {len(y)} labels")
    rest, test = stratified_split(y, [test_fraction], split_seed)
    train, val = stratified_split(y[rest], [val_fraction], split_seed)
    parts = {"train": rest[train], "val": rest[val], "test": test}
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    splits = {split: (_TensorRow(x[index], y[index]), len(index)) for split, index in parts.items()}
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return splits, {"input_shape": list(x.shape[1:]), "classes": classes, "scale": scale}


def _csv_splits(
    source: Path, target: str | None, val_fraction: float, test_fraction: float, split_seed: int
) -> tuple[dict[str, tuple[Callable[[int], tuple[np.ndarray, int]], int]], dict[str, Any]]:
    """A CSV table's rows exactly as `data=tabular_csv` hands them to a neural model: split by `split_seed`,
    categoricals one-hot, every column standardized with the training split's statistics, and a regression target
    standardized too (its training mean and std go into zoo.json as `target_scale`)."""
    from zoo.data.table import Table
    from zoo.data.tabular import TabularDataModule

    if not target:
        raise UserError("prepare --format csv: name the column to predict with --target <column>")
    splitting = {"val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": split_seed}
    table = Table("csv", str(source), target, **splitting)
    regression = table.task == "regression"
    outputs = 1 if regression else table.num_classes
    data = TabularDataModule(
        "csv", str(source), target, input_shape=[table.encoded_width], num_classes=outputs, table=table, **splitting
    )
    data.setup()
    splits = {
        split: (_TensorRow(x.numpy(), y.numpy()), len(y)) for split, (x, y) in data.splits.items() if split in SPLITS
    }
    meta: dict[str, Any] = {"input_shape": [table.encoded_width], "scale": 1.0}
    if regression:  # one output, no class names
        meta |= {"classes": [], "num_classes": 1, "target_scale": list(data.target_scale)}
    else:
        meta["classes"] = [str(c) for c in table.classes]
    return splits, meta


# characters read at a time when a text is prepared: its vocabulary and ids come from passes over parts this long,
# so memory stays bounded whatever the file's size
TEXT_PART_CHARS = 1 << 20
# the text's character ids while its windows are written (a file in the output folder, removed after)
TEXT_IDS = "text_ids.tmp"


def _text_parts(file: Path) -> Iterator[str]:
    """The text in parts, decoded and its newlines translated as Path.read_text (data=char_text) does."""
    with file.open(encoding="utf-8") as stream:
        while part := stream.read(TEXT_PART_CHARS):
            yield part


def _first_bad_byte(file: Path) -> int:
    """The offset of the first byte that is not UTF-8, found without holding the file."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with file.open("rb") as stream:
        while block := stream.read(1 << 24):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                return offset - pending + error.start
            offset += len(block)
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as error:
        return offset - pending + error.start
    return offset


def _text_vocab(file: Path) -> tuple[list[str], int]:
    """Every character of the text (sorted) and its length in characters; an empty, undecodable or binary file is
    the user's error in one line, as `read_text` words it."""
    chars: set[str] = set()
    length, binary = 0, False
    try:
        for part in _text_parts(file):
            chars.update(part)
            length += len(part)
            binary = binary or "\x00" in part
    except UnicodeDecodeError as error:
        problem = f"is not UTF-8 text (byte {_first_bad_byte(file)}); allowed: a UTF-8 text file"
        raise UserError(f"prepare: '{file}' {problem}") from error
    if length == 0:
        raise UserError(f"prepare: '{file}' is empty; a language model needs some text")
    if binary:  # valid UTF-8, but a binary file (or UTF-16 text): its characters would mean nothing
        raise UserError(f"prepare: '{file}' holds NUL characters, so it is binary; allowed: a UTF-8 text file")
    return sorted(chars), length


def _write_text_ids(file: Path, chars: list[str], length: int, ids_path: Path, dtype: Any) -> None:
    """The text's character ids into a raw file, part by part (plain writes, not a memory map, whose written pages
    the process would hold): a character's id is its place among the sorted code points of the vocabulary."""
    code_points = np.array([ord(c) for c in chars], dtype=np.uint32)
    written = 0
    with ids_path.open("wb") as out:
        for part in _text_parts(file):
            points = np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)
            part_ids = np.searchsorted(code_points, points).clip(max=len(chars) - 1)
            written += len(points)
            if written > length or not np.array_equal(code_points[part_ids], points):
                raise UserError(f"prepare: '{file}' changed while it was read; prepare it again")
            out.write(part_ids.astype(dtype).tobytes())
    if written != length:
        raise UserError(f"prepare: '{file}' changed while it was read; prepare it again")


class _TextWindow:
    """Window i of a text part, as character ids read from the ids file when it is written; picklable for writer
    processes (each opens the file itself)."""

    def __init__(self, ids_path: Path, dtype: Any, start: int, stride: int, length: int) -> None:
        self.ids_path, self.dtype, self.start, self.stride, self.length = ids_path, dtype, start, stride, length
        self.ids: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"ids": None}

    def close(self) -> None:
        if self.ids is not None:
            self.ids.close()
            self.ids = None

    def __call__(self, i: int) -> tuple[np.ndarray, int]:
        if self.ids is None:
            self.ids = self.ids_path.open("rb")
        itemsize = np.dtype(self.dtype).itemsize
        self.ids.seek((self.start + i * self.stride) * itemsize)
        return np.frombuffer(self.ids.read(self.length * itemsize), dtype=self.dtype).copy(), 0


def _text_splits(
    source: Path, block_size: int, val_fraction: float, test_fraction: float, out: Path
) -> tuple[dict[str, tuple[Callable[[int], tuple[np.ndarray, int]], int]], dict[str, Any]]:
    """A UTF-8 text's windows exactly as `data=char_text` (stride null) makes them: its end held out in order, windows
    of block_size + 1 characters every block_size characters, the vocabulary every character of the whole text.
    The text is read in parts, twice (vocabulary, then ids into `out`), never whole: it may be larger than memory."""
    from zoo.data.char_lm import text_bounds

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise UserError(f"prepare --block-size: expected an integer >= 1, got {block_size!r}")
    if not source.is_file():
        raise UserError(f"prepare: '{source}' is not a file; allowed: a UTF-8 text file")
    chars, length = _text_vocab(source)
    bounds = text_bounds(length, block_size, val_fraction, test_fraction)
    dtype = np.int16 if len(chars) <= np.iinfo(np.int16).max else np.int32
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_text_ids(source, chars, length, out / TEXT_IDS, dtype)
    except BaseException:
        (out / TEXT_IDS).unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise
    splits = {}
    for split, part in bounds.items():
        count = (len(part) - (block_size + 1)) // block_size + 1
        splits[split] = (_TextWindow(out / TEXT_IDS, dtype, part.start, block_size, block_size + 1), count)
    meta = {"input_shape": [block_size + 1], "classes": [], "num_classes": len(chars), "scale": 1.0}
    return splits, meta | {"vocab": chars, "block_size": block_size}


def prepare(
    source: str,
    out: str,
    data_format: str = "image_folder",
    image_size: int = 64,
    channels: int = 3,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    split_seed: int = 0,
    chunk_bytes: str = "64MB",
    compression: str | None = None,
    num_workers: int = 1,
    target: str | None = None,
    block_size: int = 128,
) -> dict[str, Any]:
    """Write `source`'s splits as LitData chunks under `out/{train,val,test}` and describe them in `out/zoo.json`.

    Unset fractions are those of the in-memory data config of the format: 0.05 and 0.05 of a text (data=char_text),
    else 0.1 and 0.2."""
    from litdata import optimize

    from zoo.errors import check_split_fractions

    default_val, default_test = (0.05, 0.05) if data_format == "text" else (0.1, 0.2)
    val_fraction = default_val if val_fraction is None else val_fraction
    test_fraction = default_test if test_fraction is None else test_fraction
    check_split_fractions(val_fraction, test_fraction)
    source_path, out_path = Path(source).expanduser(), Path(out).expanduser()
    if not source_path.exists():
        raise UserError(f"prepare: no such source '{source}'")
    if out_path.exists() and any(out_path.iterdir()):
        raise UserError(f"prepare: '{out}' is not empty; give a new folder (nothing there is overwritten)")
    if data_format == "image_folder":
        splits, meta = _image_folder_splits(source_path, image_size, channels, val_fraction, test_fraction, split_seed)
    elif data_format == "tensor":
        splits, meta = _tensor_splits(source_path, val_fraction, test_fraction, split_seed)
    elif data_format == "csv":
        splits, meta = _csv_splits(source_path, target, val_fraction, test_fraction, split_seed)
    elif data_format == "text":
        splits, meta = _text_splits(source_path, block_size, val_fraction, test_fraction, out_path)
    else:
        raise UserError(f"prepare: --format {data_format!r} unknown; allowed: image_folder, tensor, csv, text")
    out_path.mkdir(parents=True, exist_ok=True)
    counts = {}
    try:
        for split, (read, count) in splits.items():
            if count == 0:
                raise UserError(f"prepare: the {split} split of '{source}' is empty; change the split fractions")
            optimize(
                fn=_Sample(read),
                inputs=list(range(count)),
                output_dir=str(out_path / split),
                chunk_bytes=chunk_bytes,
                compression=compression,
                num_workers=num_workers,
                # fork, as a DataLoader's workers do on Linux: spawn would import torch again in every writer, and
                # LitData sets the start method for the whole process
                start_method="fork" if sys.platform == "linux" else None,
                verbose=False,
            )
            counts[split] = count
    finally:
        for read, _ in splits.values():
            if isinstance(read, _TextWindow):
                read.close()
        (out_path / TEXT_IDS).unlink(missing_ok=True)
    meta.setdefault("num_classes", len(meta["classes"]))
    meta |= {"samples": counts, "format": data_format, "source": str(source_path)}
    (out_path / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
