"""Optimizer parameter groups and learning-rate schedules shared by every task."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zoo.errors import UserError


def param_groups(
    module: nn.Module, head: set[int] | frozenset[int] = frozenset(), head_lr: float | None = None
) -> list[dict[str, Any]]:
    """Split parameters so that weight decay skips biases and norm scales (vectors), as in AdamW practice.

    The second group carries weight_decay=0; the first inherits whatever the optimizer config sets. Parameters
    whose ids are in `head` go to groups of their own at `head_lr` (discriminative learning rates for fine-tuning).
    Frozen parameters are in the groups too: they get no gradient, so no step, until something unfreezes them.
    The group names are the logged ones: `train/lr` (and `train/lr_no_decay`, `train/lr_head`, ...).
    """
    groups: dict[str, dict[str, Any]] = {}
    for param in module.parameters():
        name = "lr" + ("_head" if id(param) in head else "") + ("" if param.ndim >= 2 else "_no_decay")
        group = groups.setdefault(name, {"params": [], "name": name})
        group["params"].append(param)
        if param.ndim < 2:
            group["weight_decay"] = 0.0
        if id(param) in head and head_lr is not None:
            group["lr"] = head_lr
    order = ("lr", "lr_no_decay", "lr_head", "lr_head_no_decay")
    return [groups[name] for name in order if name in groups] or [{"params": [], "name": "lr"}]


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
    head, multiplier = getattr(task, "head_parameters", frozenset()), getattr(task, "head_lr_mult", 1.0)
    head_lr = None
    if head and multiplier != 1.0:
        base = getattr(task.make_optimizer, "keywords", {}).get("lr")
        if base is None:
            raise UserError("head_lr_mult: the optimizer config sets no lr to multiply")
        head_lr = float(base) * multiplier
    return with_scheduler(task, task.make_optimizer(params=param_groups(task.net, head, head_lr)))
