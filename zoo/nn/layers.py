"""Small pieces that several networks choose by name from a config."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown '{name}'; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Fail early, naming the key and its allowed values, instead of deep inside a forward pass."""
    if value not in allowed:
        raise ValueError(f"{key}: unknown '{value}'; allowed: {', '.join(allowed)}")
