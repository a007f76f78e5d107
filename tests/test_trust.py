"""Files from elsewhere never run code, and a diverging run stops without keeping poisoned weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from tests import test_cyclegan, test_dqn, test_gan, test_pggan, test_recommender, test_transformer, test_vae
from tests.conftest import ROOT, run_script
from zoo.callbacks import AtomicCheckpointIO
from zoo.errors import TrainingDiverged, UserError
from zoo.records import check_targets, load_checkpoint, write_metrics
from zoo.run import build_model, train

QUIET = ["extras.print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SHORT = [*QUIET, "model=logreg", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run folder of train.py, copied by each test before it is tampered with."""
    root = tmp_path_factory.mktemp("trusted")
    result = run_script("train.py", *SHORT, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = (root / "logs" / "train" / "runs").iterdir()
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copied_run"
    shutil.copytree(run, copy)
    return copy


def poison_checkpoint(path: Path, marker: Path) -> None:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"] = {"note": Payload(marker)}
    torch.save(checkpoint, path)


def assert_refused(result: Any, marker: Path, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert not marker.exists(), "the payload ran"
    assert lines[-1].startswith("error: "), lines[-5:]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[-1], lines[-1]


# ---------------------------------------------------------------- checkpoints


def test_every_checkpoint_the_zoo_writes_loads_weights_only(trained_run: Path) -> None:
    for path in (trained_run / "checkpoints").glob("*.ckpt"):
        assert "state_dict" in load_checkpoint(path)


@pytest.mark.parametrize(
    "optimizer", sorted(p.stem for p in (ROOT / "configs" / "optimizer").glob("*.yaml") if p.stem != "none")
)
def test_checkpoints_load_weights_only_with_every_optimizer(train_config, optimizer: str) -> None:
    settings = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "logger=none", "test=false"]
    cfg = train_config("model=logreg", f"optimizer={optimizer}", *settings)
    train(cfg)
    written = list((Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"))
    assert written
    for path in written:
        assert load_checkpoint(path)["optimizer_states"], path


def test_a_pickle_payload_is_refused_in_one_line_naming_the_file_and_the_global(tmp_path: Path) -> None:
    marker, path = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, path)
    with pytest.raises(UserError, match=r"^ckpt_path: refused to load '.*evil.ckpt': it needs getattr, ") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("train.py", ["ckpt_path={ckpt}"]),  # resume
        ("evaluate.py", ["ckpt_path={ckpt}"]),  # score
        pytest.param("evaluate.py", ["ckpt_path={ckpt}", "split=val"], marks=pytest.mark.slow),
        # a mode of another family: refused before loading
        pytest.param("evaluate.py", ["ckpt_path={ckpt}", "mode=sample"], marks=pytest.mark.slow),
    ],
)
def test_a_poisoned_checkpoint_never_runs_from_any_entry(
    trained_run: Path, tmp_path: Path, script: str, args: list[str]
) -> None:
    run, marker = copy_run(trained_run, tmp_path), tmp_path / "ran"
    ckpt = run / "checkpoints" / "last.ckpt"
    poison_checkpoint(ckpt, marker)
    extra = SHORT if script == "train.py" else []
    result = run_script(script, *extra, *(a.format(ckpt=ckpt) for a in args), cwd=tmp_path)
    assert_refused(result, marker, str(ckpt))


def test_a_poisoned_scorer_checkpoint_never_runs(trained_run: Path, tmp_path: Path) -> None:
    from zoo.metrics.scorer import load_scorer

    marker, scorer = tmp_path / "ran", tmp_path / "scorer.pt"
    torch.save({"kind": "zoo.gan.scorer", "net": Payload(marker)}, scorer)
    with pytest.raises(UserError, match=r"^model.scorer.ckpt_path: refused to load"):
        load_scorer(scorer, torch.device("cpu"), "data", [1, 28, 28], 10)
    assert not marker.exists()


# ---------------------------------------------------------------- run configs


