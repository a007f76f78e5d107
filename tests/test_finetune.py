"""Fine-tuning: init_from copies matching weights only, freeze keeps parameters and batch-norm statistics."""

from pathlib import Path

import pytest
import torch

from zoo.errors import UserError
from zoo.records import load_checkpoint
from zoo.run import train

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "logger=none"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from tests.conftest import QUICK, compose_config

    folder = tmp_path_factory.mktemp("pretrained")
    cfg = compose_config("train", [*QUICK, *SHORT], folder)
    train(cfg)
    return folder / "run" / "checkpoints" / "last.ckpt"


def test_init_from_loads_what_matches_and_starts_the_run_afresh(train_config, pretrained: Path) -> None:
    from zoo import finetune
    from zoo.run import build_model

    cfg = train_config(*SHORT, "model.net.hidden=32", f"init_from={pretrained}")
    model = build_model(cfg)
    report = finetune.init_from(model, pretrained)
    source = load_checkpoint(pretrained)["state_dict"]
    assert "net.features_net.0.weight" in report["loaded"]
    assert torch.equal(model.state_dict()["net.features_net.0.weight"], source["net.features_net.0.weight"])
    assert any(k.startswith("net.head") for k in report["new"])  # the new hidden layer and head
    assert not any("acc_best" in k for k in report["loaded"])  # a metric's state stays with its run
    train(cfg)
    last = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == 3  # counters start afresh


def test_frozen_parameters_and_batch_norm_statistics_do_not_move(train_config, pretrained: Path) -> None:
    cfg = train_config(*SHORT, f"init_from={pretrained}", "freeze=[net.features_net.*]")
    train(cfg)
    before = load_checkpoint(pretrained)["state_dict"]
    after = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["state_dict"]
    features = [k for k in before if k.startswith("net.features_net.") and "num_batches" not in k]
    assert features and all(torch.equal(before[k], after[k]) for k in features)  # running stats included
    head = [k for k in before if k.startswith("net.head")]
    assert any(not torch.equal(before[k], after[k]) for k in head)


def test_fine_tuning_mistakes_are_one_line(train_config, pretrained: Path) -> None:
    with pytest.raises(UserError, match=r"^init_from: no tensor of '.*' matches this model by name and shape"):
        train(train_config(*SHORT, "model=mlp", f"init_from={pretrained}", folder="mlp"))
    with pytest.raises(UserError, match=r"^init_from: a new run starts from weights, ckpt_path resumes"):
        train(train_config(*SHORT, f"init_from={pretrained}", f"ckpt_path={pretrained}", folder="both"))
    with pytest.raises(UserError, match=r"^freeze: 'net.encoder.\*' matches no parameter; names look like net\."):
        train(train_config(*SHORT, "freeze=[net.encoder.*]", folder="freeze"))
    with pytest.raises(UserError, match=r"^head_lr_mult: expected a number > 0 with head=\[<parameter patterns>\]"):
        train(train_config(*SHORT, "head_lr_mult=10", folder="mult"))
    with pytest.raises(UserError, match=r"^unfreeze_at_epoch: expected an epoch number with freeze="):
        train(train_config(*SHORT, "unfreeze_at_epoch=1", folder="unfreeze"))
    with pytest.raises(UserError, match=r"^head: 'net.top.\*' matches no parameter"):
        train(train_config(*SHORT, "head=[net.top.*]", "head_lr_mult=10", folder="head"))


def test_head_trains_at_its_multiple_of_the_learning_rate(train_config) -> None:
    from zoo.run import _fine_tuning, build_model

    overrides = ("optimizer=sgd", "scheduler=none", "optimizer.lr=0.01", "head=[net.head.*]", "head_lr_mult=10")
    cfg = train_config(*SHORT, *overrides)
    model = build_model(cfg)
    _fine_tuning(cfg, model)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    head_ids = {id(p) for name, p in model.named_parameters() if name.startswith("net.head.")}
    head_groups = [g for g in optimizer.param_groups if g["name"].startswith("lr_head")]
    assert rates["lr"] == pytest.approx(0.01) and all(g["lr"] == pytest.approx(0.1) for g in head_groups)
    assert {id(p) for g in head_groups for p in g["params"]} == head_ids


def test_unfreeze_at_epoch_lets_the_frozen_body_train_from_then_on(train_config, pretrained: Path) -> None:
    overrides = [*SHORT, f"init_from={pretrained}", "freeze=[net.features_net.*]", "unfreeze_at_epoch=1"]
    cfg = train_config(*overrides, "trainer.max_epochs=2")
    train(cfg)
    before = load_checkpoint(pretrained)["state_dict"]
    after = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["state_dict"]
    weights = [k for k in before if k.startswith("net.features_net.") and k.endswith("weight")]
    assert weights and any(not torch.equal(before[k], after[k]) for k in weights)  # trained in the second epoch
