"""Q-networks: one output per discrete action, from vector observations (MLP) or stacked frames (CNN)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from zoo.nn.layers import make_activation


class DuelingHead(nn.Module):
    """Q = V + A - mean(A) (Wang et al., 2016): the state value is learned once, not once per action."""

    def __init__(self, width: int, num_actions: int) -> None:
        super().__init__()
        self.value = nn.Linear(width, 1)
        self.advantage = nn.Linear(width, num_actions)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        advantage = self.advantage(features)
        return self.value(features) + advantage - advantage.mean(dim=1, keepdim=True)


class QNetwork(nn.Module):
    """MLP from a flat observation to Q(s, a) for every action; `dueling` swaps the last layer for a dueling head."""

    def __init__(
        self,
        observation_shape: Sequence[int],
        num_actions: int,
        hidden_sizes: Sequence[int] = (120, 84),
        activation: str = "relu",
        dueling: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(observation_shape)
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), make_activation(activation)]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.head: nn.Module = DuelingHead(width, num_actions) if dueling else nn.Linear(width, num_actions)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(observations.float()))


class ConvQNetwork(nn.Module):
    """The Nature-DQN convolutional trunk (Mnih et al., 2015) for stacked uint8 frames (C, 84, 84) scaled to [0, 1].

    Image observations need only this network and an environment that yields frames; the task is unchanged.
    """

    def __init__(
        self,
        observation_shape: Sequence[int],
        num_actions: int,
        hidden_size: int = 512,
        dueling: bool = False,
    ) -> None:
        super().__init__()
        if len(observation_shape) != 3:
            raise ValueError(
                f"model.net: ConvQNetwork needs (channels, height, width) observations, got {observation_shape}"
            )
        channels = observation_shape[0]
        convs = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = convs(torch.zeros(1, *observation_shape)).shape[1]
        self.trunk = nn.Sequential(convs, nn.Linear(width, hidden_size), nn.ReLU())
        self.head: nn.Module = DuelingHead(hidden_size, num_actions) if dueling else nn.Linear(hidden_size, num_actions)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(observations.float() / 255.0))