@pytest.mark.parametrize(
    "target",
    [
        "pathlib.Path.touch",  # outside the allow-list
        "torch.load",
        "zoo.tasks.gan.torch.load",  # inside by name, outside by what it is
        "zoo.records._finite",  # private
        "builtins.exec",
    ],
)
def test_a_run_config_naming_a_foreign_target_is_refused(trained_run: Path, tmp_path: Path, target: str) -> None:
    run, marker = copy_run(trained_run, tmp_path), tmp_path / "ran"
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data = {"_target_": target, "_args_": [str(marker)]}
    OmegaConf.save(cfg, run / "config.yaml")
    result = run_script("evaluate.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert_refused(result, marker, "data._target_", target, "trust_config=true")


def test_the_zoos_own_configs_pass_the_allow_list(trained_run: Path) -> None:
    from tests.conftest import CONFIG_DIR, compose_config

    check_targets(OmegaConf.load(trained_run / "config.yaml"), "run")
    for experiment in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        check_targets(compose_config("train", [f"experiment={experiment.stem}"], Path("/nonexistent")), experiment.name)


# ---------------------------------------------------------------- divergence


class PoisonWeights(Callback):
    """Fills the first parameter with NaN when epoch `at_epoch` starts, as an exploding update would."""

    def __init__(self, at_epoch: int = 1) -> None:
        self.at_epoch, self.name = at_epoch, ""

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == self.at_epoch:
            self.name, parameter = next(iter(pl_module.named_parameters()))
            with torch.no_grad():
                parameter.fill_(float("nan"))


def text_corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(test_transformer.TEXT, encoding="utf-8")
    return f"data.path={path}"


FAMILIES = {
    "classification": ["model=mlp", "data=digits_flat", "trainer.max_epochs=3", "trainer.limit_train_batches=4"],
    "char_lm": [*test_transformer.TINY_LM, "trainer.max_epochs=3", "trainer.limit_train_batches=4"],
    "seq2seq": [*test_transformer.TINY_S2S, "trainer.max_epochs=3", "trainer.limit_train_batches=4"],
    "mf": ["experiment=mf_synthetic", *test_recommender.SMALL, "trainer.max_epochs=3"],
    "mf_implicit": ["experiment=mf_implicit_synthetic", "trainer.max_epochs=3", "trainer.limit_train_batches=4"],
    "dqn": [*test_dqn.TINY, "trainer.max_epochs=3"],
    "gan": ["model=dcgan", *test_gan.TINY, "trainer.max_epochs=3"],
    "pggan": test_pggan.TINY,
    "cyclegan": [*test_cyclegan.TINY, *test_cyclegan.NO_SCORER, "trainer.max_epochs=3"],
    "vae": [*test_vae.TINY, "trainer.max_epochs=3"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_divergence_stops_every_family_and_keeps_no_poisoned_checkpoint(
    train_config, tmp_path: Path, family: str
) -> None:
    settings = [*FAMILIES[family], "logger=none", "callbacks.model_checkpoint.save_top_k=-1"]
    if family == "char_lm":
        settings.append(text_corpus(tmp_path))
    cfg = train_config(*settings, "+callbacks.poison._target_=tests.test_trust.PoisonWeights")
    with pytest.raises(TrainingDiverged) as error:
        train(cfg)
    message = str(error.value)
    assert message.startswith("training diverged: ") and "\n" not in message
    assert "the last good checkpoint is " in message, message
    good = Path(message.split("the last good checkpoint is ")[1].split(";")[0])
    assert good.is_file()
    run = Path(cfg.paths.output_dir)
    assert not (run / "metrics.json").exists()
    poisoned, _ = next(iter(build_model(cfg).named_parameters()))
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints
    for path in checkpoints:
        assert torch.isfinite(load_checkpoint(path)["state_dict"][poisoned]).all(), path


def test_a_diverging_run_ends_in_one_line_and_exit_code_2(tmp_path: Path) -> None:
    result = run_script(
        "train.py", *QUIET, "experiment=cnn_digits", "optimizer.lr=1e6", "trainer.max_epochs=3", cwd=tmp_path
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("error: training diverged: "), lines[-3:]
    assert "Traceback" not in result.stderr
    for path in tmp_path.rglob("*.ckpt"):
        weights = load_checkpoint(path)["state_dict"]
        assert all(torch.isfinite(v).all() for k, v in weights.items() if k.startswith("net.")), path


def test_metrics_files_are_strict_json(tmp_path: Path) -> None:
    write_metrics(tmp_path / "metrics.json", {"val/loss": float("nan"), "val/acc": 0.5, "test/x": float("inf")})
    text = (tmp_path / "metrics.json").read_text()
    loaded = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert loaded == {
        "val/loss": None,
        "val/acc": 0.5,
        "test/x": None,
        "non_finite": {"val/loss": "nan", "test/x": "inf"},
    }


# ---------------------------------------------------------------- torn checkpoints


KILLED_WHILE_SAVING = """
import os, sys, time
import torch
from zoo.callbacks import AtomicCheckpointIO

io, target = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "version": 1}, target)
io.wait()

def stall(fd):  # the new checkpoint is written but not yet in place: the instant a kill is most harmful
    print("writing", flush=True)
    time.sleep(600)

os.fsync = stall
io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "version": 2}, target)
"""


def test_a_kill_in_the_middle_of_a_checkpoint_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    system_temp, target = tmp_path / "system_temp", tmp_path / "checkpoints" / "last.ckpt"
    system_temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(target)],
        env={**os.environ, "TMPDIR": str(system_temp)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait()
    assert load_checkpoint(target)["version"] == 1
    assert not any(system_temp.iterdir())
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"state_dict": {}, "version": 3}, target)  # the next save works
    assert writer.load_checkpoint(target)["version"] == 3


def test_saves_return_before_the_disk_is_done_and_land_in_call_order(tmp_path: Path, monkeypatch) -> None:
    import threading

    import zoo.callbacks

    release, written = threading.Event(), []
    real_write = zoo.callbacks.atomic_write_bytes

    def slow_write(path: Path, data: bytes) -> None:
        release.wait(timeout=30)
        real_write(path, data)
        written.append(path.name)

    monkeypatch.setattr(zoo.callbacks, "atomic_write_bytes", slow_write)
    writer = AtomicCheckpointIO()
    first, second = tmp_path / "epoch_000.ckpt", tmp_path / "epoch_001.ckpt"
    writer.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 0}, first)
    writer.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, second)
    writer.remove_checkpoint(first)  # a new best replacing the old one: removed only after it was written
    assert not first.exists() and not second.exists()  # the training thread did not wait for the disk
    release.set()
    assert writer.load_checkpoint(second)["epoch"] == 1  # loading waits for every pending write
    assert written == ["epoch_000.ckpt", "epoch_001.ckpt"] and not first.exists()
    writer.teardown()


