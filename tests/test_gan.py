"""GANs: network shapes and init, the critics' constraints (gradient penalty, spectral norm, clipping), scores that
separate real digits from noise, losses that move, sample grids, exact resume, evaluate, and one-line errors."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from tests.conftest import checkpoint, compose_config, interrupted_and_resumed, run_script
from zoo.data.gan import ImageFolderGANDataModule, MNIST5kGANDataModule, TorchvisionGANDataModule
from zoo.errors import TrainingDiverged, UserError
from zoo.metrics.generative import (
    class_coverage,
    frechet_distance,
    generative_scores,
    inception_score,
    kl_to_uniform,
)
from zoo.metrics.scorer import cached_scorer_path, load_or_train_scorer
from zoo.nn.gan import (
    DCGANDiscriminator,
    DCGANGenerator,
    StandardCNNDiscriminator,
    StandardCNNGenerator,
    start_size,
)
from zoo.run import build_model, evaluate, train
from zoo.tasks.adversarial import gradient_penalty, ramped_decay, update_ema
from zoo.tasks.gan import GANTask

MODELS = ("dcgan", "wgan", "wgan_gp", "sngan")
# small networks and a briefly trained scorer, so that a run takes seconds on one CPU core
TINY = [
    "data=mnist5k_gan",
    "scheduler=none",
    "model.generator.base_channels=8",
    "model.generator.latent_dim=16",
    "model.discriminator.base_channels=8",
    "model.scorer.channels=[8,16]",
    "model.scorer.hidden=32",
    "model.scorer.max_steps=5",
    "data.eval_batch_size=200",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
]


def epoch_rows(cfg) -> list[dict[str, str]]:
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


def last_ckpt(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def real_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = MNIST5kGANDataModule(input_shape=[1, 28, 28], num_classes=10)
    data.setup("fit")
    return (*data.splits["train"], *data.splits["test"])


def test_gan_data_is_in_minus_one_to_one(tmp_path: Path, real_digits) -> None:
    from tests.test_vision_data import make_mnist

    x_train = real_digits[0]
    assert x_train.min() == -1.0 and x_train.max() == 1.0 and x_train.shape[1:] == (1, 28, 28)
    written = make_mnist(tmp_path)
    data = TorchvisionGANDataModule("mnist", input_shape=[1, 28, 28], num_classes=10, data_dir=str(tmp_path))
    x, _, x_test, _ = data.load()
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(torch.from_numpy(x_test[:, 0]), torch.from_numpy(written["x_test"] / 127.5 - 1).float())


def write_image_folder(root: Path, per_class: int = 10) -> None:
    """Two classes of 20x20 images, grayscale and RGB mixed: a dark and a bright class."""
    from PIL import Image

    for label, level in (("dark", 30), ("bright", 220)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            mode = "L" if i % 2 else "RGB"
            pixel = level if mode == "L" else (level, level, level)
            Image.new(mode, (20, 20), pixel).save(root / label / f"{i}.png")


def test_image_folder_gan_data_reads_every_image_into_minus_one_to_one(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images")
    data = ImageFolderGANDataModule(
        root=str(tmp_path / "images"), input_shape=[1, 16, 16], num_classes=2, val_fraction=0.2, test_fraction=0.2
    )
    data.setup("fit")
    splits = {name: data.splits[name] for name in ("train", "val", "test")}
    assert sum(len(x) for x, _ in splits.values()) == 20
    assert all(x.shape[1:] == (1, 16, 16) for x, _ in splits.values())
    x, y = splits["train"]
    bright = x[y == 0]  # classes numbered in sorted folder order: bright, dark
    assert bright.min() > 0.6 and x[y == 1].max() < -0.6 and x.min() >= -1 and x.max() <= 1


def test_a_gan_trains_on_an_image_folder_and_an_empty_folder_is_one_line(train_config, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images")
    folder = [f"data.root={tmp_path / 'images'}", "data.num_classes=2", "data.input_shape=[1,16,16]"]
    cfg = train_config("model=dcgan", *TINY, "data=image_folder_gan", *folder, "data.val_fraction=0.2", "debug=fdr")
    train(cfg)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    result = run_script(
        "train.py",
        "experiment=dcgan_mnist",
        "data=image_folder_gan",
        f"data.root={tmp_path / 'empty'}",
        "data.num_classes=2",
        "data.input_shape=[1,16,16]",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "data.root: no images" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# ---- networks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "start"), [((1, 28, 28), (7, 2)), ((3, 32, 32), (4, 3)), ((1, 8, 8), (4, 1))])
def test_generator_and_discriminator_fit_the_image_size(shape: tuple[int, ...], start: tuple[int, int]) -> None:
    assert start_size(shape[1]) == start
    generator, discriminator = DCGANGenerator(shape, latent_dim=10, base_channels=8), DCGANDiscriminator(shape, 8)
    images = generator(torch.randn(5, 10))
    assert images.shape == (5, *shape) and images.abs().max() <= 1
    assert discriminator(images).shape == (5,)


@pytest.mark.parametrize("size", [30, 12 * 3, 7])
def test_unsupported_image_size_is_one_line(size: int) -> None:
    with pytest.raises(UserError, match=r"^model.image_shape: image size \d+ is not supported .*allowed: ") as error:
        DCGANGenerator((1, size, size))
    assert "\n" not in str(error.value)


def test_dcgan_init_draws_weights_from_n_0_002() -> None:
    generator = DCGANGenerator((3, 64, 64), base_channels=64)
    convs = [m.weight.detach().flatten() for m in generator.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    weights = torch.cat(convs)
    scales = torch.cat([m.weight.detach() for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert weights.mean().abs() < 1e-3 and weights.std() == pytest.approx(0.02, rel=0.02)
    assert scales.mean() == pytest.approx(1.0, abs=0.01) and scales.std() == pytest.approx(0.02, rel=0.2)


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic_and_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(16, 1, 4, 4), torch.randn(16, 1, 4, 4)
    linear = torch.nn.Linear(16, 1)
    critic = torch.nn.Sequential(torch.nn.Flatten(), linear)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(1, 16)).div_(linear.weight.norm())
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        linear.weight.mul_(3.0)  # gradient norm 3 everywhere: penalty (3 - 1)^2
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(4.0, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = gradient_penalty(critic, real, fake)
    assert penalty.dtype == torch.float32 and penalty.item() == pytest.approx(4.0, rel=1e-5)
    penalty.backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


def test_spectral_norm_bounds_the_largest_singular_value_by_one() -> None:
    torch.manual_seed(0)
    critic = DCGANDiscriminator((1, 28, 28), base_channels=16, norm="none", spectral_norm=True)
    for _ in range(20):  # power iteration runs in training-mode forwards
        critic(torch.randn(8, 1, 28, 28))
    critic.eval()
    convs = [m for m in critic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(hasattr(m, "parametrizations") for m in convs)
    for conv in convs:
        assert torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() == pytest.approx(1.0, abs=0.02)
    plain = DCGANDiscriminator((1, 28, 28), base_channels=16, norm="none")
    top = [torch.linalg.matrix_norm(m.weight.flatten(1), ord=2).item() for m in plain.modules() if hasattr(m, "weight")]
    assert max(top) > 1.05 or min(top) < 0.95  # without it the norms are whatever the init gives


def test_standard_cnn_critic_has_the_papers_layers_and_swaps_in_by_target(train_config) -> None:
    critic = StandardCNNDiscriminator((1, 28, 28), base_channels=8)
    convs = [m for m in critic.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0]) for m in convs] == [(3, 1), (4, 2)] * 3 + [(3, 1)]
    assert [m.out_channels for m in convs] == [8, 8, 16, 16, 32, 32, 64]
    assert all(hasattr(m, "parametrizations") for m in [*convs, critic.score])  # spectral norm on every layer
    assert critic.score.in_features == 64 * 3 * 3 and critic(torch.randn(5, 1, 28, 28)).shape == (5,)
    with pytest.raises(UserError, match=r"needs images of 8x8 or more, got 4x4"):
        StandardCNNDiscriminator((1, 4, 4))
    cfg = train_config("model=sngan", *TINY, "model.discriminator._target_=zoo.nn.gan.StandardCNNDiscriminator")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss_d"]) and metrics["test/coverage"] >= 1


def test_standard_cnn_generator_has_the_papers_layers_and_swaps_in_by_target(train_config) -> None:
    generator = StandardCNNGenerator((3, 32, 32))  # the paper's CIFAR-10 generator
    layers = [m for m in generator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert [(type(m).__name__, m.kernel_size[0], m.out_channels) for m in layers] == [
        ("ConvTranspose2d", 4, 512),
        ("ConvTranspose2d", 4, 256),
        ("ConvTranspose2d", 4, 128),
        ("ConvTranspose2d", 4, 64),
        ("Conv2d", 3, 3),
    ]
    images = StandardCNNGenerator((1, 28, 28), latent_dim=16, base_channels=8)(torch.randn(5, 16))
    assert images.shape == (5, 1, 28, 28) and images.abs().max() <= 1
    with pytest.raises(UserError, match="image size 30 is not supported"):
        StandardCNNGenerator((1, 30, 30))
    cfg = train_config("model=sngan", *TINY, "model.generator._target_=zoo.nn.gan.StandardCNNGenerator")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss_g"]) and metrics["test/coverage"] >= 1


# ---- scores ------------------------------------------------------------------------------------------------------


def test_score_functions_on_known_cases() -> None:
    torch.manual_seed(0)
    a = torch.randn(4000, 3, dtype=torch.float64)
    a = a - a.mean(0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + torch.tensor([3.0, 0.0, 4.0])
    assert frechet_distance(a, shifted) == pytest.approx(25.0, rel=1e-6)
    scaled = a * 2  # Tr(S + 4S - 2 * 2S) = Tr(S) ~ 3
    assert frechet_distance(a, scaled) == pytest.approx(float(torch.cov(a.T).trace()), rel=1e-9)
    one_hot = torch.eye(10).repeat(5, 1)
    assert inception_score(one_hot) == pytest.approx(10.0, rel=1e-6)
    assert kl_to_uniform(one_hot) == pytest.approx(0.0, abs=1e-9) and class_coverage(one_hot) == 10
    collapsed = torch.eye(10)[[3] * 50]
    assert inception_score(collapsed) == pytest.approx(1.0, rel=1e-6)
    assert kl_to_uniform(collapsed) == pytest.approx(math.log(10)) and class_coverage(collapsed) == 1


def test_scores_of_real_digits_beat_scores_of_noise(tmp_path: Path, real_digits, caplog) -> None:
    data = MNIST5kGANDataModule(input_shape=[1, 28, 28], num_classes=10)
    spec = {"ckpt_path": str(tmp_path / "scorer.pt"), "epochs": 2, "channels": [16, 32], "hidden": 64}
    scorer = load_or_train_scorer(spec, data, torch.device("cpu"), cache=True)
    assert scorer.accuracy > 0.85 and (tmp_path / "scorer.pt").is_file()
    # trained on shifted and blurred digits, it reads blurred test digits better than one trained on plain digits
    plain = {**spec, "ckpt_path": str(tmp_path / "plain.pt"), "shift": 0, "blur_sigma": 0.0}
    plain_scorer = load_or_train_scorer(plain, data, torch.device("cpu"), cache=True)
    assert scorer.blur_accuracy > plain_scorer.blur_accuracy + 0.03, (scorer.blur_accuracy, plain_scorer.blur_accuracy)
    _, _, x_test, _ = real_digits
    real_a, real_b = x_test[0::2], x_test[1::2]
    noise = torch.rand_like(real_b) * 2 - 1
    feats_a, _ = scorer(real_a)
    real = generative_scores(feats_a, *scorer(real_b))
    fake = generative_scores(feats_a, *scorer(noise))
    assert real["fid"] < fake["fid"] / 10, (real, fake)
    assert real["coverage"] == 10 and real["kl_uniform"] < 0.05 < fake["kl_uniform"]
    assert real["inception_score"] > fake["inception_score"] + 1
    assert real["confidence"] > fake["confidence"]
    # real halves cover each other; noise covers none of the real variety. (Its features collapse to one small
    # cluster that falls inside the real manifold, so its precision is high: in this scorer's feature space
    # precision alone does not judge noise, recall does.)
    assert real["precision"] > 0.6 and real["recall"] > 0.6 and fake["recall"] < 0.05
    # a second call loads the cache, names the file it scores with by its digest, and refuses data of another shape
    with caplog.at_level(logging.INFO, logger="zoo.metrics.scorer"):
        loaded = load_or_train_scorer(spec, data, torch.device("cpu"), cache=True)
    assert (loaded.accuracy, loaded.blur_accuracy) == (scorer.accuracy, scorer.blur_accuracy)
    digest = hashlib.sha256((tmp_path / "scorer.pt").read_bytes()).hexdigest()[:12]
    assert f"scorer.pt (sha256 {digest})" in caplog.text
    other = MNIST5kGANDataModule(input_shape=[1, 28, 28], num_classes=10, test_fraction=0.5)
    with pytest.raises(UserError, match="^model.scorer.ckpt_path: the classifier at .* was trained on"):
        load_or_train_scorer(spec, other, torch.device("cpu"), cache=True)


def classifier_run(train_config, experiment: str) -> Path:
    """The folder layout of a zoo classification run (config.yaml, checkpoints/last.ckpt), with untrained weights;
    a small hidden layer keeps its features (and the Frechet distances on them) cheap."""
    cfg = train_config(f"experiment={experiment}", "model.net.hidden=32", folder=experiment)
    run = Path(cfg.paths.output_dir)
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    net = instantiate(cfg.model.net)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, run / "checkpoints/last.ckpt")
    return run / "checkpoints/last.ckpt"


def test_a_classification_run_scores_only_data_of_its_own_shape(train_config, real_digits) -> None:
    """model.scorer.ckpt_path may name a zoo classifier's checkpoint; one trained on other images is refused."""
    data = MNIST5kGANDataModule(input_shape=[1, 28, 28], num_classes=10)
    same = {"ckpt_path": str(classifier_run(train_config, "cnn_mnist5k"))}
    scorer = load_or_train_scorer(same, data, torch.device("cpu"), True)
    _, _, x_test, _ = real_digits
    features, probs = scorer(x_test[:8])
    assert scorer.pixel_range == (0.0, 1.0) and probs.shape == (8, 10) and features.shape[0] == 8
    other = {"ckpt_path": str(classifier_run(train_config, "cnn_digits"))}
    with pytest.raises(UserError, match=r"^model.scorer.ckpt_path: the classifier at .* takes images \[1, 8, 8\]"):
        load_or_train_scorer(other, data, torch.device("cpu"), True)


