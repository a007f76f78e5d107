"""The GAN family as published: the EMA generator's own batch-norm statistics, WGAN's critic warm-up, PGGAN's
logged phase and optimizer resets, a scorer cache keyed by everything it learns from, and class coverage with a
minimum share."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_same_final_weights, checkpoint, compose_config, interrupted_and_resumed
from tests.test_gan import TINY as GAN_TINY
from tests.test_pggan import STEPS
from tests.test_pggan import TINY as PGGAN_TINY
from zoo.data.gan import MNIST5kGANDataModule
from zoo.errors import UserError
from zoo.internals import is_batch_norm
from zoo.metrics.generative import (
    class_coverage,
    covered_classes,
    generative_scores,
    histogram_kl_to_uniform,
    kl_to_uniform,
)
from zoo.metrics.scorer import SHIPPED_SCORERS, cached_scorer_path, load_or_train_scorer, scorer_key
from zoo.nn.gan import DCGANDiscriminator, DCGANGenerator
from zoo.run import build_model, train
from zoo.tasks.gan import CriticSchedule, GANTask
from zoo.tasks.pggan import GrowthSchedule


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def csv_rows(cfg) -> list[dict[str, str]]:
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


# ---- 1. the EMA generator's batch-norm statistics ---------------------------------------------------------------


def batch_norms(network: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in network.modules() if is_batch_norm(m)]


def activation_statistics(network: torch.nn.Module, latent_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per channel mean and variance of what each batch-norm layer receives, over 4,096 fresh latents in eval mode."""
    found: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        found.append((inputs[0].mean((0, 2, 3)), inputs[0].var((0, 2, 3), unbiased=False)))

    hooks = [m.register_forward_hook(record) for m in batch_norms(network)]
    network.eval()
    with torch.no_grad():
        network(torch.randn(4096, latent_dim, generator=torch.Generator().manual_seed(5)))
    for hook in hooks:
        hook.remove()
    return found


def drifted_task(ema_bn_batches: int) -> GANTask:
    """A GAN task whose live generator moved far (three big jumps) while the EMA followed halfway each time."""
    torch.manual_seed(0)
    shape = (1, 28, 28)
    task = GANTask(
        DCGANGenerator(shape, latent_dim=8, base_channels=8),
        DCGANDiscriminator(shape, 8),
        scorer=None,
        ema_decay=0.9,
        ema_bn_batches=ema_bn_batches,
    )
    live = task.generator.train()
    for _ in range(3):
        with torch.no_grad():
            for param in live.parameters():
                param.add_(torch.randn_like(param) * 0.5)
            for _ in range(20):  # the live generator's running statistics follow its own weights
                live(torch.randn(64, 8))
        task.update_generator_ema(0.5)
    return task


def statistics_fit(network: torch.nn.Module) -> bool:
    """Whether each batch-norm layer's running statistics are those of the activations it gets in eval mode."""
    fits = []
    for (mean, var), norm in zip(activation_statistics(network, 8), batch_norms(network), strict=True):
        shift = ((mean - norm.running_mean).abs() / norm.running_var.sqrt()).max()
        fits.append(bool(shift < 0.05) and bool(((var / norm.running_var) - 1).abs().max() < 0.1))
    return all(fits)


def test_the_ema_generator_runs_with_batch_norm_statistics_of_its_own_weights() -> None:
    task = drifted_task(ema_bn_batches=16)
    task.refresh_ema_statistics()
    ema, live = task.generator_ema, task.generator
    assert len(batch_norms(ema)) == 2 and statistics_fit(ema)
    for own, other in zip(batch_norms(ema), batch_norms(live)):
        assert not torch.allclose(own.running_var, other.running_var, rtol=0.05)
        assert own.momentum == other.momentum == 0.1  # the cumulative average was only for the recomputation
    # the same weights always get the same statistics, and the global random state is left alone
    before = [n.running_var.clone() for n in batch_norms(ema)]
    state = torch.get_rng_state()
    task._ema_statistics_stale = True
    task.refresh_ema_statistics()
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(a, n.running_var) for a, n in zip(before, batch_norms(ema)))


