"""Sequence to sequence: teacher-forced training, greedy and beam-search decoding, exact-match accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MaxMetric, MeanMetric

from zoo.errors import UserError
from zoo.optim import configure_optimizers
from zoo.tasks import figures

if TYPE_CHECKING:
    from zoo.data.seq2seq import Seq2SeqDataModule

SHOWN_EXAMPLES = 8


class Seq2SeqTask(L.LightningModule):
    """Trains an encoder-decoder (transformer.Seq2SeqTransformer, rnn.Seq2SeqRNN) on (source, <bos> target <eos>) pairs.

    Training feeds the target shifted right (teacher forcing) and scores every next token, padding ignored.
    Validation decodes greedily: `val/exact_match` is the share of sequences decoded exactly up to <eos>,
    `val/token_acc` the teacher-forced share of right tokens. Testing decodes greedily
    (`test/exact_match_greedy`) and, with beam_size > 1, by beam search (`test/exact_match_beam`);
    `test/exact_match` is the beam search's figure when there is one, else the greedy one.
    """

    def __init__(
        self,
        data: Seq2SeqDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/exact_match",
        beam_size: int = 4,
        length_penalty: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not hasattr(data, "target_length"):
            raise UserError(f"model: seq2seq needs data=seq2seq_reverse, _sort or _addition, not {type(data).__name__}")
        if beam_size < 1:
            raise UserError(f"model.beam_size: {beam_size}; allowed: an integer >= 1 (1 is greedy decoding)")
        if isinstance(net, nn.Module):
            self.net = net
        else:
            self.net = net(
                vocab_size=data.vocab_size,
                pad_id=data.pad_id,
                max_len=max(data.source_length, data.target_length),
            )
        self.make_optimizer, self.make_scheduler, self.monitor = optimizer, scheduler, monitor
        self.beam_size, self.length_penalty, self.label_smoothing = beam_size, length_penalty, label_smoothing
        self.tokens = list(data.tokens)
        self.pad_id, self.bos_id, self.eos_id = data.pad_id, data.bos_id, data.eos_id
        self.target_length = data.target_length
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_token_acc, self.test_token_acc = MeanMetric(), MeanMetric()
        self.val_exact = MeanMetric()
        self.test_exact = nn.ModuleDict({"greedy": MeanMetric(), "beam": MeanMetric()})
        self.val_exact_best = MaxMetric()
        self.val_exact_best.persistent(True)  # part of the checkpoint, so a resumed run keeps its best
        self.shown: list[str] = []

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.net(src, tgt_in)

    def _teacher_forced(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        src, tgt = batch
        logits = self.net(src, tgt[:, :-1])
        targets = tgt[:, 1:]
        smoothing = self.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=self.pad_id,
            label_smoothing=smoothing,
        )
        real = targets != self.pad_id
        token_acc = ((logits.argmax(dim=-1) == targets) & real).sum() / real.sum()
        return loss, token_acc

    def _canonical(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows cut to target_length with everything after the first <eos> set to padding."""
        rows = rows[:, : self.target_length]
        if rows.shape[1] < self.target_length:
            rows = F.pad(rows, (0, self.target_length - rows.shape[1]), value=self.pad_id)
        after_end = (rows == self.eos_id).long().cumsum(dim=1) - (rows == self.eos_id).long() > 0
        return rows.masked_fill(after_end, self.pad_id)

    def decode(self, src: torch.Tensor, beam_size: int | None = None) -> torch.Tensor:
        """Token rows <bos> ... <eos> for each source row: greedy with beam_size 1, beam search above."""
        beam = self.beam_size if beam_size is None else beam_size
        if beam == 1:
            return self.net.greedy(src, self.bos_id, self.eos_id, self.target_length)
        return self.net.beam_search(src, self.bos_id, self.eos_id, self.target_length, beam, self.length_penalty)

    def exact_matches(self, predicted: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return (self._canonical(predicted) == self._canonical(tgt)).all(dim=1).float()

    def text(self, row: list[int]) -> str:
        out = []
        for i in row:
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(self.tokens[i])
        return "".join(out)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._teacher_forced(batch)
        self.train_loss.update(loss.detach())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, token_acc = self._teacher_forced(batch)
        self.val_loss.update(loss, weight=len(batch[0]))
        self.val_token_acc.update(token_acc, weight=len(batch[0]))
        predicted = self.decode(batch[0], beam_size=1)
        self.val_exact.update(self.exact_matches(predicted, batch[1]))
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/token_acc", self.val_token_acc, on_epoch=True)
        self.log("val/exact_match", self.val_exact, on_epoch=True, prog_bar=True)
        if batch_idx == 0:
            self._remember(batch, predicted)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the sanity check's untrained score is no "best"
            self.shown = []
            return
        self.val_exact_best(self.val_exact.compute())
        self.log("val/exact_match_best", self.val_exact_best.compute(), prog_bar=True)
        self._write_examples("val/examples")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, token_acc = self._teacher_forced(batch)
        self.test_loss.update(loss, weight=len(batch[0]))
        self.test_token_acc.update(token_acc, weight=len(batch[0]))
        self.log("test/loss", self.test_loss, on_epoch=True)
        self.log("test/token_acc", self.test_token_acc, on_epoch=True)
        greedy = self.decode(batch[0], beam_size=1)
        self.test_exact["greedy"].update(self.exact_matches(greedy, batch[1]))
        self.log("test/exact_match_greedy", self.test_exact["greedy"], on_epoch=True)
        best = greedy
        if self.beam_size > 1:
            best = self.decode(batch[0])
            self.test_exact["beam"].update(self.exact_matches(best, batch[1]))
            self.log("test/exact_match_beam", self.test_exact["beam"], on_epoch=True)
        if batch_idx == 0:
            self._remember(batch, best)

    def on_test_epoch_end(self) -> None:
        chosen = self.test_exact["beam" if self.beam_size > 1 else "greedy"]
        self.log("test/exact_match", chosen.compute())
        self._write_examples("test/examples")

    def _remember(self, batch: tuple[torch.Tensor, torch.Tensor], predicted: torch.Tensor) -> None:
        src, tgt = (t[:SHOWN_EXAMPLES].tolist() for t in batch)
        rows = predicted[:SHOWN_EXAMPLES].tolist()
        self.shown = [
            f"{'ok ' if self.text(p) == self.text(t) else 'BAD'} `{self.text(s)}` -> `{self.text(p)}` "
            f"(want `{self.text(t)}`)"
            for s, t, p in zip(src, tgt, rows)
        ]

    def _write_examples(self, tag: str) -> None:
        writer = figures.tensorboard_writer(self.loggers)
        shown, self.shown = self.shown, []
        if writer is not None and self.trainer.is_global_zero and shown:
            writer.add_text(tag, "  \n".join(shown), self.global_step)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self)