# ---- training ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_fast_dev_run_of_every_gan(train_config, model: str) -> None:
    cfg = train_config(f"model={model}", *TINY, "debug=fdr")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert {"train/loss_d", "test/fid", "test/inception_score", "test/coverage", "test/kl_uniform"} <= set(metrics)
    assert not (Path(cfg.paths.data_dir) / "scorers").exists(), "a fast dev run must not cache a half-trained scorer"


def test_discriminator_learns_and_generator_loss_falls_against_a_fixed_discriminator(train_config) -> None:
    longer = ["logger=csv", "trainer.max_epochs=3", "trainer.limit_train_batches=10", "test=false"]
    cfg = train_config("model=dcgan", *TINY, *longer, folder="both")
    train(cfg)
    losses_d = column(epoch_rows(cfg), "train/loss_d")
    assert losses_d[0] > losses_d[-1] and losses_d[-1] < math.log(4) - 0.2, losses_d  # ln 4: D learned nothing
    frozen = train_config("model=dcgan", *TINY, *longer, "model.optimizer_d.lr=0", folder="g")
    train(frozen)
    losses_g = column(epoch_rows(frozen), "train/loss_g")
    assert losses_g[0] > losses_g[1] > losses_g[2], losses_g


def test_wgan_gp_critic_separates_real_from_fake_and_logs_the_penalty(train_config) -> None:
    every = "callbacks.model_checkpoint.save_top_k=-1"  # last.ckpt follows the saved checkpoints
    cfg = train_config(
        "model=wgan_gp", *TINY, every, "logger=csv", "trainer.max_epochs=3", "trainer.limit_train_batches=10"
    )
    train(cfg)
    rows = epoch_rows(cfg)
    distance, penalty = column(rows, "train/wasserstein"), column(rows, "train/gp")
    assert 0 < distance[0] < distance[1] < distance[2], distance  # the critic's estimate grows as it learns
    assert 0 < penalty[-1] < penalty[0] <= 1.0, penalty  # a near-constant critic starts at (0 - 1)^2
    assert last_ckpt(cfg)["gan_steps"] == {"d_steps": 30, "g_steps": 6}  # n_critic = 5


