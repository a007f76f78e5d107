"""Progressive growing of GANs (Karras et al., 2018) with Lightning manual optimization.

Training runs through phases measured in images shown: a stabilizing phase at 4x4, then for each higher
resolution a fade-in phase (alpha rising linearly from 0 to 1) and a stabilizing phase. One step is one critic
update and one generator update on a batch of the current resolution's size, drawn by index from the training
tensor, so the batch size can change with the phase while the run stays a function of (seed, step): a resumed
run draws the same images, noise and penalties as an uninterrupted one. The loss is WGAN-GP with the paper's
drift penalty; the generator's exponential moving average makes the samples, grids and scores.

Grids, validation and test show the phase that was just trained (`GrowthSchedule.after`), not the one the next step
enters. With `reset_optimizer_per_phase` both optimizers' state is cleared where each later phase begins, as the
paper's reference code does (`reset_opt_for_new_lod`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric

from zoo.errors import UserError
from zoo.internals import max_epochs, set_max_epochs
from zoo.metrics.generative import DEFAULT_MIN_CLASS_SHARE, frechet_distance
from zoo.records import load_checkpoint
from zoo.tasks.adversarial import (
    AdversarialTask,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    ramped_decay,
    refuse_automatic_only_settings,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """Where a step falls in the growth schedule; `images*` count the images shown before the step."""

    index: int
    resolution: int
    fading: bool
    alpha: float
    batch_size: int
    images_in_phase: int
    images: int


def check_resolutions(resolutions: Sequence[int], final: int | None = None) -> list[int]:
    """Successive powers of two from 4, ending at the data's image size `final` when it is given."""
    resolutions = [int(r) for r in resolutions]
    expected = [4 * 2**i for i in range(len(resolutions))]
    if not resolutions or resolutions != expected:
        raise UserError(
            f"model.resolutions: must be successive powers of two starting at 4, got {resolutions}; "
            "allowed: e.g. [4], [4, 8], [4, 8, 16, 32]"
        )
    if final is not None and resolutions[-1] != final:
        allowed = [4 * 2**i for i in range(int(math.log2(final // 4)) + 1)]
        raise UserError(
            f"model.resolutions: the final resolution {resolutions[-1]} is not the data's image size "
            f"{final}x{final} (data.input_shape); allowed: {allowed}"
        )
    return resolutions


class GrowthSchedule:
    """Phases of `images_per_phase` images each: 4x4, then fade-in and stabilize for every higher resolution.

    A phase takes ceil(images_per_phase / batch size) steps; after the last phase the final resolution keeps
    training (alpha 1) for as long as the run lasts.
    """

    def __init__(self, resolutions: Sequence[int], images_per_phase: int, batch_sizes: int | Sequence[int]) -> None:
        resolutions = check_resolutions(resolutions)
        if isinstance(images_per_phase, bool) or not isinstance(images_per_phase, int) or images_per_phase < 1:
            raise UserError(f"model.images_per_phase: must be an integer >= 1, got {images_per_phase!r}")
        sizes = [batch_sizes] * len(resolutions) if isinstance(batch_sizes, int) else list(batch_sizes)
        if len(sizes) != len(resolutions) or any(not isinstance(b, int) or b < 1 for b in sizes):
            raise UserError(
                f"model.batch_sizes: must be one integer >= 1 or one per resolution ({len(resolutions)}), got "
                f"{list(sizes)}"
            )
        self.resolutions, self.images_per_phase, self.batch_sizes = resolutions, images_per_phase, sizes
        self.phases: list[tuple[int, bool, int]] = [(resolutions[0], False, sizes[0])]
        for resolution, size in zip(resolutions[1:], sizes[1:]):
            self.phases += [(resolution, True, size), (resolution, False, size)]
        self.steps_per_phase = [math.ceil(images_per_phase / size) for _, _, size in self.phases]

    def steps_at_resolution(self, phase: Phase) -> int:
        """Steps since `phase`'s resolution entered (its fade-in began): the EMA generator's decay ramps up anew
        there, so that its copy of the new block is not an average dominated by the block's random initial weights
        (which the paper's 800k-image phases make negligible, but short schedules do not)."""
        steps = phase.images_in_phase // phase.batch_size
        if phase.index > 0 and not phase.fading:
            steps += self.steps_per_phase[phase.index - 1]
        return steps

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_phase)

    @property
    def final_resolution(self) -> int:
        return self.resolutions[-1]

    def at(self, step: int) -> Phase:
        """The phase of the step that follows `step` completed steps."""
        images = 0
        for index, ((resolution, fading, size), steps) in enumerate(zip(self.phases, self.steps_per_phase)):
            last = index == len(self.phases) - 1
            if step < steps or last:
                shown = step * size
                alpha = min(1.0, shown / self.images_per_phase) if fading else 1.0
                return Phase(index, resolution, fading, alpha, size, shown, images + shown)
            step -= steps
            images += steps * size
        raise AssertionError("unreachable")

    def after(self, steps: int) -> Phase:
        """The phase the networks are in after `steps` completed steps: that of the last step taken, its counts and
        alpha as that step left them (a fade-in that just ended has alpha 1). What validation, grids and samples
        show: `at(steps)` is already the next phase where a phase has just ended."""
        if steps <= 0:
            return self.at(0)
        last = self.at(steps - 1)
        shown = last.images_in_phase + last.batch_size
        alpha = min(1.0, shown / self.images_per_phase) if last.fading else 1.0
        return dataclasses.replace(last, alpha=alpha, images_in_phase=shown, images=last.images + last.batch_size)

    def starts_phase(self, step: int) -> bool:
        """Whether the step that follows `step` completed steps is the first of a phase after the first one."""
        phase = self.at(step)
        return phase.index > 0 and phase.images_in_phase == 0


def resize_real(images: torch.Tensor, resolution: int, alpha: float = 1.0) -> torch.Tensor:
    """Real images at `resolution` by average pooling; in a fade-in, blended with their 2x coarser version
    (pooled, then nearest-upsampled) by `alpha`, as the generator's output is."""
    factor = images.shape[-1] // resolution
    x = F.avg_pool2d(images, factor) if factor > 1 else images
    if alpha < 1.0:
        coarse = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        x = torch.lerp(coarse, x, float(alpha))
    return x


class PGGANTask(AdversarialTask):
    """A progressive GAN: the GAN family's scorer, grids, divergence guard and sample mode, with growth phases.

    Logs per step `train/resolution`, `train/alpha` and `train/kimg` (thousands of images shown), per epoch
    `train/loss_d`, `train/loss_g`, `train/gp`, `train/drift`, `train/wasserstein` and an 8x8 grid of the EMA
    generator's samples at the resolution just trained (nearest-upsampled to the data's size). Validation and test
    score the EMA generator at the final resolution and log the resolution and alpha of the phase that was just
    trained (`val/resolution`, `val/alpha`, `test/resolution`).

    Both networks hold every block from the start, so one optimizer per network serves the whole schedule. With
    `reset_optimizer_per_phase`, their state (Adam's moments and step count, hence its bias correction) is cleared
    where each phase after the first begins, while the learning rates stay: what the paper's reference code does
    with `reset_opt_for_new_lod=True` (its default), which re-initializes the optimizers' variables, not the
    optimizers, whenever the level of detail's floor or ceiling changes: where a fade-in begins and where it ends.
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        resolutions: Sequence[int] = (4, 8, 16, 32),
        images_per_phase: int = 100_000,
        batch_sizes: int | Sequence[int] = 64,
        optimizer_g: Callable[..., torch.optim.Optimizer] | None = None,
        optimizer_d: Callable[..., torch.optim.Optimizer] | None = None,
        gp_weight: float = 10.0,
        drift_weight: float = 1e-3,
        ema_decay: float = 0.996,
        gradient_clip_val: float | None = None,
        shuffle_seed: int = 0,
        scorer: Mapping[str, Any] | None = None,
        min_class_share: float = DEFAULT_MIN_CLASS_SHARE,
        fixed_noise_seed: int = 0,
        eval_seed: int = 0,
        grid_every_n_epochs: int = 1,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/fid",
        reset_optimizer_per_phase: bool = False,
        score_samples: int = 2000,
        truncation: float | None = None,
    ) -> None:
        super().__init__(
            generator,
            discriminator,
            optimizer_g=optimizer_g,
            optimizer_d=optimizer_d,
            gp_weight=gp_weight,
            gradient_clip_val=gradient_clip_val,
            accumulate_grad_batches=1,
            scorer=scorer,
            min_class_share=min_class_share,
            fixed_noise_seed=fixed_noise_seed,
            eval_seed=eval_seed,
            grid_every_n_epochs=grid_every_n_epochs,
            ema_decay=ema_decay,
            optimizer=optimizer,
            scheduler=scheduler,
            monitor=monitor,
            score_samples=score_samples,
            truncation=truncation,
        )
        check_resolutions(resolutions, getattr(generator, "final_resolution", None))
        self.schedule = GrowthSchedule(list(resolutions), images_per_phase, batch_sizes)
        if drift_weight < 0:
            raise UserError(f"model.drift_weight: must be >= 0, got {drift_weight}")
        if not isinstance(reset_optimizer_per_phase, bool):
            raise UserError(
                f"model.reset_optimizer_per_phase: must be true or false, got {reset_optimizer_per_phase!r}"
            )
        self.reset_optimizer_per_phase = reset_optimizer_per_phase
        self.drift_weight, self.shuffle_seed = drift_weight, shuffle_seed
        self.train_drift = MeanMetric()
        self.phase_seconds: list[float] = [0.0] * len(self.schedule.phases)
        self._train_images: torch.Tensor | None = None
        self._permutation: tuple[int, torch.Tensor] | None = None

    @property
    def phase(self) -> Phase:
        """The phase of the next training step (after training: the last phase reached)."""
        return self.schedule.at(self.d_steps)

    @property
    def trained_phase(self) -> Phase:
        """The phase of the last step taken, as that step left it: what samples, grids and scores show."""
        return self.schedule.after(self.d_steps)

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """`evaluate.py mode=sample`: the fixed-noise grid at the checkpoint's phase (its step count says which)."""
        saved = load_checkpoint(str(cfg.ckpt_path))
        self.on_load_checkpoint(saved)
        return super().run_eval_mode(mode, cfg)

    # ---- setup -------------------------------------------------------------------------------------------------

    def configure_callbacks(self) -> list[Any]:
        trainer = self.trainer
        refuse_automatic_only_settings(
            trainer, "PGGAN takes one step per batch of model.batch_sizes images; change model.batch_sizes instead"
        )
        if trainer.world_size > 1:
            raise UserError("trainer.devices: PGGAN draws its own batches and trains on one device; allowed: 1")
        if trainer.datamodule is not None:  # before the scoring classifier trains, not at the first batch
            require_images_in_memory(trainer.datamodule)
        return []

    def configure_optimizers(self) -> Any:
        """One optimizer per network over all its blocks, built once; a per-step schedule spans the growth schedule
        when the run's length is left to it (`trainer.max_epochs=-1`)."""
        opt_g, opt_d = self.network_optimizers()
        if self.make_scheduler is None:
            return [opt_g, opt_d]
        estimated = float(self.trainer.estimated_stepping_batches)
        steps = int(estimated) if math.isfinite(estimated) else self.schedule.total_steps
        return [opt_g, opt_d], [self._schedule(opt_g, steps), self._schedule(opt_d, steps)]

    def on_train_start(self) -> None:
        """`trainer.max_epochs=-1` runs exactly the epochs the growth schedule needs."""
        per_epoch = max(1, int(self.trainer.num_training_batches))
        needed = math.ceil(self.schedule.total_steps / per_epoch)
        budget = max_epochs(self.trainer)
        if budget in (None, -1):
            set_max_epochs(self.trainer, needed)
        elif budget < needed and not self.trainer.fast_dev_run:
            log.warning(
                "trainer.max_epochs=%d ends the run before the growth schedule (%d epochs of %d steps); "
                "set trainer.max_epochs=-1 to run it whole",
                budget,
                needed,
                per_epoch,
            )

    # ---- training ----------------------------------------------------------------------------------------------

    def _real_batch(self, phase: Phase) -> torch.Tensor:
        """The next `batch_size` images of a stream of shuffled passes over the training set (pass e shuffled by
        (shuffle_seed, e)), at the phase's resolution and fade."""
        if self._train_images is None or self._train_images.device != self.device:
            train = require_images_in_memory(self.trainer.datamodule)
            self._train_images = (train[0] if isinstance(train, (tuple, list)) else train).to(self.device)
        total = len(self._train_images)
        positions = torch.arange(phase.images, phase.images + phase.batch_size)
        passes, offsets = positions // total, positions % total
        index = torch.empty_like(positions)
        for number in passes.unique().tolist():
            chosen = passes == number
            index[chosen] = self._pass_order(number, total)[offsets[chosen]]
        real = self._train_images[index.to(self.device)]
        return resize_real(real, phase.resolution, phase.alpha if phase.fading else 1.0)

    def _pass_order(self, number: int, total: int) -> torch.Tensor:
        if self._permutation is None or self._permutation[0] != number:
            generator = torch.Generator().manual_seed(self.shuffle_seed * 100_003 + number)
            self._permutation = (number, torch.randperm(total, generator=generator))
        return self._permutation[1]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        started = time.perf_counter()
        phase = self.phase
        resolution, alpha = phase.resolution, phase.alpha
        opt_g, opt_d = self.optimizers()
        if self.reset_optimizer_per_phase and self.schedule.starts_phase(self.d_steps):
            for optimizer in (opt_g, opt_d):
                getattr(optimizer, "optimizer", optimizer).state.clear()  # moments and step count; lr stays
        real = self._real_batch(phase)
        critic = functools.partial(self.discriminator, resolution=resolution, alpha=alpha)

        z = torch.randn(len(real), self.latent_dim, device=real.device)
        with torch.no_grad():
            fake = self.generator(z, resolution, alpha)
        d_real, d_fake = critic(real), critic(fake)
        loss_d = discriminator_loss("wasserstein", d_real, d_fake)
        penalty = gradient_penalty(critic, real, fake)
        drift = d_real.float().square().mean()  # keeps the critic's output near 0
        total_d = loss_d + self.gp_weight * penalty + self.drift_weight * drift
        self._check_finite("loss_d", total_d)
        self.manual_backward(total_d)
        self._step(opt_d, 1)
        self.d_steps += 1

        self.discriminator.requires_grad_(False)  # the generator's step needs no critic gradients
        try:
            z = torch.randn(len(real), self.latent_dim, device=real.device)
            loss_g = generator_loss("wasserstein", critic(self.generator(z, resolution, alpha)))
            self._check_finite("loss_g", loss_g)
            self.manual_backward(loss_g)
        finally:
            self.discriminator.requires_grad_(True)
        self._step(opt_g, 0)
        self.g_steps += 1
        if self.generator_ema is not None:
            self.update_generator_ema(ramped_decay(self.ema_decay, self.schedule.steps_at_resolution(phase)))

        self.train_loss_d.update(loss_d.detach())
        self.train_loss_g.update(loss_g.detach())
        self.train_gp.update(penalty.detach())
        self.train_drift.update(drift.detach())
        self.train_wasserstein.update((d_real.mean() - d_fake.mean()).detach().float())
        for name, metric in (
            ("loss_d", self.train_loss_d),
            ("loss_g", self.train_loss_g),
            ("gp", self.train_gp),
            ("drift", self.train_drift),
            ("wasserstein", self.train_wasserstein),
        ):
            self.log(f"train/{name}", metric, on_step=False, on_epoch=True, prog_bar=name.startswith("loss"))
        self.log("train/resolution", float(resolution), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/alpha", float(alpha), on_step=True, on_epoch=False)
        self.log("train/kimg", (phase.images + phase.batch_size) / 1000.0, on_step=True, on_epoch=False)
        self.phase_seconds[phase.index] += time.perf_counter() - started

    # ---- samples and scores ------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, z: torch.Tensor, ema: bool = True, final: bool = False) -> torch.Tensor:
        """Images in [-1, 1] at the data's size: of the phase just trained, nearest-upsampled (what the grids show),
        or with `final` from the final resolution's output (what is scored; that phase's alpha while it fades in)."""
        phase = self.trained_phase
        network = self.sampler if ema else self.generator
        resolution = self.schedule.final_resolution if final else phase.resolution
        alpha = phase.alpha if phase.resolution == resolution else 1.0
        images = network(z, resolution, alpha).clamp(-1.0, 1.0)
        factor = self.schedule.final_resolution // resolution
        return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.generate(z.to(self.device), ema=True)  # unconditional: run_eval_mode refuses a label

    def _fakes_to_score(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The EMA generator at the final resolution, so that no checkpoint from before the network has grown to full
        size can be the best one; the current resolution's FID (`fid_current_res`) shows progress."""
        return self.generate(z, ema=True, final=True)

    def _score_batch(self, real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        z = super()._score_batch(real, labels)
        if z is not None and self.trained_phase.resolution != self.schedule.final_resolution:
            self._scored.setdefault("fake_current", []).append(self.scorer(self.generate(z, ema=True))[0])
        return z

    def on_validation_epoch_end(self) -> None:
        if self._scored.get("real"):
            phase = self.trained_phase
            self.log("val/resolution", float(phase.resolution))
            self.log("val/alpha", float(phase.alpha))
            current = self._scored.pop("fake_current", None) or self._scored["fake"]
            self.log("val/fid_current_res", frechet_distance(torch.cat(self._scored["real"]), torch.cat(current)))
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        if self._scored.get("real"):
            self.log("test/resolution", float(self.trained_phase.resolution))
            self._scored.pop("fake_current", None)
        super().on_test_epoch_end()

    # ---- exact resume ------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        phase = self.phase
        checkpoint["pggan"] = {
            "steps": self.d_steps,
            "phase": phase.index,
            "resolution": phase.resolution,
            "alpha": phase.alpha,
            "images": phase.images,
            "phase_seconds": list(self.phase_seconds),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        seconds = checkpoint.get("pggan", {}).get("phase_seconds")
        if seconds is not None and len(seconds) == len(self.phase_seconds):
            self.phase_seconds = [float(s) for s in seconds]


def require_images_in_memory(datamodule: Any) -> Any:
    """The training split PGGAN draws its batches from by index (None before the datamodule is set up); a stream
    (data=streaming_gan) has none to index."""
    splits = getattr(datamodule, "splits", None)
    if splits is None or (splits and "train" not in splits):
        raise UserError(
            "data: PGGAN needs an in-memory datamodule with a train split (data.splits['train']), "
            f"not {type(datamodule).__name__}; allowed: data=mnist5k_pggan, cifar10_pggan, image_folder_gan"
        )
    return splits.get("train")
