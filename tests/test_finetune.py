"""Fine-tuning: init_from copies matching weights only, freeze keeps parameters and batch-norm statistics; the
few-shot digits of experiment=finetune_digits (exactly k per class, resized to MNIST's layout) and the recipe
starting from a cnn_mnist5k checkpoint."""

import re
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException

from zoo.data.bundled import DigitsDataModule
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


def digits(input_shape: tuple[int, ...] = (1, 8, 8), **options: object) -> DigitsDataModule:
    data = DigitsDataModule(input_shape=input_shape, num_classes=10, **options)
    data.setup()
    return data


def rows(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def test_train_per_class_keeps_exactly_k_of_each_class_and_the_same_val_and_test() -> None:
    whole, ten, three = digits(), digits(train_per_class=10), digits(train_per_class=3, shuffle_seed=7)
    assert torch.bincount(ten.splits["train"][1], minlength=10).tolist() == [10] * 10
    assert torch.bincount(three.splits["train"][1], minlength=10).tolist() == [3] * 10
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(ten.splits[split], whole.splits[split]))
    # drawn from the training split only, fixed by split_seed (not the training seed), smaller draws nested
    assert rows(ten.splits["train"][0]) <= rows(whole.splits["train"][0])
    assert rows(three.splits["train"][0]) <= rows(ten.splits["train"][0])
    assert all(torch.equal(a, b) for a, b in zip(ten.splits["train"], digits(train_per_class=10).splits["train"]))
    other = digits(train_per_class=10, split_seed=1)
    assert not torch.equal(ten.splits["test"][0], other.splits["test"][0])


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "ten"])
def test_a_bad_train_per_class_is_refused_in_one_line(value: object) -> None:
    with pytest.raises(UserError, match=r"^data.train_per_class: expected null .* or a whole number") as error:
        DigitsDataModule(input_shape=[1, 8, 8], num_classes=10, train_per_class=value)
    assert "\n" not in str(error.value)


def test_more_per_class_than_the_rarest_class_holds_is_refused_with_the_limit(train_config) -> None:
    with pytest.raises(UserError, match=r"^data.train_per_class: expected at most 1\d\d \(the training split's rarest"):
        digits(train_per_class=500)
    with pytest.raises(UserError, match=r"^data.train_per_class: give it or data.train_fraction < 1, not both$"):
        digits(train_per_class=10, train_fraction=0.5)
    with pytest.raises(InstantiationException) as error:  # through the recipe's config; train.py prints the cause
        train(train_config("experiment=finetune_digits", *SHORT, "data.train_per_class=0"))
    assert isinstance(error.value.__cause__, UserError)
    assert re.match(r"data.train_per_class: expected null .*, got 0$", str(error.value.__cause__))


def test_resized_digits_take_mnist_layout() -> None:
    data = digits((1, 28, 28), image_size=20, pad=4)
    images = data.splits["train"][0]
    assert images.shape[1:] == (1, 28, 28) and images.min() >= 0 and images.max() <= 1
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert images[:, 0, border].abs().max() == 0 and images[:, 0, 4:24, 4:24].amax(dim=(1, 2)).min() > 0.5


def test_finetune_digits_starts_from_every_tensor_of_a_cnn_mnist5k_checkpoint(train_config, capsys) -> None:
    source_cfg = train_config("experiment=cnn_mnist5k", *SHORT, "trainer.limit_train_batches=1", folder="mnist5k")
    train(source_cfg)
    checkpoint = Path(source_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    cfg = train_config("experiment=finetune_digits", f"init_from={checkpoint}", *SHORT, folder="finetune")
    train(cfg)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("init_from")]
    assert printed and re.search(r": loaded \d+, new 0, ignored 0$", printed[0]), printed  # head included
    before = load_checkpoint(checkpoint)["state_dict"]
    after = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["state_dict"]
    # three small AdamW steps away from the pre-trained weights; a fresh initialisation would be far from them
    for name in ("net.features_net.0.weight", "net.head.1.weight"):
        assert 0 < (after[name] - before[name]).abs().max() < 0.01, name