def test_weight_clipping_keeps_the_critic_within_c(train_config) -> None:
    every = "callbacks.model_checkpoint.save_top_k=-1"
    cfg = train_config("model=wgan", *TINY, "model.optimizer_d.lr=0.05", every, "test=false")
    train(cfg)
    weights = {k: v for k, v in last_ckpt(cfg)["state_dict"].items() if k.startswith("discriminator.")}
    trained = [v for k, v in weights.items() if "running" not in k and "num_batches" not in k]
    assert max(v.abs().max().item() for v in trained) <= 0.01 + 1e-7
    assert max(v.abs().max().item() for v in trained) == pytest.approx(0.01)  # lr 0.05 pushes weights to the bound


def test_fixed_noise_grid_is_logged_every_epoch(train_config) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config("model=sngan", *TINY, "test=false")
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples/fixed_noise")
    assert len(images) == 2
    assert (images[0].width, images[0].height) == (8 * 28 + 9 * 2, 8 * 28 + 9 * 2)
    assert images[0].encoded_image_string != images[1].encoded_image_string
    assert {"train/loss_d", "train/loss_g", "val/fid"} <= set(events.Tags()["scalars"])


def test_ema_update_is_the_exponential_moving_average() -> None:
    torch.manual_seed(0)
    model, average = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in average.parameters()]
    update_ema(average, model, decay=0.9)
    for smooth, a, b in zip(average.parameters(), start, model.parameters()):
        torch.testing.assert_close(smooth, 0.9 * a + 0.1 * b)
    update_ema(average, model, decay=0.9)
    for smooth, a, b in zip(average.parameters(), start, model.parameters()):
        torch.testing.assert_close(smooth, 0.81 * a + 0.19 * b)
    # the decay ramps up: the first updates nearly copy the model, long runs reach the configured decay
    assert [ramped_decay(0.999, t) for t in (0, 1, 90)] == pytest.approx([0.1, 2 / 11, 0.91])
    assert ramped_decay(0.999, 100_000) == 0.999


