"""scikit-learn's classic estimators behind train.py and evaluate.py, on the same tables, splits and metric names.

`model=random_forest` (or extra_trees, adaboost, decision_tree, logistic_regression, linear_regression, knn, svm)
instantiates `Estimator`: the estimator's kind plus every constructor argument as a config key, checked against
the estimator's signature before anything is fitted. The estimator is the classifier or the regressor of its
kind, as the table's task asks.

Features reach every estimator one way: categoricals one-hot, missing values replaced by the training split's
column mean (`SimpleImputer`), and for the distance- and margin-based kinds (knn, svm, logistic and linear
regression) standardized with the training split's mean and spread. The fitted pipeline is saved as `model.skops`:
loading it with skops builds only allow-listed scikit-learn and NumPy types and never runs code from the file.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np

from zoo.data.table import pca_components
from zoo.errors import UserError

log = logging.getLogger(__name__)

# kind -> (classifier, regressor or None), as "module.Class" of scikit-learn
KINDS: dict[str, tuple[str, str | None]] = {
    "random_forest": ("ensemble.RandomForestClassifier", "ensemble.RandomForestRegressor"),
    "extra_trees": ("ensemble.ExtraTreesClassifier", "ensemble.ExtraTreesRegressor"),
    "adaboost": ("ensemble.AdaBoostClassifier", "ensemble.AdaBoostRegressor"),
    "decision_tree": ("tree.DecisionTreeClassifier", "tree.DecisionTreeRegressor"),
    "logistic_regression": ("linear_model.LogisticRegression", None),
    "linear_regression": ("", "linear_model.LinearRegression"),
    "knn": ("neighbors.KNeighborsClassifier", "neighbors.KNeighborsRegressor"),
    "svm": ("svm.SVC", "svm.SVR"),
    "dummy": ("dummy.DummyClassifier", "dummy.DummyRegressor"),  # the floor: the majority class, or the mean
    # XGBoost's scikit-learn interface, as a member of an ensemble (model=xgboost alone is the native booster)
    "xgboost": ("xgboost.XGBClassifier", "xgboost.XGBRegressor"),
    "voting": ("ensemble.VotingClassifier", "ensemble.VotingRegressor"),
    "stacking": ("ensemble.StackingClassifier", "ensemble.StackingRegressor"),
}
# kinds whose `members` are other kinds, each configured as its own model config says
ENSEMBLES = ("voting", "stacking")
# distances and margins depend on each column's scale; trees do not
SCALED = {"logistic_regression", "linear_regression", "knn", "svm"}
# the modules a saved pipeline may be built from (skops checks every type in the file against these)
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "builtins.", "scipy.sparse.", "xgboost.sklearn.XGB", "xgboost.core.Booster")
MODEL_FILE = "model.skops"


class Estimator:
    """What to fit, not a fitted model: Hydra builds it from `model.*`, `fit_and_test` fits it on a table."""

    def __init__(self, kind: str, members: list[Any] | None = None, final: Any = None, **params: Any) -> None:
        if kind not in KINDS:
            raise UserError(f"model.kind: unknown '{kind}'; allowed: {', '.join(KINDS)}")
        self.kind = kind
        self.params = dict(params)
        self.members = [member_estimator(m, "model.members") for m in members or []]
        self.final = member_estimator(final, "model.final") if final is not None else None
        if kind in ENSEMBLES and len(self.members) < 2:
            raise UserError(f"model.members: {kind} combines at least two kinds, got {members!r}")
        if kind not in ENSEMBLES and (members or final is not None):
            raise UserError(f"model.members: only {', '.join(ENSEMBLES)} take members, not {kind}")
        self.auto_pruning = params.get("ccp_alpha") == "auto"
        if self.auto_pruning and kind != "decision_tree":
            raise UserError("model.ccp_alpha: 'auto' chooses the pruning of a decision_tree; give a number here")
        allowed = set()
        for path in KINDS[kind]:
            if path:
                allowed |= set(_parameters(_sklearn_class(path)))
        unknown = sorted(set(params) - allowed - {"estimators", "final_estimator"})
        if unknown:
            raise UserError(f"model.{unknown[0]}: not a setting of {kind}; allowed: {', '.join(sorted(allowed))}")

    def estimator_class(self, task: str) -> type:
        classifier, regressor = KINDS[self.kind]
        path = regressor if task == "regression" else classifier
        if not path:
            need = "a regression table" if task != "regression" else "class labels"
            other = "logistic_regression" if task != "regression" else "linear_regression"
            raise UserError(f"model: {self.kind} needs {need}, and data.task is {task}; use model={other}")
        return _sklearn_class(path)

    def pipeline(self, task: str, seed: int, ccp_alpha: float | None = None, pca_components: int | None = None) -> Any:
        """Impute, standardize where the kind needs it (or before a PCA), then the estimator with its arguments."""
        from sklearn.decomposition import PCA
        from sklearn.impute import SimpleImputer
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        cls = self.estimator_class(task)
        params = dict(self.params)
        if ccp_alpha is not None:
            params["ccp_alpha"] = ccp_alpha
        accepted = _parameters(cls)
        # a key of the other estimator of the kind (SVC's probability) does not apply; null where the two defaults
        # differ (a forest's criterion) means this estimator's own default
        params = {
            k: v for k, v in params.items() if k in accepted and not (v is None and accepted[k].default is not None)
        }
        if "random_state" in accepted and params.get("random_state") is None:
            params["random_state"] = seed
        if self.kind in ENSEMBLES:  # each member brings its own imputation and scaling
            params["estimators"] = [(f"{m.kind}_{i}", m.pipeline(task, seed)) for i, m in enumerate(self.members)]
            if self.final is not None and "final_estimator" in accepted:
                params["final_estimator"] = self.final.pipeline(task, seed)
        steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="mean", keep_empty_features=True))]
        if self.kind in SCALED or pca_components:
            steps.append(("scale", StandardScaler()))
        if pca_components:
            steps.append(("pca", PCA(n_components=pca_components, random_state=seed)))
        # SVC's probability: Platt scaling (a sigmoid on the margin) fitted by internal CV, which scikit-learn now
        # offers as a wrapper instead of the deprecated SVC(probability=True)
        calibrated = self.kind == "svm" and params.pop("probability", False)
        estimator = cls(**params)
        if calibrated:
            from sklearn.calibration import CalibratedClassifierCV

            estimator = CalibratedClassifierCV(estimator, method="sigmoid", ensemble=False)
        steps.append(("model", estimator))
        return Pipeline(steps)


def member_estimator(spec: Any, key: str) -> Estimator:
    """A member of an ensemble: a kind with the settings of its model config (`svm` is configs/model/svm.yaml),
    or a mapping {kind: svm, C: 10} that changes some of them."""
    from omegaconf import OmegaConf

    from zoo.cli import CONFIG_DIR

    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    changes = dict(spec) if isinstance(spec, dict) else {"kind": spec}
    kind = changes.pop("kind", None)
    if kind not in KINDS or kind in ENSEMBLES:
        allowed = ", ".join(k for k in KINDS if k not in ENSEMBLES)
        raise UserError(f"{key}: unknown kind {kind!r}; allowed: {allowed}")
    configured = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{kind}.yaml").model)
    # an ensemble member has no validation split of its own to stop on: XGBoost runs its n_estimators rounds
    settings = {k: v for k, v in configured.items() if k not in ("_target_", "kind", "early_stopping_rounds")}
    return Estimator(kind, **{**settings, **changes})


def fit_and_test(cfg: Any, output_dir: Path, model: Estimator, table: Any) -> tuple[dict[str, float], Any]:
    """Fit on train (choosing ccp_alpha by inner CV when asked), score every split; returns metrics and the fit."""
    from zoo.classic.run import score

    splits = table.splits()
    x_train, y_train = table.encoded(splits["train"][0]), splits["train"][1]
    seed = int(cfg.seed)
    metrics: dict[str, float] = {}
    ccp_alpha = None
    components = pca_components(cfg.data, x_train.shape[1])
    if model.auto_pruning:
        ccp_alpha = choose_ccp_alpha(model, table.task, x_train, y_train, seed, components=components)
        metrics["train/ccp_alpha"] = ccp_alpha
    fitted = model.pipeline(table.task, seed, ccp_alpha, components)
    try:
        fitted.fit(x_train, y_train)
    except ValueError as error:  # scikit-learn's parameter check names the argument
        raise UserError(f"model: {model.kind} refused its settings: {_first_line(error)}") from error
    for name, (x, y) in splits.items():
        if len(y) and (name != "test" or cfg.get("test", True)):
            metrics.update(score(table.task, y, outputs(fitted, table.task, table.encoded(x)), name, table.num_classes))
    if not len(splits["val"][1]) and getattr(fitted[-1], "oob_score", False):  # no val rows: the out-of-bag ones
        metrics.update(score(table.task, y_train, out_of_bag(fitted[-1], table.task), "val", table.num_classes))
    if "val/acc" in metrics:
        metrics["val/acc_best"] = metrics["val/acc"]
    return metrics, fitted


def out_of_bag(forest: Any, task: str) -> np.ndarray:
    """A bagged forest's out-of-bag outputs on its training rows (each row scored by the trees that never drew it),
    in the layout of `outputs`: with `data.val_fraction=0` and `model.oob_score=true` they are the validation figures
    (Breiman, 2001), so the forest fits on every training row and still reports val/ metrics."""
    if task == "regression":
        return forest.oob_prediction_
    proba = np.nan_to_num(forest.oob_decision_function_, nan=1.0 / forest.n_classes_)  # rows no tree left out
    return proba[:, 1] if task == "binary" else proba


def outputs(fitted: Any, task: str, x: np.ndarray) -> np.ndarray:
    """Predicted values, or class probabilities in the booster's layout (P(class 1) for binary tables)."""
    if task == "regression":
        return fitted.predict(x)
    if not hasattr(fitted, "predict_proba"):
        raise UserError("model.probability: class probabilities are needed for the metrics; set it to true")
    proba = fitted.predict_proba(x)
    return proba[:, 1] if task == "binary" else proba


