"""Convolutional encoder and decoder of a variational autoencoder (Kingma & Welling, 2014), optionally conditioned
on a class label (Sohn et al., 2015): the one-hot label joins the encoder's features and the decoder's latent code.

The network only maps images to the Gaussian posterior's parameters and latent codes to the parameters of the
pixel likelihood; the ELBO and its bounds live in the task (zoo.tasks.vae).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from zoo.errors import UserError

LIKELIHOODS = ("bernoulli", "gaussian")


class VAE(nn.Module):
    """q(z|x[,y]) = N(mean, diag(exp(log_var))) and p(x|z[,y]) with a prior N(0, I) over `latent_dim` dimensions.

    Each entry of `channels` is a 4x4 stride-2 convolution that halves height and width (transposed in the
    decoder, in mirror order), so both must be divisible by 2 ** len(channels); a hidden fully connected layer of
    `hidden` units sits between the convolutions and the latent code on both sides. The decoder returns logits
    for a Bernoulli likelihood and means in [0, 1] for a Gaussian one, whose per-channel log standard deviation
    (`log_scale`) is learned: a fixed variance would weigh reconstruction against KL by an arbitrary constant.
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (1, 28, 28),
        latent_dim: int = 32,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        likelihood: str = "bernoulli",
        conditional: bool = False,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise UserError(f"model.likelihood: unknown '{likelihood}'; allowed: {', '.join(LIKELIHOODS)}")
        if latent_dim < 1 or hidden < 1 or not channels or min(channels) < 1:
            raise UserError(
                f"model.net: latent_dim ({latent_dim}), hidden ({hidden}) and every channel count ({list(channels)}) "
                "must be >= 1, with at least one convolution"
            )
        image_channels, height, width = (int(s) for s in image_shape)
        factor = 2 ** len(channels)
        if height % factor or width % factor:
            raise UserError(
                f"model.net.channels: {len(channels)} stride-2 convolutions need height and width divisible by "
                f"{factor}, got {height}x{width}; use fewer channels entries or pad the images"
            )
        self.image_shape = (image_channels, height, width)
        self.latent_dim, self.likelihood = latent_dim, likelihood
        self.conditional, self.num_classes = conditional, num_classes
        label_dim = num_classes if conditional else 0
        self.feature_shape = (channels[-1], height // factor, width // factor)
        features = channels[-1] * (height // factor) * (width // factor)

        down: list[nn.Module] = []
        for c_in, c_out in zip([image_channels, *channels[:-1]], channels):
            down += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*down, nn.Flatten())
        self.encoder_head = nn.Sequential(
            nn.Linear(features + label_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.decoder_head = nn.Sequential(
            nn.Linear(latent_dim + label_dim, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU()
        )
        up: list[nn.Module] = []
        outs = [*reversed(channels[:-1]), image_channels]
        for i, (c_in, c_out) in enumerate(zip(reversed(channels), outs)):
            up.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(channels) - 1:
                up.append(nn.ReLU())
        self.decoder = nn.Sequential(*up)
        self.log_scale = nn.Parameter(torch.zeros(image_channels)) if likelihood == "gaussian" else None

    def _label(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """Class indices become one-hot rows; float rows (a blend of labels, for interpolation) pass as they are."""
        if not self.conditional:
            return None
        if y is None:
            raise ValueError("a conditional VAE needs the labels of its images")
        if y.is_floating_point():
            return y.to(like.dtype)
        return F.one_hot(y.long(), self.num_classes).to(like.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and log variance, each (B, latent_dim)."""
        h = self.encoder(x)
        label = self._label(y, h)
        if label is not None:
            h = torch.cat([h, label], dim=1)
        mean, log_var = self.encoder_head(h).chunk(2, dim=1)
        return mean, log_var

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Bernoulli logits or Gaussian means in [0, 1], shaped like the images."""
        label = self._label(y, z)
        if label is not None:
            z = torch.cat([z, label], dim=1)
        out = self.decoder(self.decoder_head(z).view(-1, *self.feature_shape))
        return out if self.likelihood == "bernoulli" else torch.sigmoid(out)

    @staticmethod
    def reparameterize(mean: torch.Tensor, log_var: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = mean + sigma * noise: a sample of q whose gradient flows to mean and log_var."""
        return mean + (0.5 * log_var).exp() * noise

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output at the posterior mean: a deterministic reconstruction."""
        mean, _ = self.encode(x, y)
        return self.decode(mean, y)
