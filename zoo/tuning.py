"""`tune=lr` and `tune=batch_size`: Lightning's learning-rate and batch-size finders in place of training.

Why a separate run rather than a step before training: a finder's answer is a setting to read, check against its
plot and then pass on the command line (`optimizer.lr=...`), so the run that trains says which value it used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from zoo.errors import UserError

TUNERS = ("lr", "batch_size")


def check(cfg: DictConfig, model: Any, datamodule: Any) -> None:
    """One line for what a finder cannot run on, before any work."""
    tune = cfg.get("tune")
    if tune not in TUNERS:
        raise UserError(f"tune: unknown '{tune}'; allowed: {', '.join(TUNERS)} (or null: train)")
    if not getattr(model, "automatic_optimization", True):
        raise UserError(
            f"tune={tune}: {type(model).__name__} steps its own optimizers (or solves in closed form); "
            "the finders need one optimizer that Lightning steps"
        )
    if tune == "batch_size" and not hasattr(datamodule, "batch_size"):
        raise UserError(f"tune=batch_size: {type(datamodule).__name__} has no data.batch_size to scale")


def steepest_descent(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """The learning rate where the smoothed loss falls fastest per decade, and the loss there.

    Why not Lightning's own suggestion: it takes the slope against the learning rate itself, not its logarithm, so
    the tiny spacing at the small end makes any wobble there look steepest; and its smoothing starts from zero with
    an off-by-one bias correction, so the first quarter of the sweep rises at rates too small to change anything.
    """
    import numpy as np

    rates, values = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    start = max(1, len(rates) // 4)
    finite = np.isfinite(values[start:-1])
    if finite.sum() < 3:
        raise UserError("tune=lr: too few finite losses to suggest from; raise tuning.steps or lower tuning.max_lr")
    rates, values = rates[start:-1][finite], values[start:-1][finite]
    slope = np.gradient(values, np.log10(rates))
    best = int(np.argmin(slope))
    if slope[best] >= 0:
        raise UserError("tune=lr: the loss never fell over the sweep; raise tuning.max_lr or tuning.steps")
    return float(rates[best]), float(values[best])


def run(cfg: DictConfig, trainer: Any, model: Any, datamodule: Any, output_dir: Path) -> dict[str, float]:
    """Run the chosen finder; its suggestion in tune.json (and for lr its plot, lr_find.png) in the run folder."""
    from zoo.records import write_json

    check(cfg, model, datamodule)
    result = _find(cfg, trainer, model, datamodule, output_dir)
    write_json(output_dir / "tune.json", result)
    return result


def _find(cfg: DictConfig, trainer: Any, model: Any, datamodule: Any, output_dir: Path) -> dict[str, float]:
    from lightning.pytorch.tuner import Tuner

    tuner = Tuner(trainer)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tune == "lr":
        finder = tuner.lr_find(
            model,
            datamodule=datamodule,
            min_lr=float(cfg.tuning.min_lr),
            max_lr=float(cfg.tuning.max_lr),
            num_training=int(cfg.tuning.steps),
            update_attr=False,
        )
        suggestion, loss = steepest_descent(finder.results["lr"], finder.results["loss"])
        figure = finder.plot(suggest=False)
        figure.axes[0].plot(suggestion, loss, marker="o", markersize=10, color="red")
        figure.axes[0].set_title(f"suggested learning rate {suggestion:.3g}")
        figure.savefig(output_dir / "lr_find.png", dpi=100)
        print(f"tune=lr: suggested learning rate {suggestion:.3g} ({output_dir / 'lr_find.png'})")
        print(f"train with: optimizer.lr={suggestion:.3g}")
        return {"tune/lr": float(suggestion)}
    start, trials = int(datamodule.batch_size), int(cfg.tuning.max_trials)
    size = tuner.scale_batch_size(
        model, datamodule=datamodule, mode="power", init_val=start, max_trials=trials, steps_per_trial=3
    )
    limit = (
        " (the last doubling tuning.max_trials allows: larger may fit too)" if size >= start * 2 ** (trials - 1) else ""
    )
    print(f"tune=batch_size: batch size {size} fits, doubling from data.batch_size={start}{limit}")
    print(f"train with: data.batch_size={size}")
    return {"tune/batch_size": float(size)}
