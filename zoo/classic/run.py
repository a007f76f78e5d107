"""XGBoost and scikit-learn's classics behind train.py and evaluate.py: the run folder, metric names, TensorBoard
and CV of the neural models.

zoo.run hands over every model whose `_target_` starts with `zoo.classic.`: `fit_and_test` trains one booster or
fits one estimator (cross_validate calls it once per fold), `evaluate` rescores a saved `model.json` or
`model.skops` and predicts new CSV rows.
The Lightning groups (trainer, callbacks, optimizer, scheduler) do not apply; `logger=none` skips TensorBoard
and `trainer.fast_dev_run` (debug=fdr) boosts a single round.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig

from zoo.classic import estimators, unsupervised
from zoo.classic.estimators import Estimator
from zoo.classic.model import XGBoostModel
from zoo.classic.unsupervised import PCA, GaussianAnomaly, KMeans
from zoo.data.table import SPLITS, Table, table_from_config
from zoo.errors import UserError
from zoo.records import flat_hparams, format_table, write_metrics

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

log = logging.getLogger(__name__)

# monitor -> (XGBoost's metric, the monitor_mode that fits, whether XGBoost maximizes it)
MONITORS = {
    "binary": {
        "val/loss": ("logloss", "min", False),
        "val/acc": ("error", "max", False),
        "val/roc_auc": ("auc", "max", True),
    },
    "multiclass": {"val/loss": ("mlogloss", "min", False), "val/acc": ("merror", "max", False)},
    "regression": {
        "val/loss": ("rmse", "min", False),
        "val/rmse": ("rmse", "min", False),
        "val/mae": ("mae", "min", False),
    },
}
# what XGBoost evaluates each round on train and val: the curves in TensorBoard
ROUND_METRICS = {
    "binary": ["logloss", "error", "auc"],
    "multiclass": ["mlogloss", "merror"],
    "regression": ["rmse", "mae"],
}
TOP_FEATURES = 20


def fit_and_test(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Boost on train with early stopping on val, score train/val/test, save model.json, metrics.json, TensorBoard."""
    import xgboost as xgb

    _check_run(cfg, output_dir)
    model = build_model(cfg)
    table = table_from_config(cfg.data)
    if isinstance(model, Estimator):
        return _fit_and_test_estimator(cfg, output_dir, model, table)
    if cfg.data.get("pca_components") is not None:
        kind = (
            "XGBoost reads the table's own columns"
            if isinstance(model, XGBoostModel)
            else "this model fits the columns"
        )
        raise UserError(
            f"data.pca_components: {kind}; allowed: null (scikit-learn estimators and neural models take it)"
        )
    if isinstance(model, KMeans | PCA | GaussianAnomaly):
        return _fit_and_test_unsupervised(cfg, output_dir, model, table)
    splits = table.splits()
    metric, maximize = early_stopping_metric(cfg, table.task)
    params = {**model.params(table.task, table.num_classes, int(cfg.seed)), "eval_metric": ROUND_METRICS[table.task]}
    rounds = _rounds(cfg, model)

    evals, callbacks = _watched_splits(splits, model.early_stopping_rounds, metric, maximize)
    curves: dict[str, dict[str, list[float]]] = {}
    try:
        booster = xgb.train(
            params, evals[0][0], rounds, evals=evals, evals_result=curves, callbacks=callbacks, verbose_eval=False
        )
    except xgb.core.XGBoostError as error:
        raise UserError(f"model: XGBoost refused the run: {_first_line(error)}") from error

    kept = booster.num_boosted_rounds()
    stopping = f"early stopping on val {metric}" if callbacks else "no early stopping"
    log.info("XGBoost kept %d of %d rounds (%s)", kept, rounds, stopping)
    metrics: dict[str, float] = {"train/rounds": float(kept)}
    for name in SPLITS:
        x, y = splits[name]
        if len(y) and (name != "test" or cfg.get("test", True)):
            metrics.update(score(table.task, y, predict(booster, x), name, table.num_classes))
    if "val/acc" in metrics:  # the accuracy of the kept (best) round: the neural models' default optimized_metric
        metrics["val/acc_best"] = metrics["val/acc"]

    ranked = _save_run(booster, output_dir, metrics)
    if cfg.get("logger"):
        _log_tensorboard(output_dir / "tensorboard", cfg, curves, metrics, ranked, kept - 1)

    print(f"\nXGBoost {table.task}, {kept} rounds: metrics of {output_dir}")
    print(format_table({k: f"{v:.4f}" for k, v in metrics.items() if k.startswith(("val/", "test/"))}))
    return metrics


