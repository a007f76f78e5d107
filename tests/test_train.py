"""Training through zoo.run with composed configs: every model runs, learns, resumes exactly, evaluates."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import assert_same_final_weights, checkpoint, compose_config, interrupted_and_resumed
from zoo.run import evaluate, train
from zoo.tasks.classification import ClassificationTask

FAST = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1"]


@pytest.mark.parametrize(
    ("model", "data"),
    [
        ("mlp", "digits"),
        ("logreg", "digits"),
        ("cnn", "digits"),
        ("resnet", "digits"),
        ("cnn", "mnist1d"),
        ("mlp", "mnist1d"),
        ("cnn", "mnist5k"),
    ],
)
def test_fast_dev_run_of_every_model(train_config, model: str, data: str) -> None:
    cfg = train_config(f"model={model}", f"data={data}", "debug=fdr")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    # one step from initialization: a well-initialized classifier is near chance, cross-entropy near ln(10)
    assert abs(metrics["train/loss"] - math.log(10)) < 1.0, metrics["train/loss"]
    assert 0 <= metrics["test/acc"] <= 1


def test_loss_falls_to_near_zero_when_overfitting_a_few_batches(train_config) -> None:
    cfg = train_config("model=mlp", "debug=overfit", "model.net.dropout=0", "data.augment.shift=0", "logger=csv")
    train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [
        float(r.split(",")[header.index("train/loss")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]
    ]
    assert losses[0] > 1.0 and losses[-1] < 0.05, losses


def test_default_run_learns_digits(train_config) -> None:
    cfg = train_config("trainer.max_epochs=8")
    best = train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert best == metrics["val/acc_best"] > 0.9
    assert metrics["test/acc"] > 0.9
    for name in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/f1",
        "test/precision",
        "test/recall",
        "test/f1",
        "train/lr",
    ):
        assert name in metrics, name


def test_learning_rate_is_logged_as_train_lr_without_a_scheduler_too(train_config) -> None:
    cfg = train_config("model=logreg", "scheduler=none", "trainer.max_epochs=1", "trainer.log_every_n_steps=1")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["train/lr"] == pytest.approx(cfg.optimizer.lr)
    assert not [name for name in metrics if name.startswith("lr-")]


def test_resume_equals_the_uninterrupted_run(train_config) -> None:
    """A crash after epoch 2 of 4 leaves epoch_001.ckpt; resuming from it must end where the full run ended."""
    settings = [
        "model=mlp",
        "model.net.dropout=0.3",
        "data.augment.shift=1",
        "trainer.limit_train_batches=5",
        "trainer.max_epochs=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
    ]
    full, resumed = interrupted_and_resumed(train_config, *settings)
    assert_same_final_weights(full, resumed)
    best = checkpoint(resumed)
    assert best["global_step"] == 20 and best["epoch"] == 3


def test_last_checkpoint_is_the_newest_state_even_when_the_metric_stalls(train_config) -> None:
    """With lr=0 val/acc never improves after epoch 0, so only epoch 0 is a "best"; last.ckpt must still be epoch 2."""
    cfg = train_config(
        "model=mlp",
        "model.net.norm=none",
        "optimizer.lr=0",
        "scheduler=none",
        "trainer.limit_train_batches=2",
        "trainer.max_epochs=3",
        "test=false",
        "logger=none",
    )
    train(cfg)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert [p.name for p in checkpoints.glob("epoch_*.ckpt")] == ["epoch_000.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6


def test_the_zoo_checkpoint_callback_stores_its_state_under_lightnings_key() -> None:
    """A checkpoint keys callback states by state_key: equal keys let runs saved with Lightning's class resume."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoo.callbacks import ModelCheckpoint as ZooModelCheckpoint

    for settings in ({"monitor": "val/acc", "mode": "max"}, {"monitor": None, "every_n_epochs": 2}):
        zoo_key = ZooModelCheckpoint(**settings).state_key
        assert zoo_key == ModelCheckpoint(**settings).state_key, zoo_key


def test_last_checkpoint_is_written_in_epochs_without_validation(train_config) -> None:
    """Validating every 2nd of 3 epochs, last.ckpt must still hold epoch 2, so a crash or max_time loses no epoch."""
    cfg = train_config(
        "model=mlp",
        "trainer.limit_train_batches=2",
        "trainer.max_epochs=3",
        "trainer.check_val_every_n_epoch=2",
        "test=false",
        "logger=none",
    )
    train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6


def test_evaluate_reproduces_the_test_metrics_logged_by_training(train_config, tmp_path: Path) -> None:
    cfg = train_config(*FAST)
    train(cfg)
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    for name, value in scored.items():
        assert value == pytest.approx(logged[name], abs=1e-6), name
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == scored


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_cpu(train_config, precision: str) -> None:
    cfg = train_config("model=cnn", f"trainer.precision={precision}", "trainer.accelerator=cpu", "trainer.max_epochs=3")
    assert train(cfg) > 0.5


