"""Generated sequence-to-sequence tasks: reverse a digit string, sort it, add two numbers.

Sources and targets share one vocabulary: <pad>, <bos>, <eos>, the digits and '+'. A target is
<bos> answer <eos>; both are right-padded with <pad>. Val and test examples are drawn first and every
training example that equals one of them is redrawn, so held-out scores measure generalization.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from zoo.data.tensor import InMemoryDataModule
from zoo.errors import UserError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
TOKENS = (PAD, BOS, EOS, *"0123456789", "+")
TASKS = ("reverse", "sort", "addition")


def _digits(rng: np.random.Generator, min_len: int, max_len: int) -> str:
    length = int(rng.integers(min_len, max_len + 1))
    return "".join(map(str, rng.integers(0, 10, length)))


def _number(rng: np.random.Generator, min_len: int, max_len: int) -> str:
    """A number of min_len..max_len digits without leading zeros, each length equally likely."""
    length = int(rng.integers(min_len, max_len + 1))
    low = 0 if length == 1 else 10 ** (length - 1)
    return str(int(rng.integers(low, 10**length)))


def make_example(
    task: str, rng: np.random.Generator, min_len: int, max_len: int, pad_operands: bool = False
) -> tuple[str, str]:
    """One (source, target) pair as strings of vocabulary characters.

    pad_operands writes both operands of a sum with leading zeros to max_len digits, so that digits of equal
    place value sit at fixed positions; the numbers themselves still have min_len..max_len digits.
    """
    if task == "reverse":
        source = _digits(rng, min_len, max_len)
        return source, source[::-1]
    if task == "sort":
        source = _digits(rng, min_len, max_len)
        return source, "".join(sorted(source))
    a, b = _number(rng, min_len, max_len), _number(rng, min_len, max_len)
    total = str(int(a) + int(b))
    if pad_operands:
        a, b = a.zfill(max_len), b.zfill(max_len)
    return f"{a}+{b}", total


class Seq2SeqDataModule(InMemoryDataModule):
    """In-memory tensors of one generated task, fixed by `generator_seed`; batches reshuffled per epoch.

    min_len / max_len bound the digits of the source (reverse, sort) or of each operand (addition). Since no
    held-out source is ever trained on, a length with few possible sources (there are 10 one-digit strings) can end
    up wholly held out and never learned; the configs start at lengths with about 1,000 sources or more.
    """

    def __init__(
        self,
        task: str = "reverse",
        min_len: int = 1,
        max_len: int = 10,
        pad_operands: bool = True,
        num_train: int = 20000,
        num_val: int = 1000,
        num_test: int = 1000,
        generator_seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        shuffle_seed: int = 0,
        folds: int = 1,
        fold: int = 0,
    ) -> None:
        super().__init__()
        if folds > 1:
            raise UserError(
                f"cv.folds: {folds}; a generated task draws fresh held-out sequences (data.generator_seed) "
                "instead of folds; allowed: 1"
            )
        if task not in TASKS:
            raise UserError(f"data.task: unknown '{task}'; allowed: {', '.join(TASKS)}")
        if not 1 <= min_len <= max_len:
            raise UserError(f"data.min_len and data.max_len: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.task, self.min_len, self.max_len, self.pad_operands = task, min_len, max_len, pad_operands
        self.batch_size, self.eval_batch_size, self.shuffle_seed = batch_size, eval_batch_size, shuffle_seed
        self.tokens = list(TOKENS)
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.eos_id = self.index[PAD], self.index[BOS], self.index[EOS]
        self.source_length = 2 * max_len + 1 if task == "addition" else max_len
        # <bos> answer <eos>: a sum has at most one digit more than its longer operand
        self.target_length = (max_len + 1 if task == "addition" else max_len) + 2
        rng = np.random.default_rng(generator_seed)
        make: Callable[[], tuple[str, str]] = lambda: make_example(task, rng, min_len, max_len, pad_operands)  # noqa: E731
        held_out: set[str] = set()
        examples: dict[str, list[tuple[str, str]]] = {}
        for split, count in (("test", num_test), ("val", num_val)):
            examples[split] = [make() for _ in range(count)]
            held_out.update(s for s, _ in examples[split])
        train: list[tuple[str, str]] = []
        attempts = 0
        while len(train) < num_train:
            attempts += 1
            if attempts > 20 * num_train + 1000:
                raise UserError(
                    f"data.num_train: only {len(train)} training examples differ from the held-out ones; "
                    "allowed: fewer examples or a larger data.max_len"
                )
            pair = make()
            if pair[0] not in held_out:
                train.append(pair)
        examples["train"] = train
        self.examples = examples
        self.splits = {split: self._tensors(pairs) for split, pairs in examples.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, length: int, wrap: bool) -> list[int]:
        ids = [self.index[c] for c in text]
        if wrap:
            ids = [self.bos_id, *ids, self.eos_id]
        return ids + [self.pad_id] * (length - len(ids))

    def source_ids(self, text: str) -> list[int]:
        """A source written by hand (`123`, or `45+678` for sums) as a padded token row, written as the generator
        writes sources: operands with leading zeros where the run's had them."""
        if self.task == "addition":
            operands = text.split("+")
            if len(operands) != 2 or not all(o.isdecimal() and o.isascii() for o in operands):
                raise UserError(f"expected two numbers joined by '+' (e.g. 12+345), got {text!r}")
            if max(len(o) for o in operands) > self.max_len:
                raise UserError(f"{text!r} has an operand of more than the run's {self.max_len} digits")
            text = "+".join(o.zfill(self.max_len) if self.pad_operands else o for o in operands)
        elif not (text.isdecimal() and text.isascii()):
            raise UserError(f"expected a string of digits (e.g. 4721), got {text!r}")
        elif len(text) > self.source_length:
            raise UserError(f"{text!r} has more than the run's {self.source_length} digits")
        return self.encode(text, self.source_length, False)

    def decode(self, ids: list[int]) -> str:
        """The characters of a token row, up to its end token, without <bos> and padding."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(self.tokens[i])
        return "".join(out)

    def _tensors(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        src = torch.tensor([self.encode(s, self.source_length, False) for s, _ in pairs], dtype=torch.long)
        tgt = torch.tensor([self.encode(t, self.target_length, True) for _, t in pairs], dtype=torch.long)
        return src.reshape(len(pairs), self.source_length), tgt.reshape(len(pairs), self.target_length)
