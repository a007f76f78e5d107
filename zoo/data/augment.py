"""Per-sample augmentation applied to whole batches on the training device."""

from __future__ import annotations

import torch
from torch.nn import functional as F


class BatchAugment:
    """Random translation by up to `shift` positions (zero padded), optional horizontal flip, Gaussian noise.

    Works on 1-D signals (B, C, L) and images (B, C, H, W); each sample draws its own offsets from the
    global torch generator, whose state the RngState callback checkpoints.
    """

    def __init__(self, shift: int = 0, hflip: bool = False, noise: float = 0.0) -> None:
        if shift < 0 or noise < 0:
            raise ValueError(f"data.augment: shift and noise must be >= 0, got shift={shift}, noise={noise}")
        self.shift, self.hflip, self.noise = shift, hflip, noise

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.hflip or self.noise > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift > 0:
            x = _translate(x, self.shift)
        if self.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        if self.noise > 0:
            x = x + self.noise * torch.randn_like(x)
        return x


def _translate(x: torch.Tensor, shift: int) -> torch.Tensor:
    batch, spatial = x.shape[0], x.shape[2:]
    padded = F.pad(x, [shift, shift] * len(spatial))
    offsets = torch.randint(0, 2 * shift + 1, (batch, len(spatial)), device=x.device)
    rows = torch.arange(batch, device=x.device)
    if len(spatial) == 1:
        cols = offsets[:, 0:1] + torch.arange(spatial[0], device=x.device)
        return padded[rows[:, None], :, cols].permute(0, 2, 1)
    ys = (offsets[:, 0:1] + torch.arange(spatial[0], device=x.device))[:, :, None]
    xs = (offsets[:, 1:2] + torch.arange(spatial[1], device=x.device))[:, None, :]
    return padded[rows[:, None, None], :, ys, xs].permute(0, 3, 1, 2)
