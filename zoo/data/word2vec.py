"""A tokenised text for word2vec: vocabulary, sub-sampling, dynamic windows, negative samples, analogy questions.

The corpus is a plain text file with one sentence (or article) per line and tokens separated by white space;
lines longer than `max_sentence_length` tokens are cut, as gensim's LineSentence cuts them. The default is the
English Wikipedia text that scripts/fetch_word2vec_data.py takes out of gensim's wheel.

The examples of an epoch are drawn from a generator seeded with (seed, epoch): which frequent words are dropped,
each centre word's window, the order and the negatives. So a resumed run sees the batches an uninterrupted one saw,
and nothing here touches the global random state.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from zoo.errors import UserError

log = logging.getLogger(__name__)

MODES = ("skipgram", "cbow")
FETCH_HINT = "python scripts/fetch_word2vec_data.py puts enwiki.txt and questions-words.txt into data/word2vec"
# at most this many held-out examples score val/loss and test/loss
MAX_HELD_OUT = 200_000


def read_sentences(path: str | Path | None, lowercase: bool, max_sentence_length: int) -> list[list[str]]:
    """The corpus as lists of tokens, one per line (long lines cut); a missing or unreadable file is one line."""
    if path is None or str(path).strip() in ("", "None"):
        raise UserError(f"data.path: not set; allowed: a text file with one sentence per line ({FETCH_HINT})")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise UserError(f"data.path: no file at '{file}'; allowed: a UTF-8 text file ({FETCH_HINT})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"data.path: '{file}' is not UTF-8 text (byte {error.start})") from error
    if lowercase:
        text = text.lower()
    sentences = []
    for line in text.splitlines():
        tokens = line.split()
        sentences += [tokens[k : k + max_sentence_length] for k in range(0, len(tokens), max_sentence_length)]
    if not sentences:
        raise UserError(f"data.path: '{file}' holds no words")
    return sentences


def build_vocab(counts: Counter[str], min_count: int, max_vocab: int | None) -> list[str]:
    """Words seen at least min_count times, most frequent first (ties alphabetical), at most max_vocab of them."""
    words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return words if max_vocab is None else words[:max_vocab]


def keep_probabilities(counts: np.ndarray, sample: float) -> np.ndarray:
    """The chance that each occurrence of a word is kept by sub-sampling, word2vec.c's formula (as in gensim):
    (sqrt(f / t) + 1) * t / f for a word of frequency f = count / total and threshold t; 1 at most, and 1 for all
    words when sample is 0. Words rarer than about t are always kept; "the" at f = 0.06 and t = 1e-3 keeps 15%."""
    if sample <= 0:
        return np.ones(len(counts))
    frequency = counts / counts.sum()
    return np.minimum(1.0, (np.sqrt(frequency / sample) + 1.0) * sample / frequency)


def noise_distribution(counts: np.ndarray, power: float = 0.75) -> np.ndarray:
    """P(w) proportional to count(w)^0.75: the negative-sampling noise of Mikolov et al. (2013)."""
    weights = counts.astype(np.float64) ** power
    return weights / weights.sum()


class AliasSampler:
    """Draws from a discrete distribution in constant time per draw (Walker's alias method, Vose's construction).

    Why: an epoch needs millions of noise words, and inverting the CDF costs a binary search over the vocabulary per
    draw, which took 15% of a skip-gram epoch; word2vec.c's table of 10^8 slots is fast but rounds every probability to
    a multiple of 10^-8. Here each of the n cells keeps its own word with chance `accept[k]` and else gives
    `alias[k]`, so a draw is one uniform cell and one uniform number, and the probabilities are exact (to float64).
    """

    def __init__(self, probabilities: np.ndarray) -> None:
        scaled = np.asarray(probabilities, dtype=np.float64)
        scaled = scaled * (len(scaled) / scaled.sum())
        self.accept = np.ones(len(scaled))
        self.alias = np.arange(len(scaled))
        small = [k for k in range(len(scaled)) if scaled[k] < 1.0]
        large = [k for k in range(len(scaled)) if scaled[k] >= 1.0]
        while small and large:
            low, high = small.pop(), large[-1]
            self.accept[low], self.alias[low] = scaled[low], high
            scaled[high] -= 1.0 - scaled[low]  # `high` fills the rest of `low`'s cell
            if scaled[high] < 1.0:
                small.append(large.pop())
        # what is left holds 1 up to rounding: those cells keep their own word (accept stays 1)

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        cells = rng.integers(0, len(self.accept), size=shape)
        return np.where(rng.random(shape) < self.accept[cells], cells, self.alias[cells])


def skipgram_pairs(
    ids: np.ndarray, sentence: np.ndarray, windows: np.ndarray, max_window: int
) -> tuple[np.ndarray, np.ndarray]:
    """(centre, context) pairs: every word within `windows[i]` positions of word i in the same sentence."""
    centres, contexts = [], []
    for offset in range(1, max_window + 1):
        same = sentence[:-offset] == sentence[offset:]
        right = same & (windows[:-offset] >= offset)  # the word `offset` after i is in i's window
        left = same & (windows[offset:] >= offset)  # the word `offset` before i is in i's window
        centres += [ids[:-offset][right], ids[offset:][left]]
        contexts += [ids[offset:][right], ids[:-offset][left]]
    if not centres:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(centres), np.concatenate(contexts)


def cbow_examples(
    ids: np.ndarray, sentence: np.ndarray, windows: np.ndarray, max_window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context words (N, 2 * max_window), their mask, centre word) for every word with at least one context word."""
    offsets = np.concatenate([np.arange(-max_window, 0), np.arange(1, max_window + 1)])
    position = np.arange(len(ids))[:, None] + offsets[None, :]
    inside = (position >= 0) & (position < len(ids))
    position = position.clip(0, max(len(ids) - 1, 0))
    mask = inside & (np.abs(offsets)[None, :] <= windows[:, None]) & (sentence[position] == sentence[:, None])
    some = mask.any(1)
    return np.where(mask, ids[position], 0)[some], mask[some], ids[some]


