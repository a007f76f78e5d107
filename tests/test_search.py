"""Several Optuna sweeper processes filling one study through a shared storage, and bad storages in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_script
from zoo.errors import UserError
from zoo.search import prepare_storage, storage_override

# k-nearest neighbours on a small table: a trial is a second, so the processes' start-up dominates
SEARCH = ["-m", "hparams_search=knn_optuna", "hydra.sweeper.n_trials=3", "cv.folds=2", "extras.print_config=false"]


@pytest.mark.slow  # subprocesses or many short runs, 25-30 s under load
def test_two_sweeper_processes_fill_one_study(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path}/study.db"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    # started together, so both race to create the storage; each has its own sampler seed, as the README says
    workers = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *SEARCH, f"hydra.sweeper.storage={url}"]
            + [f"hydra.sweeper.sampler.seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-2000:]
    study = optuna.load_study(study_name="knn", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 6
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) > 3  # the two samplers drew apart
    # each process reports the study's best, over the trials of both
    best = f"Best value: {study.best_value}"
    assert all(best in stdout + stderr for stdout, stderr in outputs)
    assert len(list((tmp_path / "logs" / "knn_optuna" / "multiruns").iterdir())) == 2


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("notaurl", "error: hydra.sweeper.storage: cannot open 'notaurl': Could not parse"),
        pytest.param(
            "postgresql://user@localhost/study",
            "error: hydra.sweeper.storage: cannot open 'postgresql://user@",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_an_unusable_storage_gets_one_line(tmp_path: Path, url: str, message: str) -> None:
    result = run_script("train.py", *SEARCH, f"hydra.sweeper.storage={url}", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(message)
    assert not (tmp_path / "logs").exists()


def test_a_sqlite_file_in_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="the folder of .* does not exist"):
        prepare_storage(f"sqlite:///{tmp_path}/missing/study.db")


def test_the_storage_comes_from_the_command_line_only_when_set() -> None:
    assert storage_override(["-m", "hydra.sweeper.storage=sqlite:///a.db"]) == "sqlite:///a.db"
    assert storage_override(["hydra.sweeper.storage=null", "model=knn"]) is None
    assert storage_override(["model=knn"]) is None
