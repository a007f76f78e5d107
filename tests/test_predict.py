"""evaluate.py data_path=<csv> for neural runs on tables: new rows go through the run's own encoding and scaling."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from sklearn.datasets import load_breast_cancer, load_diabetes

from tests.conftest import compose_config
from zoo.errors import UserError
from zoo.records import load_lightning_checkpoint
from zoo.run import build_model, evaluate, train


def trained(train_config, *overrides: str, folder: str = "run") -> tuple[object, str]:
    cfg = train_config(*overrides, "trainer.max_epochs=2", "logger=none", folder=folder)
    train(cfg)
    return cfg, str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")


def predicted(tmp_path: Path, ckpt: str, rows: pd.DataFrame) -> pd.DataFrame:
    source = tmp_path / "new_rows.csv"
    rows.to_csv(source, index=False)
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", f"data_path={source}", "extras.print_config=false"], tmp_path)
    cfg.paths.output_dir = str(tmp_path / "eval")
    evaluate(cfg)
    return pd.read_csv(tmp_path / "eval" / "predictions.csv")


def test_classifier_predicts_raw_rows_as_it_scored_the_test_split(train_config, tmp_path: Path) -> None:
    cfg, ckpt = trained(train_config, "experiment=mlp_breast_cancer")
    frame = load_breast_cancer(as_frame=True).frame
    result = predicted(tmp_path, ckpt, frame.drop(columns=["target"]).head(40))
    assert list(result.columns[-3:]) == ["prediction", "probability_0", "probability_1"]
    assert result[["probability_0", "probability_1"]].sum(axis=1).round(5).eq(1).all()
    # the same rows through the datamodule's own encoding and scaling give the same probabilities
    data = instantiate(cfg.data)
    data.setup("fit")
    model = build_model(cfg, data)
    model.load_state_dict(load_lightning_checkpoint(Path(ckpt))["state_dict"])
    x = torch.as_tensor(data.table.encoded(frame.drop(columns=["target"]).head(40)), dtype=torch.float32)
    with torch.no_grad():
        expected = model.eval()((x - data.mean) / data.std).softmax(-1)[:, 1].numpy()
    assert abs(result["probability_1"].to_numpy() - expected).max() < 1e-5
    assert (result["prediction"] == frame["target"].head(40)).mean() > 0.8  # mostly right after two epochs


def test_regressor_predicts_on_the_targets_scale_and_images_are_refused(train_config, tmp_path: Path) -> None:
    _, ckpt = trained(train_config, "experiment=mlp_diabetes")
    result = predicted(
        tmp_path, ckpt, load_diabetes(as_frame=True, scaled=False).frame.drop(columns=["target"]).head(9)
    )
    assert len(result) == 9 and result["prediction"].between(0, 400).all() and result["prediction"].std() > 1
    _, image_ckpt = trained(train_config, "experiment=cnn_digits", "trainer.limit_train_batches=2", folder="cnn")
    with pytest.raises(UserError, match="data_path: new rows are predicted for table runs"):
        predicted(tmp_path, image_ckpt, pd.DataFrame({"a": [1]}))
