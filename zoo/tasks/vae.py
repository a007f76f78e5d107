"""Variational autoencoder: the ELBO with beta and KL warm-up, its nats and bits per dimension, the importance-weighted
bound, image grids, prior samples scored like the GANs' samples, and latent interpolation.

Images arrive in [-1, 1], as the generative data configs give them (the GAN family's scorer is trained on them),
and are mapped to [0, 1]. A Bernoulli likelihood models binary pixels: a training batch is binarised afresh at
each step (dynamic binarisation) or once (static), validation and test images always once, with noise that depends
only on the image, so that every evaluation, batch size and device sees the same binary test set. A Gaussian
likelihood models grey levels, dequantised with uniform noise, so that its nats bound those of the 8-bit images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MinMetric

from zoo.errors import UserError
from zoo.metrics.generative import fid_interval, generative_scores
from zoo.metrics.scorer import DomainScorer, load_or_train_scorer, real_floor
from zoo.optim import configure_optimizers
from zoo.tasks import figures

BINARIZE = ("dynamic", "static", "none")
GRID_ROWS = 10  # prior sample grids are 10x10; a conditional VAE draws class r in row r
FAST_DEV_RUN_IW_IMAGES = 8  # a fast dev run checks that the bound runs, on this many images per batch
_MASK32 = 0xFFFFFFFF


# ---- the terms of the ELBO (per image, in nats) ----------------------------------------------------------------


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp(log_var))) || N(0, I)) in closed form: 0.5 * sum(mean^2 + var - 1 - log var)."""
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(dim=1)


def log_normal(z: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(log_var))), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mean).square() / log_var.exp()).sum(dim=-1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z) of binary pixels: minus the binary cross-entropy with logits, summed over each image."""
    return -F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").flatten(1).sum(dim=1)


def gaussian_log_likelihood(mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_scale)^2) of each pixel, with one scale per channel, summed over each image."""
    log_scale = log_scale.float().view(1, -1, *([1] * (x.ndim - 2)))
    z = (x.float() - mean.float()) / log_scale.exp()
    return (-0.5 * z.square() - log_scale - 0.5 * math.log(2 * math.pi)).flatten(1).sum(dim=1)


