"""CycleGAN (Zhu et al., 2017): unpaired image-to-image translation with Lightning manual optimization.

Two generators (G_AB: A -> B, G_BA: B -> A) and two PatchGAN discriminators (D_A, D_B) train with the least-squares
GAN loss, a cycle-consistency loss (lambda = 10), an identity loss (0.5 lambda) and a pool of 50 earlier fakes per
domain for the discriminators. As in the paper's code, one Adam optimizer steps both generators and another both
discriminators, and the learning rate stays constant for `n_epochs` then falls linearly to zero over
`n_epochs_decay`. Manual optimization is needed because the generator and discriminator losses step different
networks from one forward pass; gradient clipping and accumulation are done here because Lightning does them only
in automatic mode.

Validation and test report the cycle reconstruction error (L1 of images in [0, 1]) in both directions and, where
the data has labels (the digit domains), the share of translations that a classifier of the target domain reads
as the source image's digit and the domain FID of translations to real target images.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MinMetric

from zoo.errors import UserError
from zoo.internals import grad_scaler
from zoo.metrics.generative import frechet_distance
from zoo.metrics.scorer import REPORTED_BLUR_SIGMA, DomainScorer, gaussian_blur, load_or_train_scorer
from zoo.tasks import figures
from zoo.tasks.adversarial import (
    check_finite,
    check_manual_optimization_settings,
    check_optimizer_group,
    discriminator_loss,
    refuse_automatic_only_settings,
)

log = logging.getLogger(__name__)

DIRECTIONS = ("AB", "BA")
LOSS_NAMES = ("loss_g_ab", "loss_g_ba", "loss_d_a", "loss_d_b", "loss_cycle", "loss_identity")


class ImagePool:
    """Shrivastava et al. (2017): the discriminators see a mix of new fakes and fakes from earlier generators.

    Until `size` images are stored, each new image is stored and returned. Then each new image is, with
    probability 0.5, returned as is; otherwise a uniformly chosen stored image is returned and the new one takes
    its place. Draws come from the pool's own generator, whose state is part of `state_dict`, so a resumed run
    returns what the uninterrupted run would have. Images are kept in float32 whatever the autocast dtype.
    """

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        if size < 0:
            raise UserError(f"model.pool_size: must be >= 0, got {size}")
        self.size, self.count = int(size), 0
        self.images: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(int(seed))

    def query(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float()
        if self.size == 0:
            return images
        if self.images is None:
            self.images = images.new_zeros((self.size, *images.shape[1:]))
        elif self.images.device != images.device:
            self.images = self.images.to(images.device)
        returned = []
        for image in images:
            if self.count < self.size:
                self.images[self.count] = image
                self.count += 1
                returned.append(image)
            elif float(torch.rand((), generator=self.generator)) > 0.5:
                slot = int(torch.randint(self.size, (), generator=self.generator))
                returned.append(self.images[slot].clone())
                self.images[slot] = image
            else:
                returned.append(image)
        return torch.stack(returned)

    def state_dict(self) -> dict[str, Any]:
        images = None if self.images is None else self.images[: self.count].cpu().clone()
        return {"size": self.size, "count": self.count, "images": images, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise UserError(
                f"model.pool_size: the checkpoint's pools hold {state['size']} images, this run {self.size}"
            )
        self.count = int(state["count"])
        self.generator.set_state(state["generator"])
        self.images = None
        if state["images"] is not None:
            stored = state["images"]
            self.images = stored.new_zeros((self.size, *stored.shape[1:]))
            self.images[: self.count] = stored


class LinearDecay:
    """LambdaLR factor of the paper's code: 1 for the first `n_epochs` epochs, then linearly down to 0.

    Epoch e (0-based) trains at lr * (1 - max(0, e + 1 - n_epochs) / (n_epochs_decay + 1)): the last epoch at
    lr / (n_epochs_decay + 1), and the line reaches zero where training ends. A class, so that the scheduler's
    state_dict keeps it.
    """

    def __init__(self, n_epochs: int, n_epochs_decay: int) -> None:
        self.n_epochs, self.n_epochs_decay = int(n_epochs), int(n_epochs_decay)

    def __call__(self, epoch: int) -> float:
        return max(0.0, 1.0 - max(0, epoch + 1 - self.n_epochs) / (self.n_epochs_decay + 1))


def lsgan_generator_loss(scores: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the discriminator's patch scores of fakes to the 'real' label 1 (no 1/2: paper)."""
    return (scores.float() - 1.0).square().mean()


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.float() - y.float()).abs().mean()


