"""Runs of train.py killed with SIGKILL resume from their newest whole epoch checkpoint to the uninterrupted run's
weights, in every family with state of its own; SIGTERM and Ctrl-C stop a run with last.ckpt written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from tests import test_cyclegan, test_pggan, test_transformer
from tests.conftest import QUICK, ROOT, compose_config
from zoo.run import train

TIMEOUT = 300  # seconds a subprocess may take before the test gives up on it
EVERY_EPOCH = ["callbacks.model_checkpoint.save_top_k=-1", "test=false", "logger=none"]


def changed(settings: list[str], *overrides: str) -> list[str]:
    """`settings` with the keys of `overrides` given the new values (Hydra takes each key once)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [s for s in settings if s.split("=", 1)[0] not in keys] + list(overrides)


# the families' own tiny settings: seconds per run on one CPU thread
PGGAN = [*test_pggan.TINY, "scheduler=warmup_cosine"]  # a per-step schedule over the whole growth schedule
# constant for one epoch, then down over three: every epoch after the kill trains at another rate
CYCLEGAN = changed([*test_cyclegan.TINY, *test_cyclegan.NO_SCORER], "model.n_epochs_decay=3", "trainer.max_epochs=4")
CHAR_LM = [*test_transformer.TINY_LM, "trainer.limit_train_batches=4", "trainer.max_epochs=4"]
SEQ2SEQ = [*test_transformer.TINY_S2S, "trainer.limit_train_batches=4", "trainer.max_epochs=4"]
RATINGS = ["data=ratings_synthetic", "data.num_users=200", "data.num_items=100", "data.num_ratings=8000"]
TWO_TOWER = [
    "model=two_tower",
    *RATINGS,
    "model.net.dim=8",
    "model.net.hidden=[16]",
    "model.net.id_dim=8",
    "optimizer=adam",
    "trainer.max_epochs=4",
]
MF_IMPLICIT = ["model=mf_implicit", *RATINGS, "model.net.rank=8", "optimizer=adam", "trainer.max_epochs=4"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The in-process runs compute as the subprocesses do (OMP_NUM_THREADS=1), and two runs fit on two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start(tmp_path: Path, folder: str, *settings: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`python train.py settings` from tmp_path (data/ is shared with the in-process runs), in run folder `folder`."""
    run = tmp_path / folder
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    (tmp_path / "output").mkdir(exist_ok=True)
    # into files, not pipes: nobody reads a pipe while the run trains, and a full one would stall it
    with (
        open(tmp_path / "output" / f"{folder}.out", "wb") as out,
        open(tmp_path / "output" / f"{folder}.err", "wb") as err,
    ):
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *QUICK, *settings, f"hydra.run.dir={run}"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
        )
    return process, run


def stderr_of(run: Path) -> str:
    return (run.parent / "output" / f"{run.name}.err").read_text(errors="replace")


def wait_for(path: Path, process: subprocess.Popen[bytes], run: Path) -> None:
    """Polls until `path` exists; fails at once if the run ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert process.poll() is None, (
            f"the run ended (code {process.returncode}) before writing {path.name}:\n" + stderr_of(run)[-3000:]
        )
        assert time.monotonic() < deadline, f"no {path.name} after {TIMEOUT} s"
        time.sleep(0.01)


def finish(process: subprocess.Popen[bytes], run: Path) -> int:
    """The run's exit code; a run that hangs is killed rather than left behind."""
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{run.name} still ran after {TIMEOUT} s:\n{stderr_of(run)[-3000:]}") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class KillOnSight(threading.Thread):
    """Sends SIGKILL to a run the moment `path` appears, while this process trains something else."""

    def __init__(self, process: subprocess.Popen[bytes], path: Path) -> None:
        super().__init__(daemon=True)
        self.process, self.path, self.killed = process, path, False

    def run(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.process.poll() is None and time.monotonic() < deadline:
            if self.path.exists():
                self.process.kill()
                self.killed = True
                break
            time.sleep(0.01)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def newest_whole_checkpoint(folder: Path) -> Path:
    """The newest epoch checkpoint that loads: a kill may have caught the next one half-written."""
    for path in sorted(folder.glob("epoch_*.ckpt"), reverse=True):
        try:
            load(path)
        except Exception:  # noqa: BLE001 - a torn file fails in any of the unpickler's ways
            continue
        return path
    raise AssertionError(f"no whole epoch checkpoint in {folder}")


def killed_and_resumed(
    train_config: Callable[..., DictConfig], tmp_path: Path, *settings: str, kill_after_epoch: int = 1
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Train `settings` with train.py and kill it with SIGKILL as soon as its epoch `kill_after_epoch` checkpoint
    appears; meanwhile train them to the end in this process. Once the run is dead, resume it from its newest whole
    epoch checkpoint in a new run folder. Returns the final checkpoints of the uninterrupted and the resumed run and
    the checkpoint the resume started from."""
    settings = (*settings, *EVERY_EPOCH)
    process, run = start(tmp_path, "killed", *settings)
    killer = KillOnSight(process, run / "checkpoints" / f"epoch_{kill_after_epoch:03d}.ckpt")
    killer.start()
    try:
        full = train_config(*settings, folder="full")
        train(full)
        killer.join(TIMEOUT)
        code = finish(process, run)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert killer.killed and code == -signal.SIGKILL, f"the run ended with {code} before the kill:\n" + stderr_of(run)
    saved = newest_whole_checkpoint(run / "checkpoints")
    resumed = train_config(*settings, f"ckpt_path={saved}", folder="resumed")
    train(resumed)
    final = load(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt")
    return final, load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt"), load(saved)


def assert_same_training_state(full: dict[str, Any], resumed: dict[str, Any], saved: dict[str, Any]) -> None:
    """Weights, step counters and optimizer states of the resumed run are the uninterrupted run's, bit for bit, and
    the resumed part trained: the weights moved on from the checkpoint it started from."""
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert not all(torch.equal(saved["state_dict"][k], v) for k, v in full["state_dict"].items())
    assert (full["epoch"], full["global_step"]) == (resumed["epoch"], resumed["global_step"])
    assert saved["global_step"] < full["global_step"]
    for a, b in zip(full["optimizer_states"], resumed["optimizer_states"], strict=True):
        assert a["state"].keys() == b["state"].keys()
        for index, state in a["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][name])), (index, name)
        assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]


# ---- kill -9, then resume: every family ends where the uninterrupted run ended ------------------------------------


# the GAN runs start about twice as slowly as the other families' (more imports, data and scorer set-up): together they
# would double this file's time in the default suite
@pytest.mark.slow
def test_pggan_killed_in_the_middle_of_a_fade_in(train_config, tmp_path: Path) -> None:
    full, resumed, saved = killed_and_resumed(train_config, tmp_path, *PGGAN)
    assert saved["pggan"]["resolution"] == 8 and 0 < saved["pggan"]["alpha"] < 1
    assert_same_training_state(full, resumed, saved)
    assert any(key.startswith("generator_ema.") for key in full["state_dict"])  # the EMA generator is compared too
    assert full["gan_steps"] == resumed["gan_steps"] and full["lr_schedulers"] == resumed["lr_schedulers"]
    phase = {k: v for k, v in full["pggan"].items() if k != "phase_seconds"}
    assert phase == {k: v for k, v in resumed["pggan"].items() if k != "phase_seconds"}
    assert phase["resolution"] == 8 and phase["alpha"] == 1


@pytest.mark.slow
def test_cyclegan_keeps_its_image_pools_and_learning_rate_decay(train_config, tmp_path: Path) -> None:
    full, resumed, saved = killed_and_resumed(train_config, tmp_path, *CYCLEGAN)
    assert saved["cyclegan"]["pool_a"]["count"] == saved["cyclegan"]["pool_b"]["count"] == 4  # full when killed
    assert_same_training_state(full, resumed, saved)
    for pool in ("pool_a", "pool_b"):
        for part in ("images", "generator"):
            assert torch.equal(full["cyclegan"][pool][part], resumed["cyclegan"][pool][part]), (pool, part)
        assert not torch.equal(saved["cyclegan"][pool]["images"], full["cyclegan"][pool]["images"])
    # the last of 4 epochs trains at 2e-4 * (1 - 3/4), for both optimizers
    rates = [group["lr"] for opt in resumed["optimizer_states"] for group in opt["param_groups"]]
    assert rates == [pytest.approx(2e-4 * 0.25)] * 2
    assert full["lr_schedulers"] == resumed["lr_schedulers"]


def test_char_lm_resumes_exactly(train_config, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(test_transformer.TEXT, encoding="utf-8")
    assert_same_training_state(*killed_and_resumed(train_config, tmp_path, *CHAR_LM, f"data.path={corpus}"))


@pytest.mark.slow  # a killed train.py subprocess and its resume, about 18 s
def test_seq2seq_resumes_exactly(train_config, tmp_path: Path) -> None:
    assert_same_training_state(*killed_and_resumed(train_config, tmp_path, *SEQ2SEQ))


@pytest.mark.parametrize(
    "settings",
    [pytest.param(TWO_TOWER, marks=pytest.mark.slow), MF_IMPLICIT],  # one sampled-negative family is enough by default
    ids=["two_tower", "mf_implicit"],
)
def test_recommenders_with_sampled_negatives_resume_exactly(train_config, tmp_path: Path, settings: list[str]) -> None:
    assert_same_training_state(*killed_and_resumed(train_config, tmp_path, *settings))


def test_a_cached_scorer_draws_no_random_numbers_of_the_run(tmp_path: Path) -> None:
    """A run that loads the scorer another run trained and cached must go on as that run did: loading, like training
    (which forks the RNG), leaves the global random state alone."""
    from hydra.utils import instantiate

    from zoo.metrics.scorer import load_or_train_scorer

    cfg = compose_config("train", [*QUICK, *PGGAN], tmp_path)
    data = instantiate(cfg.data)
    spec = {**cfg.model.scorer, "ckpt_path": str(tmp_path / "scorer.pt")}
    states = []
    for _ in range(2):  # trained and cached, then loaded
        torch.manual_seed(0)
        load_or_train_scorer(spec, data, torch.device("cpu"), cache=True)
        states.append(torch.get_rng_state())
    assert (tmp_path / "scorer.pt").is_file()
    assert torch.equal(states[0], states[1])


# ---- SIGTERM and Ctrl-C: last.ckpt written, a conventional exit code, and the run resumes --------------------------


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_stops_the_run_with_last_ckpt_written(train_config, tmp_path: Path, signum: int) -> None:
    settings = [*SEQ2SEQ, "trainer.max_epochs=12", *EVERY_EPOCH]
    process, run = start(tmp_path, "stopped", *settings)
    try:
        wait_for(run / "checkpoints" / "epoch_000.ckpt", process, run)
        process.send_signal(signum)
        process.send_signal(signum)  # impatient: a second signal changes nothing
        code = finish(process, run)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    name = signal.Signals(signum).name
    last = run / "checkpoints" / "last.ckpt"
    assert code == 128 + signum, stderr_of(run)[-3000:]
    lines = [line for line in stderr_of(run).splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {name} at epoch "), lines
    assert lines[0].endswith(f": saved {last}; resume with ckpt_path={last}"), lines
    assert "Traceback" not in stderr_of(run)
    stopped = load(last)  # weights_only: a checkpoint of plain tensors and values
    assert 4 < stopped["global_step"] < 12 * 4  # trained on after the first epoch's checkpoint, stopped before the end

    resumed = train_config(*settings, f"ckpt_path={last}", folder="resumed")
    train(resumed)
    final = load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert (final["epoch"], final["global_step"]) == (11, 12 * 4)
