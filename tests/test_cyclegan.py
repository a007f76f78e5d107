"""CycleGAN: image pool, losses, schedule, networks, both datamodules, training, resume, evaluate, one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import checkpoint, compose_config, interrupted_and_resumed, run_script
from zoo.data.cyclegan import DigitDomainsDataModule, ImageFolderPairDataModule, UnpairedSampler, apply_style
from zoo.errors import UserError
from zoo.metrics.scorer import cached_scorer_path
from zoo.nn.cyclegan import PatchDiscriminator, ResnetGenerator
from zoo.run import evaluate, train
from zoo.tasks.cyclegan import CycleGANTask, ImagePool, LinearDecay, domain_scorer_spec

# small networks, a few batches, no scoring classifier: a run takes seconds on one CPU thread
TINY = [
    "model=cyclegan",
    "data=digits_pair",
    "model.generator.base_channels=4",
    "model.generator.n_blocks=1",
    "model.discriminator.base_channels=4",
    "model.pool_size=4",
    "model.grid_size=4",
    "model.n_epochs=1",
    "model.n_epochs_decay=1",
    "data.batch_size=8",
    "data.eval_batch_size=100",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.accelerator=cpu",
]
NO_SCORER = ["model.scorer=null"]
SMALL_SCORER = ["model.scorer.channels=[4,8]", "model.scorer.hidden=16", "model.scorer.max_steps=5"]
EVERY_EPOCH = "callbacks.model_checkpoint.save_top_k=-1"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def epoch_rows(cfg) -> list[dict[str, str]]:
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


def write_png(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], len(mode)) if len(mode) > 1 else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(pixels, mode=mode).save(path)


def make_pair_folders(root: Path, skip: str = "", empty: str = "") -> Path:
    """trainA: RGB; trainB: grayscale and RGBA files mixed; testA, testB: one image each, of odd sizes."""
    files = {
        "trainA": [("RGB", 200), ("RGB", 180), ("RGB", 160)],
        "trainB": [("L", 40), ("RGBA", 60), ("L", 80)],
        "testA": [("RGB", 220)],
        "testB": [("L", 20)],
    }
    for folder, images in files.items():
        if folder == skip:
            continue
        (root / folder).mkdir(parents=True, exist_ok=True)
        if folder == empty:
            (root / folder / "notes.txt").write_text("not an image")
            continue
        for k, (mode, value) in enumerate(images):
            write_png(root / folder / f"{k}.png", mode, (20 + k, 12), value)
    return root


# ---- pool, losses, schedule, networks ------------------------------------------------------------------------------


def test_image_pool_returns_inputs_until_full_then_a_stored_image_half_the_time() -> None:
    pool = ImagePool(size=4, seed=0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and pool.count == 4  # filling: every image comes back
    returned_old, outs = 0, []
    for k in range(4, 404):
        new = torch.full((1, 1, 1, 1), float(k))
        stored_before = pool.images.clone()
        out = pool.query(new)
        outs.append(out.item())
        if out.item() != k:  # a stored image came back, and the new one took its slot
            returned_old += 1
            assert out.item() in stored_before.flatten().tolist()
            slot = (stored_before.flatten() == out.item()).nonzero().item()
            assert pool.images.flatten()[slot].item() == k
        else:
            assert torch.equal(pool.images, stored_before)
    assert 160 < returned_old < 240, returned_old  # Binomial(400, 0.5)
    again = ImagePool(size=4, seed=0)  # seeded: the same draws, the same answers
    again.query(first)
    assert [again.query(torch.full((1, 1, 1, 1), float(k))).item() for k in range(4, 404)] == outs
    resumed = ImagePool(size=4, seed=123)
    resumed.load_state_dict(pool.state_dict())
    probe = torch.arange(500.0, 520.0).view(20, 1, 1, 1)
    assert torch.equal(resumed.query(probe), pool.query(probe))
    assert torch.equal(ImagePool(size=0).query(probe), probe)


class Negate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_identity_loss_is_zero_for_identity_generators_and_lambda_weighted_otherwise() -> None:
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    patch = lambda: PatchDiscriminator(1, 4, 1)  # noqa: E731
    task = CycleGANTask(nn.Identity, patch, lambda_cycle=10.0, lambda_identity=0.5)
    losses, fake_a, fake_b = task.generator_losses(a, b)
    assert losses["loss_identity"].item() == 0.0 and losses["loss_cycle"].item() == 0.0
    assert torch.equal(fake_a, b) and torch.equal(fake_b, a)
    negating = CycleGANTask(Negate, patch, lambda_cycle=10.0, lambda_identity=0.5)
    losses, _, _ = negating.generator_losses(a, b)
    expected = 10.0 * 0.5 * (2 * b.abs().mean() + 2 * a.abs().mean())  # |-x - x| = 2|x|
    assert losses["loss_identity"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["loss_cycle"].item() == 0.0  # negating twice gives the input back
    off = CycleGANTask(Negate, patch, lambda_identity=0.0)
    assert off.generator_losses(a, b)[0]["loss_identity"].item() == 0.0


def test_learning_rate_is_constant_then_falls_linearly_to_zero() -> None:
    decay = LinearDecay(n_epochs=3, n_epochs_decay=4)
    assert [decay(e) for e in range(9)] == pytest.approx([1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0])
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=2e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearDecay(100, 100))
    rates = []
    for _ in range(200):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == rates[99] == 2e-4 and rates[100] == pytest.approx(2e-4 * 100 / 101)
    assert rates[150] == pytest.approx(2e-4 * 50 / 101) and rates[199] == pytest.approx(2e-4 / 101)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # after the last epoch


@pytest.mark.parametrize(("shape", "downsampling"), [((1, 32, 32), 2), ((3, 24, 40), 3)])
def test_generator_keeps_shape_and_range(shape: tuple[int, ...], downsampling: int) -> None:
    torch.manual_seed(0)
    generator = ResnetGenerator(shape[0], base_channels=8, n_downsampling=downsampling, n_blocks=2)
    x = torch.rand(2, *shape) * 2 - 1
    y = generator(x)
    assert y.shape == x.shape and y.abs().max() <= 1 and y.std() > 0
    convs = torch.cat([m.weight.flatten() for m in generator.modules() if isinstance(m, nn.Conv2d)])
    assert convs.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(UserError, match="not divisible by 2\\^n_downsampling"):
        generator(torch.zeros(1, shape[0], 30, 30))


def test_patch_discriminator_receptive_fields() -> None:
    assert PatchDiscriminator(3, 8, n_layers=3).receptive_field == 70  # the paper's 70x70 PatchGAN
    small = PatchDiscriminator(1, 8, n_layers=1)
    assert small.receptive_field == 16 and small(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 14, 14)


# ---- data ----------------------------------------------------------------------------------------------------------


def test_digit_domains_are_disjoint_and_styled() -> None:
    data = DigitDomainsDataModule(style="dilate")
    data.setup()
    all_a = np.concatenate([data.indices[s][0] for s in ("train", "val", "test")])
    all_b = np.concatenate([data.indices[s][1] for s in ("train", "val", "test")])
    assert len(np.intersect1d(all_a, all_b)) == 0 and len(all_a) == len(all_b) > 2490
    a, label_a, b, label_b = data.splits["train"]
    assert a.shape[1:] == (1, 32, 32) and a.min() == -1 and a.max() == 1
    twins = {apply_style((x + 1) / 2, "dilate").mul(2).sub(1).numpy().tobytes() for x in a[:, None]}
    assert not twins & {x.numpy().tobytes() for x in b}  # no restyled A image is in B's training set
    assert (b > -1).float().mean() > 1.5 * (a > -1).float().mean()  # thicker strokes cover more pixels
    assert torch.bincount(label_a).min() > 150 and torch.bincount(label_b).min() > 150
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 4 and batch[0].shape == (32, 1, 32, 32)


def test_domain_classifier_caches_are_keyed_by_split_and_style(tmp_path: Path) -> None:
    """Another split seed or style never finds a classifier trained on other images; the same data finds its own,
    and a run saved with the old `ckpt_dir` key caches in the same folder."""
    spec = domain_scorer_spec({"cache_dir": str(tmp_path)})

    def path(domain: str, **settings: object) -> Path:
        data = DigitDomainsDataModule(**settings)
        data.setup()
        found = cached_scorer_path(spec, data.domain(domain))
        assert found is not None and found.parent == tmp_path
        return found

    first = path("A", style="invert", split_seed=0)
    assert path("A", style="invert", split_seed=0) == first
    assert len({first, path("B", style="invert", split_seed=0), path("A", style="invert", split_seed=1)}) == 3
    assert path("B", style="dilate", split_seed=0) != path("B", style="invert", split_seed=0)
    assert domain_scorer_spec({"ckpt_dir": str(tmp_path)})["cache_dir"] == str(tmp_path)


def test_folder_pair_data_converts_mixed_modes_and_pairs_unpaired(train_config, tmp_path: Path) -> None:
    root = make_pair_folders(tmp_path / "pairs")
    data = ImageFolderPairDataModule(str(root), image_size=16, channels=3, batch_size=2, num_workers=0, val_fraction=0)
    data.setup()
    a, b = next(iter(data.train_dataloader()))
    assert a.shape == b.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    test_a, test_b = next(iter(data.test_dataloader()))
    assert torch.equal(test_b[0, 0], test_b[0, 1])  # a grayscale file becomes three equal channels
    assert test_b[0, 0, 0, 0].item() == pytest.approx(20 / 255 * 2 - 1, abs=1e-6)
    gray = ImageFolderPairDataModule(str(root), image_size=8, channels=1, batch_size=3, num_workers=0)
    gray.setup()
    a, b = next(iter(gray.train_dataloader()))
    assert a.shape == (2, 1, 8, 8) and b.shape == (2, 1, 8, 8)  # one of each folder's 3 images is held out
    sampler = UnpairedSampler(3, 5, shuffle=True, seed=1)
    epoch0 = list(sampler)
    assert len(epoch0) == 5 and sorted(j for _, j in epoch0) == list(range(5)) and {i for i, _ in epoch0} == {0, 1, 2}
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and UnpairedSampler(3, 5, True, 1).__iter__().__next__() == epoch0[0]
    small = [o for o in TINY if not o.startswith(("data", "trainer.limit"))]
    folders = [f"data.root={root}", "data.image_size=16", "data.num_workers=0", "data.val_fraction=0"]
    cfg = train_config(*small, "data=image_folder_pair", *folders, "trainer.max_epochs=1")
    train(cfg)  # no labels: cycle errors only
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert {"test/cycle_l1_aba", "test/cycle_l1_bab", "val/cycle_l1_best"} <= set(metrics)
    assert not any("label_keep" in name or "fid" in name for name in metrics)


@pytest.mark.parametrize(
    ("skip", "empty", "message"),
    [
        ("trainB", "", "no folder .*trainB; expected trainA/ trainB/ testA/ testB/"),
        ("", "testA", "no images in .*testA"),
    ],
)
def test_bad_folder_layouts_are_one_line_errors(tmp_path: Path, skip: str, empty: str, message: str) -> None:
    root = make_pair_folders(tmp_path / "pairs", skip=skip, empty=empty)
    with pytest.raises(UserError, match=f"^data.root: {message}") as error:
        ImageFolderPairDataModule(str(root))
    assert "\n" not in str(error.value)


# ---- training, resume, evaluate ------------------------------------------------------------------------------------


def test_training_logs_losses_and_translation_rows_and_cycle_loss_falls(train_config) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config(
        *TINY, *NO_SCORER, "model.generator.base_channels=8", "trainer.limit_train_batches=8", "trainer.max_epochs=3",
        "model.n_epochs=3", "logger=many", "test=false",
    )  # fmt: skip
    train(cfg)
    cycle = column(epoch_rows(cfg), "train/loss_cycle")
    assert len(cycle) == 3 and cycle[0] > cycle[1] > cycle[2], cycle
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for tag in ("translations/A_B_A", "translations/B_A_B"):
        images = events.Images(tag)
        assert len(images) == 3 and (images[0].width, images[0].height) == (4 * 32 + 5 * 2, 3 * 32 + 4 * 2)
    scalars = set(events.Tags()["scalars"])
    losses = {f"train/{n}" for n in ("loss_g_ab", "loss_g_ba", "loss_d_a", "loss_d_b", "loss_cycle", "loss_identity")}
    assert losses | {"train/lr_g", "train/lr_d", "val/cycle_l1_aba", "val/cycle_l1_bab", "val/cycle_l1_best"} <= scalars


def test_resume_equals_the_uninterrupted_run(train_config) -> None:
    settings = [*TINY, *NO_SCORER, "trainer.max_epochs=4", "model.n_epochs=1", "model.n_epochs_decay=3", EVERY_EPOCH]
    full, resumed = interrupted_and_resumed(train_config, *settings, "test=false")
    a, b = checkpoint(full), checkpoint(resumed)
    halfway = checkpoint(full, "epoch_001.ckpt")
    assert halfway["cyclegan"]["pool_a"]["count"] == 4  # the pools were full when the run was cut
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert not torch.equal(
        halfway["state_dict"]["generator_ab.net.1.weight"], a["state_dict"]["generator_ab.net.1.weight"]
    )
    for pool in ("pool_a", "pool_b"):
        assert torch.equal(a["cyclegan"][pool]["images"], b["cyclegan"][pool]["images"])
        assert torch.equal(a["cyclegan"][pool]["generator"], b["cyclegan"][pool]["generator"])
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values()):
            assert all(torch.equal(torch.as_tensor(state_a[k]), torch.as_tensor(state_b[k])) for k in state_a)
    # epoch 3 (the last) trains at lr * (1 - 3/4); both optimizers follow the schedule
    rates = [group["lr"] for opt in a["optimizer_states"] for group in opt["param_groups"]]
    assert (
        rates == [pytest.approx(2e-4 * 0.25)] * 2 == [g["lr"] for o in b["optimizer_states"] for g in o["param_groups"]]
    )


def test_evaluate_reproduces_test_metrics_and_translate_writes_images(train_config, tmp_path: Path) -> None:
    from PIL import Image

    cfg = train_config(*TINY, *SMALL_SCORER, "trainer.limit_test_batches=null", "trainer.max_epochs=1")
    train(cfg)
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    names = [
        f"test/{n}"
        for n in ("cycle_l1_aba", "cycle_l1_bab", "label_keep_ab", "label_keep_ba", "fid_ab", "fid_ba")
        + ("label_keep_real", "label_keep_real_blurred")  # the judges on real digits: the baseline beside label_keep
    ]
    assert set(names) <= set(logged) and all(math.isfinite(logged[n]) for n in names)
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    for name in names:
        assert scored[name] == pytest.approx(logged[name], rel=1e-5, abs=1e-7), name

    inputs = tmp_path / "inputs"
    write_png(inputs / "one.png", "L", (28, 28), 0)
    write_png(inputs / "sub" / "two.jpg", "RGB", (40, 30), 255)
    overrides = [f"ckpt_path={ckpt}", "mode=translate", f"translate.input_dir={inputs}", "translate.direction=BA"]
    eval_cfg = compose_config("eval", [*overrides, f"translate.output_dir={tmp_path / 'out'}"], tmp_path)
    evaluate(eval_cfg)
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["one.png", "sub/two.png"]
    assert Image.open(tmp_path / "out" / "sub" / "two.png").size == (32, 32)
    bad = compose_config("eval", [*overrides[:-1], "translate.direction=AC"], tmp_path)
    with pytest.raises(UserError, match="^translate.direction: unknown 'AC'; allowed: AB, BA"):
        evaluate(bad)


def test_fast_dev_run_of_the_experiment(train_config) -> None:
    small = [o for o in TINY if o.startswith(("model.generator", "model.discriminator"))]
    cfg = train_config("experiment=cyclegan_digits", *small, *SMALL_SCORER, "debug=fdr")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert {"test/cycle_l1_aba", "test/label_keep_ab", "test/fid_ba", "train/loss_cycle"} <= set(metrics)
    assert not (Path(cfg.paths.data_dir) / "scorers").exists(), "a fast dev run must not cache half-trained scorers"


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a CUDA GPU (on a CPU it is bf16)")


@pytest.mark.parametrize(
    ("precision", "accelerator"),
    [("bf16-mixed", "cpu"), pytest.param("16-mixed", "gpu", marks=[pytest.mark.cuda, CUDA])],
)
def test_mixed_precision_training_stays_finite(train_config, precision: str, accelerator: str) -> None:
    cfg = train_config(
        *TINY, *NO_SCORER, f"trainer.precision={precision}", f"trainer.accelerator={accelerator}", "logger=csv",
        "test=false",
    )  # fmt: skip
    train(cfg)
    rows = epoch_rows(cfg)
    assert all(math.isfinite(v) for n in ("train/loss_cycle", "train/loss_d_a") for v in column(rows, n))
    assert len(column(rows, "train/loss_cycle")) == 2


def test_discriminator_gradients_follow_a_loss_scale_changed_by_the_generator_step() -> None:
    from types import SimpleNamespace

    task = CycleGANTask(nn.Identity, lambda: PatchDiscriminator(1, 4, 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    task._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    nets = (task.discriminator_a, task.discriminator_b)
    for net in nets:
        scaler.scale(net(torch.rand(2, 1, 16, 16)).mean()).backward()  # scaled by the scale before the update
    before = [p.grad.clone() for net in nets for p in net.parameters()]
    scale = task._loss_scale()
    scaler.update(new_scale=256.0)  # as after a generator step that overflowed twice
    task._rescale_after_update(scale, nets)
    after = [p.grad for net in nets for p in net.parameters()]
    assert all(torch.allclose(b / 4, a) for b, a in zip(before, after))
    task._rescale_after_update(256.0, nets)  # unchanged scale: gradients untouched
    assert all(torch.equal(a, p.grad) for a, p in zip(after, (p for net in nets for p in net.parameters())))


def test_accumulation_steps_every_second_batch_and_the_last(train_config) -> None:
    cfg = train_config(
        *TINY, *NO_SCORER, "model.accumulate_grad_batches=2", "model.gradient_clip_val=0.5", "test=false"
    )
    train(cfg)
    saved = checkpoint(cfg)
    assert saved["cyclegan"]["steps"] == 4  # 3 batches a window of 2: steps after batches 2 and 3, for 2 epochs
    assert all(int(s["step"]) == 4 for opt in saved["optimizer_states"] for s in opt["state"].values())


def test_the_model_selects_no_scheduler_and_one_from_the_command_line_is_refused(train_config) -> None:
    from zoo.run import build_model

    assert train_config(*TINY, *NO_SCORER).scheduler is None  # model=cyclegan alone: its own schedule
    cfg = train_config(*TINY, *NO_SCORER, "scheduler=warmup_cosine")
    with pytest.raises(Exception, match="scheduler: CycleGAN has its own schedule .*allowed: scheduler=none"):
        build_model(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [("trainer.gradient_clip_val=1.0", "model.gradient_clip_val"), ("trainer.accumulate_grad_batches=2", "model.acc")],
)
def test_trainer_settings_lightning_cannot_honour_point_to_the_model_keys(
    train_config, override: str, key: str
) -> None:
    cfg = train_config(*TINY, *NO_SCORER, override, "debug=fdr")
    with pytest.raises(UserError, match=f"^{override.split('=')[0]}: Lightning cannot .* set {key}"):
        train(cfg)


@pytest.mark.slow  # train.py processes, about 15 s
def test_train_py_reports_bad_folders_in_one_line(tmp_path: Path) -> None:
    for name, (skip, empty, expected) in {
        "missing": ("trainB", "", "trainB; expected trainA/ trainB/ testA/ testB/"),
        "empty": ("", "trainA", "no images in"),
    }.items():
        root = make_pair_folders(tmp_path / name, skip=skip, empty=empty)
        done = run_script(
            "train.py",
            "model=cyclegan",
            "data=image_folder_pair",
            f"data.root={root}",
            "debug=fdr",
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith("error: data.root: ") and expected in lines[0], done.stderr[
            -2000:
        ]
