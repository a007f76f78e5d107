"""Character language model: next-character cross-entropy, bits per character, perplexity, sampled text."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MinMetric

from zoo.data.char_lm import CharVocab
from zoo.errors import UserError
from zoo.optim import configure_optimizers
from zoo.tasks import figures

if TYPE_CHECKING:
    from zoo.data.char_lm import CharTextDataModule
    from zoo.data.streaming import StreamingTextDataModule


class CharLMTask(L.LightningModule):
    """Trains a language model (zoo.nn.transformer.DecoderLM, zoo.nn.rnn.RNNLanguageModel) on a CharTextDataModule
    (or its windows streamed from chunks, zoo.data.streaming.StreamingTextDataModule).

    Logs `train/loss`, `val/loss`, `val/bpc` (loss / ln 2), `val/ppl` (exp loss), `val/ppl_best`, `test/*`,
    and after every validation a sampled continuation to TensorBoard's text tab. The vocabulary is a buffer
    of the model (its characters' code points), so a checkpoint alone rebuilds it; it is also written to
    `vocab.json` in the run folder. `evaluate.py mode=sample prompt=...` prints a continuation.
    """

    eval_modes = ("sample",)

    def __init__(
        self,
        data: CharTextDataModule | StreamingTextDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/loss",
        sample_tokens: int = 200,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = None,
        tbptt_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(data, "vocab"):
            raise UserError(
                f"model: a language model needs text data, data=char_text or data=streaming_text, "
                f"not {type(data).__name__}"
            )
        self.net = net if isinstance(net, nn.Module) else net(vocab_size=data.vocab_size, block_size=data.block_size)
        if tbptt_steps is not None and (tbptt_steps < 1 or not hasattr(self.net, "forward_state")):
            raise UserError(
                f"model.tbptt_steps: {tbptt_steps}; allowed: null, or an integer >= 1 with a recurrent net "
                "(zoo.nn.rnn.RNNLanguageModel)"
            )
        self.tbptt_steps = tbptt_steps
        if getattr(self.net, "block_size", data.block_size) < data.block_size:
            raise UserError(
                f"data.block_size: {data.block_size} is longer than the model's context {self.net.block_size}"
            )
        self.make_optimizer, self.make_scheduler, self.monitor = optimizer, scheduler, monitor
        self.register_buffer("vocab_codes", torch.tensor([ord(c) for c in data.vocab.chars], dtype=torch.long))
        self.sample_tokens, self.sample_temperature, self.sample_top_k = sample_tokens, sample_temperature, sample_top_k
        self.sample_prompt = data.prompt(min(32, data.block_size // 2))
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_ppl_best = MinMetric()
        self.val_ppl_best.persistent(True)  # part of the checkpoint, so a resumed run keeps its best

    @property
    def vocab(self) -> CharVocab:
        return CharVocab([chr(c) for c in self.vocab_codes.tolist()])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, int]:
        windows = batch[0]
        targets = windows[:, 1:]
        if self.tbptt_steps is not None and self.training:
            return self._truncated_loss(windows[:, :-1], targets), targets.numel()
        logits = self.net(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)), targets.numel()

    def _truncated_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Truncated backpropagation through time (Williams & Peng 1990): the window runs in chunks of tbptt_steps.

        The recurrent state carries forward from chunk to chunk but is detached at each boundary, so gradients
        flow back at most tbptt_steps characters; the chunks' losses are summed into one update per batch.
        """
        state, total = None, inputs.new_zeros((), dtype=torch.float32)
        for start in range(0, inputs.shape[1], self.tbptt_steps):
            chunk = slice(start, start + self.tbptt_steps)
            if state is not None:
                state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
            logits, state = self.net.forward_state(inputs[:, chunk], state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[:, chunk].reshape(-1))
            total = total + loss * targets[:, chunk].numel()
        return total / targets.numel()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.train_loss.update(loss.detach())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.val_loss.update(loss, weight=count)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        loss = float(self.val_loss.compute())
        self.log("val/bpc", loss / math.log(2))
        self.log("val/ppl", math.exp(loss))
        if self.trainer.sanity_checking:  # the sanity check's untrained score is no "best"
            return
        self.val_ppl_best(torch.tensor(math.exp(loss)))
        self.log("val/ppl_best", self.val_ppl_best.compute(), prog_bar=True)
        self._write_sample()

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss, count = self._loss(batch)
        self.test_loss.update(loss, weight=count)
        self.log("test/loss", self.test_loss, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        loss = float(self.test_loss.compute())
        self.log("test/bpc", loss / math.log(2))
        self.log("test/ppl", math.exp(loss))

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero and self.trainer.default_root_dir:
            folder = Path(self.trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.vocab.save(folder / "vocab.json")

    def _write_sample(self) -> None:
        """A continuation of the start of the validation text, drawn with its own seeded generator.

        The generator leaves the global random state alone, so samples do not change training or resuming.
        """
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or not self.trainer.is_global_zero or self.sample_tokens <= 0:
            return
        generator = torch.Generator(device=self.device).manual_seed(self.global_step)
        text = self.sample(
            self.sample_prompt, self.sample_tokens, self.sample_temperature, self.sample_top_k, generator
        )
        # TensorBoard's text tab renders markdown: indent by four spaces to show the text as it is
        writer.add_text("samples", "    " + text.replace("\n", "\n    "), self.global_step)

    @torch.no_grad()
    def sample(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """The prompt followed by `max_new_tokens` sampled characters."""
        if temperature < 0:
            raise UserError(f"temperature: {temperature} is negative; allowed: 0 (most likely character) or more")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k: {top_k}; allowed: an integer >= 1, or null for no truncation")
        vocab = self.vocab
        if not prompt:
            prompt = "\n" if "\n" in vocab.index else vocab.chars[0]
        ids = vocab.encode(prompt)
        context = getattr(self.net, "block_size", None)  # a recurrent LM has no context limit
        if context is not None and len(ids) > context:
            raise UserError(
                f"prompt: {len(ids)} characters is longer than the model's context of {context}; "
                f"allowed: at most {context} characters"
            )
        was_training = self.training
        self.eval()
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.net.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
        self.train(was_training)
        return vocab.decode(out[0].tolist())

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """`evaluate.py mode=sample prompt="..." max_new_tokens=200 temperature=0.8 top_k=...` prints a continuation."""
        print(self.sample_as_asked(str(cfg.get("prompt") or ""), cfg))
        return {}

    def sample_as_asked(self, prompt: str, cfg: Any) -> str:
        """`sample` with evaluate.py's max_new_tokens, temperature, top_k and sample_seed (a fresh generator per
        prompt, so that each prompt's draw does not depend on the prompts before it)."""
        generator = None
        if cfg.get("sample_seed") is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(cfg.sample_seed))
        top_k = cfg.get("top_k")
        return self.sample(
            prompt,
            int(cfg.get("max_new_tokens", 200)),
            float(cfg.get("temperature", 0.8)),
            None if top_k is None else int(top_k),
            generator,
        )

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self)
