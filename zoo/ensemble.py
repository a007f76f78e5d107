"""`python evaluate.py ensemble=[<ckpt>,<ckpt>,...]`: several runs of one task scored as one model on one test split.

Classifiers are combined by averaging their class probabilities (`ensemble_by=mean`) or by a majority vote of their
predicted classes (`vote`, ties to the lowest class); regressors by averaging their predictions. Each member's own
score and the members' mean are printed beside the ensemble's: an ensemble earns its place only by beating them.
`train.py cv.ensemble=mean|vote` combines the k models of a cross-validation the same way, on an outer test split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from zoo.errors import UserError

COMBINERS = ("mean", "vote")
# data keys that change batching or shuffling but not which rows the test split holds
BATCHING_KEYS = ("batch_size", "eval_batch_size", "shuffle_seed", "num_workers", "pin_memory", "data_dir")


def _member(path: Path, trust: bool) -> tuple[DictConfig, Any, Any]:
    """A member's run config, its task with the checkpoint's weights, and its data module."""
    from hydra.utils import instantiate

    from zoo.records import load_lightning_checkpoint, saved_run_config
    from zoo.run import build_model, check_checkpoint, is_classic
    from zoo.tasks.classification import ClassificationTask
    from zoo.tasks.regression import RegressionTask

    run_cfg = saved_run_config(path, trust=trust, key="ensemble")
    if is_classic(run_cfg):
        raise UserError(f"ensemble: '{path}' is a scikit-learn or XGBoost run; use model=voting or model=stacking")
    data = instantiate(run_cfg.data)
    model = build_model(run_cfg, data)
    if not isinstance(model, ClassificationTask | RegressionTask):
        raise UserError(f"ensemble: '{path}' is a {type(model).__name__} run; allowed: classifiers and regressors")
    check_checkpoint(str(path), model)
    model.load_state_dict(load_lightning_checkpoint(path)["state_dict"])
    return run_cfg, model.eval(), data


def _test_rows(run_cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(run_cfg.data, resolve=True)
    return {k: v for k, v in data.items() if k not in BATCHING_KEYS}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score each member and the ensemble on the first member's test split; write metrics.json."""
    from zoo.records import write_metrics
    from zoo.run import format_table
    from zoo.tasks.classification import ClassificationTask

    paths = [Path(str(p)).expanduser() for p in cfg.ensemble]
    combine = str(cfg.get("ensemble_by", "mean"))
    if combine not in COMBINERS:
        raise UserError(f"ensemble_by: unknown '{combine}'; allowed: {', '.join(COMBINERS)}")
    if len(paths) < 2:
        raise UserError(f"ensemble: expected a list of 2 or more checkpoints, got {len(paths)}")
    members = [_member(path, bool(cfg.get("trust_config", False))) for path in paths]
    first_cfg, first_model, data = members[0]
    for path, (run_cfg, model, _) in zip(paths[1:], members[1:]):
        if type(model) is not type(first_model):
            raise UserError(
                f"ensemble: '{path}' is a {type(model).__name__}, '{paths[0]}' a {type(first_model).__name__}"
            )
        mine, theirs = _test_rows(run_cfg), _test_rows(first_cfg)
        differing = sorted(key for key in set(mine) | set(theirs) if mine.get(key) != theirs.get(key))
        if differing:
            raise UserError(
                f"ensemble: '{path}' was trained on other data than '{paths[0]}' (data.{', data.'.join(differing)} "
                "differ); members are scored on one test split"
            )
    data.setup("test")
    if not isinstance(getattr(data, "splits", None), dict) or "test" not in data.splits:
        raise UserError(
            f"ensemble: {type(data).__name__} keeps no test split in memory; allowed: tensor and table data"
        )
    inputs, targets = data.splits["test"]
    with torch.no_grad():
        stacked = torch.stack([outputs(model, inputs) for _, model, _ in members])
    if isinstance(first_model, ClassificationTask):
        metrics = classification_scores(stacked, targets, combine)
    else:
        mean, std = first_model.target_scale  # the targets come standardized
        metrics = regression_scores(stacked, targets * std + mean)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_metrics(output_dir / "metrics.json", metrics)
    how = combine if isinstance(first_model, ClassificationTask) else "mean"
    print(f"\ntest split of {paths[0]}: {len(paths)} members combined by {how}")
    print(format_table({k: f"{v:.4f}" for k, v in metrics.items()}))
    return metrics


