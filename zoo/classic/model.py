"""The booster settings of configs/model/xgboost.yaml, checked before XGBoost sees them."""

from __future__ import annotations

from typing import Any

from zoo.errors import UserError

TREE_METHODS = ("hist", "approx", "exact")
OBJECTIVES = {"binary": "binary:logistic", "multiclass": "multi:softprob", "regression": "reg:squarederror"}


class XGBoostModel:
    """What to boost, not a trained model: Hydra instantiates it from `model.*`, zoo.classic.run trains with it.

    Every value is checked here so that a mistake is one line naming its key instead of an XGBoost trace
    halfway through a sweep. The objective follows the data's task (binary, multiclass, regression).
    """

    def __init__(
        self,
        n_estimators: int = 1000,
        max_depth: int = 6,
        learning_rate: float = 0.1,
        subsample: float = 1.0,
        colsample_bytree: float = 1.0,
        min_child_weight: float = 1.0,
        reg_alpha: float = 0.0,
        reg_lambda: float = 1.0,
        gamma: float = 0.0,
        tree_method: str = "hist",
        device: str = "cpu",
        early_stopping_rounds: int | None = 50,
        n_jobs: int | None = None,
    ) -> None:
        self.n_estimators = _integer("n_estimators", n_estimators, low=1)
        self.max_depth = _integer("max_depth", max_depth, low=0)
        self.learning_rate = _number("learning_rate", learning_rate, low=0.0, low_open=True)
        self.subsample = _number("subsample", subsample, low=0.0, high=1.0, low_open=True)
        self.colsample_bytree = _number("colsample_bytree", colsample_bytree, low=0.0, high=1.0, low_open=True)
        self.min_child_weight = _number("min_child_weight", min_child_weight, low=0.0)
        self.reg_alpha = _number("reg_alpha", reg_alpha, low=0.0)
        self.reg_lambda = _number("reg_lambda", reg_lambda, low=0.0)
        self.gamma = _number("gamma", gamma, low=0.0)
        if tree_method not in TREE_METHODS:
            raise UserError(f"model.tree_method: unknown '{tree_method}'; allowed: {', '.join(TREE_METHODS)}")
        self.tree_method = tree_method
        if not isinstance(device, str) or not (
            device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
        ):
            raise UserError(f"model.device: unknown '{device}'; allowed: cpu, cuda, cuda:<index>")
        self.device = device
        self.early_stopping_rounds = (
            None if early_stopping_rounds is None else _integer("early_stopping_rounds", early_stopping_rounds, low=1)
        )
        self.n_jobs = None if n_jobs is None else _integer("n_jobs", n_jobs, low=1)

    def params(self, task: str, num_classes: int, seed: int) -> dict[str, Any]:
        """Parameters of `xgboost.train` for this task; `seed` makes row and column sampling repeatable."""
        if task not in OBJECTIVES:
            raise UserError(f"data.task: unknown '{task}'; allowed: {', '.join(OBJECTIVES)}")
        params: dict[str, Any] = {
            "objective": OBJECTIVES[task],
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "reg_alpha": self.reg_alpha,
            "reg_lambda": self.reg_lambda,
            "gamma": self.gamma,
            "tree_method": self.tree_method,
            "device": self.device,
            "seed": seed,
            "verbosity": 1,
        }
        if task == "multiclass":
            params["num_class"] = num_classes
        if self.n_jobs is not None:
            params["nthread"] = self.n_jobs
        return params

    def __repr__(self) -> str:
        return f"XGBoostModel({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _integer(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"model.{key}: expected an integer >= {low}, got {value!r}")
    return value


def _number(key: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise UserError(f"model.{key}: expected a number in {bounds}, got {value!r}")
    return float(value)