def choose_ccp_alpha(
    model: Estimator, task: str, x: np.ndarray, y: np.ndarray, seed: int, folds: int = 5, components: int | None = None
) -> float:
    """Cost-complexity pruning strength by `folds`-fold CV on the training split along the tree's pruning path
    (Breiman et al. 1984): the alpha with the best mean score, the largest (simplest tree) among ties."""
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score

    grown = model.pipeline(task, seed, ccp_alpha=0.0, pca_components=components)
    grown[:-1].fit(x, y)
    path = grown[-1].cost_complexity_pruning_path(grown[:-1].transform(x), y)
    alphas = np.unique(np.clip(path.ccp_alphas[:-1], 0.0, None))  # the last alpha prunes to the root
    if len(alphas) > 30:
        alphas = np.unique(np.quantile(alphas, np.linspace(0, 1, 30)))
    splitter = (KFold if task == "regression" else StratifiedKFold)(folds, shuffle=True, random_state=seed)
    scores = [cross_val_score(model.pipeline(task, seed, ccp_alpha=float(a)), x, y, cv=splitter).mean() for a in alphas]
    best = max(scores)
    chosen = float(max(a for a, s in zip(alphas, scores) if s >= best - 1e-12))
    log.info("decision tree: ccp_alpha %.5f chosen by %d-fold CV over %d candidates", chosen, folds, len(alphas))
    return chosen


