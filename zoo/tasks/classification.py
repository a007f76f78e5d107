"""Supervised classification: one task for MLPs, CNNs and ResNets on any tensor data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from zoo.errors import UserError
from zoo.optim import configure_optimizers
from zoo.tasks import figures

MAX_MISCLASSIFIED = 64


class ClassificationTask(L.LightningModule):
    """Cross-entropy training with accuracy, macro precision/recall/F1 and a test confusion matrix.

    Logs `train/loss`, `train/acc`, `val/loss`, `val/acc`, `val/acc_best`, `test/*`; at the end of
    testing it draws the confusion matrix and a grid of misclassified samples into TensorBoard.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        monitor: str = "val/acc",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise UserError(
                f"model.num_classes is {num_classes}: a classifier needs 2 or more classes; "
                "for a regression target use model=mlp_regressor"
            )
        self.net = net
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.label_smoothing, self.monitor = label_smoothing, monitor

        def metrics(prefix: str) -> MetricCollection:
            return MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro"),
                    "precision": MulticlassPrecision(num_classes, average="macro"),
                    "recall": MulticlassRecall(num_classes, average="macro"),
                    "f1": MulticlassF1Score(num_classes, average="macro"),
                },
                prefix=prefix,
            )

        # training loss sum and correct predictions: running sums instead of torchmetrics objects,
        # whose per-step input checks cost more than a small network's whole step
        self.register_buffer("train_sums", torch.zeros(2), persistent=False)
        self.train_samples = 0
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_metrics, self.test_metrics = metrics("val/"), metrics("test/")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # part of the checkpoint, so a resumed run keeps its best
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.misclassified: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning records the running hook's name here before and after every hook it calls, some fifty times a
        # training step; nn.Module's __setattr__, which sorts values into parameters, buffers and submodules, costs
        # more per call than a small network's metrics do. The name is only ever a string or None.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if self.training else 0.0)
        return loss, logits.argmax(dim=1), y

    def on_train_epoch_start(self) -> None:
        self.train_sums.zero_()
        self.train_samples = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, preds, y = self._step(batch)
        with torch.no_grad():
            self.train_sums += torch.stack((loss.detach().float() * len(y), (preds == y).sum().float()))
        self.train_samples += len(y)
        return loss

    def on_train_epoch_end(self) -> None:
        """Epoch means over every sample of every process: the sums are reduced before dividing."""
        sums = torch.cat((self.train_sums, self.train_sums.new_tensor([self.train_samples])))
        loss_sum, correct, samples = self.trainer.strategy.reduce(sums, reduce_op="sum")
        # the values are equal on every process already; sync_dist only keeps Lightning from asking for it
        self.log("train/loss", loss_sum / samples, prog_bar=True, sync_dist=True)
        self.log("train/acc", correct / samples, sync_dist=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.val_loss(loss)
        self.val_metrics(preds, y)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log_dict(self.val_metrics, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the sanity check's untrained score is no "best"
            return
        self.val_acc_best(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.test_loss(loss)
        self.test_metrics(preds, y)
        self.test_confusion.update(preds, y)
        self.log("test/loss", self.test_loss, on_epoch=True)
        self.log_dict(self.test_metrics, on_epoch=True)
        wrong = preds != y
        kept = sum(len(x) for x, _, _ in self.misclassified)
        if wrong.any() and kept < MAX_MISCLASSIFIED:
            take = slice(0, MAX_MISCLASSIFIED - kept)
            self.misclassified.append((batch[0][wrong][take].cpu(), y[wrong][take].cpu(), preds[wrong][take].cpu()))

    def on_test_epoch_end(self) -> None:
        confusion = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        misclassified = self.misclassified
        self.misclassified = []
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or not self.trainer.is_global_zero:
            return
        writer.add_figure("test/confusion_matrix", figures.confusion_matrix(confusion), self.global_step)
        if misclassified:
            x, y, preds = (torch.cat(parts) for parts in zip(*misclassified))
            writer.add_figure("test/misclassified", figures.sample_grid(x, y, preds), self.global_step)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self)
