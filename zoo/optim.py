"""Optimizer parameter groups and learning-rate schedules shared by every task."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Split parameters so that weight decay skips biases and norm scales (vectors), as in AdamW practice.

    The second group carries weight_decay=0; the first inherits whatever the optimizer config sets.
    The group names are the logged ones: `train/lr` (and `train/lr_no_decay`).
    """
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups: list[dict[str, Any]] = [{"params": decay, "name": "lr"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "lr_no_decay"})
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base LR, then half a cosine down to min_lr_ratio * base LR."""
    if warmup_steps is None:
        warmup_steps = int(round(warmup_fraction * total_steps))
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"scheduler.warmup_steps must be in [0, {total_steps}], got {warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_scheduler_config(
    make_scheduler: Callable[..., Any], optimizer: torch.optim.Optimizer, trainer: Any, monitor: str
) -> dict[str, Any]:
    """Build a scheduler and tell Lightning how to step it.

    A schedule that needs the run length (a `total_steps` argument) is stepped every optimizer step;
    the others are epoch schedules, and ReduceLROnPlateau watches the run's monitored metric.
    """
    accepts_total = "total_steps" in inspect.signature(make_scheduler).parameters
    if accepts_total:
        scheduler = make_scheduler(optimizer, total_steps=int(trainer.estimated_stepping_batches))
    else:
        scheduler = make_scheduler(optimizer)
    config: dict[str, Any] = {
        "scheduler": scheduler,
        "interval": "step" if accepts_total else "epoch",
    }
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = monitor
    return config


def with_scheduler(task: Any, optimizer: torch.optim.Optimizer) -> Any:
    """What `configure_optimizers` returns: the optimizer alone, or with the task's scheduler (`make_scheduler`)."""
    if task.make_scheduler is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler_config(task.make_scheduler, optimizer, task.trainer, task.monitor),
    }


def configure_optimizers(task: Any) -> Any:
    """The optimizer group's optimizer over `task.net` (biases and norms without weight decay), and its schedule."""
    if task.make_optimizer is None:
        raise ValueError("no optimizer given: set the `optimizer` config group, e.g. optimizer=adamw")
    return with_scheduler(task, task.make_optimizer(params=param_groups(task.net)))
