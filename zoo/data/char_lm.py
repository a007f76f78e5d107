"""Character-level text for language models: any UTF-8 file, or a corpus that ships with Python.

The default corpus is the text of `pydoc_data.topics`: the Python language reference and library topics that
`help()` shows, about 465,000 characters of English prose with code, in every CPython installation (no
download, no extra package), and fixed for a given Python version.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from zoo.data.tensor import InMemoryDataModule
from zoo.errors import UserError

DEFAULT_CORPUS = "python-docs"


def default_corpus() -> str:
    """The help() topics of the running Python, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_text(path: str | None, key: str = "data.path") -> str:
    """The corpus as a string; an empty, undecodable or binary file is the user's error, in one line naming `key`."""
    if path in (None, "", DEFAULT_CORPUS):
        return default_corpus()
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{key}: no file at '{file}'; allowed: a UTF-8 text file, or null for the Python docs")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        problem = f"is not UTF-8 text (byte {error.start}); allowed: a UTF-8 text file"
        raise UserError(f"{key}: '{file}' {problem}") from error
    if not text:
        raise UserError(f"{key}: '{file}' is empty; a language model needs some text")
    if "\x00" in text:  # valid UTF-8, but a binary file (or UTF-16 text): its characters would mean nothing
        raise UserError(f"{key}: '{file}' holds NUL characters, so it is binary; allowed: a UTF-8 text file")
    return text


def text_bounds(length: int, block_size: int, val_fraction: float, test_fraction: float) -> dict[str, range]:
    """Where the train, val and test parts of a text of `length` characters lie: the held-out parts are its end, in
    order, so that `data=char_text` and `prepare --format text` cut a text alike."""
    n_val, n_test = int(length * val_fraction), int(length * test_fraction)
    n_train = length - n_val - n_test
    bounds = {
        "train": range(0, n_train),
        "val": range(n_train, n_train + n_val),
        "test": range(n_train + n_val, length),
    }
    for split, part in bounds.items():
        if len(part) < block_size + 1:
            raise UserError(
                f"data.block_size: the {split} part of the text has {len(part)} characters, fewer than "
                f"block_size + 1 = {block_size + 1}; use a longer text or a smaller block size"
            )
    return bounds


class CharVocab:
    """Characters to ids and back; the characters are stored with the model so sampling needs no corpus."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise UserError(
                f"prompt: characters not in the model's vocabulary: {', '.join(map(repr, unknown[:10]))}; "
                f"allowed: {''.join(c for c in self.chars if c.isprintable())!r}"
            )
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"chars": self.chars}, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> CharVocab:
        return cls(json.loads(path.read_text(encoding="utf-8"))["chars"])


class CharTextDataModule(InMemoryDataModule):
    """A text cut into contiguous train / val / test parts (the last val_fraction + test_fraction of it).

    Each part is cut into windows of block_size + 1 characters (input and next-character target); training
    windows start every `stride` characters (default block_size: no overlap) and are shuffled per epoch.
    Val and test windows do not overlap, so their mean loss is the per-character loss of the held-out text.
    The vocabulary is every character of the whole text, so evaluation never meets an unknown one.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 128,
        stride: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        shuffle_seed: int = 0,
        folds: int = 1,
        fold: int = 0,
    ) -> None:
        super().__init__()
        if folds > 1:
            raise UserError(
                f"cv.folds: {folds}; k-fold cross-validation does not apply to a text read in order "
                "(its held-out parts are its end); allowed: 1"
            )
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"data.block_size and data.batch_size must be >= 1, got {block_size}, {batch_size}")
        if val_fraction <= 0 or test_fraction <= 0 or val_fraction + test_fraction >= 1:
            raise ValueError("data.val_fraction and data.test_fraction must be > 0 and sum to less than 1")
        self.path, self.block_size, self.stride = path, block_size, stride or block_size
        self.batch_size, self.eval_batch_size, self.shuffle_seed = batch_size, eval_batch_size, shuffle_seed
        text = read_text(path)
        self.vocab = CharVocab.from_text(text)
        ids = torch.tensor(self.vocab.encode(text), dtype=torch.long)
        bounds = text_bounds(len(ids), block_size, val_fraction, test_fraction)
        self.text_parts = {split: ids[part.start : part.stop] for split, part in bounds.items()}
        self.splits = {
            split: self._windows(part, self.stride if split == "train" else block_size)
            for split, part in self.text_parts.items()
        }

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def prompt(self, length: int) -> str:
        """The first `length` characters of the validation text: the start of the samples the task writes."""
        return self.vocab.decode(self.text_parts["val"][:length].tolist())

    def _windows(self, ids: torch.Tensor, stride: int) -> torch.Tensor:
        return ids.unfold(0, self.block_size + 1, stride).contiguous()
