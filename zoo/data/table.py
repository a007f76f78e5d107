"""Tables of features and one target: scikit-learn's bundled tables and any CSV file.

XGBoost reads the splits as pandas frames, so categorical columns stay categorical and missing values stay
missing. The MLP reads the same rows through `zoo.data.tabular.TabularDataModule`, one-hot encoded and
standardized. Rows are split as `zoo.data.tensor.TensorDataModule` splits them (stratified for classes;
`folds`/`fold` cut all the data with a k-fold, or the rows `holdout_fraction` leaves), so a neural model and a
booster trained on one data config see the same rows in every split.

This module imports neither torch nor Lightning (pandas and scikit-learn only when a table is read), so that
XGBoost runs start fast.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zoo.errors import UserError, check_holdout_fraction, check_split_fractions

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# name -> (scikit-learn loader, task)
BUNDLED = {
    "breast_cancer": ("load_breast_cancer", "binary"),
    "wine": ("load_wine", "multiclass"),
    "digits": ("load_digits", "multiclass"),
    "diabetes": ("load_diabetes", "regression"),
}
DATASETS = (*BUNDLED, "csv")
TASKS = ("auto", "binary", "multiclass", "regression")
# an integer-valued numeric target with at most this many distinct values is read as class labels
MAX_INFERRED_CLASSES = 20
SPLITS = ("train", "val", "test")


class Table:
    """Features (a DataFrame: float columns and pandas categoricals) and an encoded target, split by `split_seed`.

    `task="auto"` reads text, boolean and categorical targets as classes (binary with two values), integer targets
    with at most 20 values as classes, and any other number as a regression target. Class labels become 0..K-1 in
    sorted order (`classes` maps them back). Text columns, and the columns named in `categorical`, become
    categoricals whose categories are the sorted values of the whole table, so codes never depend on the split.
    Rows without a target are dropped; missing feature values are left as NaN.
    """

    def __init__(
        self,
        dataset: str = "csv",
        path: str | None = None,
        target: str | None = None,
        task: str = "auto",
        categorical: list[str] | None = None,
        drop: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        folds: int = 1,
        fold: int = 0,
        normal_class: Any = None,
        anomaly_share: float = 0.05,
        train_fraction: float = 1.0,
        holdout_fraction: float = 0.0,
    ) -> None:
        if dataset not in DATASETS:
            raise UserError(f"data.dataset: unknown '{dataset}'; allowed: {', '.join(DATASETS)}")
        if task not in TASKS:
            raise UserError(f"data.task: unknown '{task}'; allowed: {', '.join(TASKS)}")
        if dataset == "csv" and not path:
            raise UserError("data.path: no CSV file given; use data=tabular_csv data.path=<file.csv> data.target=<col>")
        if dataset == "csv" and not target:
            raise UserError(f"data.target: name the column to predict, e.g. data.target=<column of {path}>")
        check_split_fractions(val_fraction, test_fraction)
        if not isinstance(folds, int) or folds < 1 or not isinstance(fold, int) or not 0 <= fold < folds:
            raise UserError(
                f"data.fold must be in [0, data.folds) with data.folds >= 1, got fold={fold}, folds={folds}"
            )
        self.dataset, self.path, self.requested_task = dataset, path, task
        self.target = None if target is None else str(target)  # data.target=3 names the column '3'
        self.categorical, self.drop = _names(categorical), _names(drop)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        check_holdout_fraction(holdout_fraction, folds)
        self.folds, self.fold, self.holdout_fraction = folds, fold, float(holdout_fraction)
        if normal_class is not None and not 0 < anomaly_share < 1:
            raise UserError(f"data.anomaly_share: expected a number in (0, 1), got {anomaly_share!r}")
        self.normal_class, self.anomaly_share = normal_class, anomaly_share
        share = train_fraction
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise UserError(f"data.train_fraction: expected a number in (0, 1], got {train_fraction!r}")
        self.train_fraction = float(train_fraction)

    @functools.cached_property
    def _content(self) -> tuple[pd.DataFrame, np.ndarray, str, list[Any]]:
        features, target, known_task = self._read()
        keep = target.notna().to_numpy()
        if not keep.all():
            log.warning("data: dropped %d rows with no value in the target column", int((~keep).sum()))
            features, target = features[keep].reset_index(drop=True), target[keep].reset_index(drop=True)
        if len(target) == 0:
            raise UserError(f"data.target: the column '{target.name}' has no values")
        if self.normal_class is not None:
            return self._anomaly_table(features, target)
        if known_task and self.requested_task not in ("auto", known_task):
            raise UserError(f"data.task: the {self.dataset} table is a {known_task} task, got '{self.requested_task}'")
        task = known_task or (self.requested_task if self.requested_task != "auto" else infer_task(target))
        y, classes = _encode_target(target, task)
        return self._features(features), y, task, classes

    def _anomaly_table(self, features: pd.DataFrame, target: pd.Series) -> tuple[pd.DataFrame, np.ndarray, str, list]:
        """An anomaly-detection table from a labelled one: every row of `normal_class`, and rows of the other classes
        drawn at random (seeded by split_seed) until they are `anomaly_share` of the rows; target 1 = anomaly."""
        values = target.astype(str).to_numpy()
        normal = values == str(self.normal_class)
        if not normal.any():
            raise UserError(f"data.normal_class: no row has the label {self.normal_class!r}")
        others = np.flatnonzero(~normal)
        wanted = round(self.anomaly_share / (1 - self.anomaly_share) * int(normal.sum()))
        chosen = np.random.default_rng(self.split_seed).choice(others, size=min(wanted, len(others)), replace=False)
        keep = np.sort(np.concatenate([np.flatnonzero(normal), chosen]))
        y = (~normal[keep]).astype(np.int64)
        return self._features(features.iloc[keep].reset_index(drop=True)), y, "binary", ["normal", "anomaly"]

    @property
    def x(self) -> pd.DataFrame:
        """All feature rows, in file order."""
        return self._content[0]

    @property
    def y(self) -> np.ndarray:
        """Class indices 0..K-1 (int64) for classification, the target (float64) for regression."""
        return self._content[1]

    @property
    def task(self) -> str:
        """binary, multiclass or regression: the one asked for, or the one the target suggests."""
        return self._content[2]

    @property
    def classes(self) -> list[Any]:
        """The original label of each class index; empty for regression."""
        return self._content[3]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split_indices(self) -> dict[str, np.ndarray]:
        """Row numbers of train, val and test, cut as TensorDataModule cuts them (KFold for regression targets).

        With `holdout_fraction > 0` (and `folds > 1`) that share of the rows, stratified for classes, is cut first
        as `holdout`, the same rows for every fold, and the k-fold runs over the rest.
        """
        y, seed, stratify = self.y, self.split_seed, self.task != "regression"
        holdout = None
        if self.folds > 1:
            from sklearn.model_selection import KFold, StratifiedKFold

            rows = np.arange(len(y))
            if self.holdout_fraction > 0:
                rows, holdout = _cut(rows, y, self.holdout_fraction, seed, stratify)
            splitter = (StratifiedKFold if stratify else KFold)(self.folds, shuffle=True, random_state=seed)
            pool, test = list(splitter.split(np.zeros(len(rows)), y[rows] if stratify else None))[self.fold]
            pool, test = rows[pool], rows[test]
        else:
            pool, test = _cut(np.arange(len(y)), y, self.test_fraction, seed, stratify)
        train, val = _cut(np.arange(len(pool)), y[pool], self.val_fraction, seed, stratify)
        if self.train_fraction < 1:  # learning curves: a share of the training rows, the same val and test
            train, _ = _cut(train, y[pool][train], 1 - self.train_fraction, seed, stratify)
        indices = {"train": pool[train], "val": pool[val], "test": test}
        if holdout is not None:
            indices["holdout"] = holdout
        return indices

    def splits(self) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
        """(features, target) of each split (holdout too, when cut); val or test may be empty (a fraction of 0)."""
        return {
            name: (self.x.iloc[rows].reset_index(drop=True), self.y[rows])
            for name, rows in self.split_indices().items()
        }

    def features_of(self, frame: pd.DataFrame, source: str = "data_path") -> pd.DataFrame:
        """New rows (a CSV read later) encoded like the table: its feature columns, numbers, the same categories."""
        import pandas as pd

        missing = [name for name in self.x.columns if name not in frame.columns]
        if missing:
            raise UserError(f"{source}: the file lacks feature columns of the training table: {', '.join(missing)}")
        columns = {}
        for name, column in self.x.items():
            if column.dtype == "category":
                known = frame[name].where(frame[name].isin(column.cat.categories))  # unseen categories: missing
                columns[name] = pd.Categorical(known, categories=column.cat.categories)
            else:
                try:
                    columns[name] = pd.to_numeric(frame[name]).astype("float64")
                except (TypeError, ValueError) as error:
                    raise UserError(
                        f"{source}: column '{name}' holds text but the model was trained on numbers"
                    ) from error
        return pd.DataFrame(columns, index=frame.index)

    def encoded(self, x: pd.DataFrame) -> np.ndarray:
        """Features as float32 numbers for a neural network: categoricals one-hot (all zero when missing), NaN kept."""
        parts = []
        for _, column in x.items():
            if column.dtype == "category":
                codes = column.cat.codes.to_numpy()
                onehot = np.zeros((len(codes), len(column.cat.categories)), dtype=np.float32)
                present = codes >= 0
                onehot[np.flatnonzero(present), codes[present]] = 1.0
                parts.append(onehot)
            else:
                parts.append(column.to_numpy(dtype=np.float32)[:, None])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(x), 0), dtype=np.float32)

    @property
    def encoded_width(self) -> int:
        """Columns of `encoded`: one per numeric feature, one per category of each categorical feature."""
        return sum(len(c.cat.categories) if c.dtype == "category" else 1 for _, c in self.x.items())

    def _read(self) -> tuple[pd.DataFrame, pd.Series, str | None]:
        """Raw features, the target column, and the task when the dataset fixes it."""
        import pandas as pd

        if self.dataset in BUNDLED:
            from sklearn import datasets

            loader, task = BUNDLED[self.dataset]
            kwargs = {"scaled": False} if self.dataset == "diabetes" else {}
            bunch = getattr(datasets, loader)(as_frame=True, **kwargs)
            return bunch.data, bunch.target.rename("target"), task
        path = Path(str(self.path))
        if not path.is_file():
            raise UserError(f"data.path: no file at '{path}'")
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise UserError(f"data.path: '{path}' is not a readable CSV file ({str(error).splitlines()[0]})") from error
        columns = [str(c) for c in frame.columns]
        if self.target not in columns:
            raise UserError(f"data.target: no column '{self.target}' in {path}; columns: {', '.join(columns)}")
        for key, names in (("categorical", self.categorical), ("drop", self.drop)):
            unknown = [n for n in names if n not in columns]
            if unknown:
                raise UserError(f"data.{key}: no column {', '.join(map(repr, unknown))} in {path}")
        features = frame.drop(columns=[self.target, *self.drop])
        if features.shape[1] == 0:
            raise UserError(f"data.target: '{path}' has no feature column besides '{self.target}'")
        return features, frame[self.target], None

    def _features(self, features: pd.DataFrame) -> pd.DataFrame:
        import pandas as pd

        columns = {}
        for name, column in features.items():
            if name in self.categorical or not pd.api.types.is_numeric_dtype(column) or column.dtype == "category":
                values = column.astype("object") if column.dtype == "category" else column
                categories = sorted(pd.unique(values.dropna()), key=lambda v: (str(type(v)), v))
                columns[str(name)] = pd.Categorical(values, categories=categories)
            else:
                columns[str(name)] = column.astype("float64")
        return pd.DataFrame(columns)


def _names(names: str | list[str] | None) -> list[str]:
    """`data.drop=id` means the same as `data.drop=[id]`."""
    return [names] if isinstance(names, str) else [str(n) for n in names or []]


def infer_task(target: pd.Series) -> str:
    """binary or multiclass for labels (text, booleans, few integers), regression for other numbers."""
    import pandas as pd

    distinct = target.nunique()
    if distinct < 2:
        raise UserError(f"data.target: the column '{target.name}' holds a single value; there is nothing to predict")
    numeric = pd.api.types.is_numeric_dtype(target) and not pd.api.types.is_bool_dtype(target)
    if numeric:
        values = target.to_numpy(dtype=np.float64)
        if not np.all(values == np.round(values)) or distinct > MAX_INFERRED_CLASSES:
            return "regression"
    return "binary" if distinct == 2 else "multiclass"


def _encode_target(target: pd.Series, task: str) -> tuple[np.ndarray, list[Any]]:
    import pandas as pd

    if task == "regression":
        if not pd.api.types.is_numeric_dtype(target) or pd.api.types.is_bool_dtype(target):
            raise UserError(f"data.task: regression needs a numeric target; column '{target.name}' holds labels")
        return target.to_numpy(dtype=np.float64), []
    codes, classes = pd.factorize(target, sort=True)
    if task == "binary" and len(classes) != 2:
        raise UserError(
            f"data.task: binary needs two classes; column '{target.name}' has {len(classes)}; "
            "use data.task=multiclass or data.task=auto"
        )
    if len(classes) < 2:
        raise UserError(f"data.target: the column '{target.name}' holds a single class; there is nothing to predict")
    return codes.astype(np.int64), [c.item() if hasattr(c, "item") else c for c in classes]


def _cut(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int, stratify: bool) -> tuple[np.ndarray, ...]:
    """One cut of `stratified_split`: (rest, part) with `fraction` of the rows in part, both sorted."""
    if fraction <= 0:
        return np.sort(rows), np.array([], dtype=int)
    from sklearn.model_selection import train_test_split

    try:
        rest, part = train_test_split(
            rows, test_size=fraction, random_state=seed, stratify=labels if stratify else None
        )
    except ValueError as error:  # a class too rare to appear on both sides of the cut
        raise UserError(
            f"data: cannot split the table by class ({error}); use more rows or data.task=regression"
        ) from error
    return np.sort(rest), np.sort(part)


TABLE_KEYS = (
    "dataset",
    "path",
    "target",
    "task",
    "categorical",
    "drop",
    "val_fraction",
    "test_fraction",
    "split_seed",
    "folds",
    "fold",
    "normal_class",
    "anomaly_share",
    "train_fraction",
    "holdout_fraction",
)


def table_from_config(data: Any) -> Table:
    """The Table of a data config: the keys XGBoost needs, without the neural ones (batch sizes, input shape)."""
    from omegaconf import OmegaConf

    target = str(data.get("_target_", ""))
    if target != "zoo.data.tabular.TabularDataModule":
        options = "breast_cancer, wine, digits_flat, diabetes, tabular_csv"
        raise UserError(f"data: boosted trees need a table, not '{target.rsplit('.', 1)[-1]}'; allowed: {options}")
    values = OmegaConf.to_container(data, resolve=True) if OmegaConf.is_config(data) else dict(data)
    return Table(**{key: values[key] for key in TABLE_KEYS if key in values})


def pca_components(data: Any, width: int) -> int | None:
    """`data.pca_components`: null, or how many principal components of the standardized columns replace them."""
    value = data.get("pca_components") if hasattr(data, "get") else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= width:
        raise UserError(f"data.pca_components: expected null or an integer in [1, {width}], got {value!r}")
    return value