def _check_run(cfg: DictConfig, output_dir: Path) -> None:
    """What an XGBoost run cannot take, refused before anything is read or written."""
    for group in ("optimizer", "scheduler"):
        if cfg.get(group) is not None:
            raise UserError(
                f"{group}: XGBoost boosts with its own step size (model.learning_rate) and no {group}; "
                f"allowed: {group}=none"
            )
    if cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path: XGBoost runs do not resume; train anew, "
            "or score a model with evaluate.py ckpt_path=<run>/model.json"
        )
    if not cfg.get("train", True):
        raise UserError("train: false needs a trained model; score an XGBoost model with evaluate.py ckpt_path=<file>")
    for saved in ("model.json", estimators.MODEL_FILE):
        if (output_dir / saved).exists():
            raise UserError(f"run folder '{output_dir}' already holds a {saved}; a new run needs a new folder")


def _fit_and_test_estimator(cfg: DictConfig, output_dir: Path, model: Estimator, table: Table) -> dict[str, float]:
    """A scikit-learn estimator: fit, score, save model.skops and metrics.json, log to TensorBoard."""
    metrics, fitted = estimators.fit_and_test(cfg, output_dir, model, table)
    output_dir.mkdir(parents=True, exist_ok=True)
    estimators.save(fitted, output_dir / estimators.MODEL_FILE)
    write_metrics(output_dir / "metrics.json", metrics)
    if cfg.get("logger"):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        from zoo.internals import add_summary

        with SummaryWriter(str(output_dir / "tensorboard")) as writer:
            for name, value in metrics.items():
                writer.add_scalar(name, value, 0)
            estimators.log_figures(writer, fitted, estimators.encoded_names(table), 0)
            flat = {k: v for k, v in flat_hparams(cfg).items() if k.startswith(("data.", "model.", "seed"))}
            for summary in hparams(flat, {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}):
                add_summary(writer, summary)
    print(f"\n{model.kind} ({table.task}): metrics of {output_dir}")
    print(format_table({k: f"{v:.4f}" for k, v in metrics.items() if k.startswith(("val/", "test/"))}))
    return metrics


def _fit_and_test_unsupervised(
    cfg: DictConfig, output_dir: Path, model: KMeans | PCA | GaussianAnomaly, table: Table
) -> dict[str, float]:
    """k-means or PCA: fit on the training rows, score every split, save model.pt and metrics.json, log."""
    metrics = unsupervised.fit_and_test(cfg, output_dir, model, table)
    write_metrics(output_dir / "metrics.json", metrics)
    if cfg.get("logger"):
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(output_dir / "tensorboard")) as writer:
            for name, value in metrics.items():
                writer.add_scalar(name, value, 0)
            if (output_dir / "pca.png").is_file():
                import matplotlib.image

                image = matplotlib.image.imread(output_dir / "pca.png")[..., :3]
                writer.add_image("pca", image, 0, dataformats="HWC")
    print(f"\n{type(model).__name__} on {table.dataset}: metrics of {output_dir}")
    print(format_table({k: f"{v:.4f}" for k, v in metrics.items()}))
    return metrics


