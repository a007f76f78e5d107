"""cv.ensemble=mean|vote: an outer test split held out of every fold of k-fold CV, the fold models scored on it
alone and combined; the splits of plain k-fold CV unchanged; bad values refused in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from zoo.data.recommender import SyntheticRatingsDataModule
from zoo.data.table import Table, table_from_config
from zoo.data.tensor import TensorDataModule
from zoo.errors import UserError
from zoo.run import build_model, train

SMALL = ["trainer.max_epochs=2", "data.batch_size=32"]


class Rows(TensorDataModule):
    """Row i holds the number i, so that each split names its rows."""

    def __init__(self, labels: np.ndarray, **kwargs: object) -> None:
        super().__init__([1], int(labels.max()) + 1, **kwargs)  # type: ignore[arg-type]
        self.labels = labels

    def load(self) -> tuple[np.ndarray, np.ndarray, None, None]:
        return np.arange(len(self.labels), dtype=np.float32)[:, None], self.labels, None, None

    def rows(self) -> dict[str, np.ndarray]:
        self.setup()
        return {name: x[:, 0].long().numpy() for name, (x, _) in self.splits.items()}


def labels(n: int = 300) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [n // 2, n * 3 // 10, n // 5]))


def check_outer_split(folds: list[dict[str, np.ndarray]], total: int) -> np.ndarray:
    """The holdout rows of every fold are the same and meet no other split; the fold test sets partition the rest."""
    holdout = folds[0]["holdout"]
    for rows in folds:
        assert np.array_equal(rows["holdout"], holdout)
        others = np.concatenate([rows[name] for name in ("train", "val", "test")])
        assert not set(others) & set(holdout)
        assert sorted([*others, *holdout]) == list(range(total))  # each row in exactly one split
    tests = np.concatenate([rows["test"] for rows in folds])
    assert sorted(tests) == sorted(set(range(total)) - set(holdout))
    return holdout


def test_tensor_data_hold_out_a_stratified_outer_split_and_fold_the_rest() -> None:
    y = labels()
    folds = [Rows(y, folds=3, fold=k, holdout_fraction=0.2).rows() for k in range(3)]
    holdout = check_outer_split(folds, len(y))
    assert np.bincount(y[holdout]).tolist() == [30, 18, 12]  # 20% of each class
    other_seed = Rows(y, folds=3, fold=0, holdout_fraction=0.2, split_seed=1).rows()["holdout"]
    assert not np.array_equal(other_seed, holdout)


@pytest.mark.parametrize("dataset", ["breast_cancer", "diabetes"])
def test_tables_hold_out_an_outer_split_and_fold_the_rest(dataset: str) -> None:
    folds = [Table(dataset, folds=3, fold=k, holdout_fraction=0.2).split_indices() for k in range(3)]
    total = len(Table(dataset).y)
    holdout = check_outer_split(folds, total)
    assert len(holdout) == math.ceil(0.2 * total)  # scikit-learn rounds a test share up
    y = Table(dataset).y
    if dataset == "breast_cancer":  # stratified: the classes' shares of the whole table
        assert abs(y[holdout].mean() - y.mean()) < 0.01
    other_seed = Table(dataset, folds=3, fold=0, holdout_fraction=0.2, split_seed=1).split_indices()["holdout"]
    assert not np.array_equal(other_seed, holdout)


def test_ratings_hold_out_an_outer_split_and_fold_the_rest() -> None:
    settings = {"num_users": 40, "num_ratings": 1000, "num_items": 30, "val_fraction": 0.1}
    folds = [SyntheticRatingsDataModule(folds=2, fold=k, holdout_fraction=0.2, **settings).rows for k in range(2)]
    assert len(check_outer_split(folds, 1000)) == 200


def test_plain_kfold_splits_are_unchanged() -> None:
    """Without an outer split the folds are scikit-learn's k-fold over all rows, as before cv.ensemble."""
    from sklearn.model_selection import KFold, StratifiedKFold

    y = labels()
    reference = list(StratifiedKFold(3, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    for k, (pool, test) in enumerate(reference):
        rows = Rows(y, folds=3, fold=k).rows()
        assert set(rows) == {"train", "val", "test"} and np.array_equal(rows["test"], test)
        assert np.array_equal(np.sort(np.concatenate([rows["train"], rows["val"]])), pool)
        assert all(np.array_equal(rows[n], Rows(y, folds=3, fold=k, holdout_fraction=0).rows()[n]) for n in rows)
    for dataset, splitter in (("breast_cancer", StratifiedKFold), ("diabetes", KFold)):
        table = Table(dataset)
        stratify = table.y if splitter is StratifiedKFold else None
        reference = list(splitter(3, shuffle=True, random_state=0).split(np.zeros(len(table.y)), stratify))
        for k, (pool, test) in enumerate(reference):
            rows = Table(dataset, folds=3, fold=k).split_indices()
            assert set(rows) == {"train", "val", "test"} and np.array_equal(rows["test"], test)
            assert np.array_equal(np.sort(np.concatenate([rows["train"], rows["val"]])), pool)
    settings = {"num_users": 40, "num_ratings": 1000, "num_items": 30}
    parts = np.array_split(np.random.default_rng(0).permutation(1000), 2)
    for k in range(2):
        assert np.array_equal(SyntheticRatingsDataModule(folds=2, fold=k, **settings).rows["test"], np.sort(parts[k]))


def test_plain_kfold_runs_pass_no_outer_split(train_config, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_fit_and_test(cfg, output_dir, on_tested=None):
        seen.append((OmegaConf.to_container(cfg.data, resolve=True), on_tested))
        return {"test/acc": 0.5 + 0.1 * len(seen), "val/acc_best": 0.9}

    monkeypatch.setattr("zoo.run.fit_and_test", fake_fit_and_test)
    cfg = train_config("experiment=mlp_breast_cancer", "cv=kfold", "logger=none")
    assert cfg.cv.ensemble is None and cfg.cv.test_fraction == 0.2
    train(cfg)
    assert [data["fold"] for data, _ in seen] == list(range(5))
    assert all("holdout_fraction" not in data and on_tested is None for data, on_tested in seen)
    report = json.loads((Path(cfg.paths.output_dir) / "cv.json").read_text())
    assert set(report) == {"folds", "per_fold", "mean", "std"}


def fold_models(out: Path, folds: int) -> list[tuple[object, object, Path]]:
    """Each fold's data module and model with the weights of the checkpoint its test used, from the run folder."""
    report = json.loads((out / "cv.json").read_text())
    models = []
    for k in range(folds):
        run_cfg = OmegaConf.load(out / f"fold_{k}" / "config.yaml")
        checkpoint = Path(report["outer_test"]["checkpoints"][k])
        # the validation-selected checkpoint: the best one that fold's checkpoint callback kept
        last = torch.load(out / f"fold_{k}" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        monitor = f"'monitor': '{run_cfg.monitor}'"
        (state,) = [v for key, v in last["callbacks"].items() if key.startswith("ModelCheckpoint") and monitor in key]
        assert Path(state["best_model_path"]) == checkpoint and checkpoint.parent == out / f"fold_{k}" / "checkpoints"
        data = instantiate(run_cfg.data)
        data.setup("test")
        model = build_model(run_cfg, data)
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
        models.append((data, model.eval(), checkpoint))
    return models


def scalars(folder: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize(
    ("experiment", "combine", "folds"),
    [("mlp_breast_cancer", "mean", 2), ("mlp_breast_cancer", "vote", 3), (None, "mean", 2)],
    ids=["table-mean", "table-vote", "digits-mean"],
)
def test_a_classifier_ensemble_scores_as_computed_by_hand(
    train_config, experiment: str | None, combine: str, folds: int
) -> None:
    chosen = [f"experiment={experiment}"] if experiment else ["model=mlp", "data=digits"]  # a table, or 8x8 images
    cfg = train_config(*chosen, *SMALL, f"cv.folds={folds}", f"cv.ensemble={combine}", "cv.test_fraction=0.25")
    value = train(cfg)
    out = Path(cfg.paths.output_dir)
    report = json.loads((out / "cv.json").read_text())
    outer = report["outer_test"]
    models = fold_models(out, folds)
    x, truth = models[0][0].splits["holdout"]
    probabilities = []
    for data, model, _ in models:
        assert data.holdout_fraction == 0.25 and torch.equal(data.splits["holdout"][1], truth)
        if not experiment:  # images are not standardized per fold: the very same inputs
            assert torch.equal(data.splits["holdout"][0], x)
        with torch.no_grad():
            probabilities.append(model(data.splits["holdout"][0]).softmax(-1))
    if experiment:  # the rows of the run's own splits
        rows = [table_from_config(OmegaConf.load(out / f"fold_{k}" / "config.yaml").data) for k in range(folds)]
        holdout = check_outer_split([table.split_indices() for table in rows], len(rows[0].y))
        assert torch.equal(torch.as_tensor(rows[0].y[holdout]), truth)
    stacked = torch.stack(probabilities)
    if combine == "mean":
        predicted = stacked.mean(0).argmax(-1)
    else:  # the class most fold models predict, ties to the lowest
        classes = stacked.shape[-1]
        votes = np.stack([np.bincount(row, minlength=classes) for row in stacked.argmax(-1).T.numpy()])
        predicted = torch.as_tensor(votes.argmax(-1))
    accs = [float((p.argmax(-1) == truth).float().mean()) for p in probabilities]
    assert outer["rows"] == len(truth) and outer["ensemble_by"] == combine
    assert [s["acc"] for s in outer["per_fold"]] == pytest.approx(accs)
    assert outer["mean"]["acc"] == pytest.approx(np.mean(accs))
    assert outer["std"]["acc"] == pytest.approx(np.std(accs, ddof=1))
    assert outer["ensemble"]["acc"] == pytest.approx(float((predicted == truth).float().mean()))
    assert value == pytest.approx(report["mean"]["val/acc_best"])  # the CV part reports as before
    logged = scalars(out / "tensorboard" / "cv")
    assert logged["cv/ensemble_acc"] == pytest.approx(outer["ensemble"]["acc"])
    assert logged["cv/outer_test_acc"] == pytest.approx(outer["mean"]["acc"])
    assert logged["cv/test/acc"] == pytest.approx(report["mean"]["test/acc"])


def test_a_regressor_ensemble_rmse_is_computed_by_hand(train_config, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = train_config("experiment=mlp_diabetes", *SMALL, "cv.folds=2", "cv.ensemble=mean")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    outer = json.loads((out / "cv.json").read_text())["outer_test"]
    holdout = Table("diabetes", folds=2, holdout_fraction=0.2).split_indices()["holdout"]
    truth = torch.as_tensor(Table("diabetes").y[holdout])
    predictions = []
    for data, model, _ in fold_models(out, 2):
        with torch.no_grad():
            predictions.append(model(data.splits["holdout"][0]).double())  # on the target's own scale
    rmse = [float((p - truth).square().mean().sqrt()) for p in predictions]
    combined = torch.stack(predictions).mean(0)
    assert [s["rmse"] for s in outer["per_fold"]] == pytest.approx(rmse, rel=1e-4)
    assert outer["ensemble"]["rmse"] == pytest.approx(float((combined - truth).square().mean().sqrt()), rel=1e-4)
    r2 = 1 - float((combined - truth).square().sum() / (truth - truth.mean()).square().sum())
    assert outer["ensemble"]["r2"] == pytest.approx(r2, rel=1e-3)
    assert scalars(out / "tensorboard" / "cv")["cv/ensemble_rmse"] == pytest.approx(outer["ensemble"]["rmse"])
    printed = capsys.readouterr().out
    assert "combined by mean prediction" in printed and f"{outer['ensemble']['rmse']:.4f}" in printed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["cv.folds=2", "cv.ensemble=median"], "cv.ensemble: unknown 'median'; allowed: null, mean, vote"),
        (["cv.folds=1", "cv.ensemble=mean"], "cv.ensemble: .* it needs cv.folds >= 2, got 1"),
        (["cv.folds=2", "cv.ensemble=mean", "cv.test_fraction=0"], r"cv.test_fraction: expected a number in \(0, 1\)"),
        (["cv.folds=2", "cv.ensemble=mean", "cv.test_fraction=1"], r"cv.test_fraction: .* got 1$"),
        (["experiment=mlp_diabetes", "cv.folds=2", "cv.ensemble=vote"], "cv.ensemble: 'vote' combines classes"),
        (["experiment=xgb_breast_cancer", "cv.folds=2", "cv.ensemble=mean"], "cv.ensemble: combines neural"),
        (["experiment=mf_synthetic", "cv.folds=2", "cv.ensemble=mean"], "this run's model is RatingTask"),
    ],
)
def test_bad_settings_are_refused_in_one_line(train_config, overrides: list[str], message: str) -> None:
    cfg = train_config(*overrides, "logger=none")
    with pytest.raises(UserError, match=message) as error:
        train(cfg)
    assert "\n" not in str(error.value)
    assert not (Path(cfg.paths.output_dir) / "fold_0").exists()  # refused before any fold trains


def test_an_outer_split_needs_folds() -> None:
    with pytest.raises(UserError, match="data.holdout_fraction: .* needs data.folds >= 2, got 1"):
        Table("breast_cancer", holdout_fraction=0.2)
    with pytest.raises(UserError, match=r"data.holdout_fraction: expected a number in \[0, 1\), got 1.5"):
        Rows(labels(), folds=2, holdout_fraction=1.5)
