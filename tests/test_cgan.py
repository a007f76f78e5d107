"""Conditional GAN: the label enters the generator as a one-hot vector and the critic by projection, samples honour
the label asked for, conditional accuracy is scored, and mismatched or bad settings are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import compose_config
from tests.test_gan import TINY as GAN_TINY
from zoo.errors import UserError
from zoo.nn.gan import (
    ConditionalGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    ProjectionDiscriminator,
    StandardCNNDiscriminator,
    class_cycle,
)
from zoo.run import build_model, evaluate, train

# test_gan's quick run (briefly trained scorer, a few batches) with the conditional networks' nested keys
TINY = [
    "experiment=cgan_mnist",
    "model.generator.latent_dim=16",
    "model.generator.generator.base_channels=8",
    "model.discriminator.discriminator.base_channels=8",
    *(o for o in GAN_TINY if o.startswith(("model.scorer", "data.", "trainer.")) and "max_epochs" not in o),
    "trainer.max_epochs=1",
]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_conditional_generator_appends_the_one_hot_label_and_cycles_classes_without_one() -> None:
    torch.manual_seed(0)
    generator = ConditionalGenerator(lambda latent_dim: DCGANGenerator([1, 28, 28], latent_dim, 8), 10, latent_dim=6)
    generator.eval()
    assert generator.net.latent_dim == 16 and generator.latent_dim == 6
    z, labels = torch.randn(4, 6), torch.tensor([3, 3, 7, 0])
    expected = generator.net(torch.cat([z, F.one_hot(labels, 10).float()], 1))
    assert torch.equal(generator(z, labels), expected)
    assert not torch.allclose(generator(z, torch.tensor([3, 4, 7, 0]))[1], expected[1])  # the label changes the image
    cycled = torch.randn(12, 6)
    assert torch.equal(class_cycle(12, 10), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]))
    assert torch.equal(generator(cycled), generator(cycled, class_cycle(12, 10)))


@pytest.mark.parametrize("critic", [DCGANDiscriminator, StandardCNNDiscriminator])
def test_projection_discriminator_adds_the_class_embedding_projected_on_the_trunk(critic) -> None:
    torch.manual_seed(0)
    discriminator = ProjectionDiscriminator(lambda: critic([1, 28, 28], base_channels=8), 10)
    discriminator.eval()
    x, labels = torch.randn(3, 1, 28, 28), torch.tensor([1, 5, 9])
    body = discriminator.net
    features = body.trunk(x)
    assert features.shape == (3, body.trunk_features)
    assert torch.allclose(body.head(features), body(x), atol=1e-6)  # trunk and head are the critic, split
    projection = (discriminator.embedding.weight[labels] * features).sum(1)
    assert torch.allclose(discriminator(x, labels), body(x) + projection, atol=1e-5)
    assert not torch.allclose(discriminator(x, torch.tensor([2, 5, 9]))[0], discriminator(x, labels)[0])


def test_cgan_trains_scores_conditional_accuracy_and_samples_the_asked_label(train_config, tmp_path: Path) -> None:
    from PIL import Image

    cfg = train_config(*TINY)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["test/conditional_acc"] <= 1.0 and "val/conditional_acc" in metrics
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"

    def sample(*overrides: str, folder: str) -> Path:
        eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "mode=sample", *overrides], tmp_path)
        eval_cfg.paths.output_dir = str(tmp_path / folder)
        evaluate(eval_cfg)
        return tmp_path / folder / "samples.png"

    grid = Image.open(sample(folder="cycle"))
    assert grid.size == (10 * 28 + 11 * 2, 7 * 28 + 8 * 2)  # 64 samples, one class per column
    threes = sample("label=3", folder="threes")
    assert (
        Image.open(threes).size == grid.size
        and threes.read_bytes() != (tmp_path / "cycle" / "samples.png").read_bytes()
    )
    task = build_model(cfg).eval()
    z, threes_labels = torch.randn(5, 16), torch.full((5,), 3)
    one_hot = F.one_hot(threes_labels, 10).float()
    assert torch.equal(task.sample(z, threes_labels), task.generator.net(torch.cat([z, one_hot], 1)))
    for label, message in (("12", r"^label: expected a class in 0..9, got 12"), ("true", "expected a class")):
        with pytest.raises(UserError, match=message):
            sample(f"label={label}", folder="bad")


def test_conditional_critic_takes_the_gradient_penalty_with_its_labels(train_config) -> None:
    overrides = ["model.loss=wasserstein", "model.gp_weight=10", "model.discriminator.discriminator.norm=none"]
    cfg = train_config(*TINY, *overrides, "logger=csv", "test=false")
    train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    assert "train/gp" in rows.splitlines()[0]


def test_label_needs_a_conditional_gan_and_the_networks_must_match(train_config, tmp_path: Path) -> None:
    plain = ["model.discriminator._target_=zoo.nn.gan.DCGANDiscriminator"]
    with pytest.raises(Exception) as error:  # instantiation wraps it; train.py prints the one line
        build_model(
            train_config(
                *TINY,
                *plain,
                "~model.discriminator.num_classes",
                "~model.discriminator.spectral_norm",
                "~model.discriminator.discriminator",
                "+model.discriminator.image_shape=[1,28,28]",
            )
        )
    assert "model.discriminator: a conditional generator needs a conditional critic" in str(error.value)
    cfg = train_config(
        "model=dcgan",
        "data=mnist5k_gan",
        *TINY[4:],
        "model.generator.base_channels=8",
        "model.discriminator.base_channels=8",
        "test=false",
    )
    train(cfg)
    eval_cfg = compose_config(
        "eval",
        [f"ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints' / 'last.ckpt'}", "mode=sample", "label=3"],
        tmp_path,
    )
    with pytest.raises(UserError, match="^label: only a conditional GAN"):
        evaluate(eval_cfg)
