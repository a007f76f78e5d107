"""tune=lr and tune=batch_size: the finders run instead of training, suggest from the curve, refuse what they
cannot run on in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from zoo.errors import UserError
from zoo.run import train
from zoo.tuning import steepest_descent


def test_steepest_descent_is_taken_per_decade_after_the_smoothing_start() -> None:
    rates = np.logspace(-6, 0, 100)
    # a loss flat at 2.3 that falls fastest (per decade) around 1e-2 and blows up past 1e-1; the first points rise
    losses = 2.3 - 1.5 / (1 + np.exp(-(np.log10(rates) + 2) * 4)) + np.where(rates > 0.1, 10 * (rates - 0.1), 0.0)
    losses[:20] = np.linspace(1.0, 2.3, 20)  # the smoothing's start: a rise that a slope against lr would pick
    rate, loss = steepest_descent(rates.tolist(), losses.tolist())
    assert 10**-2.3 < rate < 10**-1.7 and math.isclose(loss, losses[list(rates).index(rate)])
    with pytest.raises(UserError, match="the loss never fell"):
        steepest_descent(rates.tolist(), np.linspace(1, 2, 100).tolist())


def test_tune_lr_writes_the_plot_and_suggests_instead_of_training(train_config) -> None:
    cfg = train_config("experiment=cnn_digits", "tune=lr", "tuning.steps=40", "logger=none")
    result = train(cfg)
    output = Path(cfg.paths.output_dir)
    assert (output / "lr_find.png").stat().st_size > 1000
    assert not (output / "checkpoints").exists() and not (output / "metrics.json").exists()
    assert result is None  # nothing trained: no optimized metric
    suggested = json.loads((output / "tune.json").read_text())["tune/lr"]
    assert cfg.tuning.min_lr < suggested < cfg.tuning.max_lr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=cnn_digits", "tune=epochs"], "tune: unknown 'epochs'; allowed: lr, batch_size"),
        (["experiment=dcgan_mnist", "tune=lr"], "steps its own optimizers"),
    ],
)
def test_tune_refuses_in_one_line(train_config, overrides: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        train(train_config(*overrides, "logger=none"))
