"""word2vec training: negative sampling on sub-sampled, dynamically windowed text, scored by word analogies.

The task takes the run's WordCorpusDataModule itself (`data`, handed over by zoo.run.build_model): the tables are
sized by its vocabulary, and the model's keys (mode, window, sample, negatives) tell it how to draw examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MinMetric

from zoo.errors import UserError
from zoo.nn.word2vec import MODES, analogy, nearest, negative_sampling_loss, unit_rows
from zoo.optim import lr_scheduler_config
from zoo.tasks import figures

if TYPE_CHECKING:
    from zoo.data.word2vec import WordCorpusDataModule

LR_DECAYS = ("linear", "none")
# words of the PCA picture when model.plot_words is null: the pairs of the classic analogy figures
PLOT_WORDS = (
    "king queen man woman prince princess father mother son daughter boy girl "
    "france paris germany berlin italy rome spain madrid china beijing japan tokyo"
)
# analogy questions scored in one matrix product
ANALOGY_CHUNK = 1024


def _positive_int(key: str, value: object, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{key}: expected an integer >= {least}, got {value!r}")
    return value


class Word2VecTask(L.LightningModule):
    """Skip-gram or CBOW (model.mode) with `negatives` noise words per example from the unigram^0.75 distribution,
    frequent words sub-sampled at threshold `sample`, and a window drawn uniformly in 1..window per centre word.

    The loss is summed over a batch's examples, so that plain SGD (model.net.sparse embedding gradients) takes
    word2vec.c's step per example (with `fused_sgd`, computed by hand: Word2Vec.sgd_step, which takes a batch in
    steps of `sgd_chunk` examples at the batch's rate); `lr_decay: linear` lowers the rate linearly over the run's
    steps to `min_lr_fraction` of the start, as word2vec.c does (gensim: to min_alpha = 1e-4). A step sums the
    updates of every example that touches a row, computed at the same weights: where a step holds a word hundreds
    of times (tiny vocabularies, very large steps) that can overshoot; the divergence guard then names the step, and
    a smaller model.sgd_chunk (data.batch_size without fused SGD) or lr fixes it.

    Logs `train/loss` (per example), `val/loss` and `test/loss` (held-out text, fixed negatives), and where the data
    has analogy questions, `val/analogy_acc` on its validation half and `test/analogy_acc` on its test half
    (`test/analogy_acc_all` on all of them; `*/analogy_questions`: how many had all four words in the vocabulary).
    At test time the word vectors go to TensorBoard's projector, labelled by word, and a PCA picture of
    `plot_words` to TensorBoard and `<run>/word2vec_pca.png`.
    """

    eval_modes = ("neighbors", "analogy")

    def __init__(
        self,
        data: WordCorpusDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/loss",
        mode: str = "skipgram",
        window: int = 5,
        negatives: int = 5,
        sample: float = 1e-3,
        lr_decay: str = "linear",
        min_lr_fraction: float = 1e-4,
        projector_words: int = 2000,
        plot_words: Sequence[str] | None = None,
        fused_sgd: bool = True,
        sgd_chunk: int | None = 1024,
    ) -> None:
        super().__init__()
        if not hasattr(data, "words"):
            raise UserError(f"model: word2vec needs a text corpus, data=word_corpus, not {type(data).__name__}")
        if mode not in MODES:
            raise UserError(f"model.mode: unknown {mode!r}; allowed: {', '.join(MODES)}")
        negatives = _positive_int("model.negatives", negatives)
        window = _positive_int("model.window", window)
        if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 <= sample < 1:
            raise UserError(f"model.sample: expected a number in [0, 1) (0: no sub-sampling), got {sample!r}")
        if lr_decay not in LR_DECAYS:
            raise UserError(f"model.lr_decay: unknown {lr_decay!r}; allowed: {', '.join(LR_DECAYS)}")
        if lr_decay == "linear" and scheduler is not None:
            raise UserError("scheduler: model.lr_decay=linear is the schedule; allowed: scheduler=none")
        if not 0 <= min_lr_fraction <= 1:
            raise UserError(f"model.min_lr_fraction: expected a number in [0, 1], got {min_lr_fraction!r}")
        self.mode, self.window, self.negatives, self.sample = mode, window, negatives, float(sample)
        self.lr_decay, self.min_lr_fraction = lr_decay, min_lr_fraction
        self.sgd_chunk = None if sgd_chunk is None else _positive_int("model.sgd_chunk", sgd_chunk)
        self.projector_words, self.plot_words = projector_words, list(plot_words or PLOT_WORDS.split())
        data.configure(mode, window, float(sample), negatives)
        self.net = net if isinstance(net, nn.Module) else net(vocab_size=data.vocab_size, mode=mode)
        if getattr(self.net, "mode", mode) != mode:
            raise UserError(f"model.mode: {mode} but the network was built for {self.net.mode}")
        self.make_optimizer, self.make_scheduler, self.monitor = optimizer, scheduler, monitor
        # plain SGD on sparse gradients: the step is taken by hand (Word2Vec.sgd_step), the same numbers faster
        function = getattr(optimizer, "func", optimizer)
        self.fused = bool(fused_sgd) and function is torch.optim.SGD and bool(getattr(self.net, "sparse", False))
        self.automatic_optimization = not self.fused
        # the vocabulary travels in the checkpoint (UTF-8 bytes and offsets), so a checkpoint names its own words
        encoded = [w.encode("utf-8") for w in data.words]
        self.register_buffer(
            "vocab_bytes", torch.frombuffer(bytearray(b"".join(encoded)) or bytearray(1), dtype=torch.uint8)
        )
        self.register_buffer("vocab_offsets", torch.tensor(np.cumsum([0, *map(len, encoded)]), dtype=torch.long))
        self.register_buffer("word_counts", torch.from_numpy(data.counts))
        self.words: list[str] = list(data.words)
        self.index = {w: k for k, w in enumerate(self.words)}
        self.analogy_total = {"val": 0, "test": 0}
        for split in ("val", "test"):
            self.register_buffer(f"{split}_questions", self._questions(data, split), persistent=False)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_loss_best, self.val_analogy_best = MinMetric(), MaxMetric()
        self.val_loss_best.persistent(True)  # part of the checkpoint, so a resumed run keeps its best
        self.val_analogy_best.persistent(True)

    def _questions(self, data: WordCorpusDataModule, split: str) -> torch.Tensor:
        """The split's analogy questions whose four words are all in the vocabulary, as word indices (Q, 4)."""
        if data.analogies is None:
            return torch.zeros((0, 4), dtype=torch.long)
        _, questions, _ = data.analogies
        half = questions[0 if split == "val" else 1 :: 2]
        self.analogy_total[split] = len(half)
        rows = [[self.index[w] for w in q] for q in half if all(w in self.index for w in q)]
        return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)

    # ---------------------------------------------------------------- training

    def _loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Per-example negative-sampling loss; a noise word equal to the target counts for nothing (word2vec.c
        skips it)."""
        inputs, mask, targets, negatives = batch
        scores = self.net.scores(self.net.hidden(inputs, mask if mask.numel() else None), targets, negatives)
        same = torch.cat([torch.zeros_like(targets, dtype=torch.bool)[:, None], negatives == targets[:, None]], 1)
        return negative_sampling_loss(scores.masked_fill(same, -math.inf))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        if self.fused:
            return self._fused_step(batch)
        losses = self._loss(batch)
        self.train_loss.update(losses.detach().mean(), weight=len(losses))
        return losses.sum()

    def on_train_epoch_end(self) -> None:
        """`train/loss`, the mean over the epoch's examples, logged once: logging a metric on every step cost more
        than a fused step's arithmetic."""
        if self.train_loss.update_called:
            self.log("train/loss", self.train_loss.compute(), prog_bar=True)
        self.train_loss.reset()

    def _fused_step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """SGD by hand at the optimizer's current rate; the optimizer then steps with no gradients (it moves nothing
        and counts the step) and the schedule moves on, so checkpoints and resumes see what automatic SGD has."""
        optimizer = self.optimizers()
        inputs, mask, targets, negatives = batch
        lr = float(optimizer.optimizer.param_groups[0]["lr"])
        losses = self.net.sgd_step(inputs, mask if mask.numel() else None, targets, negatives, lr, self.sgd_chunk)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        self.train_loss.update(losses.mean(), weight=len(losses))
        return losses.sum()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        losses = self._loss(batch)
        self.val_loss.update(losses.mean(), weight=len(losses))
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        accuracy = self._analogy_metrics("val")
        if self.trainer.sanity_checking:  # the sanity check's untrained score is no "best"
            return
        self.val_loss_best(self.val_loss.compute())
        self.log("val/loss_best", self.val_loss_best.compute())
        if accuracy is not None:
            self.val_analogy_best(accuracy)
            self.log("val/analogy_acc_best", self.val_analogy_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        losses = self._loss(batch)
        self.test_loss.update(losses.mean(), weight=len(losses))
        self.log("test/loss", self.test_loss, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        self._analogy_metrics("test")
        if len(self.val_questions) + len(self.test_questions):
            questions = torch.cat([self.val_questions, self.test_questions])
            self.log("test/analogy_acc_all", self.analogy_accuracy(questions))
        self.write_projector()
        self.write_pca()

    def _analogy_metrics(self, split: str) -> torch.Tensor | None:
        questions = getattr(self, f"{split}_questions")
        if not self.analogy_total[split]:
            return None
        accuracy = self.analogy_accuracy(questions)
        self.log(f"{split}/analogy_acc", accuracy, prog_bar=split == "val")
        self.log(f"{split}/analogy_questions", float(len(questions)))
        return accuracy

    @torch.no_grad()
    def analogy_accuracy(self, questions: torch.Tensor) -> torch.Tensor:
        """Share of questions a : b :: c : d answered d (gensim's evaluate_word_analogies over the vocabulary)."""
        if len(questions) == 0:
            return torch.tensor(0.0, device=self.device)
        unit = unit_rows(self.net.vectors().detach().float())
        correct = 0
        for start in range(0, len(questions), ANALOGY_CHUNK):
            q = questions[start : start + ANALOGY_CHUNK]
            correct += int((analogy(unit, q[:, 0], q[:, 1], q[:, 2])[:, 0] == q[:, 3]).sum())
        return torch.tensor(correct / len(questions), device=self.device)

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer()
        if self.lr_decay == "linear":
            floor = self.min_lr_fraction

            def linear(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
                return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(floor, 1.0 - s / max(1, total_steps)))

            return {"optimizer": optimizer, "lr_scheduler": lr_scheduler_config(linear, optimizer, self.trainer, "")}
        if self.make_scheduler is None:
            return optimizer
        config = lr_scheduler_config(self.make_scheduler, optimizer, self.trainer, self.monitor)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _optimizer(self) -> torch.optim.Optimizer:
        """SGD takes the sparse gradients as they are (momentum and weight decay must be 0: both would make every
        row move every step); Adam and AdamW run as SparseAdam with their lr, betas and eps."""
        if self.make_optimizer is None:
            raise UserError("optimizer: none given; allowed: optimizer=sgd (word2vec.c's) or optimizer=adam")
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad], "name": "lr"}]
        if not getattr(self.net, "sparse", False):
            return self.make_optimizer(params=groups)
        function = getattr(self.make_optimizer, "func", self.make_optimizer)
        settings = dict(getattr(self.make_optimizer, "keywords", {}))
        if function in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SparseAdam):
            betas = tuple(settings.get("betas", (0.9, 0.999)))
            return torch.optim.SparseAdam(groups, lr=float(settings.get("lr", 1e-3)), betas=betas)  # type: ignore[arg-type]
        if function is torch.optim.SGD:
            for key in ("momentum", "weight_decay"):
                if settings.get(key):
                    raise UserError(
                        f"optimizer.{key}: {settings[key]} with sparse embedding gradients; allowed: 0 "
                        "(or model.net.sparse=false)"
                    )
            return self.make_optimizer(params=groups)
        name = getattr(function, "__name__", str(function))
        raise UserError(
            f"optimizer: {name} takes no sparse gradients; allowed: sgd, adam, adamw (or model.net.sparse=false)"
        )

    # ---------------------------------------------------------------- outputs

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero and self.trainer.default_root_dir:
            folder = Path(self.trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            lines = (f"{w}\t{int(n)}\n" for w, n in zip(self.words, self.word_counts.tolist()))
            (folder / "vocab.tsv").write_text("".join(lines), encoding="utf-8")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember the loaded step: testing loads the best checkpoint, whose vectors the projector shows."""
        self._loaded_step = int(checkpoint.get("global_step", 0))

    def write_projector(self) -> None:
        """The vectors of the `projector_words` most frequent words to TensorBoard's projector, labelled by word."""
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or not self.trainer.is_global_zero or self.projector_words <= 0:
            return
        count = min(self.projector_words, len(self.words))
        vectors = self.net.vectors().detach().float().cpu()[:count]
        step = getattr(self, "_loaded_step", self.global_step)
        writer.add_embedding(vectors, metadata=self.words[:count], tag="words", global_step=step)

    def write_pca(self) -> None:
        """`plot_words` found in the vocabulary (else the 30 most frequent words) on the first two principal axes
        of their vectors: to TensorBoard (images tab) and as <run>/word2vec_pca.png."""
        words = [w for w in self.plot_words if w in self.index]
        if len(words) < 3:
            words = self.words[:30]
        if len(words) < 3:
            return
        figure = pca_figure(self.net.vectors().detach().float().cpu(), words, self.index)
        writer = figures.tensorboard_writer(self.loggers)
        # the run's folder: the TensorBoard logger's parent (evaluate.py's output folder when it scores), else the
        # trainer's root (a training run's folder)
        folder = Path(writer.log_dir).parent if writer is not None else Path(self.trainer.default_root_dir or ".")
        if self.trainer.is_global_zero and folder.is_dir():
            figure.savefig(folder / "word2vec_pca.png", dpi=120)
        if writer is not None and self.trainer.is_global_zero:
            writer.add_figure("pca", figure, getattr(self, "_loaded_step", self.global_step))
        else:
            import matplotlib.pyplot as plt

            plt.close(figure)

    # ---------------------------------------------------------------- evaluate.py modes

    def word_index(self, key: str, word: object) -> int:
        """A word's row, or a one-line error naming the key."""
        if word is None or str(word) == "":
            raise UserError(f"{key}: required, e.g. {key}=king")
        if str(word) not in self.index:
            raise UserError(f"{key}: '{word}' is not in the model's vocabulary of {len(self.words)} words")
        return self.index[str(word)]

    @torch.no_grad()
    def neighbors(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The k words most cosine-similar to `word`, the word itself left out."""
        row = self.word_index("word", word)
        unit = unit_rows(self.net.vectors().detach().float())
        indices, values = nearest(unit, unit[row : row + 1], k, torch.tensor([[row]], device=unit.device))
        return [(self.words[i], v) for i, v in zip(indices[0].tolist(), values[0].tolist()) if v > -math.inf]

    @torch.no_grad()
    def solve_analogy(self, a: str, b: str, c: str, k: int = 10) -> list[tuple[str, float]]:
        """a : b :: c : ?, the k best answers by cosine to b - a + c (unit vectors), a, b and c left out."""
        rows = [self.word_index(key, word) for key, word in (("a", a), ("b", b), ("c", c))]
        unit = unit_rows(self.net.vectors().detach().float())
        query = unit[rows[1]] - unit[rows[0]] + unit[rows[2]]
        indices, values = nearest(unit, query[None], k, torch.tensor([rows], device=unit.device))
        return [(self.words[i], v) for i, v in zip(indices[0].tolist(), values[0].tolist()) if v > -math.inf]

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """`mode=neighbors word=king top_k=10` and `mode=analogy a=man b=king c=woman top_k=10` print a table."""
        k = int(cfg.get("top_k") or 10)
        if mode == "neighbors":
            rows = self.neighbors(cfg.get("word"), k)
            title = f"nearest {k} words to '{cfg.word}' by cosine similarity"
        else:
            rows = self.solve_analogy(cfg.get("a"), cfg.get("b"), cfg.get("c"), k)
            title = f"{cfg.a} : {cfg.b} :: {cfg.c} : ?  (cosine to b - a + c)"
        print(f"checkpoint: {cfg.ckpt_path}")
        print(title)
        width = max(len(w) for w, _ in rows) if rows else 4
        print("\n".join(f"{rank:>3}  {word:<{width}}  {score:.4f}" for rank, (word, score) in enumerate(rows, 1)))
        return {}


def pca_figure(vectors: torch.Tensor, words: Sequence[str], index: dict[str, int]) -> Any:
    """A scatter of the words on the first two principal axes of their (centred) vectors, labelled."""
    plt = figures._pyplot()
    chosen = vectors[[index[w] for w in words]].double()
    centred = chosen - chosen.mean(0)
    _, _, axes = torch.linalg.svd(centred, full_matrices=False)
    points = (centred @ axes[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(points[:, 0], points[:, 1], s=12)
    for (x, y), word in zip(points, words):
        ax.annotate(word, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="principal axis 1", ylabel="principal axis 2", title="word vectors, PCA")
    fig.tight_layout()
    return fig
