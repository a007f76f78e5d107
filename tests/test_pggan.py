"""PGGAN: equalized layers, pixel norm, minibatch stddev, fade-in of both networks and of real images, the growth
schedule, EMA, optimizer state across growth, logging, exact resume in a fade-in, evaluate, and one-line errors."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch.nn import functional as F

from tests.conftest import (
    assert_same_final_weights,
    checkpoint,
    compose_config,
    interrupted_and_resumed,
    run_script,
)
from tests.test_vision_data import make_cifar10, skip_md5  # noqa: F401  (skip_md5: a fixture used below)
from zoo.data.pggan import MNIST5kPGGANDataModule
from zoo.errors import UserError
from zoo.nn.pggan import (
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    PixelNorm,
    ProgressiveDiscriminator,
    ProgressiveGenerator,
)
from zoo.run import build_model, evaluate, train
from zoo.tasks.pggan import GrowthSchedule, resize_real

# 8x8 digits, 4x4 -> 8x8, small networks and a briefly trained scorer: seconds per run on one CPU thread.
# Phases of 24 images: 4x4 in 3 steps of 8, the 8x8 fade-in and stabilization in 6 steps of 4 each (15 steps);
# 3 steps per epoch: 5 epochs, and epoch_001.ckpt (after step 6) falls in the middle of the fade-in.
TINY = [
    "experiment=pggan_mnist",
    "data.input_shape=[1,8,8]",
    "data.steps_per_epoch=3",
    "data.eval_batch_size=200",
    "model.resolutions=[4,8]",
    "model.images_per_phase=24",
    "model.batch_sizes=[8,4]",
    "model.generator.latent_dim=16",
    "model.generator.channel_base=64",
    "model.generator.max_channels=16",
    "model.discriminator.channel_base=64",
    "model.discriminator.max_channels=16",
    "model.scorer.channels=[8,16]",
    "model.scorer.hidden=32",
    "model.scorer.max_steps=5",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
]
STEPS = (3, 6, 6)  # steps of the phases: stabilize 4x4, fade in 8x8, stabilize 8x8


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def metrics_rows(cfg) -> list[dict[str, str]]:
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


# ---- layers ------------------------------------------------------------------------------------------------------


def test_equalized_layers_keep_n01_weights_and_scale_by_the_he_constant_at_run_time() -> None:
    torch.manual_seed(0)
    conv, linear = EqualizedConv2d(64, 48, 3, padding=1), EqualizedLinear(256, 512)
    for layer, fan_in in ((conv, 64 * 9), (linear, 256)):
        weight = layer.weight.detach()
        assert weight.mean().abs() < 0.03 and weight.std() == pytest.approx(1.0, rel=0.02)
        assert layer.scale == pytest.approx(math.sqrt(2.0 / fan_in))
        assert torch.all(layer.bias == 0)
    x = torch.randn(16, 64, 12, 12)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight * math.sqrt(2 / 576), padding=1))
    # He: unit-variance inputs give outputs of variance 2 (a LeakyReLU then halves it back)
    assert conv(x)[..., 1:-1, 1:-1].var().item() == pytest.approx(2.0, rel=0.1)  # away from the zero padding
    assert linear(torch.randn(4096, 256)).var().item() == pytest.approx(2.0, rel=0.1)
    linear.weight.data.mul_(3)  # scaling the stored weights scales the output: the constant is applied per call
    assert linear(torch.randn(4096, 256)).var().item() == pytest.approx(18.0, rel=0.1)


def test_pixel_norm_gives_unit_mean_square_per_pixel() -> None:
    x = torch.randn(5, 7, 3, 3) * torch.rand(5, 1, 3, 3) * 10
    y = PixelNorm()(x)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(5, 3, 3))
    torch.testing.assert_close(y / y.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True))


def test_minibatch_stddev_appends_the_group_standard_deviation_as_one_channel() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    whole = MinibatchStdDev(group_size=8)(x)
    assert whole.shape == (8, 4, 4, 4) and torch.equal(whole[:, :3], x)
    expected = x.std(dim=0, unbiased=False).mean()
    torch.testing.assert_close(whole[:, 3], expected.expand(8, 4, 4), atol=1e-5, rtol=1e-5)
    grouped = MinibatchStdDev(group_size=4)(x)  # 4 groups of two: sample i is in group i % 2
    for i in range(8):
        group = x[i % 2 :: 2]
        torch.testing.assert_close(grouped[i, 3], group.std(dim=0, unbiased=False).mean().expand(4, 4))
    assert MinibatchStdDev(4)(torch.randn(6, 2, 4, 4)).shape == (6, 3, 4, 4)  # groups of 3 when 4 does not divide


# ---- growth ------------------------------------------------------------------------------------------------------


def test_generator_fade_in_blends_the_upsampled_previous_output_into_the_new_block() -> None:
    torch.manual_seed(0)
    generator = ProgressiveGenerator((1, 16, 16), latent_dim=8, channel_base=64, max_channels=16)
    z = torch.randn(3, 8)
    previous = F.interpolate(generator(z, 8), scale_factor=2, mode="nearest")
    new = generator.to_rgb[2](generator.blocks[2](generator.features(z, 8)))
    assert generator(z, 16).shape == (3, 1, 16, 16) and generator(z, 4).shape == (3, 1, 4, 4)
    torch.testing.assert_close(generator(z, 16, alpha=0.0), previous)
    torch.testing.assert_close(generator(z, 16, alpha=1.0), new)
    torch.testing.assert_close(generator(z, 16, alpha=0.3), 0.7 * previous + 0.3 * new)
    assert not torch.allclose(previous, new)


def test_discriminator_fade_in_blends_the_pooled_input_through_the_old_from_rgb() -> None:
    torch.manual_seed(0)
    critic = ProgressiveDiscriminator((1, 16, 16), channel_base=64, max_channels=16)
    x = torch.randn(4, 1, 16, 16)
    old_path = critic.from_rgb[1](F.avg_pool2d(x, 2))
    new_path = critic.blocks[2](critic.from_rgb[2](x))
    rest = lambda h: critic.blocks[0](critic.blocks[1](h)).flatten()  # noqa: E731
    torch.testing.assert_close(critic(x, 16, alpha=0.0), critic(F.avg_pool2d(x, 2), 8))
    torch.testing.assert_close(critic(x, 16, alpha=1.0), rest(new_path))
    torch.testing.assert_close(critic(x, 16, alpha=0.25), rest(0.75 * old_path + 0.25 * new_path))
    assert critic(F.avg_pool2d(x, 4), 4).shape == (4,)


def test_real_images_fade_between_the_coarse_and_the_full_version() -> None:
    x = torch.randn(2, 1, 16, 16)
    at_8 = F.avg_pool2d(x, 2)
    coarse = F.interpolate(F.avg_pool2d(at_8, 2), scale_factor=2, mode="nearest")
    torch.testing.assert_close(resize_real(x, 8, 0.0), coarse)
    torch.testing.assert_close(resize_real(x, 8, 1.0), at_8)
    torch.testing.assert_close(resize_real(x, 8, 0.6), 0.4 * coarse + 0.6 * at_8)
    assert torch.equal(resize_real(x, 16), x)


def test_schedule_gives_resolution_alpha_and_images_from_the_steps_taken() -> None:
    schedule = GrowthSchedule([4, 8, 16], images_per_phase=100, batch_sizes=[10, 20, 25])
    assert schedule.steps_per_phase == [10, 5, 5, 4, 4] and schedule.total_steps == 28
    first = schedule.at(0)
    assert (first.resolution, first.fading, first.alpha, first.images) == (4, False, 1.0, 0)
    assert schedule.at(9).images == 90 and schedule.at(9).batch_size == 10
    fade = [schedule.at(step) for step in range(10, 15)]
    assert {p.resolution for p in fade} == {8} and all(p.fading for p in fade)
    assert [p.alpha for p in fade] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])  # linear in images shown
    assert [p.images for p in fade] == [100, 120, 140, 160, 180]
    stable = schedule.at(15)
    assert (stable.resolution, stable.fading, stable.alpha, stable.images, stable.index) == (8, False, 1.0, 200, 2)
    assert [schedule.at(s).alpha for s in range(20, 24)] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert schedule.at(20).resolution == 16 and schedule.at(20).images == 300
    done = schedule.at(100)  # past the schedule the final resolution keeps training
    assert (done.resolution, done.alpha, done.index) == (16, 1.0, 4)
    assert GrowthSchedule([4], 10, 3).steps_per_phase == [4]  # a partial last batch still counts as a step
    # the EMA's decay ramps up anew where each resolution enters: steps since its fade-in began
    at_resolution = [schedule.steps_at_resolution(schedule.at(step)) for step in (0, 9, 10, 14, 15, 19, 20, 27, 30)]
    assert at_resolution == [0, 9, 0, 4, 5, 9, 0, 7, 10]


# ---- training ----------------------------------------------------------------------------------------------------


def test_tiny_run_logs_growth_keeps_optimizer_state_and_scores(train_config) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config(*TINY, "logger=many", "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.save_top_k=-1")
    train(cfg)
    rows = metrics_rows(cfg)
    resolution, alpha = column(rows, "train/resolution"), column(rows, "train/alpha")
    assert resolution == [4.0] * 3 + [8.0] * 12, resolution
    assert alpha[3:9] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6]) and alpha[9:] == [1.0] * 6, alpha
    losses = column(rows, "train/loss_d") + column(rows, "train/loss_g") + column(rows, "train/gp")
    assert len(losses) == 15 and all(math.isfinite(v) for v in losses)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    for name in ("test/fid", "test/coverage", "test/kl_uniform", "test/confidence", "val/fid_best"):
        assert math.isfinite(metrics[name]), name
    assert metrics["test/resolution"] == 8.0

    # Adam's state was created once: layers that exist from the start have stepped at every step, the 8x8 block
    # since its fade-in began, and the 4x4 toRGB only until the fade-in ended
    saved = checkpoint(cfg)
    names = [name for name, _ in build_model(cfg).generator.named_parameters()]
    state = saved["optimizer_states"][0]["state"]
    step = lambda name: int(state[names.index(name)]["step"])  # noqa: E731
    assert step("dense.weight") == sum(STEPS)
    assert step("blocks.1.1.weight") == step("to_rgb.1.weight") == STEPS[1] + STEPS[2]
    assert step("to_rgb.0.weight") == STEPS[0] + STEPS[1]
    early = checkpoint(cfg, "epoch_000.ckpt")["optimizer_states"][0]["state"]
    assert names.index("to_rgb.1.weight") not in early  # the 8x8 layers had no gradient before growing
    assert int(early[names.index("dense.weight")]["step"]) == 3
    assert saved["pggan"]["resolution"] == 8 and saved["gan_steps"] == {"d_steps": 15, "g_steps": 15}
    ema = {k[len("generator_ema.") :]: v for k, v in saved["state_dict"].items() if k.startswith("generator_ema.")}
    live = {k[len("generator.") :]: v for k, v in saved["state_dict"].items() if k.startswith("generator.")}
    assert ema.keys() == live.keys() and not torch.equal(ema["dense.weight"], live["dense.weight"])

    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/resolution", "train/alpha", "train/loss_d", "train/loss_g", "train/gp"} <= set(
        events.Tags()["scalars"]
    )
    grids = events.Images("samples/fixed_noise")
    assert len(grids) == 5 and (grids[0].width, grids[0].height) == (8 * 8 + 9 * 2, 8 * 8 + 9 * 2)


def test_resume_in_the_middle_of_a_fade_in_equals_the_uninterrupted_run(train_config) -> None:
    every = "callbacks.model_checkpoint.save_top_k=-1"
    # a per-step learning-rate schedule over the whole growth schedule resumes with the rest
    settings = [*TINY, "scheduler=warmup_cosine", "logger=none", every, "test=false"]
    full, resumed = interrupted_and_resumed(train_config, *settings)
    halfway = checkpoint(full, "epoch_001.ckpt")["pggan"]
    assert halfway["resolution"] == 8 and 0 < halfway["alpha"] < 1 and halfway["images"] == 3 * 8 + 3 * 4
    assert_same_final_weights(full, resumed)  # G, G_ema and D, and the resumed part trained further
    a, b = checkpoint(full), checkpoint(resumed)
    assert any(k.startswith("generator_ema.") for k in a["state_dict"])
    assert a["gan_steps"] == b["gan_steps"] and a["global_step"] == b["global_step"]
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["lr_schedulers"][0]["last_epoch"] == sum(STEPS)
    assert {k: v for k, v in a["pggan"].items() if k != "phase_seconds"} == {
        k: v for k, v in b["pggan"].items() if k != "phase_seconds"
    }
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for index, state_a in opt_a["state"].items():
            for name, value in state_a.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name])), name


def test_evaluate_reproduces_the_test_scores_of_training(train_config, tmp_path: Path) -> None:
    cfg = train_config(*TINY, "logger=none", "trainer.limit_test_batches=null")
    train(cfg)
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    for name in ("test/fid", "test/coverage", "test/kl_uniform", "test/confidence", "test/fid_real_floor"):
        assert scored[name] == pytest.approx(logged[name], rel=1e-5), name


def test_sample_mode_draws_the_grid_at_the_checkpoints_resolution(train_config, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    cfg = train_config(*TINY, "logger=none", "test=false")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "mode=sample", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    evaluate(eval_cfg)
    image = np.asarray(Image.open(tmp_path / "eval" / "samples.png").convert("L"), dtype=np.int64)
    assert image.shape == (8 * 8 + 9 * 2, 8 * 8 + 9 * 2)
    cell = image[2:10, 2:10]  # the first sample; 4x4 output upsampled would be constant in every 2x2 block
    blocks = cell.reshape(4, 2, 4, 2)
    assert (blocks.max(axis=(1, 3)) - blocks.min(axis=(1, 3))).max() > 0


@pytest.mark.usefixtures("skip_md5")
def test_cifar10_files_train_the_same_way(train_config, tmp_path: Path) -> None:
    written = make_cifar10(tmp_path / "data")
    cfg = train_config(
        *TINY, "data=cifar10_pggan", "data.input_shape=[3,8,8]", "data.val_fraction=0.5", "logger=none",
        "trainer.max_epochs=1",
    )  # fmt: skip
    data = instantiate(cfg.data)
    data.setup("fit")
    x_test = data.splits["test"][0]
    assert x_test.shape == (10, 3, 8, 8)
    expected = torch.from_numpy(written["x_test"] / 127.5 - 1).float()
    torch.testing.assert_close(x_test, F.avg_pool2d(expected, 4))
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert math.isfinite(metrics["test/fid"]) and math.isfinite(metrics["train/loss_d"])


def test_padded_digits_are_32x32_with_background_borders() -> None:
    data = MNIST5kPGGANDataModule(input_shape=[1, 32, 32], num_classes=10)
    data.setup("fit")
    x = data.splits["train"][0]
    assert x.shape[1:] == (1, 32, 32) and x.min() == -1.0 and x.max() == 1.0
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, :, -2:] == -1)
    assert len(data.train_dataloader()) == 250


# ---- errors and the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.resolutions=[4,16]", r"^model.resolutions: must be successive powers of two starting at 4, .*allowed"),
        ("model.resolutions=[8,16]", r"^model.resolutions: must be successive powers of two starting at 4"),
        (
            "model.resolutions=[4,8,16] model.batch_sizes=4",
            r"^model.resolutions: the final resolution 16 is not the data's image size 8x8",
        ),
        ("model.images_per_phase=0", r"^model.images_per_phase: must be an integer >= 1, got 0"),
        ("model.batch_sizes=[8,4,2]", r"^model.batch_sizes: must be one integer >= 1 or one per resolution \(2\)"),
        ("data.input_shape=[1,12,12]", r"model.generator.image_shape: progressive GANs need .* allowed: "),
    ],
)
def test_bad_settings_are_one_line_errors(train_config, override: str, message: str) -> None:
    from zoo.cli import describe

    cfg = train_config(*TINY, *override.split())
    with pytest.raises(Exception) as error:
        build_model(cfg)
    assert isinstance(error.value.__cause__ or error.value, UserError)
    line = describe(error.value)  # what train.py prints after "error: "
    assert re.search(message, line) and "\n" not in line, line


@pytest.mark.slow  # two train.py processes, about 18 s
def test_experiment_fast_dev_run_through_train_py_and_a_bad_input_in_one_line(tmp_path: Path) -> None:
    quick = ["model.scorer.channels=[8,16]", "data.eval_batch_size=100"]  # one eval batch of the 32x32 networks
    done = run_script("train.py", "experiment=pggan_mnist", "debug=fdr", *quick, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test/fid" in done.stdout
    assert not (tmp_path / "data" / "scorers").exists(), "a fast dev run must not cache a half-trained scorer"
    bad = run_script(
        "train.py", "experiment=pggan_mnist", "debug=fdr", "model.resolutions=[4,8,16,32,64]", cwd=tmp_path
    )
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "final resolution 64 is not the data's image size 32x32" in lines[0], bad.stderr[-2000:]


def test_a_nan_loss_stops_the_run_in_one_line(train_config) -> None:
    from zoo.errors import TrainingDiverged

    cfg = train_config(*TINY, "logger=none", "test=false")
    model = build_model(cfg)
    forward = model.discriminator.forward
    model.discriminator.forward = lambda x, *args, **kwargs: forward(x, *args, **kwargs) * float("nan")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    with pytest.raises(
        TrainingDiverged, match=r"^training diverged: loss_d is nan at epoch 0, generator step 0; "
    ) as e:
        trainer.fit(model, datamodule=instantiate(cfg.data))
    assert "\n" not in str(e.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())