@dataclass
class Examples:
    """One epoch (or a held-out split) of examples as tensors: inputs (B,) for skip-gram or (B, C) for CBOW, the
    mask of CBOW's context slots ((B, 0) for skip-gram), the target word (B,) and K negatives (B, K)."""

    inputs: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, index: slice) -> tuple[torch.Tensor, ...]:
        return self.inputs[index], self.mask[index], self.targets[index], self.negatives[index]


class EpochBatches:
    """The batches of one training epoch, drawn afresh from (seed, epoch) when iterated.

    The number of batches is fixed (that of epoch 0, so that Lightning and the learning-rate decay know the run's
    length); an epoch whose sub-sampling kept a few more or fewer words cuts its examples into that many slightly
    larger or smaller batches. Lightning calls `set_epoch(e)` before each epoch, as for a DistributedSampler; under
    DDP each rank takes every world_size-th batch.

    With `data.prefetch`, the next epoch's examples are drawn in a background thread while this one trains (NumPy
    lets go of the GIL in the large array operations that drawing is made of). An epoch's examples depend on
    (shuffle_seed, epoch) alone, so they are the same numbers either way.
    """

    batch_sampler = None

    def __init__(self, data: WordCorpusDataModule, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        self.data, self.device, self.rank, self.world_size = data, device, rank, world_size
        self.epoch = 0
        self._next: tuple[int, Future[Examples]] | None = None

    @property
    def sampler(self) -> EpochBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.data.batches_per_epoch, self.world_size))

    def _epoch_examples(self) -> Examples:
        drawn, self._next = self._next, None
        examples = drawn[1].result() if drawn and drawn[0] == self.epoch else self.data.epoch_examples(self.epoch)
        if self.data.prefetch:
            self._next = (self.epoch + 1, _drawing_thread().submit(self.data.epoch_examples, self.epoch + 1))
        return examples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        examples = self._epoch_examples()
        bounds = np.linspace(0, len(examples), self.data.batches_per_epoch + 1).round().astype(np.int64)
        for k in range(self.rank, self.data.batches_per_epoch, self.world_size):
            yield tuple(t.to(self.device) for t in examples.batch(slice(int(bounds[k]), int(bounds[k + 1]))))


_DRAWING: list[ThreadPoolExecutor] = []


def _drawing_thread() -> ThreadPoolExecutor:
    if not _DRAWING:
        _DRAWING.append(ThreadPoolExecutor(1, thread_name_prefix="word2vec-examples"))
    return _DRAWING[0]


class HeldOutBatches:
    """Fixed held-out examples in order, cut into eval_batch_size batches (val/loss, test/loss)."""

    batch_sampler = None

    def __init__(self, examples: Examples, batch_size: int, device: torch.device) -> None:
        self.examples, self.batch_size, self.device = examples, batch_size, device

    @property
    def sampler(self) -> HeldOutBatches:
        return self

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(self.examples), self.batch_size):
            yield tuple(t.to(self.device) for t in self.examples.batch(slice(start, start + self.batch_size)))


