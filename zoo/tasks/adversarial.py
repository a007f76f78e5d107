"""What the adversarial tasks share: the GAN losses, the gradient penalty, the generator EMA, the divergence
check, and the settings Lightning cannot apply under manual optimization (GAN, PGGAN and CycleGAN import it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zoo.callbacks import last_good_checkpoint
from zoo.errors import TrainingDiverged, UserError

LOSSES = ("bce", "wasserstein", "hinge", "lsgan")


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's (critic's) loss from its scores of real and generated images; lower is better for it."""
    real, fake = real.float(), fake.float()
    if kind == "bce":  # Goodfellow et al. (2014), on logits
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "wasserstein":  # Arjovsky et al. (2017): the critic maximises E[D(real)] - E[D(fake)]
        return fake.mean() - real.mean()
    if kind == "hinge":  # Lim & Ye (2017), Miyato et al. (2018)
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "lsgan":  # Mao et al. (2017): least squares to the labels 1 (real) and 0 (fake)
        return 0.5 * ((real - 1.0).square().mean() + fake.square().mean())
    raise UserError(f"model.loss: unknown '{kind}'; allowed: {', '.join(LOSSES)}")


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's loss from the discriminator's scores of its images (non-saturating form for BCE)."""
    fake = fake.float()
    if kind == "bce":
        return F.softplus(-fake).mean()
    if kind in ("wasserstein", "hinge"):
        return -fake.mean()
    if kind == "lsgan":
        return 0.5 * (fake - 1.0).square().mean()
    raise UserError(f"model.loss: unknown '{kind}'; allowed: {', '.join(LOSSES)}")


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Gulrajani et al. (2017): E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = a real + (1 - a) fake, a ~ U(0, 1) per sample.

    Computed in float32 with autocast off: the penalty differentiates a gradient, and in half precision both
    the small interpolation gradients and their squares lose the digits that make the term mean anything.
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        real, fake = real.detach().float(), fake.detach().float()
        alpha = torch.rand(len(real), *([1] * (real.ndim - 1)), device=real.device, dtype=torch.float32)
        mixed = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
        scores = critic(mixed).float()
        (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1.0).square().mean()


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, for parameters; buffers (batch-norm statistics) are copied."""
    for smooth, current in zip(average.parameters(), model.parameters()):
        smooth.lerp_(current.detach().to(smooth.dtype), 1.0 - decay)
    for smooth, current in zip(average.buffers(), model.buffers()):
        smooth.copy_(current)


def ramped_decay(decay: float, steps: int) -> float:
    """min(decay, (1 + t) / (10 + t)) after t steps: an average over the steps so far until that exceeds `decay`'s
    horizon, so that a short run is not dominated by the random weights it started from."""
    return min(decay, (1 + steps) / (10 + steps))


def check_finite(name: str, value: torch.Tensor, trainer: Any, position: str) -> None:
    """Stops the run before a NaN or infinite loss reaches the weights, naming the checkpoint to go back to."""
    if bool(torch.isfinite(value)):
        return
    raise TrainingDiverged(
        f"training diverged: {name} is {float(value)} at {position}; the weights were not updated with it and "
        f"{last_good_checkpoint(trainer)}; try lower model.optimizer_g.lr / model.optimizer_d.lr"
    )


def refuse_automatic_only_settings(
    trainer: Any,
    accumulate_hint: str = "set model.accumulate_grad_batches instead and leave trainer.accumulate_grad_batches at 1",
) -> None:
    """Lightning clips and accumulates only under automatic optimization; adversarial tasks do both by hand."""
    if trainer.gradient_clip_val:
        raise UserError(
            "trainer.gradient_clip_val: Lightning cannot clip under the manual optimization GANs use; "
            "set model.gradient_clip_val instead and leave trainer.gradient_clip_val null"
        )
    if trainer.accumulate_grad_batches != 1:
        raise UserError(
            f"trainer.accumulate_grad_batches: Lightning cannot accumulate under the manual optimization GANs use; "
            f"{accumulate_hint}"
        )


def check_optimizer_group(
    optimizer: Any | None, optimizer_g: Any | None, optimizer_d: Any | None, networks: str = "network"
) -> None:
    """An `optimizer=` group beside both per-network optimizers would be ignored: say so instead."""
    if optimizer is not None and optimizer_g is not None and optimizer_d is not None:
        raise UserError(
            f"optimizer: this model configures one optimizer per {networks} (model.optimizer_g, model.optimizer_d); "
            "allowed: optimizer=none, and e.g. model.optimizer_g.lr=... to change them"
        )


def check_manual_optimization_settings(gradient_clip_val: float | None, accumulate_grad_batches: int) -> None:
    """The model's own clipping and accumulation keys, which stand in for the trainer's under manual optimization."""
    if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
        raise UserError(f"model.accumulate_grad_batches: must be an integer >= 1, got {accumulate_grad_batches!r}")
    if gradient_clip_val is not None and gradient_clip_val <= 0:
        raise UserError(f"model.gradient_clip_val: must be > 0 or null, got {gradient_clip_val}")
