"""GANs trained with Lightning manual optimization: DCGAN (BCE), WGAN (weight clipping), WGAN-GP, SNGAN (hinge).

One task covers the family because the four differ only in the loss, the critic's regularizer (clipping,
gradient penalty, spectral norm inside the network) and the optimizer settings. Manual optimization is needed
for n_critic discriminator steps per generator step; gradient clipping and accumulation are done here because
Lightning does them only in automatic mode. Validation and test score the generator with a domain classifier
(zoo.metrics.generative): checkpoints keep the generator with the best validation FID.

WGAN's critic schedule follows the authors' reference code with `critic_warmup`: 100 critic steps before each of the
first 25 generator steps and before every 500th, `n_critic` otherwise (`CriticSchedule`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from zoo.errors import UserError
from zoo.metrics.generative import DEFAULT_MIN_CLASS_SHARE
from zoo.tasks.adversarial import (
    LOSSES,
    AdversarialTask,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    ramped_decay,
    refuse_automatic_only_settings,
)

log = logging.getLogger(__name__)

WARMUP_CRITIC_STEPS = 100  # Arjovsky et al.'s reference code: Diters = 100 ...
WARMUP_GENERATOR_STEPS = 25  # ... while gen_iterations < 25 ...
WARMUP_EVERY = 500  # ... or gen_iterations % 500 == 0


class CriticSchedule:
    """How many critic steps precede each generator step: `n_critic`, or with `warmup` the WGAN reference code's
    schedule (Arjovsky et al., 2017): 100 for the first 25 generator steps and for every 500th, so that the critic
    is near its optimum, and its Wasserstein estimate meaningful, where the generator most needs it.

    The counts depend only on the generator step, so the task needs no state beyond its step counters to know
    whether a generator step is due (and a resumed run continues the schedule exactly). The reference code also
    cuts a critic run short where its data loader's epoch ends; here the run carries over into the next epoch, so
    that the schedule does not depend on the size of the data set.
    """

    def __init__(self, n_critic: int, warmup: bool = False) -> None:
        self.n_critic, self.warmup = n_critic, warmup

    def critic_steps(self, g_step: int) -> int:
        """Critic steps before generator step `g_step` (counted from 0)."""
        if self.warmup and (g_step < WARMUP_GENERATOR_STEPS or g_step % WARMUP_EVERY == 0):
            return WARMUP_CRITIC_STEPS
        return self.n_critic

    def critic_steps_before(self, g_steps: int) -> int:
        """Critic steps that the first `g_steps` generator steps take in all (a closed form of the sum)."""
        if not self.warmup:
            return g_steps * self.n_critic
        warm = min(g_steps, WARMUP_GENERATOR_STEPS)
        later = max(0, g_steps - WARMUP_GENERATOR_STEPS)
        extra = max(0, g_steps - 1) // WARMUP_EVERY  # generator steps 500, 1000, ... below g_steps
        return warm * WARMUP_CRITIC_STEPS + later * self.n_critic + extra * (WARMUP_CRITIC_STEPS - self.n_critic)

    def generator_step_due(self, d_steps: int, g_steps: int) -> bool:
        """Whether the generator steps after `d_steps` critic steps, `g_steps` generator steps having been taken."""
        return d_steps - self.critic_steps_before(g_steps) >= self.critic_steps(g_steps)

    def generator_steps(self, d_steps: int) -> int:
        """Generator steps that `d_steps` critic steps allow (what a per-step learning-rate schedule needs)."""
        low, high = 0, d_steps  # the largest g with critic_steps_before(g) <= d_steps
        while low < high:
            middle = (low + high + 1) // 2
            if self.critic_steps_before(middle) <= d_steps:
                low = middle
            else:
                high = middle - 1
        return low


class GANTask(AdversarialTask):
    """Adversarial training of `generator` against `discriminator`, one optimizer each.

    Per training batch the discriminator takes one (micro-)step; every `accumulate_grad_batches` batches its
    optimizer steps, then WGAN's weight clipping applies; after every `n_critic` discriminator steps the
    generator takes one step on as many fresh noise batches. Logs `train/loss_d`, `train/loss_g` (and
    `train/gp`, `train/wasserstein` for WGAN critics), an 8x8 grid from a fixed noise vector every
    `grid_every_n_epochs` epochs, and `val/*`, `test/*` scores from the domain classifier. With `ema_decay`
    the EMA generator makes samples and scores; its decay ramps up over the generator steps (`ramped_decay`).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        loss: str = "bce",
        optimizer_g: Callable[..., torch.optim.Optimizer] | None = None,
        optimizer_d: Callable[..., torch.optim.Optimizer] | None = None,
        n_critic: int = 1,
        clip_value: float | None = None,
        gp_weight: float = 0.0,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        scorer: Mapping[str, Any] | None = None,
        min_class_share: float = DEFAULT_MIN_CLASS_SHARE,
        fixed_noise_seed: int = 0,
        eval_seed: int = 0,
        grid_every_n_epochs: int = 1,
        ema_decay: float | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/fid",
        critic_warmup: bool = False,
        ema_bn_batches: int = 16,
        score_samples: int = 2000,
        truncation: float | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise UserError(f"model.loss: unknown '{loss}'; allowed: {', '.join(LOSSES)}")
        if not isinstance(n_critic, int) or n_critic < 1:
            raise UserError(f"model.n_critic: must be an integer >= 1, got {n_critic!r}")
        if clip_value is not None and clip_value <= 0:
            raise UserError(f"model.clip_value: must be > 0 or null, got {clip_value}")
        if not isinstance(critic_warmup, bool):
            raise UserError(f"model.critic_warmup: must be true or false, got {critic_warmup!r}")
        super().__init__(
            generator,
            discriminator,
            optimizer_g=optimizer_g,
            optimizer_d=optimizer_d,
            gp_weight=gp_weight,
            gradient_clip_val=gradient_clip_val,
            accumulate_grad_batches=accumulate_grad_batches,
            scorer=scorer,
            min_class_share=min_class_share,
            fixed_noise_seed=fixed_noise_seed,
            eval_seed=eval_seed,
            grid_every_n_epochs=grid_every_n_epochs,
            ema_decay=ema_decay,
            optimizer=optimizer,
            scheduler=scheduler,
            monitor=monitor,
            ema_bn_batches=ema_bn_batches,
            score_samples=score_samples,
            truncation=truncation,
        )
        self.loss_kind, self.n_critic, self.clip_value = loss, n_critic, clip_value
        self.critic_schedule = CriticSchedule(n_critic, critic_warmup)

    def configure_callbacks(self) -> list[Any]:
        """Lightning calls this before it checks the trainer, so settings it cannot honour fail here in one line."""
        refuse_automatic_only_settings(self.trainer)
        return []

    def configure_optimizers(self) -> Any:
        opt_g, opt_d = self.network_optimizers()
        if self.make_scheduler is None:
            return [opt_g, opt_d]
        d_steps = max(1, int(self.trainer.estimated_stepping_batches) // self.accumulate)
        g_steps = max(1, self.critic_schedule.generator_steps(d_steps))
        return [opt_g, opt_d], [self._schedule(opt_g, g_steps), self._schedule(opt_d, d_steps)]

    # ---- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        real = batch[0]
        # a conditional GAN: fakes of the batch's classes, and the critic scores every image with its label
        label = {} if self.num_classes is None else {"labels": self._labels(batch)}
        z = torch.randn(len(real), self.latent_dim, device=real.device)
        with torch.no_grad():
            fake = self.generator(z, **label)
        d_real, d_fake = self.discriminator(real, **label), self.discriminator(fake, **label)
        loss_d = discriminator_loss(self.loss_kind, d_real, d_fake)
        total_d = loss_d
        if self.gp_weight > 0:
            penalty = gradient_penalty(functools.partial(self.discriminator, **label), real, fake)
            total_d = loss_d + self.gp_weight * penalty
            self.train_gp.update(penalty.detach())
            self.log("train/gp", self.train_gp, on_step=False, on_epoch=True)
        self._check_finite("loss_d", total_d)
        self.manual_backward(total_d / self.accumulate)
        self.train_loss_d.update(loss_d.detach())
        self.log("train/loss_d", self.train_loss_d, on_step=False, on_epoch=True, prog_bar=True)
        if self.loss_kind == "wasserstein":
            self.train_wasserstein.update((d_real.mean() - d_fake.mean()).detach().float())
            self.log("train/wasserstein", self.train_wasserstein, on_step=False, on_epoch=True)

        last = batch_idx + 1 >= self.trainer.num_training_batches
        if (batch_idx + 1) % self.accumulate != 0 and not last:
            return
        self._step(opt_d, 1)
        if self.clip_value is not None:  # WGAN: keep the critic in a compact set of functions
            with torch.no_grad():
                for param in self.discriminator.parameters():
                    param.clamp_(-self.clip_value, self.clip_value)
        self.d_steps += 1
        if not self.critic_schedule.generator_step_due(self.d_steps, self.g_steps):
            return

        self.discriminator.requires_grad_(False)  # the generator's step needs no critic gradients
        try:
            for _ in range(self.accumulate):
                z = torch.randn(len(real), self.latent_dim, device=real.device)
                loss_g = generator_loss(self.loss_kind, self.discriminator(self.generator(z, **label), **label))
                self._check_finite("loss_g", loss_g)
                self.manual_backward(loss_g / self.accumulate)
                self.train_loss_g.update(loss_g.detach())
        finally:
            self.discriminator.requires_grad_(True)
        self.log("train/loss_g", self.train_loss_g, on_step=False, on_epoch=True, prog_bar=True)
        self._step(opt_g, 0)
        self.g_steps += 1
        if self.generator_ema is not None:
            self.update_generator_ema(ramped_decay(self.ema_decay, self.g_steps))
