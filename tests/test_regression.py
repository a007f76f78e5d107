"""Neural regression: least squares by gradient descent equals the closed form, the target's scale round-trips,
and a classifier or a regressor on the wrong kind of table is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zoo.data.table import Table
from zoo.run import train


def metrics_of(cfg) -> dict[str, float]:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_linear_regression_by_gradient_descent_matches_least_squares(train_config) -> None:
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    cfg = train_config(
        "experiment=linreg_diabetes",
        "optimizer.lr=0.1",
        "trainer.max_epochs=60",
        "trainer.check_val_every_n_epoch=20",
        "logger=none",
    )
    train(cfg)
    table = Table("diabetes", None, None, "regression", None, None, 0.1, 0.2, 0, 1, 0)
    splits = table.splits()
    (x, y), (x_test, y_test) = splits["train"], splits["test"]
    closed_form = LinearRegression().fit(table.encoded(x), y)
    expected = r2_score(y_test, closed_form.predict(table.encoded(x_test)))
    metrics = metrics_of(cfg)
    assert abs(metrics["test/r2"] - expected) < 0.01, (metrics["test/r2"], expected)
    rmse = float(np.sqrt(np.mean((closed_form.predict(table.encoded(x_test)) - y_test) ** 2)))
    assert abs(metrics["test/rmse"] - rmse) < 0.02 * rmse  # on the target's own scale, not the standardized one


@pytest.mark.parametrize("loss", ["huber", "l1"])
def test_mlp_regressor_learns_with_each_loss(train_config, loss: str) -> None:
    cfg = train_config("experiment=mlp_diabetes", f"model.loss={loss}", "trainer.max_epochs=30", "logger=none")
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/r2"] > 0.2 and metrics["val/rmse_best"] <= metrics["val/rmse"] + 1e-6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=mlp_regressor", "data=breast_cancer"], "a regression model needs a regression table"),
        (["model=mlp", "data=diabetes"], "a classifier needs 2 or more classes"),
        (["experiment=mlp_diabetes", "model.loss=hinge"], "model.loss: unknown 'hinge'; allowed: mse, huber, l1"),
        (["experiment=mlp_diabetes", "data.num_classes=3"], "a regression target has one output"),
    ],
)
def test_wrong_kind_of_table_or_loss_is_one_line(train_config, overrides: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):  # hydra may wrap the UserError; train.py prints its one line
        train(train_config(*overrides, "trainer.max_epochs=1", "logger=none"))
