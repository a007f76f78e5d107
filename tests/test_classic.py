"""XGBoost through train.py and evaluate.py: tables, CSV files, early stopping, CV, sweeps, predictions, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compose_config, run_script
from zoo.data.table import Table
from zoo.errors import UserError
from zoo.run import evaluate, train

QUIET = ["extras.print_config=false"]


def write_csv(path: Path, rows: int = 240, seed: int = 0) -> Path:
    """A learnable table: numbers, a text column that matters, gaps in both, and three kinds of target."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=rows), rng.normal(size=rows)
    colour = rng.choice(["red", "green", "blue"], size=rows)
    shift = pd.Series(colour).map({"red": 2.0, "green": 0.0, "blue": -2.0}).to_numpy()
    signal = x1 + shift
    frame = pd.DataFrame(
        {
            "x1": x1,
            "x2": x2,
            "colour": colour,
            "sick": np.where(signal > 0, "yes", "no"),
            "grade": np.digitize(signal, [-1.0, 1.0]),
            "level": 3.0 * signal + 0.1 * rng.normal(size=rows),
        }
    )
    frame.loc[::7, "x2"] = np.nan
    frame.loc[::11, "colour"] = None
    frame.to_csv(path, index=False)
    return path


def csv_config(train_config, path: Path, target: str, *overrides: str, folder: str = "run"):
    return train_config(
        "model=xgboost", "data=tabular_csv", f"data.path={path}", f"data.target={target}", *overrides, folder=folder
    )