def _watched_splits(
    splits: dict[str, Any], early_stopping_rounds: int | None, metric: str, maximize: bool
) -> tuple[list[tuple[Any, str]], list[Any]]:
    """The splits XGBoost reports each round (train, and val when there is one), and early stopping on val."""
    import xgboost as xgb

    evals = [(_matrix(*splits["train"]), "train")]
    callbacks = []
    if len(splits["val"][1]):
        evals.append((_matrix(*splits["val"]), "val"))
        if early_stopping_rounds:
            callbacks.append(
                xgb.callback.EarlyStopping(
                    rounds=early_stopping_rounds,
                    metric_name=metric,
                    data_name="val",
                    maximize=maximize,
                    save_best=True,  # the saved model ends at the best round, so evaluate.py needs no extra state
                )
            )
    elif early_stopping_rounds:
        log.warning("data.val_fraction is 0: no validation split, so early stopping is off")
    return evals, callbacks


def _save_run(booster: Any, output_dir: Path, metrics: dict[str, float]) -> dict[str, float]:
    """model.json (what evaluate.py loads), metrics.json and the features ranked by gain, which it returns."""
    output_dir.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(output_dir / "model.json"))
    write_metrics(output_dir / "metrics.json", metrics)
    importance = booster.get_score(importance_type="gain")
    ranked = dict(sorted(importance.items(), key=lambda item: -item[1]))
    (output_dir / "feature_importance.json").write_text(json.dumps(ranked, indent=2) + "\n")
    return ranked


def evaluate(cfg: DictConfig, run_cfg: DictConfig) -> dict[str, float]:
    """Rescore a saved model.json on the split its run config defines; with `data_path`, also predict a new CSV."""
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = Path(cfg.ckpt_path)
    split = cfg.get("split", "test")
    if split not in ("test", "val"):
        raise UserError(f"split: unknown '{split}'; allowed: test, val")
    table = table_from_config(_data_from_launch_folder(run_cfg.data, ckpt_path))
    if ckpt_path.suffix == ".pt":  # k-means, PCA, Gaussian anomaly: their fitted tensors
        model = unsupervised.restore(build_model(run_cfg), ckpt_path)
        x, y = table.splits()[split]
        if not len(y):
            raise UserError(f"split: the run's {split} split is empty (data.{split}_fraction is 0)")
        metrics = unsupervised.score_split(model, table.encoded(x), y, split, table.task)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(output_dir / "metrics.json", metrics)
        print(f"\n{split} metrics of {ckpt_path}")
        print(format_table({k: f"{v:.4f}" for k, v in metrics.items()}))
        return metrics
    predict_rows = _predictor(table, ckpt_path)
    x, y = table.splits()[split]
    if not len(y):
        raise UserError(f"split: the run's {split} split is empty (data.{split}_fraction is 0)")
    metrics = score(table.task, y, predict_rows(x), split, table.num_classes)

    output_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(output_dir / "metrics.json", metrics)
    print(f"\n{split} metrics of {ckpt_path}")
    print(format_table({k: f"{v:.4f}" for k, v in metrics.items()}))
    if cfg.get("data_path"):
        target = Path(cfg.get("predictions") or output_dir / "predictions.csv")
        rows = write_predictions(predict_rows, table, Path(cfg.data_path), target)
        print(f"wrote {rows} predictions to {target}")
    return metrics


def predict_file(run_cfg: DictConfig, ckpt_path: Path, source: Path, target: Path) -> int:
    """`evaluate.py mode=predict input=<csv>` for a model.json or model.skops: the rows of `source` with their
    predictions, written to `target` as `data_path` writes them beside the scores."""
    table = table_from_config(_data_from_launch_folder(run_cfg.data, ckpt_path))
    rows = write_predictions(_predictor(table, ckpt_path), table, source, target, key="input")
    print(f"wrote {rows} predictions to {target}")
    return rows


def _predictor(table: Table, ckpt_path: Path) -> Callable[[pd.DataFrame], np.ndarray]:
    """Feature rows of `table` to the outputs of the saved model.json (XGBoost) or model.skops (scikit-learn)."""
    if ckpt_path.suffix == ".skops":
        fitted = estimators.load(ckpt_path)
        if getattr(fitted, "n_features_in_", table.encoded_width) != table.encoded_width:
            raise UserError(f"ckpt_path: '{ckpt_path}' was fitted on other columns than the table in its config.yaml")

        def predict_rows(x: pd.DataFrame) -> np.ndarray:
            return estimators.outputs(fitted, table.task, table.encoded(x))

        return predict_rows
    booster = load_booster(ckpt_path)
    if list(booster.feature_names or []) != list(table.x.columns):
        raise UserError(f"ckpt_path: '{ckpt_path}' was trained on other columns than the table in its config.yaml")
    return lambda x: predict(booster, x)


