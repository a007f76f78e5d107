"""Generator and discriminator networks of the DCGAN family, built from blocks that other image GANs reuse.

`UpBlock` / `DownBlock` (a stride-2 transposed or plain 4x4 convolution, a normalization, an activation),
`make_norm`, `spectral` and `dcgan_init` are the shared pieces: progressive and image-to-image GANs put the
same blocks together in other orders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from zoo.errors import UserError

NORMS = ("batch", "instance", "layer", "none")
START_SIZES = (4, 7)
INITS = ("dcgan", "default")


def make_norm(name: str, channels: int) -> nn.Module:
    """Batch norm (DCGAN), instance norm (image translation), layer norm (a WGAN-GP critic may use it), none."""
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if name == "layer":
        return nn.GroupNorm(1, channels)
    if name == "none":
        return nn.Identity()
    raise UserError(f"norm: unknown '{name}'; allowed: {', '.join(NORMS)}")


def spectral(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Spectral normalization of a conv or linear layer (Miyato et al., 2018): its largest singular value is 1."""
    return spectral_norm(module) if enabled else module


class UpBlock(nn.Sequential):
    """Doubles height and width: 4x4 transposed convolution with stride 2, normalization, activation."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", activation: nn.Module | None = None):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=norm == "none"),
            make_norm(norm, out_channels),
            activation if activation is not None else nn.ReLU(inplace=True),
        )


class DownBlock(nn.Sequential):
    """Halves height and width: 4x4 convolution with stride 2, normalization, LeakyReLU(0.2) as in DCGAN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str = "batch",
        spectral_norm: bool = False,
        negative_slope: float = 0.2,
    ) -> None:
        conv = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=norm == "none")
        super().__init__(
            spectral(conv, spectral_norm),
            make_norm(norm, out_channels),
            nn.LeakyReLU(negative_slope, inplace=True),
        )


def start_size(image_size: int) -> tuple[int, int]:
    """The feature-map size the generator starts from and how many times it doubles to reach `image_size`.

    DCGAN starts at 4x4 (32, 64, ... pixels); MNIST's 28x28 starts at 7x7 as in the common MNIST DCGAN.
    """
    for start in START_SIZES:
        doublings = 0
        size = image_size
        while size > start and size % 2 == 0:
            size //= 2
            doublings += 1
        if size == start and doublings >= 1:
            return start, doublings
    raise UserError(
        f"model.image_shape: image size {image_size} is not supported by the DCGAN architecture; "
        "allowed: 4*2^k or 7*2^k pixels with k >= 1 (8, 14, 16, 28, 32, 56, 64, ...)"
    )


def _square_size(image_shape: Sequence[int]) -> int:
    if len(image_shape) != 3 or image_shape[1] != image_shape[2]:
        raise UserError(f"model.image_shape: expected square images [C, H, H], got {list(image_shape)}")
    return int(image_shape[1])


def dcgan_init(module: nn.Module, std: float = 0.02) -> None:
    """Radford et al. (2016): conv and linear weights from N(0, 0.02), norm scales from N(1, 0.02), biases 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
            nn.init.normal_(weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and layer.weight is not None:
            nn.init.normal_(layer.weight, 1.0, std)
            nn.init.zeros_(layer.bias)


def check_init(init: str, key: str) -> None:
    """dcgan: dcgan_init after building; default: PyTorch's own initialization."""
    if init not in INITS:
        raise UserError(f"{key}: unknown '{init}'; allowed: {', '.join(INITS)}")


