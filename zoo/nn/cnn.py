"""Convolutional classifier for 1-D signals (C, L) and images (C, H, W)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo.nn.layers import check_choice, make_activation

POOLS = ("max", "avg", "none")
NORMS = ("batch", "none")


class CNN(nn.Module):
    """Blocks of [conv -> norm -> activation] x convs_per_block, then a 2x pooling, then a linear head.

    The input's rank picks 1-D or 2-D convolutions, so one config family serves MNIST-1D and images.
    `global_pool` averages the last feature map (translation invariant, fewer parameters);
    otherwise it is flattened as in LeNet-style networks.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        convs_per_block: int = 2,
        kernel_size: int = 3,
        stride: int = 1,
        norm: str = "batch",
        pool: str = "max",
        activation: str = "relu",
        dropout: float = 0.0,
        global_pool: bool = False,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        check_choice("pool", pool, POOLS)
        check_choice("norm", norm, NORMS)
        if len(input_shape) not in (2, 3):
            raise ValueError(f"input_shape must be (C, L) or (C, H, W), got {list(input_shape)}")
        self.features_net = _conv_blocks(
            input_shape, channels, convs_per_block, kernel_size, stride, norm, pool, activation, global_pool
        )
        try:  # probe the flattened width in eval mode (BatchNorm cannot train on one sample)
            with torch.no_grad():
                width = self.features_net.eval()(torch.zeros(1, *input_shape)).shape[1]
        except RuntimeError as error:
            raise ValueError(
                f"input_shape {list(input_shape)} is too small for {len(channels)} pooled blocks"
            ) from error
        self.features_net.train()
        head: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        if hidden > 0:
            head += [nn.Linear(width, hidden), make_activation(activation)]
            head += [nn.Dropout(dropout)] if dropout > 0 else []
            width = hidden
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features_net(x))


def _conv_blocks(
    input_shape: Sequence[int],
    channels: Sequence[int],
    convs_per_block: int,
    kernel_size: int,
    stride: int,
    norm: str,
    pool: str,
    activation: str,
    global_pool: bool,
) -> nn.Sequential:
    """VGG-style blocks (conv, norm, activation, repeated; then a pool), 1-D or 2-D from the input's shape,
    flattened at the end."""
    two_d = len(input_shape) == 3
    conv = nn.Conv2d if two_d else nn.Conv1d
    batch_norm = nn.BatchNorm2d if two_d else nn.BatchNorm1d
    pooling = {"max": nn.MaxPool2d if two_d else nn.MaxPool1d, "avg": nn.AvgPool2d if two_d else nn.AvgPool1d}
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for out_channels in channels:
        for _ in range(convs_per_block):
            bias, same = norm == "none", kernel_size // 2  # a batch norm's shift stands in for the bias
            layers.append(conv(in_channels, out_channels, kernel_size, stride=stride, padding=same, bias=bias))
            if norm == "batch":
                layers.append(batch_norm(out_channels))
            layers.append(make_activation(activation))
            in_channels = out_channels
        if pool != "none":
            layers.append(pooling[pool](2))
    if global_pool:
        layers.append(nn.AdaptiveAvgPool2d(1) if two_d else nn.AdaptiveAvgPool1d(1))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)