def build_model(cfg: DictConfig) -> XGBoostModel | Estimator | KMeans | PCA | GaussianAnomaly:
    """Instantiate `model`; a bad value surfaces as its own one-line UserError rather than Hydra's wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        model = instantiate(cfg.model)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise
    if not isinstance(model, XGBoostModel | Estimator | KMeans | PCA | GaussianAnomaly):
        raise UserError(f"model._target_: expected an XGBoost or scikit-learn model, got {cfg.model._target_}")
    return model


def early_stopping_metric(cfg: DictConfig, task: str) -> tuple[str, bool]:
    """XGBoost's name for `monitor` and whether it grows; a monitor it cannot compute falls back to val/loss."""
    choices = MONITORS[task]
    monitor, mode = str(cfg.get("monitor") or "val/loss"), cfg.get("monitor_mode")
    if monitor not in choices:
        log.warning(
            "monitor '%s' is not computed for a %s booster (allowed: %s); early stopping watches val/loss",
            monitor,
            task,
            ", ".join(choices),
        )
        monitor, mode = "val/loss", None
    metric, direction, maximize = choices[monitor]
    if mode is not None and mode != direction:
        raise UserError(f"monitor_mode: '{mode}' does not fit monitor={monitor}; use monitor_mode={direction}")
    return metric, maximize


def score(task: str, y: np.ndarray, output: np.ndarray, split: str, num_classes: int) -> dict[str, float]:
    """Metrics named like the neural models': loss, acc, precision, recall, F1, ROC-AUC, or RMSE, MAE, R²."""
    from sklearn import metrics as skm

    values: dict[str, float] = {}
    if task == "regression":
        error = np.asarray(output, dtype=np.float64) - y
        values["rmse"] = values["loss"] = float(np.sqrt(np.mean(error**2)))
        values["mae"] = float(np.mean(np.abs(error)))
        if len(y) > 1 and np.ptp(y) > 0:
            values["r2"] = float(skm.r2_score(y, output))
    else:
        proba = probabilities(output)
        pred = proba.argmax(axis=1)
        labels = np.arange(num_classes)
        values["loss"] = float(skm.log_loss(y, proba, labels=labels))
        values["acc"] = float(skm.accuracy_score(y, pred))
        for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
            values[name] = float(fn(y, pred, average="macro", zero_division=0))
        if len(np.unique(y)) == num_classes:  # ROC-AUC needs every class among the true labels
            auc = (
                skm.roc_auc_score(y, proba[:, 1])
                if num_classes == 2
                else skm.roc_auc_score(y, proba, multi_class="ovr", labels=labels)
            )
            values["roc_auc"] = float(auc)
    return {f"{split}/{name}": value for name, value in values.items()}


def probabilities(output: np.ndarray) -> np.ndarray:
    """Rows of class probabilities from XGBoost's output: P(class 1) for binary, softprob rows otherwise."""
    output = np.asarray(output, dtype=np.float64)
    proba = np.column_stack([1.0 - output, output]) if output.ndim == 1 else output
    return proba / proba.sum(axis=1, keepdims=True)


def predict(booster: Any, x: pd.DataFrame) -> np.ndarray:
    return booster.predict(_matrix(x))


def load_booster(path: Path) -> Any:
    import xgboost as xgb

    if not path.is_file():
        raise UserError(f"ckpt_path: no file at '{path}'")
    try:
        return xgb.Booster(model_file=str(path))
    except xgb.core.XGBoostError as error:
        raise UserError(f"ckpt_path: '{path}' is not a readable XGBoost model ({_first_line(error)})") from error