def test_samples_and_scores_come_from_the_ema_generator(train_config) -> None:
    cfg = train_config("model=sngan", *TINY, "model.ema_decay=0.9", "test=false")
    train(cfg)
    task = build_model(cfg)
    task.load_state_dict(last_ckpt(cfg)["state_dict"])
    live, ema = task.generator.eval(), task.generator_ema.eval()
    assert task.sampler is ema and not ema.net[0].weight.requires_grad
    for a, b in zip(live.parameters(), ema.parameters()):
        assert not torch.equal(a, b)  # 8 generator steps with a decay ramped up to 0.9: an average, not a copy
    z = torch.randn(16, live.latent_dim)
    torch.testing.assert_close(task.sample(z), ema(z))
    assert not torch.allclose(task.sample(z), live(z))
    off = build_model(train_config("model=sngan", *TINY, folder="off"))
    assert off.generator_ema is None and off.sampler is off.generator


def test_truncated_noise_lies_within_the_threshold_and_is_the_prior_without_one() -> None:
    from zoo.tasks.adversarial import truncated_normal

    plain = truncated_normal(4000, 8, None, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(4000, 8, generator=torch.Generator().manual_seed(0)))
    assert plain.abs().max() > 2.5  # the untruncated prior reaches past the thresholds below
    for threshold in (0.5, 1.0, 2.0):
        z = truncated_normal(4000, 8, threshold, torch.Generator().manual_seed(0))
        assert z.abs().max() <= threshold
        kept = plain[plain.abs() <= threshold]
        # redrawing (not clamping): no pile-up at the edges, and the spread of a normal cut at the threshold
        assert (z.abs() > 0.99 * threshold).float().mean() < 0.05
        assert abs(float(z.std()) - float(kept.std())) < 0.03


