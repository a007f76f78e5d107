"""Configs are composed here the way Hydra composes them for train.py, with every output in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"

# short, quiet runs: no progress bars or config printing in test logs
QUICK = [
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose_config(config_name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


@pytest.fixture
def train_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """`train_config("model=mlp", ...)`: the train config with quick settings and outputs in tmp_path."""

    def make(*overrides: str, folder: str = "run") -> DictConfig:
        cfg = compose_config("train", [*QUICK, *overrides], tmp_path)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / folder)
        return cfg

    return make


def run_script(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run train.py or evaluate.py as a user would, from `cwd` (logs/ and data/ land there)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def checkpoint(cfg: DictConfig, name: str = "last.ckpt") -> dict:
    """A checkpoint of the run of `cfg`, loaded on the CPU."""
    import torch

    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / name, map_location="cpu", weights_only=True)


def every_n_steps(tmp_path: Path, steps: int) -> list[str]:
    """Overrides that keep a checkpoint every `steps` optimizer steps in tmp_path/steps (`step_<n>.ckpt`): a place in
    mid-epoch to resume from."""
    return [
        "+callbacks.steps._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.steps.dirpath={tmp_path}/steps",
        f"+callbacks.steps.every_n_train_steps={steps}",
        "+callbacks.steps.save_top_k=-1",
        "+callbacks.steps.filename='step_{step}'",
        "+callbacks.steps.auto_insert_metric_name=false",
    ]


def interrupted_and_resumed(
    train_config: Callable[..., DictConfig], *settings: str, name: str = ""
) -> tuple[DictConfig, DictConfig]:
    """Train `settings` to the end, then again from that run's epoch_001.ckpt, as after a crash in epoch 3.

    `settings` must keep every epoch's checkpoint (`callbacks.model_checkpoint.save_top_k=-1`).
    """
    from zoo.run import train

    prefix = f"{name}_" if name else ""
    full = train_config(*settings, folder=f"{prefix}full")
    train(full)
    halfway = Path(full.paths.output_dir) / "checkpoints" / "epoch_001.ckpt"
    resumed = train_config(*settings, f"ckpt_path={halfway}", folder=f"{prefix}resumed")
    train(resumed)
    return full, resumed


def assert_same_final_weights(full: DictConfig, resumed: DictConfig) -> None:
    """The resumed run ends with the uninterrupted run's weights, and both trained past the halfway point."""
    import torch

    a, b = (checkpoint(c)["state_dict"] for c in (full, resumed))
    halfway = checkpoint(full, "epoch_001.ckpt")["state_dict"]
    assert not all(torch.equal(halfway[k], a[k]) for k in a), "the resumed part must have trained further"
    for key in a:
        assert torch.equal(a[key], b[key]), key