@pytest.mark.slow  # train.py and evaluate.py processes, about 15 s; tests/test_cli.py runs the same path
def test_train_then_evaluate_end_to_end(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trained = run_script("train.py", *QUIET, "experiment=xgb_breast_cancer", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    (run,) = (tmp_path / "logs" / "xgb_breast_cancer" / "runs").iterdir()
    assert {"config.yaml", "metrics.json", "model.json", "tensorboard", ".hydra"} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "model.json").read_text())["learner"]["objective"]["name"] == "binary:logistic"
    logged = json.loads((run / "metrics.json").read_text())
    assert logged["test/acc"] > 0.9 and {"test/f1", "test/roc_auc", "val/loss", "train/loss"} <= set(logged)

    scored = run_script("evaluate.py", f"ckpt_path={run / 'model.json'}", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "test/roc_auc" in scored.stdout
    (evaluation,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    evaluated = json.loads((evaluation / "metrics.json").read_text())
    assert evaluated == {k: v for k, v in logged.items() if k.startswith("test/")}

    events = EventAccumulator(str(next((run / "tensorboard").glob("events.*"))), size_guidance={"images": 0})
    events.Reload()
    curve = events.Scalars("val/logloss")
    assert len(curve) > logged["train/rounds"] and [e.step for e in curve[:3]] == [0, 1, 2]
    assert {"train/logloss", "val/auc", "val/acc", "test/acc"} <= set(events.Tags()["scalars"])
    assert "feature_importance/gain" in events.Tags()["images"]
    assert events.PluginTagToContent("hparams")


def test_cross_validation_reports_mean_and_std_over_folds(train_config) -> None:
    cfg = train_config("experiment=xgb_breast_cancer", "cv.folds=3", "logger=none")
    value = train(cfg)
    out = Path(cfg.paths.output_dir)
    report = json.loads((out / "cv.json").read_text())
    assert report["folds"] == 3 and len(report["per_fold"]) == 3
    accs = [fold["test/acc"] for fold in report["per_fold"]]
    assert report["mean"]["test/acc"] == pytest.approx(np.mean(accs)) and np.mean(accs) > 0.9
    assert report["std"]["test/acc"] == pytest.approx(np.std(accs, ddof=1))
    assert value == pytest.approx(report["mean"]["val/acc"])
    assert all((out / f"fold_{i}" / "model.json").is_file() for i in range(3))
    tests = [Table("breast_cancer", folds=3, fold=i).split_indices()["test"] for i in range(3)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(569))  # the folds partition the table


@pytest.mark.parametrize(
    ("target", "task", "metric"),
    [("sick", "binary", "test/roc_auc"), ("grade", "multiclass", "test/f1"), ("level", "regression", "test/r2")],
)
def test_csv_table_with_categories_and_gaps(train_config, tmp_path: Path, target: str, task: str, metric: str) -> None:
    path = write_csv(tmp_path / "table.csv")
    overrides = ["model.n_jobs=1", "logger=none", f"data.drop=[{','.join({'sick', 'grade', 'level'} - {target})}]"]
    cfg = csv_config(train_config, path, target, *overrides)
    if task == "regression":
        cfg.monitor, cfg.monitor_mode = "val/rmse", "min"
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metric in metrics
    if task == "regression":
        assert metrics["test/r2"] > 0.8
    else:
        assert metrics["test/acc"] > 0.8
    table = Table("csv", str(path), target, drop=list({"sick", "grade", "level"} - {target}))
    assert table.task == task and table.x["colour"].dtype == "category" and table.x["x2"].isna().any()
    model = json.loads((Path(cfg.paths.output_dir) / "model.json").read_text())
    assert model["learner"]["feature_types"] == ["float", "float", "c"]


def test_task_is_inferred_or_taken_as_given(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "table.csv")
    assert Table("csv", str(path), "grade", task="regression").task == "regression"
    assert Table("csv", str(path), "sick", categorical=["x1"]).x["x1"].dtype == "category"
    with pytest.raises(UserError, match="data.task: binary needs two classes; column 'grade' has 3"):
        _ = Table("csv", str(path), "grade", task="binary").y


def test_early_stopping_stops_before_n_estimators(train_config) -> None:
    easy = [
        "data=breast_cancer",
        "model=xgboost",
        "model.n_jobs=1",
        "monitor=val/loss",
        "monitor_mode=min",
        "logger=none",
    ]
    cfg = train_config(*easy, "model.n_estimators=2000", "model.learning_rate=0.3", "model.early_stopping_rounds=10")
    train(cfg)
    rounds = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["train/rounds"]
    assert 10 < rounds < 200
    full = train_config(*easy, "model.n_estimators=30", "model.early_stopping_rounds=null", folder="full")
    train(full)
    assert json.loads((Path(full.paths.output_dir) / "metrics.json").read_text())["train/rounds"] == 30


def test_evaluate_reproduces_metrics_and_predicts_a_new_csv(train_config, tmp_path: Path) -> None:
    import pandas as pd

    path = write_csv(tmp_path / "table.csv")
    cfg = csv_config(train_config, path, "sick", "data.drop=[grade,level]", "model.n_jobs=1")
    train(cfg)
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())

    new = pd.read_csv(write_csv(tmp_path / "new.csv", rows=20, seed=1)).drop(columns=["sick", "grade", "level"])
    new.loc[0, "colour"] = "purple"  # a category training never saw counts as missing
    new.to_csv(tmp_path / "new.csv", index=False)
    model = Path(cfg.paths.output_dir) / "model.json"
    eval_cfg = compose_config("eval", [f"ckpt_path={model}", f"data_path={tmp_path / 'new.csv'}"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    assert scored == {k: v for k, v in logged.items() if k.startswith("test/")}

    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert len(predictions) == 20 and list(predictions.columns[:3]) == ["x1", "x2", "colour"]
    assert set(predictions["prediction"]) <= {"yes", "no"}
    assert np.allclose(predictions["probability_no"] + predictions["probability_yes"], 1.0)
    assert (predictions["prediction"] == "yes").tolist() == (predictions["probability_yes"] > 0.5).tolist()


def test_relative_csv_path_is_read_from_the_training_launch_folder(train_config, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "home").mkdir()
    write_csv(tmp_path / "home" / "table.csv")
    monkeypatch.chdir(tmp_path / "home")
    cfg = csv_config(
        train_config, Path("table.csv"), "level", "data.drop=[sick,grade]", "model.n_jobs=1", "logger=none"
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    logged = {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k.startswith("test/")}
    (run / ".hydra").mkdir()
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {tmp_path / 'home'}\n")
    monkeypatch.chdir(tmp_path)
    eval_cfg = compose_config("eval", [f"ckpt_path={run / 'model.json'}"], tmp_path)
    assert evaluate(eval_cfg) == logged


def test_monitor_chooses_what_early_stopping_watches(train_config) -> None:
    from zoo.classic.run import early_stopping_metric

    cfg = train_config("data=breast_cancer", "model=xgboost")
    assert (cfg.monitor, cfg.monitor_mode) == ("val/loss", "min")  # model=xgboost sets them; experiments may not
    assert early_stopping_metric(cfg, "binary") == ("logloss", False)
    cfg.monitor, cfg.monitor_mode = "val/roc_auc", "max"
    assert early_stopping_metric(cfg, "binary") == ("auc", True)
    assert early_stopping_metric(cfg, "regression") == ("rmse", False)  # not computed there: falls back to val/loss
    cfg.monitor, cfg.monitor_mode = "val/acc", "min"
    with pytest.raises(UserError, match="monitor_mode: 'min' does not fit monitor=val/acc; use monitor_mode=max"):
        early_stopping_metric(cfg, "multiclass")


def test_mlp_reads_the_same_rows_standardized(train_config) -> None:
    from hydra.utils import instantiate

    from zoo.data.tensor import stratified_split

    for folds, fold in ((1, 0), (5, 2)):
        table = Table("breast_cancer", folds=folds, fold=fold)
        module = instantiate(
            train_config("experiment=mlp_breast_cancer", f"+data.folds={folds}", f"+data.fold={fold}").data
        )
        module.setup("fit")
        for name, (x, y) in table.splits().items():
            tx, ty = module.splits[name]
            assert np.array_equal(ty.numpy(), y)
            assert np.allclose((tx * module.std + module.mean).numpy(), x.to_numpy(), rtol=1e-5, atol=1e-3)
        train_x = module.splits["train"][0]
        assert np.allclose(train_x.mean(0).numpy(), 0, atol=1e-4) and np.allclose(train_x.std(0).numpy(), 1, atol=0.01)
    y = Table("digits").y  # the split of tensor.py's image data modules, cut for cut
    pool, test = stratified_split(y, [0.2], 0)
    train_rows, val_rows = stratified_split(y[pool], [0.1], 0)
    splits = Table("digits").split_indices()
    assert [splits[k].tolist() for k in ("train", "val", "test")] == [
        pool[train_rows].tolist(),
        pool[val_rows].tolist(),
        test.tolist(),
    ]


def test_mlp_trains_on_a_table(train_config) -> None:
    cfg = train_config("experiment=mlp_breast_cancer", "debug=fdr")
    train(cfg)
    assert 0 <= json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["test/acc"] <= 1


def test_neural_model_on_a_csv_is_told_its_input_shape(train_config, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    path = write_csv(tmp_path / "table.csv")
    cfg = train_config(
        "model=mlp", "data=tabular_csv", f"data.path={path}", "data.target=grade", "data.drop=[sick,level]"
    )
    with pytest.raises(Exception, match=r"set data.input_shape=\[5\] data.num_classes=3"):
        instantiate(cfg.data)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.path=missing.csv", "data.target=y"], "error: data.path: no file at 'missing.csv'"),
        pytest.param(
            ["data.path=table.csv", "data.target=price"],
            "error: data.target: no column 'price' in table.csv; columns: x1",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["data.path=table.csv", "data.target=sick", "data.task=ordinal"],
            "error: data.task: unknown 'ordinal'",
            marks=pytest.mark.slow,
        ),
        (["data=breast_cancer", "model.n_estimators=0"], "error: model.n_estimators: expected an integer >= 1, got 0"),
        pytest.param(
            ["data=breast_cancer", "model.device=tpu"],
            "error: model.device: unknown 'tpu'; allowed: cpu, cuda",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["data=digits"],
            "error: data: boosted trees need a table, not 'DigitsDataModule'; allowed: breast_cancer",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(tmp_path: Path, args: list[str], expected: str) -> None:
    write_csv(tmp_path / "table.csv")
    csv = [] if any(a.startswith("data=") for a in args) else ["data=tabular_csv"]
    result = run_script("train.py", *QUIET, "model=xgboost", *csv, *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # subprocesses of train.py and evaluate.py, 30-50 s
def test_bad_evaluate_input_gets_one_line(train_config, tmp_path: Path) -> None:
    cfg = train_config("data=breast_cancer", "model=xgboost", "model.n_estimators=5", "model.n_jobs=1", "logger=none")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / "broken.json").write_text("{not a model")
    result = run_script("evaluate.py", f"ckpt_path={run / 'broken.json'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert "is not a readable XGBoost model" in result.stderr.strip().splitlines()[-1]
    eval_cfg = compose_config("eval", [f"ckpt_path={run / 'model.json'}", "data_path=nothing.csv"], tmp_path)
    with pytest.raises(UserError, match="data_path: no file at 'nothing.csv'"):
        evaluate(eval_cfg)


@pytest.mark.slow  # subprocesses or many short runs, 25-30 s under load
def test_optuna_search_over_cross_validated_trials(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        "-m",
        *QUIET,
        "hparams_search=xgb_optuna",
        "hydra.sweeper.n_trials=2",
        "cv.folds=2",
        "logger=none",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "xgb_optuna" / "multiruns").iterdir()
    best = json.loads(json.dumps(_yaml(sweep / "optimization_results.yaml")))
    means = [json.loads((job / "cv.json").read_text())["mean"]["val/loss"] for job in sweep.iterdir() if job.is_dir()]
    assert len(means) == 2 and best["best_value"] == pytest.approx(min(means))
    assert isinstance(best["best_params"]["model.max_depth"], int)


def test_compare_prints_models_side_by_side(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from compare import main

    for job, (task, acc) in enumerate([("xgb_breast_cancer", 0.97), ("mlp_breast_cancer", 0.96)]):
        folder = tmp_path / "logs" / task / "multiruns" / "2026-01-01_00-00-00" / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- experiment={task}\n- cv.folds=5\n")
        (folder / "config.yaml").write_text(f"task_name: {task}\ndata:\n  dataset: breast_cancer\n  split_seed: 0\n")
        report = {"folds": 5, "per_fold": [], "mean": {"test/acc": acc}, "std": {"test/acc": 0.01}}
        (folder / "cv.json").write_text(json.dumps(report))
    report = main(["--log-dir", str(tmp_path / "logs")])
    header, _, row = report.splitlines()[1:4]
    assert header.split() == ["metric", "xgb_breast_cancer", "mlp_breast_cancer", "reference"]
    assert row.split() == ["test/acc", "0.9700", "±", "0.0100", "0.9600", "±", "0.0100", "0.97"]


@pytest.mark.slow
def test_breast_cancer_five_fold_accuracy(train_config) -> None:
    cfg = train_config("experiment=xgb_breast_cancer", "cv.folds=5", "logger=none")
    cfg.optimized_metric = "test/acc"
    assert train(cfg) >= 0.95


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_boosting_on_cuda_matches_the_cpu(train_config) -> None:
    scores = {}
    for device in ("cpu", "cuda"):
        cfg = train_config("experiment=xgb_breast_cancer", f"model.device={device}", "logger=none", folder=device)
        cfg.optimized_metric = "test/acc"
        scores[device] = train(cfg)
    assert scores["cuda"] >= 0.93 and abs(scores["cuda"] - scores["cpu"]) <= 0.03


def _yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))
