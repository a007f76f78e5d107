"""Networks alone: shapes, the documented special cases, and clear errors for bad arguments."""

import pytest
import torch
from torch import nn

from zoo.nn.cnn import CNN
from zoo.nn.mlp import MLP
from zoo.nn.resnet import ResNet


def test_mlp_without_hidden_layers_is_logistic_regression() -> None:
    net = MLP(input_shape=[1, 8, 8], num_classes=10, hidden_sizes=[], dropout=0.0)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 64
    assert net(torch.randn(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "weight"])
def test_mlp_norms(norm: str) -> None:
    net = MLP(input_shape=[40], num_classes=3, hidden_sizes=[16, 8], norm=norm, dropout=0.1, input_dropout=0.1)
    assert net(torch.randn(4, 40)).shape == (4, 3)
    if norm == "weight":
        names = {name for name, _ in net.named_parameters()}
        assert any("parametrizations.weight.original0" in n for n in names)  # g and v of weight norm


def test_cnn_picks_1d_or_2d_convolutions_from_the_input_rank() -> None:
    one_d = CNN(input_shape=[1, 40], num_classes=10)
    two_d = CNN(input_shape=[3, 16, 16], num_classes=10, global_pool=True, hidden=32, dropout=0.1)
    assert any(isinstance(m, nn.Conv1d) for m in one_d.modules())
    assert any(isinstance(m, nn.Conv2d) for m in two_d.modules())
    assert one_d(torch.randn(2, 1, 40)).shape == (2, 10)
    assert two_d(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_resnet20_has_the_papers_size() -> None:
    net = ResNet(input_shape=[3, 32, 32], num_classes=10, depth=20)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # 19 3x3 convolutions + the classifier = 20 weighted layers
    assert 0.26e6 < sum(p.numel() for p in net.parameters()) < 0.29e6  # 0.27M in He et al., table 6
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_blocks_start_as_identity() -> None:
    net = ResNet(input_shape=[3, 8, 8], num_classes=10, depth=8).eval()
    block = net.stages[0]
    x = torch.relu(torch.randn(2, 16, 8, 8))
    assert torch.allclose(block(x), x)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MLP([4], 2, activation="swish"), "activation: unknown 'swish'; allowed: relu"),
        (lambda: MLP([4], 2, norm="group"), "norm: unknown 'group'; allowed: none, batch, layer, weight"),
        (lambda: CNN([1, 8, 8], 2, pool="lp"), "pool: unknown 'lp'; allowed: max, avg, none"),
        (lambda: CNN([64], 2), "input_shape must be (C, L) or (C, H, W)"),
        (lambda: CNN([1, 4], 2, channels=[8, 8, 8]), "too small"),
        (lambda: ResNet([3, 32, 32], 10, depth=21), "depth must be 6n+2"),
        (lambda: ResNet([1, 40], 10), "ResNet needs image input"),
    ],
)
def test_bad_arguments_name_the_key_and_allowed_values(make, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        make()
