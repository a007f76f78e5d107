"""GANs trained with Lightning manual optimization: DCGAN (BCE), WGAN (weight clipping), WGAN-GP, SNGAN (hinge).

One task covers the family because the four differ only in the loss, the critic's regularizer (clipping,
gradient penalty, spectral norm inside the network) and the optimizer settings. Manual optimization is needed
for n_critic discriminator steps per generator step; gradient clipping and accumulation are done here because
Lightning does them only in automatic mode. Validation and test score the generator with a domain classifier
(zoo.metrics.generative): checkpoints keep the generator with the best validation FID.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MinMetric

from zoo.errors import UserError
from zoo.internals import is_batch_norm
from zoo.metrics.generative import frechet_distance, generative_scores
from zoo.metrics.scorer import DomainScorer, load_or_train_scorer
from zoo.tasks import figures
from zoo.tasks.adversarial import (
    LOSSES,
    check_finite,
    check_manual_optimization_settings,
    check_optimizer_group,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    ramped_decay,
    refuse_automatic_only_settings,
    update_ema,
)

log = logging.getLogger(__name__)

BACKENDS = ("domain", "torchmetrics")
GRID_SIZE = 64  # an 8x8 grid of samples from the fixed noise


class GANTask(L.LightningModule):
    """Adversarial training of `generator` against `discriminator`, one optimizer each.

    Per training batch the discriminator takes one (micro-)step; every `accumulate_grad_batches` batches its
    optimizer steps, then WGAN's weight clipping applies; after every `n_critic` discriminator steps the
    generator takes one step on as many fresh noise batches. Logs `train/loss_d`, `train/loss_g` (and
    `train/gp`, `train/wasserstein` for WGAN critics), an 8x8 grid from a fixed noise vector every
    `grid_every_n_epochs` epochs, and `val/*`, `test/*` scores from the domain classifier.

    With `ema_decay`, an exponential moving average of the generator's weights (Yazici et al., 2019) makes the
    samples, grids and scores: it smooths out the oscillation of adversarial training at no cost in steps. Its
    decay ramps up over the generator steps (`ramped_decay`).
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
        min_class_share: float = 0.0,
        fixed_noise_seed: int = 0,
        eval_seed: int = 0,
        grid_every_n_epochs: int = 1,
        ema_decay: float | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/fid",
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise UserError(f"model.loss: unknown '{loss}'; allowed: {', '.join(LOSSES)}")
        if not isinstance(n_critic, int) or n_critic < 1:
            raise UserError(f"model.n_critic: must be an integer >= 1, got {n_critic!r}")
        check_manual_optimization_settings(gradient_clip_val, accumulate_grad_batches)
        if clip_value is not None and clip_value <= 0:
            raise UserError(f"model.clip_value: must be > 0 or null, got {clip_value}")
        if gp_weight < 0:
            raise UserError(f"model.gp_weight: must be >= 0, got {gp_weight}")
        if gp_weight > 0 and any(is_batch_norm(m) for m in discriminator.modules()):
            # the penalty is a per-sample gradient norm; batch norm makes each output depend on the whole batch
            raise UserError(
                "model.discriminator.norm: batch norm mixes the samples of a batch, so the per-sample gradient "
                "penalty (model.gp_weight > 0) does not hold with it; allowed: layer, instance, none"
            )
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise UserError(f"model.ema_decay: must be in [0, 1) or null, got {ema_decay}")
        backend = (scorer or {}).get("backend", "domain")
        if backend not in BACKENDS:
            raise UserError(f"model.scorer.backend: unknown '{backend}'; allowed: {', '.join(BACKENDS)}")
        self.automatic_optimization = False
        self.generator, self.discriminator = generator, discriminator
        self.loss_kind, self.n_critic, self.clip_value, self.gp_weight = loss, n_critic, clip_value, gp_weight
        self.gradient_clip_val, self.accumulate = gradient_clip_val, accumulate_grad_batches
        check_optimizer_group(optimizer, optimizer_g, optimizer_d)
        self.make_optimizer_g = optimizer_g or optimizer
        self.make_optimizer_d = optimizer_d or optimizer
        self.make_scheduler, self.monitor = scheduler, monitor
        self.scorer_spec = dict(scorer) if scorer is not None else None
        self.min_class_share, self.eval_seed, self.grid_every = min_class_share, eval_seed, grid_every_n_epochs
        self.latent_dim = int(generator.latent_dim)
        self.ema_decay = ema_decay
        self.generator_ema = copy.deepcopy(generator).requires_grad_(False) if ema_decay is not None else None
        noise = torch.randn(GRID_SIZE, self.latent_dim, generator=torch.Generator().manual_seed(fixed_noise_seed))
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

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """`evaluate.py mode=sample`: the 8x8 grid of the fixed noise as <output_dir>/samples.png."""
        from torchvision.utils import save_image

        path = Path(cfg.paths.output_dir) / "samples.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(self.sample(self.fixed_noise).float(), path, nrow=8, normalize=True, value_range=(-1, 1))
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

    def configure_callbacks(self) -> list[Any]:
        """Lightning calls this before it checks the trainer, so settings it cannot honour fail here in one line."""
        refuse_automatic_only_settings(self.trainer)
        return []

    def network_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """One optimizer per network; the group names are the logged ones (train/lr_g, train/lr_d)."""
        if self.make_optimizer_g is None or self.make_optimizer_d is None:
            raise UserError("model.optimizer_g / model.optimizer_d: not set; give each network an optimizer config")
        opt_g = self.make_optimizer_g(params=[{"params": list(self.generator.parameters()), "name": "lr_g"}])
        opt_d = self.make_optimizer_d(params=[{"params": list(self.discriminator.parameters()), "name": "lr_d"}])
        return opt_g, opt_d

    def configure_optimizers(self) -> Any:
        opt_g, opt_d = self.network_optimizers()
        if self.make_scheduler is None:
            return [opt_g, opt_d]
        d_steps = max(1, int(self.trainer.estimated_stepping_batches) // self.accumulate)
        g_steps = max(1, d_steps // self.n_critic)
        return [opt_g, opt_d], [self._schedule(opt_g, g_steps), self._schedule(opt_d, d_steps)]

    def _schedule(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """Schedules that need the run length step with their network; the others step once per epoch."""
        if self._per_step_schedule():
            return self.make_scheduler(optimizer, total_steps=total_steps)
        return self.make_scheduler(optimizer)

    # ---- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        real = batch[0]
        z = torch.randn(len(real), self.latent_dim, device=real.device)
        with torch.no_grad():
            fake = self.generator(z)
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        loss_d = discriminator_loss(self.loss_kind, d_real, d_fake)
        total_d = loss_d
        if self.gp_weight > 0:
            penalty = gradient_penalty(self.discriminator, real, fake)
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
        if self.d_steps % self.n_critic != 0:
            return

        self.discriminator.requires_grad_(False)  # the generator's step needs no critic gradients
        try:
            for _ in range(self.accumulate):
                z = torch.randn(len(real), self.latent_dim, device=real.device)
                loss_g = generator_loss(self.loss_kind, self.discriminator(self.generator(z)))
                self._check_finite("loss_g", loss_g)
                self.manual_backward(loss_g / self.accumulate)
                self.train_loss_g.update(loss_g.detach())
        finally:
            self.discriminator.requires_grad_(True)
        self.log("train/loss_g", self.train_loss_g, on_step=False, on_epoch=True, prog_bar=True)
        self._step(opt_g, 0)
        self.g_steps += 1
        if self.generator_ema is not None:
            update_ema(self.generator_ema, self.generator, ramped_decay(self.ema_decay, self.g_steps))

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

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Images from noise with the sampling generator in eval mode (batch norm uses its running statistics)."""
        network = self.sampler
        was_training = network.training
        network.eval()
        try:
            return network(z)
        finally:
            network.train(was_training)

    def _log_grid(self) -> None:
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or not self.trainer.is_global_zero:
            return
        from torchvision.utils import make_grid

        images = self.sample(self.fixed_noise).float().cpu()
        grid = make_grid(images, nrow=8, normalize=True, value_range=(-1, 1))
        writer.add_image("samples/fixed_noise", grid, self.global_step)

    # ---- scoring -----------------------------------------------------------------------------------------------

    def _start_scoring(self) -> None:
        self._eval_noise = torch.Generator().manual_seed(self.eval_seed)  # the same samples at every evaluation
        self._scored = {"real": [], "fake": [], "probs": []}
        if self.scorer is not None:
            self.scorer.to(self.device)
        if self.inception is not None:
            for metric in self.inception.values():
                metric.reset()
                metric.to(self.device)

    def _score_batch(self, real: torch.Tensor) -> None:
        if self.scorer is None:
            return
        z = torch.randn(len(real), self.latent_dim, generator=self._eval_noise).to(real.device)
        fake = self.sampler(z)
        real_features, _ = self.scorer(real)
        fake_features, fake_probs = self.scorer(fake)
        self._scored["real"].append(real_features)
        self._scored["fake"].append(fake_features)
        self._scored["probs"].append(fake_probs)
        if self.inception is not None:
            to_rgb = lambda x: ((x.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)  # noqa: E731
            self.inception["fid"].update(to_rgb(real), real=True)
            self.inception["fid"].update(to_rgb(fake), real=False)
            self.inception["is"].update(to_rgb(fake))

    def _scores(self) -> dict[str, float]:
        real, fake, probs = (torch.cat(self._scored[k]) for k in ("real", "fake", "probs"))
        self._scored = {}
        scores = generative_scores(real, fake, probs, self.min_class_share)
        if self.inception is not None:
            scores["fid_inception"] = float(self.inception["fid"].compute())
            scores["inception_score_inception"] = float(self.inception["is"].compute()[0])
        return scores

    def on_validation_epoch_start(self) -> None:
        self._start_scoring()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._score_batch(batch[0])

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
        self._score_batch(batch[0])

    def on_test_epoch_end(self) -> None:
        if not self._scored.get("real"):
            return
        real = torch.cat(self._scored["real"])
        floor = frechet_distance(real[0::2], real[1::2])  # two halves of the real test set
        for name, value in self._scores().items():
            self.log(f"test/{name}", value)
        self.log("test/fid_real_floor", floor)

    # ---- exact resume ------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gan_steps"] = {"d_steps": self.d_steps, "g_steps": self.g_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        steps = checkpoint.get("gan_steps", {})
        self.d_steps, self.g_steps = int(steps.get("d_steps", 0)), int(steps.get("g_steps", 0))


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
