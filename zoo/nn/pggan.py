"""Networks of progressive GANs (Karras et al., 2018): layers with an equalized learning rate, pixel-wise feature
normalization, a minibatch standard deviation layer, and a generator and discriminator that grow from 4x4.

Both networks hold the blocks of every resolution from the start and run only those up to the resolution asked
for, so an optimizer built once owns every parameter and keeps its state across growth. During a fade-in
(`alpha` < 1) the new block's output is blended with the previous resolution's, nearest-upsampled in the
generator and average-pooled in the discriminator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from zoo.errors import UserError

HE_GAIN = math.sqrt(2.0)
START_RESOLUTION = 4


class EqualizedLinear(nn.Module):
    """A linear layer whose weights are N(0, 1) and scaled at run time by gain / sqrt(fan_in).

    Scaling at run time instead of at init gives every weight the same dynamic range, so Adam's per-parameter
    step sizes translate into the same relative change everywhere (the paper's "equalized learning rate").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gain: float = HE_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualizedConv2d(nn.Module):
    """A stride-1 convolution with N(0, 1) weights scaled at run time by gain / sqrt(in_channels * k * k)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        bias: bool = True,
        gain: float = HE_GAIN,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class PixelNorm(nn.Module):
    """Scales each pixel's feature vector to unit mean square: keeps generator and critic from escalating magnitudes."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + self.eps)


class MinibatchStdDev(nn.Module):
    """Appends one feature map: the standard deviation over a group of samples, averaged over features and pixels.

    The critic sees how varied a group of images is, so a generator that collapses to few modes is caught.
    Samples are split into groups of `group_size` (the largest divisor of the batch not above it).
    """

    def __init__(self, group_size: int = 4, eps: float = 1e-8) -> None:
        super().__init__()
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        group = min(self.group_size, n)
        while n % group:
            group -= 1
        y = x.float().reshape(group, n // group, c, h, w)
        std = (y.var(dim=0, unbiased=False) + self.eps).sqrt()  # (n / group, c, h, w)
        stat = std.mean(dim=(1, 2, 3)).to(x.dtype)  # one value per group member index
        stat = stat.repeat(group).view(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, stat], dim=1)


def check_image_shape(image_shape: Sequence[int], key: str) -> int:
    """The final resolution: square images whose side is a power of two >= 4."""
    shape = list(image_shape)
    size = shape[1] if len(shape) == 3 else -1
    if len(shape) != 3 or shape[1] != shape[2] or size < START_RESOLUTION or size & (size - 1):
        raise UserError(
            f"{key}: progressive GANs need square images with a power-of-two side >= 4, got {shape}; "
            "allowed: [C, 4, 4], [C, 8, 8], [C, 16, 16], [C, 32, 32], ... (MNIST: data=mnist5k_pggan, padded to 32x32)"
        )
    return size


def resolutions_up_to(final: int) -> list[int]:
    return [START_RESOLUTION * 2**i for i in range(int(math.log2(final // START_RESOLUTION)) + 1)]


def feature_channels(resolution: int, channel_base: int, max_channels: int) -> int:
    """min(max_channels, channel_base / resolution): the paper's 512 channels up to 32x32, halving above."""
    return max(1, min(max_channels, channel_base // resolution))


class ProgressiveGenerator(nn.Module):
    """z -> images at any resolution from 4x4 up to the data's size, blending in a new block by `alpha`.

    4x4 block: pixel-normalized z, a dense layer to a 4x4 map, a 3x3 conv. Each later block: nearest 2x
    upsampling, two 3x3 convs. Every conv is followed by LeakyReLU(0.2) and pixel norm. Each resolution has its own
    1x1 toRGB (linear output, no tanh, as in the paper).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 128,
        channel_base: int = 2048,
        max_channels: int = 128,
    ) -> None:
        super().__init__()
        if latent_dim < 1 or channel_base < 1 or max_channels < 1:
            raise UserError("model.generator: latent_dim, channel_base and max_channels must be >= 1")
        self.final_resolution = check_image_shape(image_shape, "model.generator.image_shape")
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        self.resolutions = resolutions_up_to(self.final_resolution)
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        channels = [feature_channels(r, channel_base, max_channels) for r in self.resolutions]
        self.input_norm = PixelNorm()
        self.dense = EqualizedLinear(latent_dim, channels[0] * 16)
        blocks = [
            nn.Sequential(act(), PixelNorm(), EqualizedConv2d(channels[0], channels[0], 3, 1), act(), PixelNorm())
        ]
        for before, after in zip(channels[:-1], channels[1:]):
            blocks.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    EqualizedConv2d(before, after, 3, 1),
                    act(),
                    PixelNorm(),
                    EqualizedConv2d(after, after, 3, 1),
                    act(),
                    PixelNorm(),
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.to_rgb = nn.ModuleList(EqualizedConv2d(c, image_shape[0], 1, gain=1.0) for c in channels)

    def stage(self, resolution: int) -> int:
        if resolution not in self.resolutions:
            raise ValueError(f"resolution {resolution} is not one of {self.resolutions}")
        return self.resolutions.index(resolution)

    def features(self, z: torch.Tensor, resolution: int) -> torch.Tensor:
        """The feature map of the block at `resolution` (blocks above it are not run)."""
        x = self.dense(self.input_norm(z.view(len(z), self.latent_dim)))
        x = x.view(len(z), -1, START_RESOLUTION, START_RESOLUTION)
        for block in self.blocks[: self.stage(resolution) + 1]:
            x = block(x)
        return x

    def forward(self, z: torch.Tensor, resolution: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        resolution = resolution or self.final_resolution
        stage = self.stage(resolution)
        if stage == 0 or alpha >= 1.0:
            return self.to_rgb[stage](self.features(z, resolution))
        previous = self.features(z, resolution // 2)
        new = self.to_rgb[stage](self.blocks[stage](previous))
        old = F.interpolate(self.to_rgb[stage - 1](previous), scale_factor=2, mode="nearest")
        return torch.lerp(old, new, float(alpha))


class ProgressiveDiscriminator(nn.Module):
    """Images at any grown resolution -> one critic score, fading in the new fromRGB and block by `alpha`.

    Each resolution has a 1x1 fromRGB; each block above 4x4 is two 3x3 convs and a 2x2 average pool; the 4x4 block
    is the minibatch standard deviation, a 3x3 conv, a 4x4 conv (a dense layer on the 4x4 map) and a linear score.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channel_base: int = 2048,
        max_channels: int = 128,
        mbstd_group_size: int = 4,
    ) -> None:
        super().__init__()
        if channel_base < 1 or max_channels < 1 or mbstd_group_size < 1:
            raise UserError("model.discriminator: channel_base, max_channels and mbstd_group_size must be >= 1")
        self.final_resolution = check_image_shape(image_shape, "model.discriminator.image_shape")
        self.image_shape = tuple(image_shape)
        self.resolutions = resolutions_up_to(self.final_resolution)
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        channels = [feature_channels(r, channel_base, max_channels) for r in self.resolutions]
        self.from_rgb = nn.ModuleList(nn.Sequential(EqualizedConv2d(image_shape[0], c, 1), act()) for c in channels)
        blocks = [
            nn.Sequential(
                MinibatchStdDev(mbstd_group_size),
                EqualizedConv2d(channels[0] + 1, channels[0], 3, 1),
                act(),
                EqualizedConv2d(channels[0], channels[0], 4, 0),
                act(),
                nn.Flatten(),
                EqualizedLinear(channels[0], 1, gain=1.0),
            )
        ]
        for lower, upper in zip(channels[:-1], channels[1:]):
            blocks.append(
                nn.Sequential(
                    EqualizedConv2d(upper, upper, 3, 1),
                    act(),
                    EqualizedConv2d(upper, lower, 3, 1),
                    act(),
                    nn.AvgPool2d(2),
                )
            )
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, resolution: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        resolution = resolution or x.shape[-1]
        if resolution not in self.resolutions or x.shape[-1] != resolution:
            raise ValueError(f"images of side {x.shape[-1]} at resolution {resolution}; allowed: {self.resolutions}")
        stage = self.resolutions.index(resolution)
        h = self.from_rgb[stage](x)
        if stage > 0:
            h = self.blocks[stage](h)
            if alpha < 1.0:
                old = self.from_rgb[stage - 1](F.avg_pool2d(x, 2))
                h = torch.lerp(old, h, float(alpha))
            for block in reversed(self.blocks[1:stage]):
                h = block(h)
        return self.blocks[0](h).flatten()