class DCGANGenerator(nn.Module):
    """z -> (C, H, H) in [-1, 1]: project to a start x start map, UpBlocks that halve channels, 4x4 conv to C, tanh.

    Channels at the start map are base_channels * 2^(doublings-1); 28x28 MNIST: 7x7x128 -> 14x14x64 -> 28x28x1.
    The projection is a dense layer, written as a transposed convolution of z seen as a 1x1 map.
    """

    full_size_block = False  # StandardCNNGenerator: one more UpBlock, then a 3x3 convolution to the image

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 100,
        base_channels: int = 64,
        norm: str = "batch",
        init: str = "dcgan",
    ) -> None:
        super().__init__()
        check_init(init, "model.generator.init")
        if latent_dim < 1 or base_channels < 1:
            raise UserError("model.generator: latent_dim and base_channels must be >= 1")
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        start, doublings = start_size(_square_size(image_shape))
        blocks = doublings if self.full_size_block else doublings - 1
        channels = base_channels * 2**blocks
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, channels, start, stride=1, padding=0, bias=norm == "none"),
            make_norm(norm, channels),
            nn.ReLU(inplace=True),
        ]
        for _ in range(blocks):
            layers.append(UpBlock(channels, channels // 2, norm))
            channels //= 2
        if self.full_size_block:
            layers.append(nn.Conv2d(channels, image_shape[0], 3, stride=1, padding=1))
        else:
            layers.append(nn.ConvTranspose2d(channels, image_shape[0], 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers, nn.Tanh())
        if init == "dcgan":
            dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(len(z), self.latent_dim, 1, 1))


class StandardCNNGenerator(DCGANGenerator):
    """The "standard CNN" generator of the SNGAN paper (Miyato et al., 2018, Table 3): DCGAN's, one layer deeper.

    Every doubling is an UpBlock that halves the channels, down to base_channels at full size, then a 3x3 convolution
    makes the image: 32x32: 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 3, as in the paper; 28x28 MNIST:
    7x7x256 -> 14x14x128 -> 28x28x64 -> 1. DCGAN's generator goes straight from half size to the image, so no
    layer has channels at full resolution. Takes the same keys as DCGANGenerator, so one `_target_` swaps them.
    """

    full_size_block = True

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 128,
        base_channels: int = 64,
        norm: str = "batch",
        init: str = "dcgan",
    ) -> None:
        super().__init__(image_shape, latent_dim, base_channels, norm, init)


class DCGANDiscriminator(nn.Module):
    """(C, H, H) -> one score per image: DownBlocks that double channels (no norm on the first), a start x start conv.

    The score is a logit for the BCE loss and an unbounded critic value for Wasserstein and hinge losses.
    WGAN-GP's critic takes norm=none (the penalty is per sample, batch norm would couple samples);
    SNGAN's takes spectral_norm=true on every layer.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        base_channels: int = 64,
        norm: str = "batch",
        spectral_norm: bool = False,
        init: str = "dcgan",
    ) -> None:
        super().__init__()
        check_init(init, "model.discriminator.init")
        make_norm(norm, 1)  # reject an unknown name before building anything
        self.image_shape = tuple(image_shape)
        start, doublings = start_size(_square_size(image_shape))
        channels = base_channels
        layers: list[nn.Module] = [DownBlock(image_shape[0], channels, "none", spectral_norm)]
        for _ in range(doublings - 1):
            layers.append(DownBlock(channels, channels * 2, norm, spectral_norm))
            channels *= 2
        layers.append(spectral(nn.Conv2d(channels, 1, start, stride=1, padding=0), spectral_norm))
        self.net = nn.Sequential(*layers)
        self.trunk_shape = (channels, start, start)
        self.trunk_features = channels * start * start
        if init == "dcgan":
            dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The features the score is read from, flat: (B, trunk_features)."""
        return self.net[:-1](x).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The score of trunk features (the last convolution spans the whole map: a linear layer)."""
        return self.net[-1](features.view(len(features), *self.trunk_shape)).flatten()


class StandardCNNDiscriminator(nn.Module):
    """The "standard CNN" critic of the SNGAN paper (Miyato et al., 2018, Table 3): deeper than DCGAN's critic.

    Three 4x4 stride-2 downsamplings, each after a 3x3 stride-1 convolution, then one more 3x3 stride-1 convolution
    and a linear score; LeakyReLU(0.1). Channels 64-64-128-128-256-256-512 for base_channels=64. The extra
    stride-1 layers give the critic more capacity at every resolution, which the paper's scores rest on.
    Takes the same keys as DCGANDiscriminator, so one `_target_` override swaps them.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        base_channels: int = 64,
        norm: str = "none",
        spectral_norm: bool = True,
        init: str = "dcgan",
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        check_init(init, "model.discriminator.init")
        make_norm(norm, 1)
        size = _square_size(image_shape)
        if size < 8:
            raise UserError(
                f"model.image_shape: the standard CNN critic needs images of 8x8 or more, got {size}x{size}"
            )
        self.image_shape = tuple(image_shape)

        def conv3x3(in_channels: int, out_channels: int) -> list[nn.Module]:
            conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=norm == "none")
            return [spectral(conv, spectral_norm), make_norm(norm, out_channels), nn.LeakyReLU(negative_slope, True)]

        layers: list[nn.Module] = []
        in_channels = image_shape[0]
        for channels in (base_channels, base_channels * 2, base_channels * 4):
            layers += conv3x3(in_channels, channels)
            layers.append(DownBlock(channels, channels, norm, spectral_norm, negative_slope))
            in_channels, size = channels, size // 2
        layers += conv3x3(in_channels, base_channels * 8)
        self.features = nn.Sequential(*layers)
        self.trunk_features = base_channels * 8 * size * size
        self.score = spectral(nn.Linear(self.trunk_features, 1), spectral_norm)
        if init == "dcgan":
            dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The features the score is read from, flat: (B, trunk_features)."""
        return self.features(x).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.score(features).flatten()


def class_cycle(count: int, num_classes: int, device: torch.device | None = None) -> torch.Tensor:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ...: a balanced mix, and in a grid of num_classes columns one class
    per column."""
    return torch.arange(count, device=device) % num_classes