def test_truncation_reaches_the_grid_and_the_scored_samples(train_config) -> None:
    task = build_model(train_config("model=dcgan", *TINY, "model.truncation=0.5"))
    assert task.fixed_noise.abs().max() <= 0.5
    drawn: list[torch.Tensor] = []

    def generate(z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        drawn.append(z)
        return torch.zeros(len(z), 1, 28, 28)

    task._fakes_to_score = generate
    task.scorer = lambda images: (torch.zeros(len(images), 4), torch.full((len(images), 10), 0.1))
    task._eval_noise, task._scored = torch.Generator().manual_seed(0), {"real": [], "fake": [], "probs": []}
    task._score_batch(torch.zeros(300, 1, 28, 28))
    assert drawn[0].shape == (300, task.latent_dim) and drawn[0].abs().max() <= 0.5


def test_accumulation_and_n_critic_count_optimizer_steps(train_config) -> None:
    cfg = train_config(
        "model=wgan_gp",
        *TINY,
        "model.accumulate_grad_batches=2",
        "trainer.limit_train_batches=10",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
    )
    train(cfg)
    assert last_ckpt(cfg)["gan_steps"] == {"d_steps": 10, "g_steps": 2}


@pytest.mark.parametrize(("model", "ema_decay"), [("dcgan", "null"), ("wgan_gp", "0.99")])
def test_resume_equals_the_uninterrupted_run(train_config, model: str, ema_decay: str) -> None:
    settings = [
        f"model={model}",
        f"model.ema_decay={ema_decay}",
        *TINY,
        "trainer.limit_train_batches=3",
        "trainer.max_epochs=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
    ]
    full, resumed = interrupted_and_resumed(train_config, *settings)
    a, b = last_ckpt(full), last_ckpt(resumed)
    halfway = checkpoint(full, "epoch_001.ckpt")
    assert not torch.equal(halfway["state_dict"]["generator.net.0.weight"], a["state_dict"]["generator.net.0.weight"])
    assert any(key.startswith("generator_ema.") for key in a["state_dict"]) == (ema_decay != "null")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["gan_steps"] == b["gan_steps"] and a["global_step"] == b["global_step"]
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values()):
            for name in state_a:
                assert torch.equal(torch.as_tensor(state_a[name]), torch.as_tensor(state_b[name])), name


