"""VAE: the ELBO's terms against hand computations, the importance-weighted bound, fixed binarisation, the label of a
conditional VAE, a short training run whose loss falls, evaluate.py's modes, resume, and one-line errors."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.conftest import compose_config, interrupted_and_resumed
from zoo.errors import UserError
from zoo.nn.vae import VAE
from zoo.run import evaluate, train
from zoo.tasks.vae import (
    VAETask,
    bernoulli_log_likelihood,
    gaussian_kl,
    gaussian_log_likelihood,
    image_noise,
    log_normal,
)

# a small network, a briefly trained scorer and short evaluations, so that a run takes seconds on one CPU core
TINY = [
    "experiment=vae_mnist",
    "model.net.channels=[8,16]",
    "model.net.hidden=32",
    "model.net.latent_dim=8",
    "model.iw_samples=10",
    "model.score_samples=200",
    "model.scorer.channels=[8,16]",
    "model.scorer.hidden=32",
    "model.scorer.max_steps=5",
    "data.eval_batch_size=100",
    "trainer.limit_train_batches=10",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.max_epochs=3",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def tiny_task(conditional: bool = False, likelihood: str = "bernoulli", **kwargs) -> VAETask:
    torch.manual_seed(0)
    net = VAE([1, 8, 8], latent_dim=3, channels=[4], hidden=6, likelihood=likelihood, conditional=conditional)
    binarize = "none" if likelihood == "gaussian" else "dynamic"
    task = VAETask(net, likelihood=likelihood, conditional=conditional, binarize=binarize, scorer=None, **kwargs)
    return task.eval()


def binary_images(count: int = 6) -> torch.Tensor:
    return torch.bernoulli(
        torch.full((count, 1, 8, 8), 0.3, dtype=torch.float32), generator=torch.Generator().manual_seed(1)
    )


# ---- the ELBO's terms ----------------------------------------------------------------------------------------------


def test_kl_of_a_diagonal_gaussian_is_the_closed_form_and_the_monte_carlo_mean() -> None:
    mean, log_var = torch.tensor([[0.5, -1.0, 0.0]]), torch.tensor([[0.2, -0.7, 0.0]])
    std = (0.5 * log_var).exp()
    reference = kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).sum(dim=1)
    torch.testing.assert_close(gaussian_kl(mean, log_var), reference)
    hand = 0.5 * sum(m**2 + math.exp(v) - 1 - v for m, v in zip(mean[0].tolist(), log_var[0].tolist()))
    assert float(gaussian_kl(mean, log_var)) == pytest.approx(hand)
    z = mean + std * torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0))
    monte_carlo = (log_normal(z, mean, log_var) - log_normal(z, torch.zeros(3), torch.zeros(3))).mean()
    assert float(monte_carlo) == pytest.approx(hand, abs=0.01)
    assert float(gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3))) == 0.0  # q = p


def test_bernoulli_reconstruction_is_the_summed_binary_cross_entropy_of_the_logits() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]])
    x = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = torch.sigmoid(logits)
    hand = (x * p.log() + (1 - x) * (1 - p).log()).sum()
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), hand.view(1))
    by_hand = math.log(1 / (1 + math.exp(-2))) + math.log(1 - 1 / (1 + math.exp(1))) + math.log(0.5)
    by_hand += math.log(1 - 1 / (1 + math.exp(-3)))
    assert float(bernoulli_log_likelihood(logits, x)) == pytest.approx(by_hand)


def test_gaussian_reconstruction_is_the_normal_log_density_with_one_scale_per_channel() -> None:
    mean, x = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    log_scale = torch.tensor([-1.0, 0.0, 0.5])
    reference = Normal(mean, log_scale.exp().view(1, 3, 1, 1)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_likelihood(mean, log_scale, x), reference)


def test_elbo_terms_of_a_tiny_model_against_a_hand_computation() -> None:
    task = tiny_task()
    x = binary_images()
    noise = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(2))
    recon, kl = task.elbo_terms(x, None, noise)
    mean, log_var = task.net.encode(x)
    logits = task.net.decode(mean + (0.5 * log_var).exp() * noise)
    p = torch.sigmoid(logits)
    hand_recon = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    hand_kl = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(recon, hand_recon, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl, hand_kl)
    assert recon.shape == kl.shape == (len(x),)


def test_bits_per_dim_are_nats_per_pixel_in_base_two() -> None:
    assert tiny_task().bits_per_dim(64 * math.log(2)) == pytest.approx(1.0)
    # a density on [0, 1] stands for 8-bit levels: log 256 nats more per pixel, 8 more bits
    assert tiny_task(likelihood="gaussian").bits_per_dim(0.0) == pytest.approx(8.0)


# ---- the importance-weighted bound ---------------------------------------------------------------------------------


def test_iw_bound_with_one_sample_is_the_single_sample_elbo_estimate() -> None:
    task = tiny_task()
    x = binary_images()
    iw = task.iw_nll(x, None, 1, torch.Generator().manual_seed(3))
    noise = torch.randn(1, len(x), 3, generator=torch.Generator().manual_seed(3))[0]
    mean, log_var = task.net.encode(x)
    z = mean + (0.5 * log_var).exp() * noise
    log_px = bernoulli_log_likelihood(task.net.decode(z), x)
    estimate = -(log_px + log_normal(z, torch.zeros(3), torch.zeros(3)) - log_normal(z, mean, log_var))
    torch.testing.assert_close(iw, estimate.detach(), rtol=1e-5, atol=1e-4)


def test_iw_bound_with_100_samples_is_below_the_elbo_on_average() -> None:
    task = tiny_task(iw_chunk=7)  # chunks that do not divide k
    with torch.no_grad():  # a decoder that listens to z, as a trained one does: the bounds then differ
        task.net.decoder_head[0].weight.mul_(10)
    x = binary_images(16)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        nelbo = torch.stack([sum(task.elbo_terms(x, None)) for _ in range(50)]).mean()
    iw100 = task.iw_nll(x, None, 100, generator).mean()
    iw1 = torch.stack([task.iw_nll(x, None, 1, generator) for _ in range(50)]).mean()
    assert float(iw1) == pytest.approx(float(nelbo), rel=0.01)  # one sample: the ELBO in expectation
    assert iw100 < nelbo - 0.5, (float(iw100), float(nelbo))


# ---- data ----------------------------------------------------------------------------------------------------------


def test_fixed_binarisation_depends_on_the_image_alone_and_keeps_the_grey_level_as_its_rate() -> None:
    x01 = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * 255).round() / 255
    together = image_noise(x01, seed=0) < x01
    alone = torch.cat([image_noise(x01[i : i + 1], seed=0) < x01[i : i + 1] for i in range(len(x01))])
    assert torch.equal(together, alone)
    assert not torch.equal(together, image_noise(x01, seed=1) < x01)
    assert float(together.float().mean()) == pytest.approx(float(x01.mean()), abs=0.005)
    grey = torch.full((1, 1, 100, 100), 0.25)
    assert float((image_noise(grey, seed=0) < grey).float().mean()) == pytest.approx(0.25, abs=0.01)


def test_training_batches_are_binarised_afresh_and_evaluation_ones_once() -> None:
    task = tiny_task()
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    task.train()
    torch.manual_seed(0)
    first, second = task.targets(images), task.targets(images)
    assert not torch.equal(first, second) and set(first.unique().tolist()) <= {0.0, 1.0}
    task.eval()
    assert torch.equal(task.targets(images), task.targets(images))


# ---- the conditional VAE -------------------------------------------------------------------------------------------


def test_a_conditional_vae_decodes_and_encodes_through_the_label() -> None:
    task = tiny_task(conditional=True)
    z = torch.randn(5, 3)
    threes, fives = (task.sample(z, torch.full((5,), label)) for label in (3, 5))
    assert not torch.allclose(threes, fives)
    torch.testing.assert_close(threes, torch.sigmoid(task.net.decode(z, torch.full((5,), 3))))
    x = binary_images(5)
    assert not torch.allclose(task.net.encode(x, torch.full((5,), 3))[0], task.net.encode(x, torch.full((5,), 5))[0])
    with pytest.raises(ValueError, match="needs the labels"):
        task.net.decode(z)
    # grids draw class r in row r
    assert task.grid_labels(100).view(10, 10)[:, 0].tolist() == list(range(10))


# ---- training, evaluate.py, errors ---------------------------------------------------------------------------------


def epoch_values(cfg, name: str) -> list[float]:
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def test_training_lowers_the_loss_and_evaluate_reproduces_samples_and_interpolates(train_config, tmp_path) -> None:
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    every_test_batch = "trainer.limit_test_batches=null"  # evaluate.py scores them all
    cfg = train_config(*TINY, "model.kl_warmup_steps=20", "logger=many", "model.conditional=true", every_test_batch)
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [len(events.Images(tag)) for tag in ("reconstructions", "samples/prior")] == [3, 3]  # every validation
    assert events.Images("samples/prior")[0].width == 10 * 28 + 11 * 2
    losses, betas = epoch_values(cfg, "train/loss"), epoch_values(cfg, "train/beta")
    assert losses[0] > losses[1] > losses[2], losses
    assert betas[0] < betas[1] < betas[2] == 1.0, betas  # warm-up over the first 20 of 30 steps
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert logged["test/bits_per_dim"] == pytest.approx(logged["test/nelbo"] / (784 * math.log(2)), rel=1e-5)
    assert logged["test/iw_nll"] < logged["test/nelbo"]
    assert {"test/fid", "test/coverage", "test/conditional_acc", "val/nelbo_best"} <= set(logged)

    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))

    def evaluated(*overrides: str, folder: str) -> dict[str, float]:
        eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false", *overrides], tmp_path)
        eval_cfg.paths.output_dir = str(tmp_path / folder)
        return evaluate(eval_cfg)

    scored = evaluated(folder="score")
    for name in ("test/nelbo", "test/iw_nll", "test/fid"):
        assert scored[name] == pytest.approx(logged[name], rel=1e-4), name
    evaluated("mode=sample", "label=3", folder="threes")
    grid = Image.open(tmp_path / "threes" / "samples.png")
    assert grid.size == (10 * 28 + 11 * 2, 10 * 28 + 11 * 2)
    evaluated("mode=interpolate", folder="lerp")
    assert Image.open(tmp_path / "lerp" / "interpolation.png").size == (12 * 28 + 13 * 2, 8 * 28 + 9 * 2)
    assert not (tmp_path / "lerp" / "samples.png").exists()
    with pytest.raises(UserError, match="^label: expected a class in 0..9"):
        evaluated("mode=sample", "label=12", folder="bad")


def test_an_unconditional_vae_refuses_a_label() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"paths": {"output_dir": "unused"}, "label": 3})
    with pytest.raises(UserError, match="^label: only a conditional VAE"):
        tiny_task().run_eval_mode("sample", cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data=digits", "^data: model=vae takes images in \\[-1, 1\\]"),
        ("model.binarize=none", "^model.binarize: a Bernoulli likelihood needs binary pixels"),
        ("model.likelihood=gaussian", "^model.binarize: a Gaussian likelihood models grey levels"),
        ("model.net.channels=[8,16,32]", "^model.net.channels: 3 stride-2 convolutions need"),
    ],
)
def test_bad_settings_are_one_line_errors(train_config, override: str, message: str) -> None:
    with pytest.raises(Exception) as error:  # raised inside Hydra's instantiate, which the command line unwraps
        train(train_config(*TINY, override, "logger=none"))
    cause = error.value
    while not isinstance(cause, UserError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, UserError) and re.search(message, str(cause)) and "\n" not in str(cause), cause


@pytest.mark.slow
def test_a_gaussian_vae_trains_and_reports_bits_of_the_8_bit_images(train_config) -> None:
    cfg = train_config(*TINY, "model.likelihood=gaussian", "model.binarize=none", "logger=csv")
    train(cfg)
    losses = epoch_values(cfg, "train/loss")
    assert losses[0] > losses[-1], losses
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    expected = (logged["test/nelbo"] + 784 * math.log(256)) / (784 * math.log(2))
    assert logged["test/bits_per_dim"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_run(train_config) -> None:
    settings = [
        *TINY,
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=3",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    full, resumed = interrupted_and_resumed(train_config, *settings, "test=false", "logger=none")
    a = torch.load(Path(full.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