class CycleGANTask(L.LightningModule):
    """Generators `generator_ab`, `generator_ba` and discriminators `discriminator_a`, `discriminator_b`.

    `generator` and `discriminator` are factories (Hydra `_partial_` configs) called twice each. Per batch the
    generators' loss (adversarial both ways + cycle + identity) is backpropagated with the discriminators frozen,
    then the discriminators' halved LSGAN loss on real images and pooled fakes; every `accumulate_grad_batches`
    batches both optimizers step. Logs train/loss_g_ab, loss_g_ba, loss_d_a, loss_d_b, loss_cycle,
    loss_identity, the learning rates (train/lr_g, train/lr_d), rows of A -> B -> A and B -> A -> B for fixed
    test images every `grid_every_n_epochs` epochs, and val/*, test/* scores.
    """

    stops_on_plateau = False  # trains for its budget whatever `monitor` does (zoo.callbacks.PlateauStopping)

    eval_modes = ("translate",)

    def __init__(
        self,
        generator: Callable[[], nn.Module],
        discriminator: Callable[[], nn.Module],
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        pool_seed: int = 0,
        n_epochs: int = 100,
        n_epochs_decay: int = 100,
        optimizer_g: Callable[..., torch.optim.Optimizer] | None = None,
        optimizer_d: Callable[..., torch.optim.Optimizer] | None = None,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        scorer: Mapping[str, Any] | None = None,
        image_size: int | None = None,
        grid_size: int = 8,
        grid_every_n_epochs: int = 1,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/cycle_l1",
    ) -> None:
        super().__init__()
        if scheduler is not None:
            raise UserError(
                "scheduler: CycleGAN has its own schedule (constant for model.n_epochs, then linear to 0 over "
                "model.n_epochs_decay); allowed: scheduler=none"
            )
        if lambda_cycle < 0 or lambda_identity < 0:
            raise UserError(
                f"model.lambda_cycle / model.lambda_identity: must be >= 0, got {lambda_cycle}, {lambda_identity}"
            )
        check_manual_optimization_settings(gradient_clip_val, accumulate_grad_batches)
        if n_epochs < 0 or n_epochs_decay < 0:
            raise UserError(f"model.n_epochs / model.n_epochs_decay: must be >= 0, got {n_epochs}, {n_epochs_decay}")
        self.automatic_optimization = False
        self.generator_ab, self.generator_ba = generator(), generator()
        self.discriminator_a, self.discriminator_b = discriminator(), discriminator()
        self.lambda_cycle, self.lambda_identity = float(lambda_cycle), float(lambda_identity)
        self.pool_a, self.pool_b = ImagePool(pool_size, pool_seed), ImagePool(pool_size, pool_seed + 1)
        self.schedule = LinearDecay(n_epochs, n_epochs_decay)
        check_optimizer_group(optimizer, optimizer_g, optimizer_d, "pair of networks")
        self.make_optimizer_g = optimizer_g or optimizer
        self.make_optimizer_d = optimizer_d or optimizer
        self.gradient_clip_val, self.accumulate = gradient_clip_val, accumulate_grad_batches
        self.scorer_spec = dict(scorer) if scorer is not None else None
        self.image_size, self.grid_size, self.grid_every = image_size, grid_size, grid_every_n_epochs
        self.monitor = monitor
        self.train_losses = nn.ModuleDict({name: MeanMetric() for name in LOSS_NAMES})
        self.val_cycle_l1_best, self.val_fid_best = MinMetric(), MinMetric()
        self.val_cycle_l1_best.persistent(True)
        self.val_fid_best.persistent(True)
        self.steps = 0
        self.scorers: dict[str, DomainScorer] = {}
        self.preview: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scored: dict[str, list[torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, direction: str = "AB") -> torch.Tensor:
        return (self.generator_ab if direction == "AB" else self.generator_ba)(x)

    # ---- setup -------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if self.preview is None and hasattr(datamodule, "preview"):
            datamodule.setup(stage)
            self.preview = datamodule.preview(self.grid_size)
        if self.scorer_spec is None or self.scorers or not hasattr(datamodule, "domain"):
            return  # image folders have no labels to train a classifier on: cycle errors only
        device = self.trainer.strategy.root_device
        quick = bool(self.trainer.fast_dev_run)
        for domain in ("A", "B"):
            data = datamodule.domain(domain)
            self.scorers[domain] = load_or_train_scorer(domain_scorer_spec(self.scorer_spec), data, device, not quick)

    def configure_callbacks(self) -> list[Any]:
        """Lightning calls this before it checks the trainer, so settings it cannot honour fail here in one line."""
        refuse_automatic_only_settings(self.trainer)
        return []

    def configure_optimizers(self) -> Any:
        if self.make_optimizer_g is None or self.make_optimizer_d is None:
            raise UserError("model.optimizer_g / model.optimizer_d: not set; give each an optimizer config")
        generators = itertools.chain(self.generator_ab.parameters(), self.generator_ba.parameters())
        discriminators = itertools.chain(self.discriminator_a.parameters(), self.discriminator_b.parameters())
        opt_g = self.make_optimizer_g(params=[{"params": list(generators), "name": "lr_g"}])
        opt_d = self.make_optimizer_d(params=[{"params": list(discriminators), "name": "lr_d"}])
        schedulers = [
            {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, self.schedule), "interval": "epoch"}
            for opt in (opt_g, opt_d)
        ]
        return [opt_g, opt_d], schedulers

    # ---- training ----------------------------------------------------------------------------------------------

    @staticmethod
    def domains(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) from `(a, b)` or `(a, label_a, b, label_b)` batches."""
        return (batch[0], batch[1]) if len(batch) == 2 else (batch[0], batch[2])

    def on_train_epoch_start(self) -> None:
        """Epoch e trains at factor(e): stepping up to the epoch number also holds after a resume from any save."""
        for scheduler in self.lr_schedulers():
            while scheduler.last_epoch < self.current_epoch:
                scheduler.step()

    def generator_losses(self, real_a: torch.Tensor, real_b: torch.Tensor) -> tuple[dict[str, torch.Tensor], ...]:
        """The generators' four loss terms, and the fakes (B-like from A, A-like from B) the discriminators judge."""
        fake_b, fake_a = self.generator_ab(real_a), self.generator_ba(real_b)
        rec_a, rec_b = self.generator_ba(fake_b), self.generator_ab(fake_a)
        losses = {
            "loss_g_ab": lsgan_generator_loss(self.discriminator_b(fake_b)),
            "loss_g_ba": lsgan_generator_loss(self.discriminator_a(fake_a)),
            "loss_cycle": self.lambda_cycle * (l1(rec_a, real_a) + l1(rec_b, real_b)),
            "loss_identity": torch.zeros((), device=real_a.device),
        }
        if self.lambda_identity > 0:  # G_AB should leave a B image alone, G_BA an A image
            same_b, same_a = self.generator_ab(real_b), self.generator_ba(real_a)
            weight = self.lambda_cycle * self.lambda_identity
            losses["loss_identity"] = weight * (l1(same_b, real_b) + l1(same_a, real_a))
        return losses, fake_a, fake_b

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        real_a, real_b = self.domains(batch)
        discriminators = (self.discriminator_a, self.discriminator_b)
        for net in discriminators:  # the generators' step needs no discriminator gradients
            net.requires_grad_(False)
        try:
            losses, fake_a, fake_b = self.generator_losses(real_a, real_b)
            loss_g = sum(losses.values())
            self._check_finite("loss_g", loss_g)
            self.manual_backward(loss_g / self.accumulate)
        finally:
            for net in discriminators:
                net.requires_grad_(True)

        pooled_a, pooled_b = self.pool_a.query(fake_a), self.pool_b.query(fake_b)
        loss_d_a = discriminator_loss("lsgan", self.discriminator_a(real_a), self.discriminator_a(pooled_a))
        loss_d_b = discriminator_loss("lsgan", self.discriminator_b(real_b), self.discriminator_b(pooled_b))
        self._check_finite("loss_d", loss_d_a + loss_d_b)
        self.manual_backward((loss_d_a + loss_d_b) / self.accumulate)

        losses.update(loss_d_a=loss_d_a, loss_d_b=loss_d_b)
        for name in LOSS_NAMES:
            self.train_losses[name].update(losses[name].detach())
            self.log(
                f"train/{name}", self.train_losses[name], on_step=False, on_epoch=True, prog_bar=name == "loss_cycle"
            )

        last = batch_idx + 1 >= self.trainer.num_training_batches
        if (batch_idx + 1) % self.accumulate != 0 and not last:
            return
        # clipping happens in on_before_optimizer_step, after AMP unscaling
        scale = self._loss_scale()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        self._rescale_after_update(scale, discriminators)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        self.steps += 1

    def _loss_scale(self) -> float | None:
        """The 16-mixed loss scale (None without a GradScaler): one GPU sync per step, only under 16-mixed."""
        scaler = grad_scaler(self.trainer)
        return None if scaler is None else float(scaler.get_scale())

    def _rescale_after_update(self, scale: float | None, nets: tuple[nn.Module, ...]) -> None:
        """The GradScaler updates its scale after the generators' step (halved on an overflow, grown after a run of
        good steps); the discriminators' gradients were scaled by the old one, so they are brought to the new one
        before their own step unscales them."""
        new = self._loss_scale()
        if scale is None or new is None or new == scale:
            return
        for net in nets:
            for param in net.parameters():
                if param.grad is not None:
                    param.grad.mul_(new / scale)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")

    def _check_finite(self, name: str, value: torch.Tensor) -> None:
        check_finite(name, value, self.trainer, f"epoch {self.current_epoch}, step {self.steps}")

    def on_train_epoch_end(self) -> None:
        if (self.current_epoch + 1) % max(1, self.grid_every) == 0:
            self._log_grid()

    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str = "AB") -> torch.Tensor:
        """Images of one domain in the other, generators in eval mode (instance norm behaves the same in both)."""
        generator = self.generator_ab if direction == "AB" else self.generator_ba
        was_training = generator.training
        generator.eval()
        try:
            return generator(images)
        finally:
            generator.train(was_training)

    def _log_grid(self) -> None:
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or self.preview is None or not self.trainer.is_global_zero:
            return
        from torchvision.utils import make_grid

        for source, direction, tag in ((0, "AB", "translations/A_B_A"), (1, "BA", "translations/B_A_B")):
            real = self.preview[source].to(self.device)
            fake = self.translate(real, direction)
            back = self.translate(fake, direction[::-1])
            rows = torch.cat([real.float(), fake.float(), back.float()]).cpu()
            grid = make_grid(rows, nrow=len(real), normalize=True, value_range=(-1, 1))
            writer.add_image(tag, grid, self.global_step)

    # ---- scoring -----------------------------------------------------------------------------------------------

    def _start_scoring(self) -> None:
        keys = ("l1_aba", "l1_bab", "keep_ab", "keep_ba", "ab", "ba", "real_a", "real_b", "keep_real", "keep_blurred")
        self._scored = {key: [] for key in keys}
        for scorer in self.scorers.values():
            scorer.to(self.device)

    def _score_batch(self, batch: tuple[torch.Tensor, ...]) -> None:
        real_a, real_b = self.domains(batch)
        fake_b, fake_a = self.generator_ab(real_a), self.generator_ba(real_b)
        rec_a, rec_b = self.generator_ba(fake_b), self.generator_ab(fake_a)
        # L1 of images in [0, 1]: half the L1 in [-1, 1]; one value per image
        self._scored["l1_aba"].append(0.5 * (rec_a.float() - real_a.float()).abs().flatten(1).mean(1))
        self._scored["l1_bab"].append(0.5 * (rec_b.float() - real_b.float()).abs().flatten(1).mean(1))
        if not self.scorers or len(batch) != 4:
            return
        label_a, label_b = batch[1], batch[3]
        features_ab, probs_ab = self.scorers["B"](fake_b)
        features_ba, probs_ba = self.scorers["A"](fake_a)
        self._scored["keep_ab"].append((probs_ab.argmax(1) == label_a).float())
        self._scored["keep_ba"].append((probs_ba.argmax(1) == label_b).float())
        self._scored["ab"].append(features_ab)
        self._scored["ba"].append(features_ba)
        for domain, real, label in (("A", real_a, label_a), ("B", real_b, label_b)):
            features, probs = self.scorers[domain](real)
            self._scored[f"real_{domain.lower()}"].append(features)
            # the judges' own accuracy on real digits, plain and blurred: how much a soft stroke alone costs a label
            self._scored["keep_real"].append((probs.argmax(1) == label).float())
            sigma = torch.full((len(real),), REPORTED_BLUR_SIGMA, device=real.device)
            blurred = self.scorers[domain](gaussian_blur(real.float(), sigma))[1]
            self._scored["keep_blurred"].append((blurred.argmax(1) == label).float())

    def _scores(self) -> dict[str, float]:
        got = {k: torch.cat(v) for k, v in self._scored.items() if v}
        self._scored = {}
        if "l1_aba" not in got:
            return {}
        scores = {"cycle_l1_aba": float(got["l1_aba"].mean()), "cycle_l1_bab": float(got["l1_bab"].mean())}
        scores["cycle_l1"] = (scores["cycle_l1_aba"] + scores["cycle_l1_bab"]) / 2
        if "keep_ab" in got:
            scores["label_keep_ab"] = float(got["keep_ab"].mean())
            scores["label_keep_ba"] = float(got["keep_ba"].mean())
            scores["label_keep_min"] = min(scores["label_keep_ab"], scores["label_keep_ba"])
            scores["label_keep_real"] = float(got["keep_real"].mean())
            scores["label_keep_real_blurred"] = float(got["keep_blurred"].mean())
            scores["fid_ab"] = frechet_distance(got["real_b"], got["ab"])
            scores["fid_ba"] = frechet_distance(got["real_a"], got["ba"])
            scores["fid"] = (scores["fid_ab"] + scores["fid_ba"]) / 2
        return scores

    def on_validation_epoch_start(self) -> None:
        self._start_scoring()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._score_batch(batch)

    def on_validation_epoch_end(self) -> None:
        scores = self._scores()
        for name, value in scores.items():
            self.log(f"val/{name}", value, prog_bar=name in ("cycle_l1", "fid"))
        if self.trainer.sanity_checking or not scores:  # the untrained generators' scores are no "best"
            return
        self.val_cycle_l1_best(torch.tensor(scores["cycle_l1"], device=self.device))
        self.log("val/cycle_l1_best", self.val_cycle_l1_best.compute())
        if "fid" in scores:
            self.val_fid_best(torch.tensor(scores["fid"], device=self.device))
            self.log("val/fid_best", self.val_fid_best.compute(), prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self._start_scoring()

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._score_batch(batch)

    def on_test_epoch_end(self) -> None:
        for name, value in self._scores().items():
            self.log(f"test/{name}", value)

    # ---- evaluate.py mode=translate ----------------------------------------------------------------------------

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """Every image under `translate.input_dir`, translated by `translate.direction`, as PNG in `output_dir`."""
        from torchvision.utils import save_image

        from zoo.data.cyclegan import folder_images

        options = cfg.get("translate") or {}
        direction = str(options.get("direction") or "AB").upper()
        if direction not in DIRECTIONS:
            raise UserError(f"translate.direction: unknown '{direction}'; allowed: {', '.join(DIRECTIONS)}")
        if not options.get("input_dir"):
            raise UserError("translate.input_dir: not set; give a folder of images, e.g. translate.input_dir=photos")
        source = Path(str(options["input_dir"])).expanduser()
        if not source.is_dir():
            raise UserError(f"translate.input_dir: no folder {source}")
        target = Path(str(options.get("output_dir") or Path(cfg.paths.output_dir) / "translated")).expanduser()
        if target.resolve() == source.resolve():
            raise UserError(f"translate.output_dir: {target} is the input folder; give another one")
        if self.image_size is None:
            raise UserError("translate: the run's config has no model.image_size; translate needs it")
        channels = int(getattr(self.generator_ab, "in_channels", 3))
        files, load = folder_images(source, channels, int(self.image_size))
        if not files:
            raise UserError(f"translate.input_dir: no images in {source}")
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.get("accelerator") != "cpu" else "cpu")
        self.to(device)
        batch_size = int(cfg.get("batch_size") or 16)
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = torch.stack([load(f) for f in chunk]).to(device)
            translated = self.translate(images, direction).float().cpu()
            for path, image in zip(chunk, translated):
                out = target / path.relative_to(source).with_suffix(".png")
                out.parent.mkdir(parents=True, exist_ok=True)
                save_image(image, out, normalize=True, value_range=(-1, 1))
        print(f"{len(files)} images translated {direction[0]} -> {direction[1]} into {target}")
        return {}

    # ---- exact resume ------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cyclegan"] = {
            "pool_a": self.pool_a.state_dict(),
            "pool_b": self.pool_b.state_dict(),
            "steps": self.steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("cyclegan")
        if state is None:
            return
        self.pool_a.load_state_dict(state["pool_a"])
        self.pool_b.load_state_dict(state["pool_b"])
        self.steps = int(state["steps"])


def domain_scorer_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A domain classifier's cache: `<cache_dir>/<domain data name>_cnn-<digest>.pt`, the digest keyed by the
    domain's split settings and training images as a GAN's scorer is (`zoo.metrics.scorer.scorer_key`), so that
    another split or style never scores with a classifier that saw its test images. `ckpt_dir` is the key's name in
    runs saved before it was keyed."""
    folder = spec.get("cache_dir") or spec.get("ckpt_dir") or "scorers"
    return {**spec, "ckpt_path": None, "cache_dir": str(folder)}
