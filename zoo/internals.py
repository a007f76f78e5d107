"""The few private parts of Lightning and torch the zoo relies on, behind one door.

Each is a documented need that the public API does not meet; tests/test_internals.py fails loudly when an
upgrade of Lightning or torch moves one of them.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def batches_that_stepped(trainer: Any) -> int:
    """The step count loggers use as x-axis (`global_step` counts optimizer steps, twice per batch for a GAN)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def set_batches_that_stepped(trainer: Any, value: int) -> None:
    trainer.fit_loop.epoch_loop._batches_that_stepped = int(value)


def logs_this_step(trainer: Any) -> bool:
    """Whether Lightning's loggers write at this step (every `log_every_n_steps`), to log at the same cadence."""
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def set_max_epochs(trainer: Any, epochs: int) -> None:
    """Changes the epoch budget of a running fit (a schedule in steps decides it once the data is known)."""
    trainer.fit_loop.max_epochs = int(epochs)


def max_epochs(trainer: Any) -> int | None:
    return trainer.fit_loop.max_epochs


def grad_scaler(trainer: Any) -> Any | None:
    """The 16-mixed GradScaler, or None under other precisions."""
    return getattr(trainer.precision_plugin, "scaler", None)


def attached_trainer(module: Any) -> Any | None:
    """The trainer of a LightningModule, or None (`module.trainer` raises when there is none)."""
    return module._trainer


def add_summary(writer: Any, summary: Any, step: int | None = None) -> None:
    """Writes a ready-made protobuf summary (hparams, an encoded image) through a SummaryWriter; also reopens the
    event file Lightning closed after testing."""
    writer._get_file_writer().add_summary(summary, step)


def is_batch_norm(module: nn.Module) -> bool:
    """BatchNorm1d/2d/3d and SyncBatchNorm, which share only a private base class."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