class ConditionalGenerator(nn.Module):
    """A generator that draws a chosen class (Mirza & Osindero, 2014): the label's one-hot vector is appended to the
    noise, so the wrapped generator is built for latent_dim + num_classes inputs.

    Called without labels it draws the classes in turn (`class_cycle`), so that what samples without a label (the
    fixed-noise grid, the EMA's batch-norm statistics, the unconditional scores) sees every class equally often.
    """

    def __init__(self, generator: Callable[..., nn.Module], num_classes: int, latent_dim: int = 100) -> None:
        super().__init__()
        if num_classes < 2 or latent_dim < 1:
            raise UserError(f"model.generator: num_classes >= 2 and latent_dim >= 1, got {num_classes}, {latent_dim}")
        self.net = generator(latent_dim=latent_dim + num_classes)
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.image_shape = self.net.image_shape

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = class_cycle(len(z), self.num_classes, z.device)
        return self.net(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], 1))


class ProjectionDiscriminator(nn.Module):
    """The projection discriminator (Miyato & Koyama, 2018): score(x, y) = head(phi(x)) + <e_y, phi(x)>, phi the
    wrapped critic's trunk features and e_y a learned class embedding (spectrally normalized with the critic).

    Why projection rather than concatenating the label to the input: the class enters as an inner product with the
    features, the form the optimal critic of a conditional model takes, and the paper's class accuracy comes from it.
    """

    def __init__(self, discriminator: Callable[..., nn.Module], num_classes: int, spectral_norm: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise UserError(f"model.discriminator.num_classes: must be >= 2, got {num_classes}")
        self.net = discriminator()
        if not hasattr(self.net, "trunk"):
            raise UserError(f"model.discriminator: {type(self.net).__name__} has no trunk features to project onto")
        self.num_classes = num_classes
        embedding = nn.Embedding(num_classes, self.net.trunk_features)
        nn.init.normal_(embedding.weight, 0.0, 0.02)
        self.embedding = spectral(embedding, spectral_norm)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.net.trunk(x)
        return self.net.head(features) + (self.embedding(labels) * features).sum(1)
