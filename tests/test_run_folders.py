"""Run folders are exclusive: claimed atomically before Hydra writes, old ones untouched, failed starts leave none."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import ROOT, run_script
from zoo.errors import UserError
from zoo.run_folder import Claim, hydra_quote, make_folder, with_folder

TINY = [
    "model=logreg",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "extras.print_config=false",
    "trainer.enable_progress_bar=false",
]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and folder below `folder` with its mtime (and a file's bytes): any write changes it."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in [folder, *folder.rglob("*")]
    }


def old_run(folder: Path, *files: str) -> Path:
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"written by an earlier run: {name}\n")
    return folder


def test_a_named_run_folder_that_exists_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    earlier = old_run(
        tmp_path / "earlier", ".hydra/overrides.yaml", "config.yaml", "checkpoints/last.ckpt", "train.log"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (earlier, empty):
        before = snapshot(folder)
        result = run_script("train.py", *TINY, f"hydra.run.dir={folder}", cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: hydra.run.dir: '{folder}' exists and may hold another run; choose a new folder"
        ]
        assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty"]


@pytest.mark.parametrize(
    "sweep",
    [["-m", "optimizer.lr=1e-3,3e-3"], ["hparams_search=mnist1d_optuna"]],  # the second is a multirun by its config
    ids=["grid", "optuna"],
)
def test_a_named_sweep_folder_that_exists_is_refused_and_left_as_it_was(tmp_path: Path, sweep: list[str]) -> None:
    earlier = old_run(tmp_path / "sweep", "multirun.yaml", "0/.hydra/overrides.yaml", "0/train.log", "1/metrics.json")
    before = snapshot(earlier)
    result = run_script("train.py", *sweep, *TINY, f"hydra.sweep.dir={earlier}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: hydra.sweep.dir: '{earlier}' exists and may hold another run; choose a new folder"
    )
    assert snapshot(earlier) == before
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # subprocesses or many short runs, 25-30 s under load
def test_of_two_runs_racing_for_one_new_folder_exactly_one_gets_it(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "run"
    with ThreadPoolExecutor(2) as pool:
        seeds = (1, 2)
        results = list(
            pool.map(
                lambda seed: run_script("train.py", *TINY, f"seed={seed}", f"hydra.run.dir={shared}", cwd=tmp_path),
                seeds,
            )
        )
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-1500:] for r in results]
    winner = seeds[[r.returncode for r in results].index(0)]
    loser = results[[r.returncode for r in results].index(2)]
    assert loser.stderr.strip().splitlines()[-1].startswith(f"error: hydra.run.dir: '{shared}' exists")
    assert OmegaConf.load(shared / "config.yaml").seed == winner  # the folder holds the winner's run only
    assert f"seed={winner}" in OmegaConf.load(shared / ".hydra" / "overrides.yaml")
    assert (shared / "metrics.json").is_file() and any((shared / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (["data=image_folder", "data.root=missing_images", "data.num_classes=2"], "data.root: no folder"),  # in fit
        (["float32_matmul_precision=fast"], "float32_matmul_precision: unknown 'fast'"),  # when the run starts
        (["-m", "float32_matmul_precision=fast,high"], "float32_matmul_precision: unknown"),  # a sweep's first job
    ],
    ids=["data", "config", "sweep"],
)
def test_a_run_stopped_by_bad_input_leaves_no_folder(tmp_path: Path, bad: list[str], expected: str) -> None:
    multirun = bad[0] == "-m"
    runs = tmp_path / "logs" / "train" / ("multiruns" if multirun else "runs")
    older = old_run(runs / "older", "config.yaml", "checkpoints/last.ckpt")
    before = snapshot(older)
    result = run_script("train.py", *bad, *TINY, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-1500:]
    assert expected in result.stderr.strip().splitlines()[-1]
    assert [p.name for p in runs.iterdir()] == ["older"]  # this run's folder went, no other folder did
    assert snapshot(older) == before


@pytest.mark.parametrize(
    ("files", "error", "kept"),
    [
        ([], RuntimeError("a bug"), False),  # nothing written: nothing to keep
        (["train.log", ".hydra/config.yaml"], SystemExit(2), False),  # a one-line user error before any result
        (["train.log", "checkpoints/epoch_000.ckpt"], SystemExit(2), True),  # a checkpoint is a result
        (["0/model.json"], SystemExit(2), True),  # so is a gradient-boosted model, in a sweep's job folder
        (["train.log"], RuntimeError("a bug"), True),  # a bug keeps the log that tells what happened
    ],
)
def test_a_failed_run_takes_back_only_a_folder_without_results(
    tmp_path: Path, files: list[str], error: BaseException, kept: bool
) -> None:
    folder = old_run(tmp_path / "run", *files) if files else tmp_path / "run"
    folder.mkdir(exist_ok=True)
    with pytest.raises(type(error)), Claim([], created=folder).removed_on_failure():
        raise error
    assert folder.is_dir() == kept


def test_an_unusable_log_dir_gets_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a file, not a folder\n")
    result = run_script("train.py", *TINY, f"paths.log_dir={tmp_path}/afile/logs", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: paths.log_dir: cannot create '{tmp_path}/afile/logs' (Not a directory)"
    ]


@pytest.mark.slow  # a torchrun process pair, about 12 s
def test_torchrun_ranks_share_rank_0s_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py")]
        + ["trainer=ddp_sim", *TINY],
        cwd=tmp_path,
        env={**env, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr  # two ranks did train
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert {".hydra", "config.yaml", "metrics.json", "checkpoints"} <= {p.name for p in run.iterdir()}


def test_a_taken_default_name_gets_a_suffix_and_a_named_one_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "runs" / "2026-01-01_00-00-00-000000"
    taken.mkdir(parents=True)
    assert make_folder(str(taken), "hydra.run.dir", explicit=False) == f"{taken}-1"
    assert make_folder(str(taken), "hydra.run.dir", explicit=False) == f"{taken}-2"
    with pytest.raises(UserError, match="exists and may hold another run"):
        make_folder(str(taken), "hydra.run.dir", explicit=True)
    assert sorted(p.name for p in taken.parent.iterdir()) == [taken.name, f"{taken.name}-1", f"{taken.name}-2"]


@pytest.mark.parametrize("path", ["/tmp/a b/it's", "/tmp/x=y,z[0]", "/tmp/${now:%H}/$HOME", "/tmp/back\\slash\\"])
def test_the_claimed_folder_reaches_hydra_unchanged(path: str) -> None:
    args = with_folder(["model=mlp", "hydra.run.dir=elsewhere"], "hydra.run.dir", path)
    assert args[:-1] == ["model=mlp"]
    override = OverridesParser.create().parse_override(args[-1])
    assert OmegaConf.create({"dir": override.value()}).dir == path
    assert hydra_quote(path).startswith("'")