def save(fitted: Any, path: Path) -> None:
    import skops.io as sio

    from zoo.records import atomic_write_bytes

    atomic_write_bytes(path, sio.dumps(fitted))


def load(path: Path) -> Any:
    """A saved pipeline, built by skops from allow-listed types only; anything else is refused in one line."""
    import skops.io as sio

    if not path.is_file():
        raise UserError(f"ckpt_path: no file at '{path}'")
    data = path.read_bytes()
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as error:  # noqa: BLE001 - any failure to read the file is the same message to the user
        raise UserError(f"ckpt_path: '{path}' is not a skops model file ({_first_line(error)})") from error
    foreign = [t for t in untrusted if not t.startswith(TRUSTED_PREFIXES)]
    if foreign:
        raise UserError(f"ckpt_path: refused to load '{path}': it names {foreign[0]}, outside scikit-learn and NumPy")
    return sio.loads(data, trusted=untrusted)


def log_figures(writer: Any, fitted: Any, feature_names: list[str], step: int) -> dict[str, float]:
    """Feature importances (trees) or absolute coefficients (linear models) as a chart, and a decision tree drawn
    with `sklearn.tree.plot_tree`; returns the importances."""
    from zoo.classic.run import importance_chart

    estimator = fitted[-1]
    weights = getattr(estimator, "feature_importances_", None)
    if weights is None and hasattr(estimator, "coef_"):
        weights = np.abs(np.atleast_2d(estimator.coef_)).mean(axis=0)
    importance: dict[str, float] = {}
    if weights is not None and len(weights) == len(feature_names):
        importance = dict(sorted(zip(feature_names, map(float, weights)), key=lambda item: -item[1]))
        writer.add_figure("feature_importance/model", importance_chart(importance), step)
    if type(estimator).__name__.startswith("DecisionTree"):
        writer.add_figure("tree", tree_figure(estimator, feature_names), step)
    return importance


def tree_figure(tree: Any, feature_names: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.tree import plot_tree

    depth = min(int(tree.get_depth()), 4)
    figure, axes = plt.subplots(figsize=(min(4 + 3 * 2**depth, 30), 2 + 2 * depth))
    plot_tree(tree, max_depth=depth, feature_names=feature_names, filled=True, fontsize=7, ax=axes)
    axes.set_title(f"decision tree (first {depth} levels of {tree.get_depth()})")
    return figure


def encoded_names(table: Any) -> list[str]:
    """Column names of `table.encoded`: numeric features as they are, one per category of a categorical."""
    names: list[str] = []
    for name, column in table.x.items():
        if column.dtype == "category":
            names += [f"{name}={category}" for category in column.cat.categories]
        else:
            names.append(str(name))
    return names


def _sklearn_class(path: str) -> type:
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module if module == "xgboost" else f"sklearn.{module}"), name)


def _parameters(cls: type) -> Any:
    """The constructor arguments; XGBoost's classifier and regressor take their shared ones as **kwargs."""
    if cls.__module__.startswith("xgboost"):
        import xgboost

        return inspect.signature(xgboost.XGBModel).parameters
    return inspect.signature(cls).parameters


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