# ---- fixed per-image noise ---------------------------------------------------------------------------------------


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 32-bit values held in int64; the multipliers stay below 2^31, so no product overflows."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def image_noise(x01: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform [0, 1) noise for each pixel that depends only on the image's 8-bit levels, the pixel and `seed`.

    Drawing from a random generator would tie an image's noise to its batch, the batch size and the process that
    scores it; hashing its own pixels gives it the same binarisation in training, evaluate.py and any DDP split.
    """
    levels = (x01.detach().float() * 255).round().long().flatten(1)
    position = torch.arange(levels.shape[1], device=levels.device)
    weights = _hash32(position + seed * 0x27D4EB2D)
    key = (levels * weights).sum(dim=1) & _MASK32
    bits = _hash32(((key[:, None] * 0x27D4EB2D) & _MASK32) ^ _hash32(position + 0x165667B1 + seed)[None])
    return (bits.float() / 2.0**32).view_as(x01)


class VAETask(L.LightningModule):
    """Trains zoo.nn.vae.VAE on -ELBO = reconstruction + beta_t * KL, beta_t rising linearly from 0 to `beta` over
    the first `kl_warmup_steps` steps (Bowman et al., 2016), so that the decoder learns to use z before the KL
    pulls the posterior to the prior.

    Logs `train/loss` (the objective), `train/{nelbo,recon,kl,beta}`, `val/{loss,nelbo,recon,kl}`,
    `val/nelbo_best`, and at test `test/{nelbo,recon,kl,bits_per_dim}`, `test/iw_nll` and `test/iw_bits_per_dim`
    (the importance-weighted bound with `iw_samples` samples, Burda et al., 2016) and the GAN family's sample scores.
    The `*/nelbo` figures are beta = 1 bounds in nats per image whatever the objective's beta; for a conditional VAE
    they bound -log p(x | y). Validation draws reconstructions and prior samples to TensorBoard.
    """

    eval_modes = ("sample", "interpolate")

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/nelbo",
        data: Any | None = None,
        likelihood: str = "bernoulli",
        conditional: bool = False,
        beta: float = 1.0,
        kl_warmup_steps: int = 0,
        binarize: str = "dynamic",
        binarize_seed: int = 0,
        iw_samples: int = 100,
        iw_chunk: int = 10,
        eval_seed: int = 0,
        fixed_noise_seed: int = 0,
        grid_every_n_epochs: int = 1,
        scorer: Mapping[str, Any] | None = None,
        score_samples: int = 2000,
        min_class_share: float = 0.02,
    ) -> None:
        super().__init__()
        if (likelihood, conditional) != (net.likelihood, net.conditional):
            raise UserError(
                f"model.net: likelihood={net.likelihood}, conditional={net.conditional} differ from the model's "
                f"likelihood={likelihood}, conditional={conditional}; set model.likelihood / model.conditional"
            )
        if binarize not in BINARIZE:
            raise UserError(f"model.binarize: unknown '{binarize}'; allowed: {', '.join(BINARIZE)}")
        if likelihood == "bernoulli" and binarize == "none":
            raise UserError(
                "model.binarize: a Bernoulli likelihood needs binary pixels; allowed: dynamic, static "
                "(or model.likelihood=gaussian for grey levels)"
            )
        if likelihood == "gaussian" and binarize != "none":
            raise UserError("model.binarize: a Gaussian likelihood models grey levels; allowed: none")
        if beta < 0 or kl_warmup_steps < 0:
            raise UserError(f"model.beta ({beta}) and model.kl_warmup_steps ({kl_warmup_steps}) must be >= 0")
        if iw_samples < 1 or iw_chunk < 1 or score_samples < 2:
            raise UserError(
                f"model.iw_samples ({iw_samples}) and model.iw_chunk ({iw_chunk}) must be >= 1, "
                f"model.score_samples ({score_samples}) >= 2"
            )
        self.net, self.data = net, data
        self.make_optimizer, self.make_scheduler, self.monitor = optimizer, scheduler, monitor
        self.likelihood, self.conditional = likelihood, conditional
        self.binarize, self.binarize_seed = binarize, binarize_seed
        self.beta, self.kl_warmup_steps = beta, kl_warmup_steps
        self.iw_samples, self.iw_chunk, self.eval_seed = iw_samples, iw_chunk, eval_seed
        self.grid_every, self.score_samples, self.min_class_share = grid_every_n_epochs, score_samples, min_class_share
        self.scorer_spec = dict(scorer) if scorer is not None else None
        self.scorer: DomainScorer | None = None
        self.dims = math.prod(net.image_shape)
        noise = torch.randn(GRID_ROWS**2, net.latent_dim, generator=torch.Generator().manual_seed(fixed_noise_seed))
        self.register_buffer("fixed_noise", noise)  # in the checkpoint: a resumed run draws the same grid
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in ("loss", "nelbo", "recon", "kl")})
        self.test_metrics = nn.ModuleDict({k: MeanMetric() for k in ("nelbo", "recon", "kl", "iw_nll")})
        self.val_nelbo_best = MinMetric()
        self.val_nelbo_best.persistent(True)  # part of the checkpoint, so a resumed run keeps its best
        self._eval_noise: torch.Generator | None = None
        self._grid_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._real_features: list[torch.Tensor] = []

    # ---- data in, likelihood out -------------------------------------------------------------------------------

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """What the likelihood models: binary pixels, or dequantised grey levels in [0, 1]."""
        x01 = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        if self.likelihood == "gaussian":
            u = torch.rand_like(x01) if self.training else image_noise(x01, self.binarize_seed)
            return ((x01 * 255).round() + u) / 256.0
        if self.binarize == "dynamic" and self.training:
            return torch.bernoulli(x01)
        return (image_noise(x01, self.binarize_seed) < x01).float()

    def log_likelihood(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(out, x)
        return gaussian_log_likelihood(out, self.net.log_scale, x)

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's expected image in [0, 1]: what grids show and the scorer judges."""
        return torch.sigmoid(out.float()) if self.likelihood == "bernoulli" else out.float().clamp(0, 1)

    def labels(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        return batch[1] if self.conditional else None

    # ---- the loss ------------------------------------------------------------------------------------------------

    def kl_weight(self) -> float:
        """beta, ramped up linearly over the first kl_warmup_steps optimizer steps."""
        if self.kl_warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, (self.global_step + 1) / self.kl_warmup_steps)

    def elbo_terms(
        self, x: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: reconstruction -log p(x|z) at one sample z ~ q(z|x), and the closed-form KL(q(z|x) || p(z))."""
        mean, log_var = self.net.encode(x, y)
        mean, log_var = mean.float(), log_var.float()
        if noise is None:
            noise = torch.randn_like(mean)
        z = self.net.reparameterize(mean, log_var, noise)
        recon = -self.log_likelihood(self.net.decode(z, y), x)
        return recon, gaussian_kl(mean, log_var)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y = self.targets(batch[0]), self.labels(batch)
        recon, kl = self.elbo_terms(x, y)
        beta = self.kl_weight()
        loss = (recon + beta * kl).mean()
        size = len(x)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/nelbo", (recon + kl).mean().detach(), on_step=False, on_epoch=True, batch_size=size)
        self.log("train/recon", recon.mean().detach(), on_step=False, on_epoch=True, batch_size=size)
        self.log("train/kl", kl.mean().detach(), on_step=False, on_epoch=True, batch_size=size)
        self.log("train/beta", beta, on_step=False, on_epoch=True, batch_size=size)
        return loss

    @torch.no_grad()
    def iw_nll(self, x: torch.Tensor, y: torch.Tensor | None, k: int, generator: torch.Generator) -> torch.Tensor:
        """-log (1/k sum_i p(x, z_i) / q(z_i|x)), z_i ~ q(z|x): a bound on -log p(x) that tightens as k grows.

        The k samples are decoded `iw_chunk` at a time, so memory grows with the chunk, not with k.
        """
        mean, log_var = (t.float() for t in self.net.encode(x, y))
        log_weights = []
        for start in range(0, k, self.iw_chunk):
            n = min(self.iw_chunk, k - start)
            noise = torch.randn(n, *mean.shape, generator=generator).to(mean.device)
            z = self.net.reparameterize(mean, log_var, noise)  # (n, B, latent)
            out = self.net.decode(z.flatten(0, 1), None if y is None else y.repeat(n))
            log_px = self.log_likelihood(out, x.repeat(n, *([1] * (x.ndim - 1)))).view(n, -1)
            log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
            log_weights.append(log_px + log_pz - log_normal(z, mean, log_var))
        return -(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k))

    def _eval_terms(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, y = self.targets(batch[0]), self.labels(batch)
        noise = torch.randn(len(x), self.net.latent_dim, generator=self._eval_noise).to(x.device)
        return x, y, *self.elbo_terms(x, y, noise)

    def bits_per_dim(self, nats: float) -> float:
        """Nats per image as bits per pixel; a density of grey levels in [0, 1] gains log 256 per pixel for the
        8-bit images its dequantised values stand for."""
        if self.likelihood == "gaussian":
            nats += self.dims * math.log(256)
        return nats / (self.dims * math.log(2))

    # ---- validation ----------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._eval_noise = torch.Generator().manual_seed(self.eval_seed)  # the same draws at every validation

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, recon, kl = self._eval_terms(batch)
        values = {"loss": recon + self.kl_weight() * kl, "nelbo": recon + kl, "recon": recon, "kl": kl}
        for name, value in values.items():
            self.val_metrics[name].update(value)
            self.log(f"val/{name}", self.val_metrics[name], on_epoch=True, prog_bar=name == "nelbo")
        if batch_idx == 0:
            self._grid_batch = (batch[0][:32], batch[1][:32])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the untrained model's bound is no "best"
            return
        self.val_nelbo_best(self.val_metrics["nelbo"].compute())
        self.log("val/nelbo_best", self.val_nelbo_best.compute(), prog_bar=True)
        if (self.current_epoch + 1) % max(1, self.grid_every) == 0:
            self._log_grids()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Mean images decoded from the posterior means, in [0, 1]."""
        return self.mean_image(self.net(self.targets(images), labels if self.conditional else None))

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean images in [0, 1] decoded from latent codes (for a conditional VAE, with their labels)."""
        if self.conditional and labels is None:
            labels = self.grid_labels(len(z)).to(z.device)
        return self.mean_image(self.net.decode(z, labels if self.conditional else None))

    def grid_labels(self, count: int) -> torch.Tensor:
        """Class r in row r of a 10-column grid (cycling when there are fewer classes)."""
        return (torch.arange(count) // GRID_ROWS) % self.net.num_classes

    def _log_grids(self) -> None:
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or not self.trainer.is_global_zero or self._grid_batch is None:
            return
        from torchvision.utils import make_grid

        images, labels = self._grid_batch
        recon, samples = self.reconstruct(images, labels), self.sample(self.fixed_noise)
        pairs = torch.cat([(images.float() + 1) / 2, recon]).cpu()  # originals above, reconstructions below
        writer.add_image("reconstructions", make_grid(pairs, nrow=8), self.global_step)
        writer.add_image("samples/prior", make_grid(samples.cpu(), nrow=GRID_ROWS), self.global_step)

    # ---- the data's range, the scorer, and the test --------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        datamodule.setup("fit")
        low = float(datamodule.splits["train"][0].min())
        if low > -0.5:
            raise UserError(
                f"data: model=vae takes images in [-1, 1], as the generative data configs give them (mnist5k_gan, "
                f"mnist_gan, image_folder_gan); this data's darkest pixel is {low:g}"
            )
        if stage == "test" and self.scorer_spec is not None and self.scorer is None:
            quick = bool(self.trainer.fast_dev_run)
            device = self.trainer.strategy.root_device
            self.scorer = load_or_train_scorer(self.scorer_spec, datamodule, device, cache=not quick)

    def on_test_epoch_start(self) -> None:
        self._eval_noise = torch.Generator().manual_seed(self.eval_seed)
        self._real_features = []
        if self.scorer is not None:
            self.scorer.to(self.device)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, recon, kl = self._eval_terms(batch)
        for name, value in (("nelbo", recon + kl), ("recon", recon), ("kl", kl)):
            self.test_metrics[name].update(value)
            self.log(f"test/{name}", self.test_metrics[name], on_epoch=True)
        if self.trainer.fast_dev_run:
            x, y = x[:FAST_DEV_RUN_IW_IMAGES], None if y is None else y[:FAST_DEV_RUN_IW_IMAGES]
        self.test_metrics["iw_nll"].update(self.iw_nll(x, y, self.iw_samples, self._eval_noise))
        self.log("test/iw_nll", self.test_metrics["iw_nll"], on_epoch=True)
        if self.scorer is not None:
            self._real_features.append(self.scorer(batch[0])[0])

    def on_test_epoch_end(self) -> None:
        self.log("test/bits_per_dim", self.bits_per_dim(float(self.test_metrics["nelbo"].compute())))
        self.log("test/iw_bits_per_dim", self.bits_per_dim(float(self.test_metrics["iw_nll"].compute())))
        if self.scorer is None or not self._real_features:
            return
        real = torch.cat(self._real_features)
        self._real_features = []
        for name, value in self.sample_scores(real).items():
            self.log(f"test/{name}", value)
        # as many real training images as samples, against the test images
        self.log("test/fid_real_floor", real_floor(self.scorer, self.trainer.datamodule, real, self.score_samples))

    @torch.no_grad()
    def sample_scores(self, real_features: torch.Tensor) -> dict[str, float]:
        """The GAN family's scores of `score_samples` prior samples (for a conditional VAE, classes in turn, and the
        share the scorer reads as the class they were drawn for)."""
        generator = torch.Generator().manual_seed(self.eval_seed)
        fake, probs, hits = [], [], 0
        for start in range(0, self.score_samples, 500):
            n = min(500, self.score_samples - start)
            z = torch.randn(n, self.net.latent_dim, generator=generator).to(self.device)
            labels = (torch.arange(start, start + n) % self.net.num_classes).to(self.device)
            images = self.sample(z, labels)
            features, p = self.scorer(images * 2 - 1)  # the scorer takes images in [-1, 1]
            fake.append(features)
            probs.append(p)
            hits += int((p.argmax(1) == labels).sum())
        fake_features = torch.cat(fake)
        scores = generative_scores(real_features, fake_features, torch.cat(probs), self.min_class_share)
        scores["fid_low"], scores["fid_high"] = fid_interval(real_features, fake_features)  # 95% bootstrap interval
        if self.conditional:
            scores["conditional_acc"] = hits / self.score_samples
        return scores

    # ---- evaluate.py modes -----------------------------------------------------------------------------------------

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """`mode=sample`: a 10x10 grid of prior samples and the interpolation; `mode=interpolate`: only the latter."""
        from torchvision.utils import save_image

        folder = Path(cfg.paths.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if mode == "sample":
            save_image(self.eval_samples(cfg), folder / "samples.png", nrow=GRID_ROWS)
            print(f"samples written to {folder / 'samples.png'}")
        save_image(self.interpolation(), folder / "interpolation.png", nrow=12)
        print(f"latent interpolation written to {folder / 'interpolation.png'}")
        return {}

    def eval_samples(self, cfg: Any) -> torch.Tensor:
        """The run's fixed noise, or draws of `sample_seed`; `label=<class>` makes all of them that class (conditional
        VAEs only), else a conditional VAE draws class r in row r."""
        z = self.fixed_noise
        if cfg.get("sample_seed") is not None:
            z = torch.randn(len(z), self.net.latent_dim, generator=torch.Generator().manual_seed(cfg.sample_seed))
        label, labels = cfg.get("label"), None
        if label is not None:
            if not self.conditional:
                raise UserError("label: only a conditional VAE (model.conditional=true) draws a chosen class")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.net.num_classes:
                raise UserError(f"label: expected a class in 0..{self.net.num_classes - 1}, got {label!r}")
            labels = torch.full((len(z),), label, dtype=torch.long, device=self.device)
        return self.sample(z.to(self.device), labels)

    @torch.no_grad()
    def interpolation(self, pairs: int = 8, steps: int = 10) -> torch.Tensor:
        """Rows of [digit a, decoded lerp(z_a, z_b) for t in 0..1, digit b]: row r goes from the first test image of
        class r to the first of class r + 1 (z: the posterior means; a conditional VAE blends the one-hot labels the
        same way). The test split is ordered by class, so neighbouring images would mostly share one."""
        if self.data is None:
            raise UserError("mode=interpolate: the run's data is needed for its test images")
        self.data.setup("test")
        test_images, test_labels = self.data.splits["test"]
        first = torch.stack([(test_labels == c).nonzero()[0, 0] for c in test_labels.unique()])
        rows = torch.arange(pairs)
        index = torch.stack([first[rows % len(first)], first[(rows + 1) % len(first)]], dim=1).flatten()
        images, labels = test_images[index].to(self.device), test_labels[index].to(self.device)
        y = F.one_hot(labels, self.net.num_classes).float() if self.conditional else None
        mean, _ = self.net.encode(self.targets(images), y)
        t = torch.linspace(0, 1, steps, device=self.device).view(1, steps, 1)
        z = torch.lerp(mean[0::2, None], mean[1::2, None], t).flatten(0, 1)
        y_path = None if y is None else torch.lerp(y[0::2, None], y[1::2, None], t).flatten(0, 1)
        decoded = self.mean_image(self.net.decode(z, y_path)).view(pairs, steps, *images.shape[1:])
        ends = (images.float() + 1) / 2
        return torch.cat([ends[0::2, None], decoded, ends[1::2, None]], dim=1).flatten(0, 1).cpu()

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self)
