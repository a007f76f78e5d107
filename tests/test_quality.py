"""Each offline experiment reaches the bound in its config (`expected: {metric, min or max}`), with its own seed."""

import pytest
import torch

from tests.test_configs import OFFLINE_EXPERIMENTS
from zoo.run import train


@pytest.mark.slow
@pytest.mark.parametrize("experiment", OFFLINE_EXPERIMENTS)
def test_experiment_reaches_its_expected_figure(train_config, experiment: str) -> None:
    cfg = train_config(f"experiment={experiment}", "logger=none")
    if cfg.expected is None:
        pytest.skip(f"{experiment} declares no expected figure")
    cfg.optimized_metric = cfg.expected.metric
    value = train(cfg)
    if "min" in cfg.expected:
        assert value >= cfg.expected.min, f"{experiment}: {cfg.expected.metric} = {value:.4f} < {cfg.expected.min}"
    if "max" in cfg.expected:  # lower is better: RMSE, loss
        assert value <= cfg.expected.max, f"{experiment}: {cfg.expected.metric} = {value:.4f} > {cfg.expected.max}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_default_experiment_on_cuda(train_config, precision: str) -> None:
    cfg = train_config("trainer=gpu", f"trainer.precision={precision}", "logger=none")
    cfg.optimized_metric = "test/acc"
    assert train(cfg) >= 0.985
