"""Regression of one real target with any network that maps a batch to (B, 1): an MLP, or with no hidden layer
linear regression trained by gradient descent.

The datamodule standardizes the target with the training split's mean and standard deviation (an MSE in units of
the target's variance trains at the same learning rates whatever the target's scale); the loss is computed there,
and every metric on the original scale, named like XGBoost's: RMSE, MAE and R².
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MinMetric, R2Score

from zoo.errors import UserError
from zoo.optim import configure_optimizers

LOSSES: dict[str, Callable[..., torch.Tensor]] = {"mse": F.mse_loss, "huber": F.huber_loss, "l1": F.l1_loss}


class RegressionTask(L.LightningModule):
    """Trains on the standardized target with `loss` (mse | huber, delta 1 standard deviation | l1).

    Logs `train/loss`, `val/loss`, `val/rmse`, `val/mae`, `val/r2`, `val/rmse_best` and the same under `test/`.
    """

    def __init__(
        self,
        net: nn.Module,
        data: Any,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        loss: str = "mse",
        monitor: str = "val/rmse",
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise UserError(f"model.loss: unknown '{loss}'; allowed: {', '.join(LOSSES)}")
        if getattr(data, "target_scale", None) is None and hasattr(data, "setup"):
            data.setup("fit")  # the target's scale is the training split's: read the table now (setup runs once)
        scale = getattr(data, "target_scale", None)
        if scale is None:
            raise UserError("data: a regression model needs a regression table (data.task=regression)")
        self.net, self.loss_name, self.monitor = net, loss, monitor
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        # the target's training mean and standard deviation: part of the checkpoint, so predictions keep their scale
        self.register_buffer("target_scale", torch.tensor(scale, dtype=torch.float32))
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": metric()
                for split in ("val", "test")
                for name, metric in (
                    ("rmse", lambda: MeanSquaredError(squared=False)),
                    ("mae", MeanAbsoluteError),
                    ("r2", R2Score),
                )
            }
        )
        self.val_rmse_best = MinMetric()
        self.val_rmse_best.persistent(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions on the target's own scale, (B,)."""
        mean, std = self.target_scale
        return self.net(x).squeeze(-1) * std + mean

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, standardized = batch
        output = self.net(x).squeeze(-1)
        mean, std = self.target_scale
        return LOSSES[self.loss_name](output, standardized), output * std + mean, standardized * std + mean

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        loss, predicted, target = self._loss(batch)
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=split == "val")
        for name in ("rmse", "mae", "r2"):
            metric = self.metrics[f"{split}_{name}"]
            metric(predicted, target)
            self.log(f"{split}/{name}", metric, on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_rmse_best(self.metrics["val_rmse"].compute())
        self.log("val/rmse_best", self.val_rmse_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self)