def test_copied_live_statistics_do_not_fit_the_averaged_weights() -> None:
    """`model.ema_bn_batches=0`, the behaviour before: the check above fails on it."""
    task = drifted_task(ema_bn_batches=0)
    task.refresh_ema_statistics()  # does nothing here
    for own, other in zip(batch_norms(task.generator_ema), batch_norms(task.generator)):
        assert torch.equal(own.running_var, other.running_var)
    assert not statistics_fit(task.generator_ema)


def test_a_trained_ema_generator_saves_and_samples_with_its_own_statistics(train_config) -> None:
    cfg = train_config("model=sngan", *GAN_TINY, "model.ema_decay=0.9", "test=false")
    assert cfg.model.ema_bn_batches == 16
    train(cfg)
    saved = checkpoint(cfg)["state_dict"]
    task = build_model(cfg)
    task.load_state_dict(saved)
    live_means = [v for k, v in saved.items() if k.startswith("generator.") and k.endswith("running_mean")]
    ema_means = [v for k, v in saved.items() if k.startswith("generator_ema.") and k.endswith("running_mean")]
    assert len(ema_means) == len(live_means) > 0
    assert not any(torch.equal(a, b) for a, b in zip(ema_means, live_means))
    task._ema_statistics_stale = True
    task.refresh_ema_statistics()  # recomputed from the saved EMA weights: what the checkpoint holds
    for name, buffer in task.generator_ema.named_buffers():
        assert torch.equal(buffer, saved[f"generator_ema.{name}"]), name


def test_ema_bn_batches_must_be_a_count(train_config) -> None:
    cfg = train_config("model=dcgan", *GAN_TINY, "model.ema_bn_batches=-1")
    with pytest.raises(Exception, match="model.ema_bn_batches: must be an integer >= 0, got -1"):
        build_model(cfg)


# ---- 2. WGAN's critic warm-up -----------------------------------------------------------------------------------


def critic_steps_per_generator_step(schedule: CriticSchedule, generator_steps: int) -> list[int]:
    """Drives the task's rule (`generator_step_due`) critic step by critic step and counts the steps in between."""
    counts, d_steps, g_steps, run = [], 0, 0, 0
    while g_steps < generator_steps:
        d_steps, run = d_steps + 1, run + 1
        if schedule.generator_step_due(d_steps, g_steps):
            counts.append(run)
            g_steps, run = g_steps + 1, 0
    return counts


def test_the_critic_warm_up_follows_the_wgan_reference_code() -> None:
    counts = critic_steps_per_generator_step(CriticSchedule(5, warmup=True), 1501)
    assert counts[:25] == [100] * 25  # the first 25 generator steps
    assert counts[25:500] == [5] * 475
    assert [i for i, c in enumerate(counts) if c == 100 and i >= 25] == [500, 1000, 1500]  # every 500th
    assert critic_steps_per_generator_step(CriticSchedule(5), 600) == [5] * 600
    schedule = CriticSchedule(5, warmup=True)
    for g in range(1501):  # the closed form the task uses sums the counts
        assert schedule.critic_steps_before(g) == sum(counts[:g])
        assert schedule.generator_steps(sum(counts[:g])) == g


def test_a_wgan_run_takes_100_critic_steps_before_its_first_generator_step(train_config) -> None:
    run = ["data.batch_size=16", "trainer.limit_train_batches=105", "trainer.max_epochs=1", "test=false"]
    every = "callbacks.model_checkpoint.save_top_k=-1"
    warm = train_config("model=wgan", *GAN_TINY, *run, every, folder="warm")
    assert warm.model.critic_warmup is True
    train(warm)
    assert checkpoint(warm)["gan_steps"] == {"d_steps": 105, "g_steps": 1}
    plain = train_config("model=wgan", *GAN_TINY, *run, every, "model.critic_warmup=false", folder="plain")
    train(plain)
    assert checkpoint(plain)["gan_steps"] == {"d_steps": 105, "g_steps": 21}


def test_the_warm_up_is_on_for_wgan_only(tmp_path: Path) -> None:
    warmups = {
        name: compose_config("train", [f"experiment={name}"], tmp_path).model.critic_warmup
        for name in ("wgan_mnist", "wgan_gp_mnist", "dcgan_mnist", "sngan_mnist")
    }
    assert warmups == {"wgan_mnist": True, "wgan_gp_mnist": False, "dcgan_mnist": False, "sngan_mnist": False}


# ---- 3. PGGAN: the phase just trained, and optimizer resets ------------------------------------------------------


def test_after_gives_the_phase_the_last_step_left() -> None:
    schedule = GrowthSchedule([4, 8, 16], images_per_phase=100, batch_sizes=[10, 20, 25])  # phases of 10, 5, 5, 4, 4
    assert schedule.after(0) == schedule.at(0)
    done_4 = schedule.after(10)  # the 4x4 phase just ended; at(10) is already the 8x8 fade-in at alpha 0
    assert (done_4.resolution, done_4.fading, done_4.alpha) == (4, False, 1.0)
    assert (schedule.at(10).resolution, schedule.at(10).alpha) == (8, 0.0)
    faded = schedule.after(15)  # the fade-in's last step reached alpha 1
    assert (faded.resolution, faded.fading, faded.alpha, faded.images) == (8, True, 1.0, 200)
    middle = schedule.after(12)  # inside a phase the two agree
    assert (middle.resolution, middle.alpha) == (schedule.at(12).resolution, schedule.at(12).alpha) == (8, 0.4)
    assert [s for s in range(30) if schedule.starts_phase(s)] == [10, 15, 20, 24]


def test_validation_logs_the_resolution_and_alpha_just_trained(train_config) -> None:
    cfg = train_config(*PGGAN_TINY, "logger=csv", "test=false")
    train(cfg)
    rows = csv_rows(cfg)
    # epochs of 3 steps: 4x4 done; fade-in half way; fade-in done; 8x8 stabilizing; done
    assert column(rows, "val/resolution") == [4.0, 8.0, 8.0, 8.0, 8.0]
    assert column(rows, "val/alpha") == pytest.approx([1.0, 0.5, 1.0, 1.0, 1.0])


def optimizer_steps(cfg, name: str = "last.ckpt") -> dict[str, int]:
    names = [n for n, _ in build_model(cfg).generator.named_parameters()]
    state = checkpoint(cfg, name)["optimizer_states"][0]["state"]
    return {names[i]: int(s["step"]) for i, s in state.items()}


def test_reset_optimizer_per_phase_clears_adam_where_each_phase_begins(train_config) -> None:
    every = "callbacks.model_checkpoint.save_top_k=-1"
    cfg = train_config(*PGGAN_TINY, "model.reset_optimizer_per_phase=true", every, "logger=none", "test=false")
    train(cfg)
    # phases of 3, 6 and 6 steps, 3 steps an epoch: resets before steps 3 and 9
    dense = [optimizer_steps(cfg, f"epoch_{e:03d}.ckpt")["dense.weight"] for e in range(5)]
    assert dense == [3, 3, 6, 3, 6]
    final = optimizer_steps(cfg)
    assert final["dense.weight"] == final["to_rgb.1.weight"] == STEPS[2]
    assert "to_rgb.0.weight" not in final  # the 4x4 output layer has no gradient once the fade-in is over
    rates = [g["lr"] for opt in checkpoint(cfg)["optimizer_states"] for g in opt["param_groups"]]
    assert rates == [1e-3, 1e-3]  # the state is cleared, the learning rates stay
    kept = train_config(*PGGAN_TINY, "logger=none", "test=false", folder="kept")
    assert kept.model.reset_optimizer_per_phase is False
    train(kept)
    assert optimizer_steps(kept)["dense.weight"] == sum(STEPS)


def test_a_run_with_resets_resumes_exactly(train_config) -> None:
    settings = [*PGGAN_TINY, "model.reset_optimizer_per_phase=true", "logger=none", "test=false"]
    full, resumed = interrupted_and_resumed(train_config, *settings, "callbacks.model_checkpoint.save_top_k=-1")
    assert_same_final_weights(full, resumed)
    a, b = checkpoint(full), checkpoint(resumed)
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for index, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name])), name


# ---- 4. the scorer cache's key ----------------------------------------------------------------------------------


SMALL_SCORER = {"channels": [8, 16], "hidden": 32, "max_steps": 5}


def digits(**split: float) -> MNIST5kGANDataModule:
    data = MNIST5kGANDataModule(input_shape=[1, 28, 28], num_classes=10, **split)
    data.setup("fit")
    return data


def test_the_cache_path_changes_with_every_split_setting_and_only_with_them(tmp_path: Path) -> None:
    spec = {"cache_dir": str(tmp_path / "scorers"), **SMALL_SCORER}
    base = cached_scorer_path(spec, digits())
    assert base.parent == tmp_path / "scorers" and base.name.startswith("mnist5k_cnn-") and base.suffix == ".pt"
    assert cached_scorer_path(dict(spec), digits()) == base  # the same settings: the same file
    assert scorer_key(spec, digits(split_seed=1))["split"]["split_seed"] == 1
    others = [
        cached_scorer_path(spec, digits(split_seed=1)),
        cached_scorer_path(spec, digits(val_fraction=0.2)),
        cached_scorer_path(spec, digits(test_fraction=0.3)),
        cached_scorer_path({**spec, "hidden": 64}, digits()),  # the classifier's own settings count too
        cached_scorer_path({**spec, "seed": 1}, digits()),
    ]
    assert len({base, *others}) == 6
    named = {**spec, "ckpt_path": str(tmp_path / "mine.pt")}  # a path given by hand is used as it is
    assert cached_scorer_path(named, digits(split_seed=1)) == tmp_path / "mine.pt"


