"""CycleGAN networks (Zhu et al., 2017): a ResNet-style image-to-image generator and a PatchGAN discriminator.

Both follow the paper's appendix and its reference code: reflection padding, instance normalization without
learned scale (convolutions keep their biases instead), weights from N(0, 0.02). Sizes are parameters so that
the 256x256 networks of the paper (64 filters, 2 downsamplings, 9 residual blocks, a 70x70 PatchGAN with 3
strided layers) and small ones for 32x32 digits (fewer filters, 6 blocks, 1 strided layer) are the same code.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.errors import UserError
from zoo.nn.gan import dcgan_init

NORMS = ("instance", "batch", "none")


def _norm(name: str, channels: int) -> nn.Module:
    """Instance norm without affine parameters as in the paper's code; batch norm and none for ablations."""
    if name == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "none":
        return nn.Identity()
    raise UserError(f"norm: unknown '{name}'; allowed: {', '.join(NORMS)}")


def _bias(norm: str) -> bool:
    """Batch norm's shift makes a bias redundant; instance norm here has none, so the convolution keeps one."""
    return norm != "batch"


class ResidualBlock(nn.Module):
    """x + [reflect-pad, 3x3 conv, norm, ReLU, reflect-pad, 3x3 conv, norm](x): the paper's R-k block."""

    def __init__(self, channels: int, norm: str = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=_bias(norm)),
            _norm(norm, channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=_bias(norm)),
            _norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """(C, H, W) in [-1, 1] -> (C_out, H, W) in [-1, 1]: c7s1-k, d2k, d4k, R4k x n_blocks, u2k, uk, c7s1-C_out, tanh.

    H and W must be divisible by 2^n_downsampling so that the transposed convolutions restore the input size.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 64,
        n_downsampling: int = 2,
        n_blocks: int = 9,
        norm: str = "instance",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        _norm(norm, 1)  # reject an unknown name before building anything
        if min(in_channels, base_channels) < 1 or n_downsampling < 0 or n_blocks < 0:
            raise UserError(
                "model.generator: in_channels and base_channels must be >= 1, n_downsampling and n_blocks >= 0"
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.n_downsampling = in_channels, out_channels, n_downsampling
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, base_channels, 7, bias=_bias(norm)),
            _norm(norm, base_channels),
            nn.ReLU(inplace=True),
        ]
        channels = base_channels
        for _ in range(n_downsampling):
            layers += [
                nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=_bias(norm)),
                _norm(norm, channels * 2),
                nn.ReLU(inplace=True),
            ]
            channels *= 2
        layers += [ResidualBlock(channels, norm) for _ in range(n_blocks)]
        for _ in range(n_downsampling):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1, bias=_bias(norm)),
                _norm(norm, channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2**self.n_downsampling
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise UserError(
                f"model.generator: image size {list(x.shape[-2:])} is not divisible by 2^n_downsampling = {factor}; "
                "allowed: sizes that are multiples of it"
            )
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """(C, H, W) -> a map of real/fake scores, one per overlapping patch (PatchGAN, Isola et al., 2017).

    4x4 convolutions: C64 (no norm), then n_layers - 1 more stride-2 layers doubling the channels (at most 8x),
    one stride-1 layer, and a stride-1 convolution to one channel; LeakyReLU(0.2). n_layers=3 is the paper's
    70x70 PatchGAN; n_layers=1 sees 16x16 patches, the same share of a 32x32 digit as 70x70 of a 256x256 photo
    sees more or less of a horse's texture.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        _norm(norm, 1)
        if in_channels < 1 or base_channels < 1 or n_layers < 1:
            raise UserError("model.discriminator: in_channels, base_channels and n_layers must be >= 1")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        channels = base_channels
        for layer in range(1, n_layers + 1):
            out = base_channels * min(2**layer, 8)
            stride = 2 if layer < n_layers else 1
            layers += [
                nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=_bias(norm)),
                _norm(norm, out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers
        dcgan_init(self, init_std)

    @property
    def receptive_field(self) -> int:
        """Side of the input patch one output score sees."""
        field = 4  # the last convolution
        for layer in reversed(range(self.n_layers + 1)):
            stride = 2 if layer < self.n_layers else 1
            field = (field - 1) * stride + 4
        return field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
