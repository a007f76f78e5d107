"""What the adversarial tasks share: the GAN losses, the gradient penalty, the generator EMA (with batch-norm
statistics recomputed for its own weights), the divergence check, the settings Lightning cannot apply under manual
optimization (GAN, PGGAN and CycleGAN import them), and `AdversarialTask`, the base of GAN and PGGAN: scoring,
grids, samples, schedules and resume state.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MinMetric

from zoo.callbacks import last_good_checkpoint
from zoo.errors import TrainingDiverged, UserError
from zoo.internals import is_batch_norm
from zoo.metrics.generative import fid_interval, generative_scores
from zoo.metrics.scorer import DomainScorer, load_or_train_scorer, real_floor
from zoo.tasks import figures

LOSSES = ("bce", "wasserstein", "hinge", "lsgan")
BACKENDS = ("domain", "torchmetrics")
GRID_SIZE = 64  # an 8x8 grid of samples from the fixed noise
STANDING_BATCH_SIZE = 64  # latent batch size of the passes that recompute the EMA generator's batch-norm statistics
STANDING_SEED_OFFSET = 1_000_003  # their noise: a stream of its own, apart from the scored samples' (eval_seed)


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
def update_ema(average: nn.Module, model: nn.Module, decay: float, copy_batch_norm_statistics: bool = True) -> None:
    """average <- decay * average + (1 - decay) * model, for parameters; buffers are copied from `model`, except,
    without `copy_batch_norm_statistics`, batch-norm statistics, left for `recompute_batch_norm_statistics`."""
    for smooth, current in zip(average.parameters(), model.parameters()):
        smooth.lerp_(current.detach().to(smooth.dtype), 1.0 - decay)
    kept = set()
    if not copy_batch_norm_statistics:
        kept = {id(b) for m in average.modules() if is_batch_norm(m) for b in m.buffers(recurse=False)}
    for smooth, current in zip(average.buffers(), model.buffers()):
        if id(smooth) not in kept:
            smooth.copy_(current)


def has_batch_norm(network: nn.Module) -> bool:
    """Whether `network` has statistics to recompute (PGGAN's pixel-normed generator has none)."""
    return any(is_batch_norm(m) for m in network.modules())


@torch.no_grad()
def recompute_batch_norm_statistics(
    network: nn.Module, latent_dim: int, batches: int, generator: torch.Generator, batch_size: int = STANDING_BATCH_SIZE
) -> None:
    """Batch-norm running statistics of `network`'s own activations: `batches` forward passes of latent batches in
    training mode, averaged with equal weights (momentum None: a cumulative average), as BigGAN's "standing
    statistics" (Brock et al., 2019) do for sampling.

    Why: a weight average is a network of its own. Statistics copied from the live generator (or averaged like the
    weights) describe other activations than the averaged weights produce, which shifts and rescales every
    normalized layer at sampling time. The noise comes from `generator`, so the global random state is untouched
    and the same weights always get the same statistics.
    """
    norms = [m for m in network.modules() if is_batch_norm(m)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    reference = next(network.parameters())
    was_training = network.training
    network.train()
    try:
        for _ in range(batches):
            z = torch.randn(batch_size, latent_dim, generator=generator)
            network(z.to(device=reference.device, dtype=reference.dtype))
    finally:
        network.train(was_training)
        for module, momentum in zip(norms, momenta):
            module.momentum = momentum


def truncated_normal(count: int, latent_dim: int, threshold: float | None, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise, each entry beyond +-threshold drawn again until it lies within (BigGAN's truncation
    trick, Brock et al., 2019); `threshold=None` leaves the noise as drawn.

    Why: noise near the centre of the prior gives the generator's most typical samples; a smaller threshold trades
    variety (recall) for fidelity (precision) at sampling time, without retraining.
    """
    z = torch.randn(count, latent_dim, generator=generator)
    if threshold is None:
        return z
    outside = z.abs() > threshold
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
        outside = z.abs() > threshold
    return z


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


class AdversarialTask(L.LightningModule):
    """What GAN and PGGAN share around their training steps: a generator and a critic with one optimizer each
    (manual optimization), the generator EMA, the fixed-noise grid, the sample mode, the domain scorer behind
    `val/*` and `test/*`, the per-network schedules, gradient clipping, and step counters for exact resume.

    With `ema_decay`, an exponential moving average of the generator's weights (Yazici et al., 2019) makes the
    samples, grids and scores: it smooths out the oscillation of adversarial training at no cost in steps. Its
    batch-norm statistics are recomputed from its own activations (`ema_bn_batches` latent batches, see
    `recompute_batch_norm_statistics`) before it samples or is scored or saved; `ema_bn_batches=0` copies the live
    generator's statistics at every update instead.
    """

    stops_on_plateau = False  # trains for its budget whatever `monitor` does (zoo.callbacks.PlateauStopping)

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        optimizer_g: Callable[..., torch.optim.Optimizer] | None,
        optimizer_d: Callable[..., torch.optim.Optimizer] | None,
        gp_weight: float,
        gradient_clip_val: float | None,
        accumulate_grad_batches: int,
        scorer: Mapping[str, Any] | None,
        min_class_share: float,
        fixed_noise_seed: int,
        eval_seed: int,
        grid_every_n_epochs: int,
        ema_decay: float | None,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., Any] | None,
        monitor: str,
        ema_bn_batches: int = 16,
        score_samples: int = 2000,
        truncation: float | None = None,
    ) -> None:
        super().__init__()
        check_manual_optimization_settings(gradient_clip_val, accumulate_grad_batches)
        if truncation is not None and (isinstance(truncation, bool) or not truncation > 0):
            raise UserError(f"model.truncation: must be a number > 0 or null (no truncation), got {truncation!r}")
        _check_penalty(gp_weight, discriminator)
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise UserError(f"model.ema_decay: must be in [0, 1) or null, got {ema_decay}")
        if isinstance(ema_bn_batches, bool) or not isinstance(ema_bn_batches, int) or ema_bn_batches < 0:
            raise UserError(f"model.ema_bn_batches: must be an integer >= 0, got {ema_bn_batches!r}")
        if not 0.0 <= min_class_share <= 1.0:
            raise UserError(f"model.min_class_share: must be in [0, 1], got {min_class_share}")
        if isinstance(score_samples, bool) or not isinstance(score_samples, int) or score_samples < 2:
            raise UserError(f"model.score_samples: must be an integer >= 2, got {score_samples!r}")
        backend = (scorer or {}).get("backend", "domain")
        if backend not in BACKENDS:
            raise UserError(f"model.scorer.backend: unknown '{backend}'; allowed: {', '.join(BACKENDS)}")
        check_optimizer_group(optimizer, optimizer_g, optimizer_d)
        self.automatic_optimization = False
        self.generator, self.discriminator, self.gp_weight = generator, discriminator, gp_weight
        self.gradient_clip_val, self.accumulate = gradient_clip_val, accumulate_grad_batches
        self.make_optimizer_g = optimizer_g or optimizer
        self.make_optimizer_d = optimizer_d or optimizer
        self.make_scheduler, self.monitor = scheduler, monitor
        self.scorer_spec = dict(scorer) if scorer is not None else None
        self.min_class_share, self.eval_seed, self.grid_every = min_class_share, eval_seed, grid_every_n_epochs
        self.score_samples, self.truncation = score_samples, truncation
        self.latent_dim = int(generator.latent_dim)
        # a conditional GAN (zoo.nn.gan.ConditionalGenerator with ProjectionDiscriminator) draws chosen classes
        self.num_classes: int | None = getattr(generator, "num_classes", None)
        if getattr(discriminator, "num_classes", None) != self.num_classes:
            raise UserError(
                "model.discriminator: a conditional generator needs a conditional critic with as many classes, and an "
                "unconditional one an unconditional critic; allowed: zoo.nn.gan.ConditionalGenerator with "
                "zoo.nn.gan.ProjectionDiscriminator, or neither"
            )
        self.ema_decay, self.ema_bn_batches = ema_decay, ema_bn_batches
        self.generator_ema = copy.deepcopy(generator).requires_grad_(False) if ema_decay is not None else None
        self._ema_statistics_stale = True  # the EMA's batch-norm statistics lag its weights until recomputed
        noise = truncated_normal(
            GRID_SIZE, self.latent_dim, truncation, torch.Generator().manual_seed(fixed_noise_seed)
        )
        self.register_buffer("fixed_noise", noise)  # in the checkpoint: a resumed run draws the same grid
        self.train_loss_d, self.train_loss_g = MeanMetric(), MeanMetric()
        self.train_gp, self.train_wasserstein = MeanMetric(), MeanMetric()
        self.val_fid_best = MinMetric()
        self.val_fid_best.persistent(True)
        self.d_steps = self.g_steps = 0
        self.scorer: DomainScorer | None = None
        self.inception: dict[str, Any] | None = None
        self._eval_noise: torch.Generator | None = None
        self._scored: dict[str, list[torch.Tensor]] = {}

    eval_modes = ("sample",)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    @property
    def grid_columns(self) -> int:
        """8, or one column per class for a conditional GAN (it draws the classes in turn)."""
        return self.num_classes if self.num_classes is not None else 8

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """`evaluate.py mode=sample`: the grid of the fixed noise as <output_dir>/samples.png; `label=<class>` makes
        every sample of a conditional GAN that class."""
        from torchvision.utils import save_image

        label, labels = cfg.get("label"), None
        if label is not None:
            if self.num_classes is None:
                raise UserError("label: only a conditional GAN (experiment=cgan_mnist) draws a chosen class")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
                raise UserError(f"label: expected a class in 0..{self.num_classes - 1}, got {label!r}")
            labels = torch.full((len(self.fixed_noise),), label, dtype=torch.long, device=self.fixed_noise.device)
        path = Path(cfg.paths.output_dir) / "samples.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        images = self.sample(self.fixed_noise, labels).float()
        save_image(images, path, nrow=self.grid_columns, normalize=True, value_range=(-1, 1))
        print(f"samples written to {path}")
        return {}

    # ---- setup -------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.scorer_spec is None or self.scorer is not None:
            return
        device = self.trainer.strategy.root_device
        if self.scorer_spec.get("backend", "domain") == "torchmetrics":
            self.inception = _torchmetrics_scores(self.scorer_spec)
        quick = bool(self.trainer.fast_dev_run)
        self.scorer = load_or_train_scorer(self.scorer_spec, self.trainer.datamodule, device, cache=not quick)

    def network_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """One optimizer per network; the group names are the logged ones (train/lr_g, train/lr_d)."""
        if self.make_optimizer_g is None or self.make_optimizer_d is None:
            raise UserError("model.optimizer_g / model.optimizer_d: not set; give each network an optimizer config")
        opt_g = self.make_optimizer_g(params=[{"params": list(self.generator.parameters()), "name": "lr_g"}])
        opt_d = self.make_optimizer_d(params=[{"params": list(self.discriminator.parameters()), "name": "lr_d"}])
        return opt_g, opt_d

    def _schedule(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """Schedules that need the run length step with their network; the others step once per epoch."""
        if self._per_step_schedule():
            return self.make_scheduler(optimizer, total_steps=total_steps)
        return self.make_scheduler(optimizer)

    @property
    def sampler(self) -> nn.Module:
        """The network that makes samples, grids and scores: the EMA generator when there is one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def _step(self, optimizer: Any, index: int) -> None:
        optimizer.step()  # gradient clipping happens in on_before_optimizer_step, after AMP unscaling
        optimizer.zero_grad(set_to_none=True)
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            scheduler = schedulers[index] if isinstance(schedulers, list) else schedulers
            if self._per_step_schedule():
                scheduler.step()

    def _per_step_schedule(self) -> bool:
        return self.make_scheduler is not None and "total_steps" in inspect.signature(self.make_scheduler).parameters

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def _check_finite(self, name: str, value: torch.Tensor) -> None:
        check_finite(name, value, self.trainer, f"epoch {self.current_epoch}, generator step {self.g_steps}")

    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is not None and self.make_scheduler is not None and not self._per_step_schedule():
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    value = self.trainer.callback_metrics.get(self.monitor)
                    if value is not None:
                        scheduler.step(float(value))
                else:
                    scheduler.step()
        if (self.current_epoch + 1) % max(1, self.grid_every) == 0:
            self._log_grid()

    def update_generator_ema(self, decay: float) -> None:
        """One EMA step of the generator's weights (and, with `ema_bn_batches=0`, a copy of its statistics)."""
        if self.generator_ema is None:
            return
        update_ema(self.generator_ema, self.generator, decay, copy_batch_norm_statistics=self.ema_bn_batches == 0)
        self._ema_statistics_stale = True

    def refresh_ema_statistics(self) -> None:
        """Recomputes the EMA generator's batch-norm statistics if its weights moved since they were last computed;
        the same weights always get the same statistics (the noise is seeded from `eval_seed`)."""
        network = self.generator_ema
        if network is None or self.ema_bn_batches == 0 or not self._ema_statistics_stale:
            return
        if has_batch_norm(network):
            noise = torch.Generator().manual_seed(self.eval_seed + STANDING_SEED_OFFSET)
            recompute_batch_norm_statistics(network, self.latent_dim, self.ema_bn_batches, noise)
        self._ema_statistics_stale = False

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images from noise with the sampling generator in eval mode (batch norm uses its running statistics); a
        conditional GAN draws `labels`, or the classes in turn."""
        self.refresh_ema_statistics()
        network = self.sampler
        was_training = network.training
        network.eval()
        try:
            return network(z) if labels is None else network(z, labels)
        finally:
            network.train(was_training)

    def _log_grid(self) -> None:
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or not self.trainer.is_global_zero:
            return
        from torchvision.utils import make_grid

        images = self.sample(self.fixed_noise).float().cpu()
        grid = make_grid(images, nrow=self.grid_columns, normalize=True, value_range=(-1, 1))
        writer.add_image("samples/fixed_noise", grid, self.global_step)

    # ---- scoring -----------------------------------------------------------------------------------------------

    def _start_scoring(self) -> None:
        self.refresh_ema_statistics()
        self._eval_noise = torch.Generator().manual_seed(self.eval_seed)  # the same samples at every evaluation
        self._scored = {"real": [], "fake": [], "probs": []}
        if self.scorer is not None:
            self.scorer.to(self.device)
        if self.inception is not None:
            for metric in self.inception.values():
                metric.reset()
                metric.to(self.device)

    def _score_batch(self, real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """Scores as many samples as real images; a conditional GAN draws the real batch's labels, and the share the
        scorer reads as the class drawn is its conditional accuracy. Returns the noise the samples came from."""
        if self.scorer is None:
            return None
        z = truncated_normal(len(real), self.latent_dim, self.truncation, self._eval_noise).to(real.device)
        fake = self._fakes_to_score(z, labels)
        self._scored["real"].append(self.scorer(real)[0])
        self._score_fakes(fake, labels)
        if self.inception is not None:
            to_rgb = lambda x: ((x.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)  # noqa: E731
            self.inception["fid"].update(to_rgb(real), real=True)
            self.inception["fid"].update(to_rgb(fake), real=False)
            self.inception["is"].update(to_rgb(fake))
        return z

    def _fakes_to_score(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.sampler(z) if labels is None else self.sampler(z, labels)

    def _score_fakes(self, fake: torch.Tensor, labels: torch.Tensor | None) -> None:
        fake_features, fake_probs = self.scorer(fake)
        self._scored["fake"].append(fake_features)
        self._scored["probs"].append(fake_probs)
        if labels is not None:
            self._scored.setdefault("hits", []).append(fake_probs.argmax(1) == labels)

    @torch.no_grad()
    def _score_more_samples(self) -> None:
        """Samples beyond one per test image, up to score_samples (a conditional GAN draws the classes in turn).

        Why: FID's bias and spread shrink with the sample count, and a test split of 1,000 images alone would give
        a noisy figure; the floor is then measured at the same count (scorer.real_floor)."""
        start = sum(len(f) for f in self._scored["fake"])
        while start < self.score_samples:
            count = min(500, self.score_samples - start)
            z = truncated_normal(count, self.latent_dim, self.truncation, self._eval_noise).to(self.device)
            labels = None
            if self.num_classes is not None:
                labels = (torch.arange(start, start + count) % self.num_classes).to(self.device)
            self._score_fakes(self._fakes_to_score(z, labels), labels)
            start += count

    def _scores(self) -> dict[str, float]:
        real, fake, probs = (torch.cat(self._scored[k]) for k in ("real", "fake", "probs"))
        hits = self._scored.get("hits", [])
        self._scored = {}
        scores = generative_scores(real, fake, probs, self.min_class_share)
        if hits:
            scores["conditional_acc"] = float(torch.cat(hits).float().mean())
        if self.inception is not None:
            scores["fid_inception"] = float(self.inception["fid"].compute())
            scores["inception_score_inception"] = float(self.inception["is"].compute()[0])
        return scores

    def on_validation_epoch_start(self) -> None:
        self._start_scoring()

    def _labels(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The batch's labels where the GAN is conditional."""
        if self.num_classes is None:
            return None
        if len(batch) < 2:
            raise UserError("model.generator: a conditional GAN needs labelled data (a data config that keeps labels)")
        return batch[1].long()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._score_batch(batch[0], self._labels(batch))

    def on_validation_epoch_end(self) -> None:
        if not self._scored.get("real"):
            return
        scores = self._scores()
        for name, value in scores.items():
            self.log(f"val/{name}", value, prog_bar=name == "fid")
        if not self.trainer.sanity_checking:  # the untrained generator's score is no "best"
            self.val_fid_best(torch.tensor(scores["fid"], device=self.device))
            self.log("val/fid_best", self.val_fid_best.compute(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self._start_scoring()

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._score_batch(batch[0], self._labels(batch))

    def on_test_epoch_end(self) -> None:
        if not self._scored.get("real"):
            return
        if not self.trainer.fast_dev_run:  # a smoke run's half-trained scorer means nothing: no extra samples
            self._score_more_samples()
        real, fake = torch.cat(self._scored["real"]), torch.cat(self._scored["fake"])
        floor = real_floor(self.scorer, self.trainer.datamodule, real, len(fake))
        low, high = fid_interval(real, fake)
        for name, value in self._scores().items():
            self.log(f"test/{name}", value)
        self.log("test/samples", float(len(fake)))
        self.log("test/fid_real_floor", floor)  # real training images against the test images, as many as samples
        self.log("test/fid_low", low)  # the 95% bootstrap interval of test/fid
        self.log("test/fid_high", high)

    # ---- exact resume ------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gan_steps"] = {"d_steps": self.d_steps, "g_steps": self.g_steps}
        if self.generator_ema is not None and self._ema_statistics_stale and self.ema_bn_batches > 0:
            # the saved EMA generator samples as it does here, also for code that reads its state_dict directly
            self.refresh_ema_statistics()
            saved = checkpoint.get("state_dict", {})
            for name, buffer in self.generator_ema.named_buffers():
                if f"generator_ema.{name}" in saved:
                    saved[f"generator_ema.{name}"] = buffer.detach().clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        steps = checkpoint.get("gan_steps", {})
        self.d_steps, self.g_steps = int(steps.get("d_steps", 0)), int(steps.get("g_steps", 0))
        self._ema_statistics_stale = True  # recomputed from the loaded weights, by this code's rule, before use


def _check_penalty(gp_weight: float, discriminator: nn.Module) -> None:
    if gp_weight < 0:
        raise UserError(f"model.gp_weight: must be >= 0, got {gp_weight}")
    if gp_weight > 0 and any(is_batch_norm(m) for m in discriminator.modules()):
        # the penalty is a per-sample gradient norm; batch norm makes each output depend on the whole batch
        raise UserError(
            "model.discriminator.norm: batch norm mixes the samples of a batch, so the per-sample gradient "
            "penalty (model.gp_weight > 0) does not hold with it; allowed: layer, instance, none"
        )


def _torchmetrics_scores(spec: Mapping[str, Any]) -> dict[str, Any]:
    """torchmetrics' Inception FID and IS, only from weights already on disk (nothing is downloaded)."""
    weights = spec.get("inception_weights")
    problem = None
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        problem = "the torch-fidelity package is not installed (pip install torch-fidelity)"
    if problem is None and (not weights or not Path(str(weights)).expanduser().is_file()):
        problem = f"no Inception weights file at model.scorer.inception_weights ({weights})"
    if problem is not None:
        raise UserError(f"model.scorer.backend: torchmetrics needs local Inception weights: {problem}; allowed: domain")
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    path = str(Path(str(weights)).expanduser())
    # InceptionScore takes no weights path: it gets the network, built from the same file
    logits = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=path)
    return {
        "fid": FrechetInceptionDistance(normalize=True, feature_extractor_weights_path=path),
        "is": InceptionScore(feature=logits, normalize=True),
    }
