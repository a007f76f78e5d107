"""evaluate.py ensemble=[...]: members scored on one test split, combined by mean or vote, refused in one line when
they are not one task on one data split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from zoo.errors import UserError
from zoo.run import evaluate, train


def trained(train_config, tmp_path: Path, *overrides: str, seeds: tuple[int, ...] = (1, 2, 3)) -> list[str]:
    paths = []
    for seed in seeds:
        folder = f"member_{len(list(tmp_path.glob('member_*')))}"
        cfg = train_config(*overrides, f"seed={seed}", "logger=none", folder=folder)
        train(cfg)
        paths.append(str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"))
    return paths


def ensemble_metrics(tmp_path: Path, paths: list[str], *overrides: str) -> dict[str, float]:
    cfg = compose_config("eval", [f"ensemble=[{','.join(paths)}]", "extras.print_config=false", *overrides], tmp_path)
    cfg.paths.output_dir = str(tmp_path / "ensemble")
    return evaluate(cfg)


def test_mean_of_probabilities_and_vote_of_classifiers(train_config, tmp_path: Path) -> None:
    paths = trained(train_config, tmp_path, "model=mlp", "data=digits_flat", "trainer.max_epochs=2")
    by_mean = ensemble_metrics(tmp_path, paths)
    assert json.loads((tmp_path / "ensemble" / "metrics.json").read_text()) == by_mean
    members = [by_mean[f"test/acc_member_{i}"] for i in range(3)]
    assert by_mean["test/acc_members_mean"] == pytest.approx(sum(members) / 3)
    # the members differ (seeds), and averaging them does not fall below the weakest
    assert len(set(members)) > 1 and by_mean["test/acc"] >= min(members)
    by_vote = ensemble_metrics(tmp_path, paths, "ensemble_by=vote")
    assert by_vote["test/acc"] >= min(members) and by_vote["test/acc_members_mean"] == by_mean["test/acc_members_mean"]


def test_averaged_regressors_are_no_worse_than_their_mean_error(train_config, tmp_path: Path) -> None:
    paths = trained(train_config, tmp_path, "experiment=mlp_diabetes", "trainer.max_epochs=5", seeds=(1, 2))
    metrics = ensemble_metrics(tmp_path, paths)
    # the error of an average is at most the average error (the triangle inequality), the ensemble's floor
    assert metrics["test/rmse"] <= metrics["test/rmse_members_mean"] + 1e-6
    assert 0 < metrics["test/r2"] < 1


def test_members_of_other_data_or_tasks_are_refused(train_config, tmp_path: Path) -> None:
    digits = trained(train_config, tmp_path, "model=mlp", "data=digits_flat", "trainer.max_epochs=1", seeds=(1,))
    other_split = trained(
        train_config, tmp_path, "model=mlp", "data=digits_flat", "data.split_seed=7", "trainer.max_epochs=1", seeds=(1,)
    )
    with pytest.raises(UserError, match=r"was trained on other data .* \(data.split_seed differ\)"):
        ensemble_metrics(tmp_path, [*digits, *other_split])
    with pytest.raises(UserError, match="expected a list of 2 or more checkpoints"):
        ensemble_metrics(tmp_path, digits)
    with pytest.raises(UserError, match="ensemble_by: unknown 'median'; allowed: mean, vote"):
        ensemble_metrics(tmp_path, [*digits, *digits], "ensemble_by=median")
    assert torch.load(digits[0], weights_only=True)["state_dict"]  # the members' files are untouched
