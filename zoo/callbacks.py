"""Callbacks shared by every Lightning task."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class LearningRates(Callback):
    """Log each optimizer parameter group's learning rate as `train/<group name>` every `log_every_n_steps` batches.

    Lightning's LearningRateMonitor names an optimizer without a scheduler after its class (`lr-Adam/g`), so the
    same rate would change its name with the schedule and between families; here it is always `train/lr`, or
    `train/lr_g` and `train/lr_d` for two networks. An unnamed group is `lr` (`lr_<index>` when there are several).
    """

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # written straight to the loggers at their cadence, as LearningRateMonitor does: through self.log the rates
        # would join the metrics Lightning reduces every step, about 0.2 ms a step on a small MLP
        if not trainer.loggers or not (trainer._logger_connector.should_update_logs or trainer.fast_dev_run):
            return
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        rates = {}
        for index, group in enumerate(groups):
            name = group.get("name") or ("lr" if len(groups) == 1 else f"lr_{index}")
            rates[f"train/{name}"] = float(group["lr"])
        for logger in trainer.loggers:
            logger.log_metrics(rates, step=trainer.fit_loop.epoch_loop._batches_that_stepped)
        trainer.callback_metrics.update({name: torch.tensor(rate) for name, rate in rates.items()})


class RngState(Callback):
    """Store Python, NumPy and torch RNG states in every checkpoint and restore them on resume.

    Lightning restores weights, optimizers and loop counters but not random generators; without
    them dropout masks and augmentations after a resume differ from the uninterrupted run.
    """

    def state_dict(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _numpy_state() -> tuple[Any, ...]:
    """NumPy's state with its key array as a tensor, so checkpoints load with torch.load(weights_only=True)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached
