"""Every config composes, every optimizer and schedule builds and steps, every experiment runs a batch."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import CONFIG_DIR
from zoo.optim import lr_scheduler_config, param_groups, warmup_cosine
from zoo.run import train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# CIFAR-10, MovieLens and the word2vec corpus are not shipped; their loaders are tested on small files the tests write
OFFLINE_EXPERIMENTS = [
    e for e in EXPERIMENTS if e != "resnet_cifar10" and not e.endswith("_movielens") and not e.startswith("word2vec_")
]
# the standard-schedule GAN recipes run the same networks and losses as their CPU recipes: a batch of each is slow
# the longest batch runs (full-size generative models with their scorers, 15-45 s under load; dcgan_mnist stays as
# the family's default-suite run) and recipes that only change settings of another (wgan_gp_ttur_mnist) run with the
# slow tests
SLOW_BATCH_RUNS = {
    "pggan_mnist",
    "pggan_gpu_mnist",
    "cyclegan_digits",
    "cgan_mnist",
    "cvae_mnist",
    "wgan_mnist",
    "wgan_gp_ttur_mnist",
    "sngan_mnist",
    "wgan_gp_mnist",
    "vae_mnist",
}
BATCH_RUNS = [
    pytest.param(e, marks=pytest.mark.slow) if e.endswith("_std_mnist") or e in SLOW_BATCH_RUNS else e
    for e in OFFLINE_EXPERIMENTS
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(train_config, experiment: str) -> None:
    cfg = train_config(f"experiment={experiment}")
    assert cfg.task_name == experiment and cfg.tags
    if "net" in cfg.model and "input_shape" in cfg.model.net:
        assert cfg.model.net.input_shape == cfg.data.input_shape


@pytest.mark.parametrize("experiment", BATCH_RUNS)
def test_every_offline_experiment_runs_a_batch(train_config, experiment: str) -> None:
    cfg = train_config(f"experiment={experiment}", "debug=fdr")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    tested = {k: v for k, v in metrics.items() if k.startswith("test/")}
    assert tested, f"no test metric: {sorted(metrics)}"
    # a training step ran and logged (DQN's first batch comes before its learning starts: no loss yet)
    assert any(k.startswith("train/") for k in metrics), f"no training metric: {sorted(metrics)}"
    assert "non_finite" not in metrics, metrics["non_finite"]
    assert (Path(cfg.paths.output_dir) / "config.yaml").is_file()


# optimizer=none deselects the group for models with one optimizer per network (GANs)
OPTIMIZERS = sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_takes_a_step(train_config, name: str) -> None:
    cfg = train_config(f"optimizer={name}")
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = instantiate(cfg.optimizer)(params=param_groups(net))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # no decay on biases and norm scales
    before = [p.detach().clone() for p in net.parameters()]
    torch.nn.functional.cross_entropy(net(torch.randn(16, 4)), torch.randint(0, 2, (16,))).backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


class FakeTrainer:
    estimated_stepping_batches = 100


@pytest.mark.parametrize("name", [p.stem for p in (CONFIG_DIR / "scheduler").glob("*.yaml") if p.stem != "none"])
def test_every_schedule_builds_and_changes_the_rate(train_config, name: str) -> None:
    cfg = train_config(f"scheduler={name}")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    config = lr_scheduler_config(instantiate(cfg.scheduler), optimizer, FakeTrainer(), monitor="val/acc")
    scheduler = config["scheduler"]
    rates = []
    for _ in range(30):
        optimizer.step()
        scheduler.step(0.5) if "monitor" in config else scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert len(set(rates)) > 1, rates
    assert config["interval"] == ("step" if name in {"warmup_cosine", "onecycle"} else "epoch")


def test_warmup_cosine_shape() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_configs_folder_is_the_one_train_py_reads() -> None:
    from zoo.cli import CONFIG_DIR as read_by_train_py

    assert read_by_train_py == CONFIG_DIR and (CONFIG_DIR / "train.yaml").is_file()


@pytest.mark.parametrize("debug", ["limit", "profiler"])
def test_debug_presets_run(train_config, debug: str) -> None:
    cfg = train_config(f"debug={debug}", "model=logreg", "trainer.max_epochs=1", "trainer.limit_train_batches=3")
    train(cfg)
    if debug == "profiler":
        assert (Path(cfg.paths.output_dir) / "fit-profile.txt").is_file()


def test_max_time_stops_training_and_the_test_still_runs(train_config) -> None:
    cfg = train_config(
        "model=logreg",
        "trainer.max_epochs=300",
        "trainer.max_time=00:00:00:02",
        "callbacks.early_stopping=null",
        "logger=none",
    )
    train(cfg)
    output_dir = Path(cfg.paths.output_dir)
    assert "test/acc" in json.loads((output_dir / "metrics.json").read_text())
    last = torch.load(output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < last["epoch"] < 299, last["epoch"]  # stopped by the clock, not by max_epochs


SEARCHES = sorted(p.stem for p in (CONFIG_DIR / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_tunes_keys_its_config_has(search: str) -> None:
    """A misspelt key in a search space would only fail at its first trial, minutes into a sweep."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"{search}: no search space"
    missing = [
        key for key in params if not key.startswith("+") and OmegaConf.select(cfg, key, default="<none>") == "<none>"
    ]
    assert not missing, f"{search}: {missing} are not keys of the composed config"