def test_a_failed_background_write_stops_the_next_save(tmp_path: Path, monkeypatch) -> None:
    import zoo.callbacks

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    writer = AtomicCheckpointIO()
    monkeypatch.setattr(zoo.callbacks, "atomic_write_bytes", full_disk)
    writer.save_checkpoint({"epoch": 0}, tmp_path / "last.ckpt")
    writer._pending[-1].exception()  # the write has failed by now
    with pytest.raises(OSError, match="No space left"):
        writer.save_checkpoint({"epoch": 1}, tmp_path / "last.ckpt")
    writer.teardown()


@pytest.mark.slow
def test_a_kill_at_any_instant_leaves_every_checkpoint_loadable(tmp_path: Path) -> None:
    """Checkpoints of ~50 MB on a tmpfs while the system temp folder is on another filesystem: where a move
    across filesystems is a copy, a kill in the middle of it would leave a torn last.ckpt."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from tests.conftest import ROOT

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp folder")
    log_dir = shm / f"zoo-test-{uuid.uuid4().hex}"
    system_temp = tmp_path / "system_temp"
    system_temp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_temp), "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    settings = [
        *QUIET,
        "model=mlp",
        "data=digits_flat",
        "model.net.hidden_sizes=[2048,2048]",
        "trainer.max_epochs=1000",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.monitor=null",  # a new epoch_*.ckpt every epoch as well as last.ckpt
        "logger=none",
        f"paths.log_dir={log_dir}",
        "test=false",
    ]
    pause = random.Random(0)  # the kill instants: spread over the save cycle, the same in every test run
    try:
        for attempt in range(8):
            run = log_dir / f"run{attempt}"
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "train.py"), *settings, f"hydra.run.dir={run}"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 120
            while not (run / "checkpoints" / "last.ckpt").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(pause.uniform(0.0, 1.5))
            process.send_signal(signal.SIGKILL)
            process.wait()
            written = sorted((run / "checkpoints").glob("*.ckpt"))
            assert written, "the run wrote no checkpoint before it was killed"
            for path in written:
                assert "state_dict" in load_checkpoint(path), path
        assert not any(system_temp.iterdir()), sorted(system_temp.iterdir())
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)


# ---------------------------------------------------------------- same seed, same run


@pytest.mark.parametrize("family", ["gan", "pggan", "cyclegan"])
def test_training_the_scorer_first_does_not_change_the_run(train_config, family: str) -> None:
    """The first run trains and caches the scoring classifier, the second loads it: the GAN ends the same."""
    from tests.conftest import checkpoint

    settings = [*FAMILIES[family], "logger=none", "test=false"]
    if family == "cyclegan":
        settings = [s for s in settings if s != "model.scorer=null"] + test_cyclegan.SMALL_SCORER
    first, second = (train_config(*settings, folder=name) for name in ("without_cache", "with_cache"))
    scorers = Path(first.paths.data_dir) / "scorers"
    assert not scorers.exists()
    train(first)
    assert any(scorers.iterdir()), "the first run caches its scorer"
    train(second)
    a, b = (checkpoint(cfg)["state_dict"] for cfg in (first, second))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.max_epochs=abc"], "error: trainer.max_epochs: expected an integer, got 'abc'"),
        (["optimizer.lr=abc"], "error: optimizer.lr: expected a number, got 'abc'"),
        (["trainer.deterministic=maybe"], "error: trainer.deterministic: expected true or false, got 'maybe'"),
        (["cv.folds=0"], "error: cv.folds: expected an integer >= 2 for k-fold cross-validation, or 1 for none"),
        (["cv.folds=-1"], "error: cv.folds: expected an integer >= 2"),
        pytest.param(
            ["data.val_fraction=1.5"],
            "error: data.val_fraction: expected a number in [0, 1), got 1.5",
            marks=pytest.mark.slow,  # the datamodule's own check: tests/test_data.py has it in-process
        ),
        (["-m", "hydra/launcher=submitit_slurm"], "error: hydra/launcher=submitit_slurm: no SLURM on this machine"),
    ],
)
def test_bad_values_are_named_by_their_key_even_in_a_fast_dev_run(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    if "hydra/launcher=submitit_slurm" in args and shutil.which("sbatch"):
        pytest.skip("this machine has SLURM")
    result = run_script("train.py", *QUIET, "debug=fdr", *args, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-1500:]
    assert errors[0].startswith(expected), errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("episodes=0", "episodes: expected an integer >= 1, got 0"),
        ("max_new_tokens=-5", "max_new_tokens: expected an integer >= 1, got -5"),
        ("batch_size=-3", "batch_size: expected an integer >= 1 or null, got -3"),
        ("temperature=-1", "temperature: expected a number >= 0, got -1"),
    ],
)
def test_bad_evaluation_settings_are_refused_before_anything_is_loaded(
    trained_run: Path, tmp_path: Path, override: str, expected: str
) -> None:
    from tests.conftest import compose_config
    from zoo.run import evaluate

    cfg = compose_config("eval", [f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", override], tmp_path)
    with pytest.raises(UserError, match=f"^{expected}$"):
        evaluate(cfg)
    assert not (tmp_path / "run").exists()


def test_an_unreadable_scorer_is_blamed_on_scorer_ckpt_path(tmp_path: Path) -> None:
    from zoo.run import _swap_scorer

    garbage = tmp_path / "scorer.pt"
    garbage.write_bytes(b"not a checkpoint")
    run_cfg = OmegaConf.create({"model": {"scorer": {"ckpt_path": "cached.pt"}}})
    with pytest.raises(UserError, match=r"^scorer_ckpt_path: '.*scorer.pt' is not a readable checkpoint"):
        _swap_scorer(run_cfg, str(garbage), tmp_path / "run.ckpt")
    assert run_cfg.model.scorer.ckpt_path == "cached.pt"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # the GAN and CycleGAN refusals through train.py; in-process below for the default run
        pytest.param(
            ["experiment=dcgan_mnist", "optimizer=sgd"],
            "error: optimizer: this model configures one optimizer per",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["model=cyclegan", "data=digits_pair", "optimizer=adam"],
            "error: optimizer: this model configures one",
            marks=pytest.mark.slow,
        ),
        (["experiment=xgb_breast_cancer", "optimizer=sgd"], "error: optimizer: XGBoost boosts with its own step"),
        (["experiment=xgb_breast_cancer", "scheduler=step"], "error: scheduler: XGBoost boosts with its own step"),
    ],
)
def test_a_group_a_model_would_ignore_is_refused(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_script("train.py", *QUIET, "debug=fdr", *args, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-1500:]
    assert errors[0].startswith(expected), errors[0]


def test_the_gan_models_deselect_the_shared_optimizer(train_config) -> None:
    for model in ("dcgan", "wgan", "wgan_gp", "sngan", "pggan", "cyclegan"):
        assert train_config(f"model={model}", folder=model).optimizer is None, model


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["experiment=dcgan_mnist", "optimizer=sgd"], "optimizer: this model configures one optimizer per network"),
        (["model=cyclegan", "data=digits_pair", "optimizer=adam"], "optimizer: this model configures one"),
    ],
)
def test_the_adversarial_tasks_refuse_a_shared_optimizer_group(train_config, args: list[str], expected: str) -> None:
    from zoo.cli import describe
    from zoo.run import build_model

    with pytest.raises(Exception) as refused:  # noqa: B017 - Hydra wraps the task's UserError
        build_model(train_config(*args, folder="refused"))
    assert describe(refused.value).startswith(expected), describe(refused.value)


@pytest.mark.parametrize(
    ("fractions", "expected"),
    [
        ((1.5, 0.1), r"^data.val_fraction: expected a number in \[0, 1\), got 1.5$"),
        ((0.1, "a"), r"^data.test_fraction: expected a number in \[0, 1\), got 'a'$"),
        ((0.6, 0.4), r"^data.val_fraction \+ data.test_fraction must be < 1, got 1.0$"),
    ],
)
def test_split_fractions_are_checked_where_the_config_names_them(fractions: tuple, expected: str) -> None:
    from zoo.data.tensor import TensorDataModule

    with pytest.raises(UserError, match=expected):
        TensorDataModule([4], 2, val_fraction=fractions[0], test_fraction=fractions[1])