def test_the_cached_scorer_is_the_same_whatever_the_thread_count(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            spec = {"ckpt_path": str(tmp_path / f"threads{count}.pt"), **SMALL_SCORER, "max_steps": 20}
            load_or_train_scorer(spec, digits(), torch.device("cpu"), cache=True)
            assert torch.get_num_threads() == count  # the caller's setting is restored
            weights.append(torch.load(tmp_path / f"threads{count}.pt", weights_only=True)["state_dict"])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_run_with_another_split_trains_its_own_scorer(tmp_path: Path) -> None:
    spec = {"cache_dir": str(tmp_path / "scorers"), **SMALL_SCORER}
    load_or_train_scorer(spec, digits(), torch.device("cpu"), cache=True)
    first = cached_scorer_path(spec, digits())
    assert first.is_file()
    written = first.stat().st_mtime_ns
    load_or_train_scorer(spec, digits(), torch.device("cpu"), cache=True)  # loaded, not trained again
    assert first.stat().st_mtime_ns == written
    load_or_train_scorer(spec, digits(split_seed=1), torch.device("cpu"), cache=True)
    second = cached_scorer_path(spec, digits(split_seed=1))
    assert second.is_file() and second != first
    assert sorted(p.name for p in (tmp_path / "scorers").iterdir()) == sorted([first.name, second.name])


def test_gan_configs_cache_their_scorer_by_key(tmp_path: Path) -> None:
    for model in ("dcgan", "wgan", "wgan_gp", "sngan"):
        cfg = compose_config("train", [f"model={model}", "data=mnist5k_gan"], tmp_path)
        assert cfg.model.scorer.ckpt_path is None and cfg.model.scorer.cache_dir == str(tmp_path / "data" / "scorers")
    cfg = compose_config("train", ["experiment=pggan_mnist"], tmp_path)
    assert cfg.model.scorer.ckpt_path is None and cfg.model.scorer.cache_dir.endswith("scorers")


def test_the_bundled_digits_are_scored_by_the_shipped_scorers(tmp_path: Path) -> None:
    """Scores compare across machines only if every machine scores with the same weights: the default GAN and PGGAN
    configs find the shipped file while their cache has none, load it without training, and a cached file of the
    same name takes precedence. A change of the scorer's settings or data changes the key: ship a new file then."""
    from hydra.utils import instantiate

    for experiment in ("dcgan_mnist", "pggan_mnist"):
        cfg = compose_config("train", [f"experiment={experiment}"], tmp_path / experiment)
        datamodule = instantiate(cfg.data)
        shipped = cached_scorer_path(cfg.model.scorer, datamodule)
        assert shipped.parent == SHIPPED_SCORERS and shipped.is_file(), shipped
        load_or_train_scorer(cfg.model.scorer, datamodule, torch.device("cpu"), cache=True)
        cache = Path(cfg.model.scorer.cache_dir)
        assert not cache.exists(), "loaded, not trained and cached"
        cache.mkdir(parents=True)
        (cache / shipped.name).write_bytes(shipped.read_bytes())
        assert cached_scorer_path(cfg.model.scorer, datamodule) == cache / shipped.name


# ---- 5. class coverage with a minimum share, and the KL of the class histogram to uniform -----------------------


def one_hot(labels: list[int], classes: int = 10) -> torch.Tensor:
    return torch.eye(classes)[labels]


def test_one_stray_sample_does_not_cover_a_class() -> None:
    collapsed = one_hot([0] * 98 + [1] + [2])  # two stray samples in classes 1 and 2, 1% each
    assert class_coverage(collapsed) == 1
    assert class_coverage(collapsed, min_share=0.0) == 3  # any sample: the count before
    assert class_coverage(one_hot([0] * 98 + [1] * 2)) == 2  # exactly 2%: at least the minimum share
    assert covered_classes(torch.tensor([0.5, 0.49, 0.01, 0.0])) == 2
    assert covered_classes(torch.tensor([0.5, 0.5, 0.0, 0.0]), min_share=0.0) == 2  # empty classes never count
    assert class_coverage(one_hot(list(range(10)) * 10)) == 10
    with pytest.raises(ValueError, match="min_share must be in"):
        covered_classes(torch.tensor([1.0]), min_share=1.5)


def test_kl_of_the_class_histogram_to_uniform() -> None:
    assert histogram_kl_to_uniform(torch.full((10,), 0.1, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-12)
    assert histogram_kl_to_uniform(torch.tensor([1.0, 0.0, 0.0, 0.0])) == pytest.approx(math.log(4))
    assert histogram_kl_to_uniform(torch.tensor([0.5, 0.25, 0.25, 0.0])) == pytest.approx(0.5 * math.log(2))
    assert kl_to_uniform(one_hot([0] * 50 + [1] * 50, classes=4)) == pytest.approx(math.log(2))


def test_the_scores_count_coverage_with_the_minimum_share(train_config) -> None:
    torch.manual_seed(0)
    features = torch.randn(100, 4)
    probs = one_hot([3] * 95 + [0, 1, 2, 4, 5])
    scores = generative_scores(features, features + 0.1, probs)
    assert scores["coverage"] == 1 and scores["kl_uniform"] > 1.5
    assert generative_scores(features, features, probs, min_share=0.0)["coverage"] == 6
    for model in ("dcgan", "wgan", "wgan_gp", "sngan"):
        assert train_config(f"model={model}", *GAN_TINY).model.min_class_share == 0.02
    assert train_config(*PGGAN_TINY).model.min_class_share == 0.02
    with pytest.raises(Exception) as error:
        build_model(train_config("model=dcgan", *GAN_TINY, "model.min_class_share=1.5"))
    assert isinstance(error.value.__cause__ or error.value, UserError)
    assert "model.min_class_share: must be in [0, 1], got 1.5" in str(error.value)


def test_a_gan_run_reports_coverage_and_class_kl(train_config) -> None:
    cfg = train_config("model=dcgan", *GAN_TINY, "debug=fdr")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert 0 <= metrics["test/coverage"] <= 10 and 0 <= metrics["test/kl_uniform"] <= math.log(10) + 1e-6