def outputs(model: Any, inputs: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Class probabilities (classifiers) or predictions on the target's scale (regressors), in batches."""
    from zoo.tasks.classification import ClassificationTask

    parts = [model(inputs[start : start + batch]) for start in range(0, len(inputs), batch)]
    output = torch.cat(parts)
    return output.softmax(dim=-1) if isinstance(model, ClassificationTask) else output


def classification_scores(probabilities: torch.Tensor, targets: torch.Tensor, combine: str) -> dict[str, float]:
    """Accuracy of each member, of their mean, and of the ensemble; (members, rows, classes) probabilities."""
    member_acc = (probabilities.argmax(-1) == targets).float().mean(dim=1)
    if combine == "mean":
        predicted = probabilities.mean(dim=0).argmax(-1)
    else:
        votes = torch.nn.functional.one_hot(probabilities.argmax(-1), probabilities.shape[-1]).sum(dim=0)
        predicted = votes.argmax(-1)  # ties go to the lowest class
    scores = {f"test/acc_member_{i}": float(acc) for i, acc in enumerate(member_acc)}
    scores["test/acc_members_mean"] = float(member_acc.mean())
    scores["test/acc"] = float((predicted == targets).float().mean())
    return scores


def regression_scores(predictions: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """RMSE of each member, of their mean, and of the averaged prediction; (members, rows) predictions and the
    targets, both on the target's own scale."""
    member_rmse = (predictions - truth).square().mean(dim=1).sqrt()
    combined = predictions.mean(dim=0)
    rmse = float((combined - truth).square().mean().sqrt())
    r2 = 1 - float((combined - truth).square().sum() / (truth - truth.mean()).square().sum())
    scores = {f"test/rmse_member_{i}": float(value) for i, value in enumerate(member_rmse)}
    scores["test/rmse_members_mean"] = float(member_rmse.mean())
    scores.update({"test/rmse": rmse, "test/r2": r2})
    return scores


def holdout_outputs(model: Any, datamodule: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A k-fold CV model's outputs on its data module's outer test split (`holdout`, see `cv.ensemble`) and that
    split's targets: class indices, or values on the target's own scale. Both on the CPU."""
    from zoo.tasks.classification import ClassificationTask

    inputs, targets = datamodule.splits["holdout"]
    model.eval()
    with torch.no_grad():
        output = outputs(model, inputs.to(model.device)).float().cpu()
    if not isinstance(model, ClassificationTask):
        mean, std = model.target_scale.cpu()
        targets = targets * std + mean
    return output, targets.cpu()


def holdout_scores(
    fold_outputs: list[torch.Tensor], targets: torch.Tensor, classifier: bool, combine: str
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The scores of each fold model on the outer test split, and of the k models combined (`combine`: mean or
    vote for classifiers; regressors average their predictions). Names without a split: acc, or rmse and r2."""
    stacked = torch.stack(fold_outputs)

    def scored(members: torch.Tensor) -> dict[str, float]:
        scores = classification_scores(members, targets, combine) if classifier else regression_scores(members, targets)
        return {k.removeprefix("test/"): v for k, v in scores.items() if "member" not in k}

    return [scored(stacked[i : i + 1]) for i in range(len(stacked))], scored(stacked)


# ---------------------------------------------------------------- train.py cv.ensemble=mean|vote


def check_cv_ensemble(cfg: DictConfig, folds: int) -> None:
    """`cv.ensemble` and `cv.test_fraction`, refused in one line before any fold trains."""
    cv = cfg.get("cv") or {}
    combine = cv.get("ensemble")
    if combine is None:
        return
    if combine not in COMBINERS:
        raise UserError(f"cv.ensemble: unknown {combine!r}; allowed: null, {', '.join(COMBINERS)}")
    if folds < 2:
        raise UserError(
            f"cv.ensemble: combines the models of k-fold cross-validation; it needs cv.folds >= 2, got {folds}"
        )
    fraction = cv.get("test_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise UserError(
            f"cv.test_fraction: expected a number in (0, 1), the outer test split's share; got {fraction!r}"
        )
    from zoo.run import is_classic

    if is_classic(cfg):
        raise UserError(
            "cv.ensemble: combines neural classifiers and regressors; XGBoost and scikit-learn runs take cv.folds "
            "without it (model=voting or model=stacking combine their estimators)"
        )
    import inspect

    from hydra._internal.utils import _locate

    from zoo.data.tensor import TensorDataModule
    from zoo.tasks.classification import ClassificationTask
    from zoo.tasks.regression import RegressionTask

    task = _locate(str(cfg.model.get("_target_", "")))
    if not (inspect.isclass(task) and issubclass(task, ClassificationTask | RegressionTask)):
        raise UserError(
            f"cv.ensemble: combines classifiers and regressors; this run's model is {getattr(task, '__name__', task)}"
        )
    if combine == "vote" and issubclass(task, RegressionTask):
        raise UserError(
            "cv.ensemble: 'vote' combines classes; a regressor's fold models are averaged: cv.ensemble=mean"
        )
    data = _locate(str(cfg.data.get("_target_", "")))
    if not (inspect.isclass(data) and issubclass(data, TensorDataModule)):
        raise UserError(
            f"cv.ensemble: the outer test split is cut by in-memory data (tables, digits, MNIST-1D, ...); "
            f"this run's data is {getattr(data, '__name__', data)}"
        )
    if not cfg.get("train", True) or not cfg.get("test", True) or cfg.get("tune"):
        raise UserError("cv.ensemble: scores the model each fold trained and tested; it needs train=true test=true")


def outer_test_report(
    cfg: DictConfig, held_out: list[tuple[Any, Any]], checkpoints: list[str | None], combine: str
) -> dict[str, Any]:
    """Each fold's tested model, and the k of them combined, scored on the outer test split."""
    targets = held_out[0][1]
    classifier = not targets.is_floating_point()  # class indices; a regressor's targets are values
    for _, other in held_out[1:]:
        if other.shape != targets.shape or not torch.allclose(other.double(), targets.double(), rtol=1e-5):
            raise RuntimeError("cross-validation: the folds' outer test splits differ")
    per_fold, combined = holdout_scores([output for output, _ in held_out], targets, classifier, combine)
    mean = {name: sum(scores[name] for scores in per_fold) / len(per_fold) for name in combined}
    std = {
        name: math.sqrt(sum((scores[name] - mean[name]) ** 2 for scores in per_fold) / (len(per_fold) - 1))
        for name in combined
    }
    return {
        "rows": len(targets),
        "test_fraction": float(cfg.cv.test_fraction),
        "ensemble_by": combine if classifier else "mean",
        "checkpoints": checkpoints,
        "per_fold": per_fold,
        "mean": mean,
        "std": std,
        "ensemble": combined,
    }


def outer_test_summary(outer: dict[str, Any]) -> dict[str, float]:
    """The outer test scores beside the CV summary: `outer_test_<metric>` (fold models' mean, and `_std`) and
    `ensemble_<metric>`, logged to TensorBoard as cv/outer_test_acc, cv/ensemble_acc, ..."""
    summary = {f"outer_test_{name}": value for name, value in outer["mean"].items()}
    summary.update({f"outer_test_{name}_std": value for name, value in outer["std"].items()})
    summary.update({f"ensemble_{name}": value for name, value in outer["ensemble"].items()})
    return summary


def outer_test_table(report: dict[str, Any]) -> str:
    """Each metric on the folds' own test sets, and the fold models and their ensemble on the outer test split."""
    outer, folds = report["outer_test"], report["folds"]
    how = {"mean": "mean of class probabilities", "vote": "majority vote"}[outer["ensemble_by"]]
    if "rmse" in outer["ensemble"]:
        how = "mean prediction"
    header = ("metric", "own fold (mean ± std)", "outer test (mean ± std)", "ensemble, outer test")
    rows = []
    for name, value in outer["ensemble"].items():
        own = "-"
        if f"test/{name}" in report["mean"]:
            own = f"{report['mean'][f'test/{name}']:.4f} ± {report['std'][f'test/{name}']:.4f}"
        fold_models = f"{outer['mean'][name]:.4f} ± {outer['std'][name]:.4f}"
        rows.append((name, own, fold_models, f"{value:.4f}"))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    title = [
        f"\nouter test split: {outer['rows']} rows ({outer['test_fraction']:.0%}), held out of all {folds} folds",
        f"the {folds} fold models on it, alone (mean ± std) and combined by {how}",
    ]
    return "\n".join([*title, *lines])