def test_evaluate_reproduces_the_test_scores_of_training(train_config, tmp_path: Path) -> None:
    cfg = train_config("model=dcgan", *TINY, "trainer.limit_test_batches=null")  # evaluate scores every test batch
    train(cfg)
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    assert logged["test/samples"] == 2000  # the 1,000 test images' own samples, then as many more
    for name in ("test/fid", "test/inception_score", "test/coverage", "test/kl_uniform", "test/fid_real_floor"):
        assert scored[name] == pytest.approx(logged[name], rel=1e-5), name


def test_evaluate_scores_with_another_classifier(train_config, tmp_path: Path) -> None:
    cfg = train_config("model=dcgan", *TINY, "trainer.max_epochs=1", "test=false")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"

    def scored_with(scorer: Path, folder: str) -> dict[str, float]:
        overrides = [f"ckpt_path={ckpt}", f"scorer_ckpt_path={scorer}", "extras.print_config=false"]
        eval_cfg = compose_config("eval", overrides, tmp_path)
        eval_cfg.paths.output_dir = str(tmp_path / folder)
        return evaluate(eval_cfg)

    own = scored_with(cached_scorer_path(cfg.model.scorer, instantiate(cfg.data)), "own")
    classifier = classifier_run(train_config, "cnn_mnist5k")
    other = scored_with(classifier, "other")
    assert own["test/fid"] != pytest.approx(other["test/fid"], rel=1e-3)  # another classifier's features
    with pytest.raises(UserError, match=r"^model.scorer.ckpt_path: the classifier at .* takes images \[1, 8, 8\]"):
        scored_with(classifier_run(train_config, "cnn_digits"), "digits")
    with pytest.raises(UserError, match="^scorer_ckpt_path: no file at .*missing.pt"):  # not trained and cached there
        scored_with(tmp_path / "missing.pt", "missing")
    assert not (tmp_path / "missing.pt").exists()
    eval_cfg = compose_config("eval", [f"ckpt_path={classifier}", f"scorer_ckpt_path={classifier}"], tmp_path)
    with pytest.raises(UserError, match="^scorer_ckpt_path: the run of .* has no model.scorer.ckpt_path"):
        evaluate(eval_cfg)