def read_analogies(path: str | Path) -> tuple[list[str], list[tuple[str, str, str, str]], list[int]]:
    """The questions of a questions-words.txt file (`: section` lines, then `a b c d` lines): section names, the
    questions lower-cased, and each question's section index."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise UserError(f"data.analogy_path: no file at '{file}'; allowed: a questions-words.txt file or null")
    sections: list[str] = []
    questions: list[tuple[str, str, str, str]] = []
    section_of: list[int] = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            sections.append(line[1:].strip())
            continue
        words = line.lower().split()
        if len(words) == 4:
            questions.append((words[0], words[1], words[2], words[3]))
            section_of.append(max(len(sections) - 1, 0))
    if not questions:
        raise UserError(f"data.analogy_path: '{file}' holds no questions (lines of four words: a b c d)")
    return sections or ["all"], questions, section_of


class WordCorpusDataModule(L.LightningDataModule):
    """A tokenised corpus: the first 1 - val_fraction - test_fraction of its words train, the next val_fraction
    score `val/loss` and the last test_fraction `test/loss` (negative-sampling loss on every pair of the held-out
    text at the full window, fixed negatives). The vocabulary comes from the training words only.

    Analogy questions (`analogy_path`) are split in two by position in the file, alternately, so that every
    section lands in both halves: the even-numbered ones are validation questions, the odd ones test questions.

    The model sets how examples are drawn (`configure`: skip-gram or CBOW, window, sub-sampling threshold,
    negatives), since those are its keys; the data only draws them.
    """

    def __init__(
        self,
        path: str | None = None,
        analogy_path: str | None = None,
        min_count: int = 5,
        max_vocab: int | None = None,
        lowercase: bool = False,
        max_sentence_length: int = 10_000,
        batch_size: int = 4096,
        eval_batch_size: int = 16384,
        val_fraction: float = 0.02,
        test_fraction: float = 0.02,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        prefetch: bool = True,
        folds: int = 1,
        fold: int = 0,
    ) -> None:
        super().__init__()
        if folds > 1:
            raise UserError(f"cv.folds: {folds}; k-fold cross-validation does not apply to word2vec; allowed: 1")
        self.prefetch = bool(prefetch)
        for key, value, least in (("min_count", min_count, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"data.{key}: expected an integer >= {least}, got {value!r}")
        if max_vocab is not None and (isinstance(max_vocab, bool) or not isinstance(max_vocab, int) or max_vocab < 1):
            raise UserError(f"data.max_vocab: expected an integer >= 1 or null, got {max_vocab!r}")
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
                raise UserError(f"data.{key}: expected a number in (0, 0.5), got {value!r}")
        self.path, self.batch_size, self.eval_batch_size = path, batch_size, eval_batch_size
        self.shuffle_seed, self.split_seed = shuffle_seed, split_seed
        sentences = read_sentences(path, lowercase, max_sentence_length)
        # one stream of (sentence number, token); the held-out parts are its end, cut between any two words
        lengths = np.fromiter((len(s) for s in sentences), np.int64, len(sentences))
        sentence_of = np.repeat(np.arange(len(sentences)), lengths)
        tokens = [t for s in sentences for t in s]
        total = len(tokens)
        n_val, n_test = int(total * val_fraction), int(total * test_fraction)
        n_train = total - n_val - n_test
        if min(n_train, n_val, n_test) < 2:
            raise UserError(f"data.path: '{path}' has {total} words, too few to hold out val and test parts")
        counts = Counter(tokens[:n_train])
        self.words = build_vocab(counts, min_count, max_vocab)
        if not self.words:
            raise UserError(
                f"data.min_count: {min_count} leaves no word of '{path}' in the vocabulary (its most frequent word "
                f"is seen {max(counts.values())} times); allowed: 1 .. {max(counts.values())}"
            )
        self.index = {w: k for k, w in enumerate(self.words)}
        self.counts = np.array([counts[w] for w in self.words], dtype=np.int64)
        ids = np.fromiter((self.index.get(t, -1) for t in tokens), np.int64, total)
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, total)}
        self.parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, (begin, end) in bounds.items():
            known = ids[begin:end] >= 0  # words outside the vocabulary are dropped before windows, as word2vec.c does
            # each part is windowed on its own: no window reaches across a cut
            self.parts[split] = (ids[begin:end][known], sentence_of[begin:end][known])
        self.train_words = int(self.counts.sum())
        self.raw_train_words = n_train
        self.noise = noise_distribution(self.counts)
        self.noise_sampler = AliasSampler(self.noise)
        self.analogy_path = analogy_path
        self.analogies = read_analogies(analogy_path) if analogy_path else None
        self.mode, self.window, self.sample, self.negatives = "skipgram", 5, 1e-3, 5
        self.batches_per_epoch = 1
        self._held_out: dict[str, Examples] = {}

    # ---------------------------------------------------------------- set by the model

    def configure(self, mode: str, window: int, sample: float, negatives: int) -> None:
        """How examples are drawn: the model's keys (model.mode, window, sample, negatives)."""
        self.mode, self.window, self.sample, self.negatives = mode, window, sample, negatives
        self.keep = keep_probabilities(self.counts, sample)
        self._held_out = {}
        first = len(self.epoch_examples(0, negatives=False))
        self.batches_per_epoch = max(1, -(-first // self.batch_size))

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def draw_negatives(self, rng: np.random.Generator, count: int) -> torch.Tensor:
        """`count` x K words from the unigram^0.75 noise (AliasSampler: exact, constant time per draw)."""
        return torch.from_numpy(self.noise_sampler.draw(rng, (count, self.negatives)))

    def _examples(
        self, ids: np.ndarray, sentence: np.ndarray, windows: np.ndarray, rng: np.random.Generator, negatives: bool
    ) -> Examples:
        if self.mode == "skipgram":
            inputs, targets = skipgram_pairs(ids, sentence, windows, self.window)
            mask = np.zeros((len(targets), 0), dtype=bool)
        else:
            inputs, mask, targets = cbow_examples(ids, sentence, windows, self.window)
        order = rng.permutation(len(targets))
        inputs, mask, targets = inputs[order], mask[order], targets[order]
        drawn = (
            self.draw_negatives(rng, len(targets)) if negatives else torch.zeros((len(targets), 0), dtype=torch.long)
        )
        return Examples(torch.from_numpy(inputs), torch.from_numpy(mask), torch.from_numpy(targets), drawn)

    def epoch_examples(self, epoch: int, negatives: bool = True) -> Examples:
        """The training examples of an epoch, shuffled: sub-sampled words dropped first (so windows reach past them,
        as in word2vec.c), then one window size per centre word, uniform in 1..window."""
        rng = np.random.default_rng([self.shuffle_seed, epoch])
        ids, sentence = self.subsampled(rng)
        windows = rng.integers(1, self.window + 1, size=len(ids))
        return self._examples(ids, sentence, windows, rng, negatives)

    def subsampled(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The training words (and their sentence numbers) that one draw of sub-sampling keeps."""
        ids, sentence = self.parts["train"]
        kept = rng.random(len(ids)) < self.keep[ids]
        return ids[kept], sentence[kept]

    def held_out(self, split: str) -> Examples:
        """Every example of the held-out text at the full window, no sub-sampling, negatives fixed by split_seed."""
        if split not in self._held_out:
            rng = np.random.default_rng([self.split_seed, 1 if split == "val" else 2])
            ids, sentence = self.parts[split]
            examples = self._examples(ids, sentence, np.full(len(ids), self.window), rng, True)
            self._held_out[split] = Examples(*(t[:MAX_HELD_OUT] for t in examples.batch(slice(None))))
        return self._held_out[split]

    def train_sentences(self) -> list[list[str]]:
        """The training words in the vocabulary, sentence by sentence: what the model trains on (for benchmarks)."""
        ids, sentence = self.parts["train"]
        cuts = np.flatnonzero(np.diff(sentence)) + 1
        return [[self.words[k] for k in part] for part in np.split(ids, cuts) if len(part)]

    # ---------------------------------------------------------------- loaders

    def _device(self) -> tuple[torch.device, int, int]:
        trainer = self.trainer
        if trainer is None:
            return torch.device("cpu"), 0, 1
        return trainer.strategy.root_device, trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> EpochBatches:
        device, rank, world = self._device()
        return EpochBatches(self, device, rank, world)

    def val_dataloader(self) -> HeldOutBatches:
        return HeldOutBatches(self.held_out("val"), self.eval_batch_size, self._device()[0])

    def test_dataloader(self) -> HeldOutBatches:
        return HeldOutBatches(self.held_out("test"), self.eval_batch_size, self._device()[0])

    def summary(self) -> str:
        sizes = "/".join(str(len(self.parts[s][0])) for s in ("train", "val", "test"))
        return (
            f"{self.path}: vocabulary {len(self.words)} words; train/val/test words in it {sizes}; "
            f"{self.batches_per_epoch} batches an epoch"
        )

    def state_dict(self) -> dict[str, Any]:
        return {}