def write_predictions(predict_rows: Any, table: Table, source: Path, target: Path, key: str = "data_path") -> int:
    """The rows of `source` with a `prediction` column (class label or value) and, for classes, probabilities.

    `key` is the config key that named `source`, for the messages; an existing `target` is refused, not replaced.
    """
    import pandas as pd

    check_new_file(target)
    if not source.is_file():
        raise UserError(f"{key}: no file at '{source}'")
    try:
        frame = pd.read_csv(source)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{key}: '{source}' is not a readable CSV file ({_first_line(error)})") from error
    output = predict_rows(table.features_of(frame, source=key))
    result = frame.copy()
    if table.task == "regression":
        result["prediction"] = output
    else:
        proba = probabilities(output)
        result["prediction"] = [table.classes[i] for i in proba.argmax(axis=1)]
        for index, label in enumerate(table.classes):
            result[f"probability_{label}"] = proba[:, index]
    target.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(target, index=False)
    return len(result)


def check_new_file(target: Path) -> None:
    """Predictions go to a new file: one already on disk (`predictions=<file>`) is refused, never replaced."""
    if target.exists():
        raise UserError(f"predictions: '{target}' already exists; give another file (predictions=<file.csv>)")


def _data_from_launch_folder(data: DictConfig, ckpt_path: Path) -> DictConfig:
    """A relative `data.path` meant the folder training was launched from, which Hydra records in the run folder."""
    from omegaconf import OmegaConf

    path = data.get("path")
    if not path or Path(str(path)).is_absolute():
        return data
    for folder in list(ckpt_path.resolve().parents)[:3]:
        recorded = folder / ".hydra" / "hydra.yaml"
        if recorded.is_file():
            launched = OmegaConf.select(OmegaConf.load(recorded), "hydra.runtime.cwd")
            if launched and (Path(launched) / str(path)).is_file():
                data = data.copy()
                data.path = str(Path(launched) / str(path))
            break
    return data


def _matrix(x: pd.DataFrame, y: np.ndarray | None = None) -> Any:
    import xgboost as xgb

    return xgb.DMatrix(x, label=y, enable_categorical=True)


def _rounds(cfg: DictConfig, model: XGBoostModel) -> int:
    """n_estimators, or one round (fast_dev_run=N: N rounds) when a debug preset asks for a quick check."""
    dev = (cfg.get("trainer") or {}).get("fast_dev_run", False)
    if dev is True:
        return 1
    if isinstance(dev, int) and dev > 0:
        return min(dev, model.n_estimators)
    return model.n_estimators


def _log_tensorboard(
    folder: Path,
    cfg: DictConfig,
    curves: dict[str, dict[str, list[float]]],
    metrics: dict[str, float],
    importance: dict[str, float],
    last_round: int,
) -> None:
    """Per-round curves (`val/logloss` at step=round), final metrics at the kept round, the gain chart, hparams."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    from zoo.internals import add_summary

    with SummaryWriter(str(folder)) as writer:
        for split, named in curves.items():
            for name, values in named.items():
                for step, value in enumerate(values):
                    writer.add_scalar(f"{split}/{name}", value, step)
        written = {f"{split}/{name}" for split, named in curves.items() for name in named}
        for name, value in metrics.items():
            if name not in written:
                writer.add_scalar(name, value, last_round)
        if importance:
            writer.add_figure("feature_importance/gain", importance_chart(importance), last_round)
        flat = {k: v for k, v in flat_hparams(cfg).items() if k.startswith(("data.", "model.", "seed"))}
        final = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
        for summary in hparams(flat, final):
            add_summary(writer, summary)


def importance_chart(importance: dict[str, float]) -> Any:
    """Horizontal bars of the largest total gains, biggest on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = sorted(importance.items(), key=lambda item: -item[1])[:TOP_FEATURES][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(top) + 1.2))
    ax.barh([name for name, _ in top], [gain for _, gain in top], color="tab:blue")
    ax.set(xlabel="gain", title=f"feature importance (top {len(top)} of {len(importance)})")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return fig


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("Stack trace")]
    return lines[0] if lines else type(error).__name__