def test_evaluate_sample_mode_writes_the_fixed_noise_grid(train_config, tmp_path: Path) -> None:
    from PIL import Image

    cfg = train_config("model=dcgan", *TINY, "trainer.max_epochs=1", "test=false")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "mode=sample", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    evaluate(eval_cfg)
    image = Image.open(tmp_path / "eval" / "samples.png")
    assert image.size == (8 * 28 + 9 * 2, 8 * 28 + 9 * 2)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_wgan_gp_on_cpu(train_config, precision: str) -> None:
    cfg = train_config("model=wgan_gp", *TINY, f"trainer.precision={precision}", "logger=csv", "test=false")
    train(cfg)
    rows = epoch_rows(cfg)
    assert all(math.isfinite(v) for v in column(rows, "train/loss_d") + column(rows, "train/gp"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_wgan_gp_on_cuda_steps_both_networks_under_each_precision(train_config, precision: str) -> None:
    """Under 16-mixed the loss scaler must unscale before the hand-made clipping and skip no step of a finite loss."""
    cfg = train_config(
        "model=wgan_gp",
        *TINY,
        "trainer.accelerator=gpu",
        f"trainer.precision={precision}",
        "model.gradient_clip_val=1.0",
        "logger=csv",
        "test=false",
    )
    train(cfg)
    rows = epoch_rows(cfg)
    assert all(math.isfinite(v) for v in column(rows, "train/loss_d") + column(rows, "train/gp"))
    ckpt = last_ckpt(cfg)
    assert ckpt["gan_steps"] == {"d_steps": 8, "g_steps": 1}  # 2 epochs x 4 batches, n_critic 5
    if precision == "16-mixed":
        assert 0 < ckpt["MixedPrecision"]["scale"] < float("inf")


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(train_config) -> None:
    cfg = train_config("model=dcgan", *TINY, "trainer.max_epochs=3", "test=false")
    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    forward, calls = model.discriminator.forward, []

    def poisoned(x: torch.Tensor) -> torch.Tensor:  # finite for the first epoch, NaN in the second
        calls.append(1)
        out = forward(x)
        return out * float("nan") if len(calls) > 4 * 3 else out

    model.discriminator.forward = poisoned
    with pytest.raises(TrainingDiverged) as error:
        trainer.fit(model, datamodule=datamodule)
    message = str(error.value)
    assert "\n" not in message and message.startswith("training diverged: loss_d is nan at epoch 1")
    last = Path(message.split("the last good checkpoint is ")[1].split(";")[0])
    assert last.parent == Path(cfg.paths.output_dir) / "checkpoints"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and all(
        torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_critic=0", "model.n_critic: must be an integer >= 1"),
        ("model.ema_decay=1.0", "model.ema_decay: must be in [0, 1) or null, got 1.0"),
        ("model.loss=minimax", "model.loss: unknown 'minimax'; allowed: bce, wasserstein, hinge, lsgan"),
        ("model.discriminator.norm=group", "norm: unknown 'group'; allowed: batch, instance, layer, none"),
        # DCGAN's critic has batch norm, which the per-sample gradient penalty cannot have
        ("model.gp_weight=10", "model.discriminator.norm: batch norm mixes the samples of a batch, so the per-sample"),
        ("model.scorer.backend=inception", "model.scorer.backend: unknown 'inception'; allowed: domain, torchmetrics"),
        ("model.truncation=0", "model.truncation: must be a number > 0 or null (no truncation), got 0"),
    ],
)
def test_bad_model_settings_are_one_line_errors(train_config, override: str, message: str) -> None:
    cfg = train_config("model=dcgan", *TINY, override)
    with pytest.raises(Exception) as error:
        build_model(cfg)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.gradient_clip_val=1.0", "model.gradient_clip_val"),
        ("trainer.accumulate_grad_batches=2", "model.accumulate"),
    ],
)
def test_trainer_settings_lightning_cannot_honour_point_to_the_model_keys(
    train_config, override: str, key: str
) -> None:
    cfg = train_config("model=dcgan", *TINY, override, "debug=fdr")
    with pytest.raises(UserError, match=f"^{override.split('=')[0]}: Lightning cannot .* set {key}"):
        train(cfg)


def test_torchmetrics_scores_without_local_weights_is_one_line(train_config) -> None:
    cfg = train_config("model=dcgan", *TINY, "model.scorer.backend=torchmetrics", "debug=fdr")
    with pytest.raises(UserError, match="^model.scorer.backend: torchmetrics needs local Inception weights: "):
        train(cfg)


