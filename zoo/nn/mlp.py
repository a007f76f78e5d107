"""Multi-layer perceptron classifier."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from zoo.nn.layers import check_choice, make_activation

NORMS = ("none", "batch", "layer", "weight")


class MLP(nn.Module):
    """Flatten the input, then Linear -> norm -> activation -> dropout per hidden layer.

    With `hidden_sizes=[]` it is multinomial logistic regression. `norm="weight"` reparametrizes
    each linear layer as g * v / ||v|| (Salimans & Kingma, 2016) instead of normalizing activations.
    `input_dropout` drops input features, the regularizer of Hinton et al. (2012).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        check_choice("norm", norm, NORMS)
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for hidden in hidden_sizes:
            linear = nn.Linear(width, hidden, bias=norm != "batch")
            layers.append(weight_norm(linear) if norm == "weight" else linear)
            if norm == "batch":
                layers.append(nn.BatchNorm1d(hidden))
            elif norm == "layer":
                layers.append(nn.LayerNorm(hidden))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation, used by feature-based scores."""
        return self.layers(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))