def test_float32_matmul_precision_reaches_torch(train_config) -> None:
    before = torch.get_float32_matmul_precision()
    try:
        train(train_config("debug=fdr", "float32_matmul_precision=high"))
        assert torch.get_float32_matmul_precision() == "high"
        train(train_config("debug=fdr", folder="default"))  # each run sets its own: the default is full fp32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_every_key_of_the_documented_command_changes_the_run(train_config) -> None:
    cfg = train_config(
        "model=mlp",
        "data=mnist1d",
        "optimizer=adamw",
        "optimizer.lr=1e-3",
        "scheduler=warmup_cosine",
        "trainer.max_epochs=20",
        "trainer.precision=bf16-mixed",
        "trainer.accumulate_grad_batches=4",
        "trainer.gradient_clip_val=1.0",
        "seed=7",
    )
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    assert isinstance(model, ClassificationTask) and type(model.net).__name__ == "MLP"
    assert type(instantiate(cfg.data)).__name__ == "MNIST1DDataModule"
    optimizer = model.make_optimizer(params=model.parameters())
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == 1e-3
    assert model.make_scheduler.func.__name__ == "warmup_cosine"
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs == 20 and trainer.precision == "bf16-mixed"
    assert trainer.accumulate_grad_batches == 4 and trainer.gradient_clip_val == 1.0
    assert cfg.data.shuffle_seed == 7


def test_accumulation_makes_fewer_optimizer_steps(train_config) -> None:
    steps = {}
    for accumulate in (1, 4):
        cfg = train_config(
            "model=mlp",
            "trainer.max_epochs=1",
            f"trainer.accumulate_grad_batches={accumulate}",
            "test=false",
            folder=f"acc{accumulate}",
        )
        train(cfg)
        steps[accumulate] = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)[
            "global_step"
        ]
    assert steps[4] == -(-steps[1] // 4)


def test_cross_validation_reports_mean_and_std_over_folds(train_config) -> None:
    cfg = train_config("model=mlp", "cv.folds=3", "trainer.max_epochs=2")
    value = train(cfg)
    report = json.loads((Path(cfg.paths.output_dir) / "cv.json").read_text())
    assert report["folds"] == 3 and len(report["per_fold"]) == 3
    accs = [fold["test/acc"] for fold in report["per_fold"]]
    assert report["mean"]["test/acc"] == pytest.approx(sum(accs) / 3)
    assert report["std"]["test/acc"] > 0
    assert value == pytest.approx(report["mean"]["val/acc_best"])
    assert all((Path(cfg.paths.output_dir) / f"fold_{i}" / "config.yaml").is_file() for i in range(3))


def test_the_default_patience_ends_a_run_that_stopped_improving(train_config) -> None:
    cfg = train_config(
        "model=logreg",
        "optimizer=sgd",
        "optimizer.lr=0",  # nothing is learnt, so val/acc never improves after the first epoch
        "scheduler=none",
        "trainer.max_epochs=45",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "logger=none",
    )
    assert cfg.callbacks.early_stopping.patience == 30
    train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 30, last["epoch"]  # the first epoch sets the best, thirty more without improvement


def test_families_trained_for_a_budget_are_not_stopped_on_a_plateau(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    from zoo.callbacks import PlateauStopping
    from zoo.tasks.classification import ClassificationTask
    from zoo.tasks.cyclegan import CycleGANTask
    from zoo.tasks.dqn import DQNTask
    from zoo.tasks.gan import GANTask
    from zoo.tasks.pggan import PGGANTask

    checks: list[str] = []
    monkeypatch.setattr(EarlyStopping, "on_validation_end", lambda self, trainer, module: checks.append("val"))
    monkeypatch.setattr(EarlyStopping, "on_train_epoch_end", lambda self, trainer, module: checks.append("epoch"))
    stopper = PlateauStopping(monitor="val/loss")
    for task in (DQNTask, GANTask, PGGANTask, CycleGANTask):
        module = object.__new__(task)  # the class's own setting is all that is read
        stopper.on_validation_end(None, module)
        stopper.on_train_epoch_end(None, module)
    assert checks == []
    stopper.on_validation_end(None, object.__new__(ClassificationTask))
    stopper.on_train_epoch_end(None, object.__new__(ClassificationTask))
    assert checks == ["val", "epoch"]


def test_the_early_stopping_preset_ends_a_run_that_stopped_improving(train_config) -> None:
    cfg = train_config("model=logreg", "callbacks=early_stopping", "logger=none", folder="preset")
    assert cfg.callbacks.early_stopping.patience == 10 and "last_checkpoint" in cfg.callbacks
    cfg = train_config(
        "model=logreg",
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=2",
        "optimizer=sgd",
        "optimizer.lr=0",  # nothing is learnt, so val/acc never improves after the first epoch
        "scheduler=none",
        "trainer.max_epochs=20",
        "trainer.limit_train_batches=2",
        "logger=none",
    )
    train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2, last["epoch"]  # the first epoch sets the best, two more without improvement


@pytest.mark.slow  # inductor compiles C++ for the MLP: about 30 s
def test_compile_true_trains_and_writes_checkpoints_an_uncompiled_model_loads(train_config, tmp_path: Path) -> None:
    quick = ("data=mnist1d", "model=mlp", "trainer.max_epochs=2", "logger=csv")
    cfg = train_config(*quick, "compile=true")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.3, metrics  # ten classes: chance is 0.1
    state = checkpoint(cfg)["state_dict"]
    plain = train_config(*quick, folder="plain")
    from zoo.run import build_model

    model = build_model(plain)
    model.load_state_dict(state)  # the same names: no `_orig_mod.` prefix
    assert model.net.__class__.__name__ != "OptimizedModule"


def test_compile_true_on_a_task_without_a_net_is_one_line(train_config) -> None:
    from zoo.errors import UserError
    from zoo.run import build_model

    with pytest.raises(UserError, match=r"^compile=true: GANTask keeps no network in `net` to compile"):
        build_model(train_config("model=dcgan", "data=mnist5k_gan", "compile=true"))