@pytest.mark.slow  # the optional Inception backend; the domain scorer's tests run by default
def test_torchmetrics_inception_scores_from_a_local_weights_file(train_config, tmp_path: Path, monkeypatch) -> None:
    """The Inception FID/IS path with a weights file the test writes (random weights: no download can happen)."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", reason="needs torch-fidelity")
    with monkeypatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pt"
    torch.save(network.state_dict(), weights)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(inception, "load_state_dict_from_url", no_download)
    local = [f"model.scorer.inception_weights={weights}", "data.eval_batch_size=8", "trainer.max_epochs=1"]
    cfg = train_config("model=dcgan", *TINY, "model.scorer.backend=torchmetrics", *local)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert math.isfinite(metrics["test/fid_inception"]) and metrics["test/fid_inception"] > 0, metrics
    assert metrics["test/inception_score_inception"] >= 1.0 and "test/fid" in metrics, metrics


@pytest.mark.slow  # train.py processes, about 14 s
def test_train_py_runs_a_gan_and_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    done = run_script("train.py", "experiment=dcgan_mnist", "debug=fdr", *TINY[1:8], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test/fid" in done.stdout
    bad = run_script("train.py", "experiment=dcgan_mnist", "debug=fdr", "data.input_shape=[1,30,30]", cwd=tmp_path)
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "image size 30 is not supported" in lines[0], bad.stderr[-2000:]


def test_gan_task_needs_an_optimizer_per_network() -> None:
    shape = (1, 8, 8)
    task = GANTask(DCGANGenerator(shape, latent_dim=4, base_channels=4), DCGANDiscriminator(shape, 4), scorer=None)
    with pytest.raises(UserError, match="model.optimizer_g / model.optimizer_d: not set"):
        task.configure_optimizers()


def test_model_override_alone_switches_the_monitor(train_config) -> None:
    cfg = train_config("model=sngan", "data=mnist5k_gan")
    assert (cfg.monitor, cfg.monitor_mode, cfg.optimized_metric) == ("val/fid", "min", "val/fid_best")
    with open_dict(cfg):
        cfg.model.scorer = None
    model = build_model(cfg)
    assert model.loss_kind == "hinge" and model.n_critic == 1


@pytest.mark.parametrize(("schedule", "interval"), [("warmup_cosine", "step"), ("step", "epoch")])
def test_a_schedule_from_the_scheduler_group_steps_both_networks(train_config, schedule: str, interval: str) -> None:
    tiny = [o for o in TINY if not o.startswith("scheduler=")]
    every = "callbacks.model_checkpoint.save_top_k=-1"
    cfg = train_config("model=wgan_gp", *tiny, f"scheduler={schedule}", every, "test=false")
    train(cfg)
    saved = last_ckpt(cfg)
    schedulers = saved["lr_schedulers"]
    assert len(schedulers) == 2
    steps = [s["last_epoch"] for s in schedulers]  # generator, discriminator
    # per network step: 8 critic steps and 8 // n_critic generator steps; per epoch: 2 each
    assert steps == ([1, 8] if interval == "step" else [2, 2]), steps
    if interval == "step":  # the cosine ends at 0 after the steps the run makes
        rates = [group["lr"] for opt in saved["optimizer_states"] for group in opt["param_groups"]]
        assert rates == [pytest.approx(0.0, abs=1e-12)] * 2, rates


@pytest.mark.parametrize("schedule", ["none", "warmup_cosine"])
def test_learning_rates_are_logged_as_train_lr_g_and_lr_d_with_or_without_a_schedule(train_config, schedule) -> None:
    tiny = [o for o in TINY if not o.startswith("scheduler=")]
    logged = ["logger=csv", "trainer.log_every_n_steps=1", "test=false"]
    cfg = train_config("model=sngan", *tiny, f"scheduler={schedule}", "model.optimizer_d.lr=5e-5", *logged)
    train(cfg)
    rows = epoch_rows(cfg)
    rates_g, rates_d = column(rows, "train/lr_g"), column(rows, "train/lr_d")
    assert len(rates_g) == len(rates_d) == 8  # one per batch: 2 epochs x 4
    assert not [name for name in rows[0] if name.startswith("lr-")]
    if schedule == "none":
        assert rates_g == pytest.approx([2e-4] * 8) and rates_d == pytest.approx([5e-5] * 8)
    else:  # the cosine falls from the base rates
        assert rates_g[0] == pytest.approx(2e-4) and rates_d[0] == pytest.approx(5e-5)
        assert rates_g == sorted(rates_g, reverse=True) and rates_g[-1] < 2e-4


def test_gradient_clipping_by_hand_bounds_each_sgd_step(train_config) -> None:
    sgd = ["model.optimizer_d._target_=torch.optim.SGD", "~model.optimizer_d.betas", "model.optimizer_d.lr=1.0"]
    changes = {}
    for clip in ("null", "1e-6"):
        cfg = train_config(
            "model=dcgan", *TINY, *sgd, f"model.gradient_clip_val={clip}", "callbacks.model_checkpoint.save_top_k=-1",
            "test=false", folder=f"clip_{clip}",
        )  # fmt: skip
        train(cfg)
        folder = Path(cfg.paths.output_dir) / "checkpoints"
        first, last = (torch.load(folder / f, weights_only=True)["state_dict"] for f in ("epoch_000.ckpt", "last.ckpt"))
        keys = [k for k in last if k.startswith("discriminator.") and k.endswith(("weight", "bias"))]
        changes[clip] = torch.cat([(last[k] - first[k]).flatten() for k in keys]).norm().item()
    assert changes["1e-6"] <= 4 * 1e-6 * 1.001 < 1e-3 < changes["null"], changes  # 4 steps of norm <= lr * clip


@pytest.mark.slow
def test_dcgan_mnist_covers_every_class_within_its_fid_bound(train_config) -> None:
    cfg = train_config("experiment=dcgan_mnist", "logger=none")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["test/coverage"] == 10, metrics
    assert metrics["test/fid"] <= cfg.expected.max, metrics
    assert metrics["test/fid"] > metrics["test/fid_real_floor"]  # the floor is what real samples score
