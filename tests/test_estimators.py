"""scikit-learn's classics through train.py and evaluate.py: the textbook tree, skops files, pruning, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config
from tests.test_classic import csv_config, write_csv
from zoo.classic import estimators
from zoo.classic.estimators import Estimator
from zoo.errors import UserError
from zoo.run import evaluate, train

# model=xgboost is XGBoost's own booster (tests/test_classic.py); its scikit-learn interface is an ensemble member
KINDS = sorted(kind for kind in estimators.KINDS if kind != "xgboost")


def test_an_entropy_tree_splits_by_the_textbook_information_gain() -> None:
    # 10 examples, 5 of each class; the feature sends 5 to each side with 4:1 and 1:4 of the classes
    x = np.array([[0]] * 5 + [[1]] * 5, dtype=float)
    y = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0])
    fitted = Estimator("decision_tree", criterion="entropy", max_depth=1).pipeline("binary", seed=0).fit(x, y)
    tree = fitted[-1].tree_
    root, left, right = tree.impurity[0], tree.impurity[1], tree.impurity[2]
    assert root == pytest.approx(1.0)
    assert left == pytest.approx(0.7219, abs=1e-4) and right == pytest.approx(0.7219, abs=1e-4)
    gain = root - 0.5 * left - 0.5 * right
    assert gain == pytest.approx(0.278, abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_learns_the_csv_table_and_evaluate_reproduces_it(train_config, tmp_path: Path, kind: str) -> None:
    path = write_csv(tmp_path / "table.csv")
    target = "level" if kind == "linear_regression" else "sick"
    drop = "data.drop=[grade,sick]" if target == "level" else "data.drop=[grade,level]"
    cfg = csv_config(train_config, path, target, drop, folder=kind)
    cfg.model = compose_config("train", [f"model={kind}"], tmp_path).model
    train(cfg)
    run = Path(cfg.paths.output_dir)
    logged = json.loads((run / "metrics.json").read_text())
    if target == "level":
        assert logged["test/r2"] > 0.8, logged  # missing colours are imputed, so not all of it is linear
    elif kind == "dummy":
        assert logged["test/acc"] < 0.7, logged  # the floor: the majority class of a table near 50:50
    else:
        assert logged["test/acc"] > 0.75, logged  # chance is about 0.5
    eval_cfg = compose_config("eval", [f"ckpt_path={run / 'model.skops'}"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / f"eval_{kind}")
    assert evaluate(eval_cfg) == {k: v for k, v in logged.items() if k.startswith("test/")}


def test_an_ensemble_member_takes_its_model_config_and_changes() -> None:
    voting = Estimator("voting", members=["svm", {"kind": "knn", "n_neighbors": 7}])
    svm, knn = voting.members
    assert svm.params["probability"] is True  # from configs/model/svm.yaml, which soft voting needs
    assert knn.params["n_neighbors"] == 7 and knn.params["weights"] == "uniform"
    fitted = voting.pipeline("binary", seed=0)[-1]
    assert [name for name, _ in fitted.estimators] == ["svm_0", "knn_1"]


def test_auto_pruning_chooses_a_smaller_tree_by_inner_cross_validation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = ((x[:, 0] > 0) ^ (rng.random(300) < 0.2)).astype(int)  # one informative split plus 20% label noise
    model = Estimator("decision_tree", ccp_alpha="auto")
    alpha = estimators.choose_ccp_alpha(model, "binary", x, y, seed=0)
    grown = Estimator("decision_tree").pipeline("binary", seed=0).fit(x, y)[-1]
    pruned = model.pipeline("binary", seed=0, ccp_alpha=alpha).fit(x, y)[-1]
    assert alpha > 0 and pruned.get_n_leaves() < grown.get_n_leaves() / 5, (alpha, pruned.get_n_leaves())


def test_a_saved_model_loads_only_from_allow_listed_types(tmp_path: Path) -> None:
    import collections
    import pickle

    import skops.io as sio

    foreign = tmp_path / "foreign.skops"
    foreign.write_bytes(sio.dumps({"lookup": collections.Counter(a=1)}))
    with pytest.raises(UserError, match=r"^ckpt_path: refused to load .*collections.Counter"):
        estimators.load(foreign)
    pickled = tmp_path / "pickled.skops"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match=r"^ckpt_path: '.*pickled.skops' is not a skops model file"):
        estimators.load(pickled)


def test_bad_settings_are_one_line_naming_the_key(train_config, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^model.kind: unknown 'forest'; allowed: random_forest, extra_trees"):
        Estimator("forest")
    with pytest.raises(UserError, match=r"^model.n_neighbours: not a setting of knn; allowed: .*n_neighbors"):
        Estimator("knn", n_neighbours=3)
    with pytest.raises(UserError, match=r"^model: logistic_regression needs a regression table|^model: logistic"):
        Estimator("logistic_regression").estimator_class("regression")
    with pytest.raises(UserError, match=r"^model.members: unknown kind 'forest'; allowed: random_forest"):
        Estimator("voting", members=["forest", "knn"])
    with pytest.raises(UserError, match=r"^model.members: voting combines at least two kinds"):
        Estimator("voting", members=["knn"])
    with pytest.raises(UserError, match=r"^model.members: only voting, stacking take members, not knn"):
        Estimator("knn", members=["svm", "knn"])
    with pytest.raises(UserError, match=r"^model.ccp_alpha: 'auto' chooses the pruning of a decision_tree"):
        Estimator("random_forest", ccp_alpha="auto")
    path = write_csv(tmp_path / "table.csv")
    cfg = csv_config(train_config, path, "sick", "data.drop=[grade,level]")
    cfg.model = compose_config("train", ["model=random_forest", "model.n_estimators=-1"], tmp_path).model
    with pytest.raises(UserError, match=r"^model: random_forest refused its settings: .*n_estimators.*-1"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "model.skops").exists()


def test_a_tree_run_draws_its_tree_and_importances_in_tensorboard(train_config) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config("experiment=tree_wine", "model.ccp_alpha=0.02")
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"))
    events.Reload()
    assert {"tree", "feature_importance/model"} <= set(events.Tags()["images"])
    assert "test/acc" in events.Tags()["scalars"]


def test_pca_components_replace_the_columns_for_estimators_and_networks(train_config, tmp_path: Path) -> None:
    import torch

    from zoo.data.tabular import TabularDataModule

    cfg = train_config("model=svm", "data=digits_flat", "data.pca_components=12", folder="svm_pca")
    train(cfg)
    fitted = estimators.load(Path(cfg.paths.output_dir) / "model.skops")
    assert fitted.named_steps["pca"].n_components_ == 12
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["test/acc"] > 0.9

    data = TabularDataModule(dataset="breast_cancer", input_shape=[5], num_classes=2, pca_components=5)
    data.setup()
    x = data.splits["train"][0]
    assert x.shape[1] == 5 and data.splits["test"][0].shape[1] == 5
    variances = x.var(dim=0)
    assert torch.all(variances[:-1] >= variances[1:])  # principal components, largest variance first
    with pytest.raises(UserError, match=r"^data.pca_components: expected null or an integer in \[1, 30\], got 31"):
        TabularDataModule(dataset="breast_cancer", input_shape=[31], num_classes=2, pca_components=31).setup()
    xgb = train_config("experiment=xgb_wine", "data.pca_components=3", folder="xgb_pca")
    with pytest.raises(UserError, match=r"^data.pca_components: XGBoost reads the table's own columns"):
        train(xgb)


def test_xgboost_joins_an_ensemble_and_its_file_loads(train_config, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "table.csv")
    cfg = csv_config(train_config, path, "sick", "data.drop=[grade,level]", folder="xgb_member")
    members = "model.members=[logistic_regression,{kind: xgboost, n_estimators: 30, n_jobs: 1}]"
    cfg.model = compose_config("train", ["model=voting", members], tmp_path).model
    train(cfg)
    run = Path(cfg.paths.output_dir)
    fitted = estimators.load(run / "model.skops")
    assert type(fitted[-1].estimators_[1][-1]).__name__ == "XGBClassifier"
    logged = json.loads((run / "metrics.json").read_text())
    new_rows = tmp_path / "new.csv"
    write_csv(new_rows, rows=12, seed=1)
    eval_cfg = compose_config("eval", [f"ckpt_path={run / 'model.skops'}", f"data_path={new_rows}"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval_xgb_member")
    assert evaluate(eval_cfg) == {k: v for k, v in logged.items() if k.startswith("test/")}
    import pandas as pd

    predictions = pd.read_csv(tmp_path / "eval_xgb_member" / "predictions.csv")
    assert len(predictions) == 12 and set(predictions["prediction"]) <= {"yes", "no"}
    assert np.allclose(predictions["probability_no"] + predictions["probability_yes"], 1.0)


def test_a_forest_without_validation_rows_reports_its_out_of_bag_scores(train_config) -> None:
    cfg = train_config("experiment=rf_breast_cancer", "model.n_estimators=50", "logger=none")
    assert cfg.data.val_fraction == 0 and cfg.model.oob_score
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    fitted = estimators.load(Path(cfg.paths.output_dir) / estimators.MODEL_FILE)
    # val/acc is the forest's own out-of-bag accuracy on the training rows, every one of which it was fitted on
    assert metrics["val/acc"] == pytest.approx(fitted[-1].oob_score_) and 0.9 < metrics["val/acc"] < 1.0
    assert {"val/loss", "val/roc_auc", "val/acc_best"} <= set(metrics)
    without = train_config("experiment=rf_breast_cancer", "model.oob_score=false", "logger=none", folder="plain")
    train(without)
    assert not any(
        k.startswith("val/") for k in json.loads((Path(without.paths.output_dir) / "metrics.json").read_text())
    )
