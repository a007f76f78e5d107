"""The domain classifier that scores generated images without internet: a zoo CNN trained on the real data.

It is a metric's model: its penultimate features give the domain FID and its class probabilities the coverage
and class-balance scores (zoo.metrics.generative). It is trained once per dataset and cached, or taken from a
zoo classification run; training it draws from a forked random generator, so a run is the same with or
without the cache. The cache file's name carries a digest of everything the classifier learns from (`scorer_key`:
the datamodule, its split settings, the training images and labels, the classifier's own settings), so that a run
with another split never scores with a classifier that saw its validation or test images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zoo.errors import UserError
from zoo.nn.cnn import CNN
from zoo.records import atomic_write_bytes, load_checkpoint_bytes, saved_run_config

log = logging.getLogger(__name__)

# The default scorers of the bundled digits (28x28 and padded to 32x32), trained once and shipped, so that scores
# compare across machines: retrained from the same seed on one thread, a scorer still differs between CPUs whose
# float kernels differ (0.969 against 0.974 test accuracy on two machines, and precision 0.01-0.02 apart). A cache
# file of the same name, or `model.scorer.ckpt_path`, takes precedence; other settings train their own.
SHIPPED_SCORERS = Path(__file__).parent / "scorers"

# datamodule attributes that decide which images land in the training split (or how they look)
SPLIT_SETTINGS = (
    "split_seed",
    "val_fraction",
    "test_fraction",
    "train_fraction",
    "folds",
    "fold",
    "train_per_class",
    "image_size",
    "pad",
    # a streamed dataset (data=streaming_gan): where it lies and which bounded draw of it the scorer learns from
    "path",
    "score_samples",
    "score_seed",
)
# the classifier's own training settings, with the defaults `load_or_train_scorer` applies
TRAINING_SETTINGS = {
    "channels": [32, 64],
    "hidden": 128,
    "dropout": 0.3,
    "epochs": 5,
    "batch_size": 128,
    "lr": 1e-3,
    "seed": 0,
    "max_steps": None,
    # each training image is shifted by up to this many pixels and, half of the time, blurred by a Gaussian of a
    # standard deviation up to blur_sigma pixels: a judge of generated digits must read soft or off-centre strokes
    "shift": 2,
    "blur_sigma": 1.5,
}
# the blur at which the scorer's accuracy on real test images is reported beside its plain accuracy
REPORTED_BLUR_SIGMA = 1.5


class DomainScorer:
    """A classifier of the real data: penultimate features for the domain FID, class probabilities for the rest.

    Not an nn.Module attribute of the task on purpose: its weights are not part of the GAN's checkpoint.
    `pixel_range` is the range the classifier was trained on; generated images in [-1, 1] are mapped to it.
    """

    def __init__(
        self,
        net: CNN,
        pixel_range: tuple[float, float] = (-1.0, 1.0),
        accuracy: float | None = None,
        blur_accuracy: float | None = None,
    ):
        self.net = net.eval()
        self.net.requires_grad_(False)
        self.pixel_range, self.accuracy, self.blur_accuracy = pixel_range, accuracy, blur_accuracy

    def to(self, device: torch.device) -> DomainScorer:
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.pixel_range
        x = (images.float() + 1.0) / 2.0 * (high - low) + low
        hidden = self.net.head[:-1](self.net.features(x))
        logits = self.net.head[-1](hidden)
        return hidden.float(), logits.float().softmax(dim=1)


def _plain(value: Any) -> Any:
    """OmegaConf containers and tuples as JSON lists, so that equal settings give equal keys."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _tensor_digest(*tensors: torch.Tensor) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        hasher.update(str((array.dtype.str, array.shape)).encode())
        hasher.update(array.data)
    return hasher.hexdigest()


def scoring_splits(datamodule: Any) -> Any:
    """The images the scorer learns from and the floor draws: an in-memory datamodule's splits, or a streamed one's
    bounded, seeded draw of each split (`data.score_samples`), so that scoring never reads a whole stream."""
    draw = getattr(datamodule, "scoring_sample", None)
    return draw() if callable(draw) else getattr(datamodule, "splits", None)


def scorer_key(spec: Mapping[str, Any], datamodule: Any) -> dict[str, Any]:
    """Everything that changes what a cached scorer is trained on: the datamodule's class and name, its split
    settings, a digest of the training images and labels (which also covers settings this list does not name, and
    the data files themselves), the classes, and the classifier's own training settings. `datamodule` must be set
    up (its `splits` filled)."""
    x, y = scoring_splits(datamodule)["train"]
    return {
        "datamodule": type(datamodule).__name__,
        "name": _plain(getattr(datamodule, "name", None)),
        "split": {k: _plain(getattr(datamodule, k)) for k in SPLIT_SETTINGS if hasattr(datamodule, k)},
        "train": {"shape": list(x.shape), "sha256": _tensor_digest(x, y)},
        "num_classes": int(datamodule.num_classes),
        "classifier": {k: _plain(spec.get(k, default)) for k, default in TRAINING_SETTINGS.items()},
        # how a CPU trains it (one_cpu_thread): a scorer cached before that rule gets another name, and is trained again
        "cpu_threads": 1,
    }


def key_digest(key: Mapping[str, Any]) -> str:
    """A short, stable digest of a scorer key: the suffix of the cache file's name."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cached_scorer_path(spec: Mapping[str, Any], datamodule: Any, key: Mapping[str, Any] | None = None) -> Path | None:
    """Where the scorer lives: `spec.ckpt_path` when given (used as it is), else `<cache_dir>/<name>_cnn-<digest>.pt`
    with the digest of `scorer_key` (`key`, when the caller has it: it hashes the training images); while the cache
    holds no such file, the one of that name in SHIPPED_SCORERS if there is one; None (train, never cache) without
    any of them."""
    if spec.get("ckpt_path"):
        return Path(str(spec["ckpt_path"])).expanduser()
    datamodule.setup("fit")
    name = str(getattr(datamodule, "name", None) or "images")
    file_name = f"{name}_cnn-{key_digest(key if key is not None else scorer_key(spec, datamodule))}.pt"
    cached = Path(str(spec["cache_dir"])).expanduser() / file_name if spec.get("cache_dir") else None
    if (cached is None or not cached.is_file()) and (SHIPPED_SCORERS / file_name).is_file():
        return SHIPPED_SCORERS / file_name
    return cached


def load_or_train_scorer(spec: Mapping[str, Any], datamodule: Any, device: torch.device, cache: bool) -> DomainScorer:
    """The classifier at `cached_scorer_path`: a cached scorer, or a classification run's checkpoint; else train one.

    A checkpoint of `train.py experiment=cnn_mnist5k` (or any zoo classification run on the same images)
    is rebuilt from the config.yaml beside it and fed pixels in [0, 1]. Otherwise a CNN is trained on the
    training split of the GAN's own data and written to that path (not when `cache` is false: fast dev runs).
    Training runs under a forked RNG, so whether the cache existed does not change the GAN run.
    """
    datamodule.setup("fit")
    key = scorer_key(spec, datamodule)
    path = cached_scorer_path(spec, datamodule, key)
    splits = scoring_splits(datamodule)
    x, y = splits["train"]
    data = f"{type(datamodule).__name__} {list(x.shape)}"  # what the scorer was trained on
    devices = [device.index or 0] if device.type == "cuda" else []
    if path is not None and path.is_file():
        # building the network draws initial weights; from the run's RNG, they would make a run whose scorer was
        # cached differ from one that trained it
        with torch.random.fork_rng(devices=devices):
            return load_scorer(path, device, data, list(x.shape[1:]), int(datamodule.num_classes), key)
    if path is not None and path.suffix == ".ckpt":
        raise UserError(f"model.scorer.ckpt_path: no classifier checkpoint at '{path}'")
    x_val, y_val = splits["val"]
    kwargs = {
        "input_shape": list(x.shape[1:]),
        "num_classes": int(datamodule.num_classes),
        "channels": list(spec.get("channels", TRAINING_SETTINGS["channels"])),
        "hidden": int(spec.get("hidden", TRAINING_SETTINGS["hidden"])),
        "dropout": float(spec.get("dropout", TRAINING_SETTINGS["dropout"])),
    }
    max_steps = spec.get("max_steps") if cache else 1
    with torch.random.fork_rng(devices=devices), one_cpu_thread(device):
        torch.manual_seed(int(spec.get("seed", TRAINING_SETTINGS["seed"])))
        net = CNN(**kwargs).to(device)
        steps = _fit_classifier(net, x.to(device), y.to(device), spec, max_steps)
    net.eval()
    held_out = splits.get("test", (x_val, y_val))[:2]  # reported, never used to choose anything
    accuracy, blur_accuracy = (_accuracy(net, held_out[0].to(device), held_out[1].to(device), s) for s in (0, 1))
    log.info(
        "scoring classifier: %d steps, accuracy on held-out images %.4f, blurred (sigma %g) %.4f",
        steps,
        accuracy,
        REPORTED_BLUR_SIGMA,
        blur_accuracy,
    )
    if cache and path is not None:
        state = {k: v.cpu() for k, v in net.state_dict().items()}
        scorer = {
            "kind": "zoo.gan.scorer",
            "net": kwargs,
            "state_dict": state,
            "accuracy": accuracy,
            "blur_accuracy": blur_accuracy,
            "data": data,
            "key": json.dumps(key, sort_keys=True),
        }
        buffer = io.BytesIO()
        torch.save(scorer, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        log.info("scoring classifier cached at %s (sha256 %s)", path, short_digest(buffer.getvalue()))
    return DomainScorer(net, (-1.0, 1.0), accuracy, blur_accuracy)


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The block on one CPU thread (a no-op elsewhere): a multi-threaded kernel's float sums depend on the thread
    count, so otherwise the cached scorer (and every score read through it) would depend on how many threads the
    first run had."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def real_floor(scorer: DomainScorer, datamodule: Any, real_features: torch.Tensor, count: int, seed: int = 0) -> float:
    """The domain FID of `count` real training images (a fixed random draw) against the test images' features: what a
    perfect generator would score with as many samples as the generated ones. Where the data keeps no training split
    in memory, the two halves of the test images against each other (a floor at half the count)."""
    from zoo.metrics.generative import frechet_distance

    splits = scoring_splits(datamodule)
    train = splits.get("train") if isinstance(splits, Mapping) else None
    if train is None:
        return frechet_distance(real_features[0::2], real_features[1::2])
    images = training_draw(train[0], count, seed)
    device = next(scorer.net.parameters()).device
    features = torch.cat([scorer(part.to(device))[0] for part in images.split(500)])
    return frechet_distance(real_features, features)


def training_draw(images: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """The fixed random draw of `count` training images (all, if fewer) that the floor and the benchmarks score."""
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]]


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, blurred: int) -> float:
    """The share of images classified right, plain or (blurred=1) blurred by REPORTED_BLUR_SIGMA."""
    if blurred:
        x = gaussian_blur(x, torch.full((len(x),), REPORTED_BLUR_SIGMA, device=x.device))
    return float(torch.cat([net(part).argmax(1) for part in x.split(1024)]).eq(y).float().mean())


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred by a Gaussian of its own standard deviation (pixels; 0 leaves it as it is), edges
    replicated. Separable: one grouped convolution along the rows, one along the columns."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    spread = sigma.to(images.dtype).clamp_min(1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / spread) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (offsets[None, :] == 0).to(images.dtype))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (B * C, K)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=len(kernel))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=len(kernel))
    return flat.reshape(batch, channels, height, width)


def shift(images: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Each image moved by its own whole number of pixels down (rows) and right (columns), edges replicated."""
    batch, _, height, width = images.shape
    source_rows = (torch.arange(height, device=images.device)[None, :] - rows[:, None]).clamp(0, height - 1)
    source_columns = (torch.arange(width, device=images.device)[None, :] - columns[:, None]).clamp(0, width - 1)
    index = torch.arange(batch, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[index, source_rows[:, :, None], source_columns[:, None, :]].permute(0, 3, 1, 2)


def augment(images: torch.Tensor, max_shift: int, max_sigma: float) -> torch.Tensor:
    """Random shifts of up to max_shift pixels each way, and for half of the images a blur of sigma up to
    max_sigma: drawn from torch's generator, which the caller seeds."""
    batch, device = len(images), images.device
    if max_shift > 0:
        rows, columns = torch.randint(-max_shift, max_shift + 1, (2, batch), device=device)
        images = shift(images, rows, columns)
    if max_sigma > 0:
        sigma = torch.rand(batch, device=device) * max_sigma * (torch.rand(batch, device=device) < 0.5)
        images = gaussian_blur(images, sigma)
    return images


def short_digest(raw: bytes) -> str:
    """A short sha256 of a scorer file: one retrained from the same config is not bit-identical across machines or
    thread counts, and its scores shift by a few thousandths, so figures compare only under one scorer file."""
    return hashlib.sha256(raw).hexdigest()[:12]


def load_scorer(
    path: Path,
    device: torch.device,
    data: str,
    image_shape: list[int],
    num_classes: int,
    key: Mapping[str, Any] | None = None,
) -> DomainScorer:
    """A cached scorer (refused when trained on data of another kind or shape) or a classification run's network.

    A cached scorer trained under other settings than `key` (another split, say) is used, with a warning: a path
    named by hand, or by `evaluate.py scorer_ckpt_path=`, is a deliberate choice of classifier.
    """
    raw = path.read_bytes()  # read once: the digest and the checkpoint come from the same bytes
    checkpoint = load_checkpoint_bytes(raw, path, "model.scorer.ckpt_path")
    log.info("scoring classifier %s (sha256 %s)", path, short_digest(raw))
    if isinstance(checkpoint, dict) and checkpoint.get("kind") == "zoo.gan.scorer":
        if checkpoint.get("data") != data:
            raise UserError(
                f"model.scorer.ckpt_path: the classifier at '{path}' was trained on {checkpoint.get('data')}, "
                f"this run's data is {data}; give another path or delete the file"
            )
        stored = checkpoint.get("key")
        if key is not None and stored is not None and stored != json.dumps(key, sort_keys=True):
            log.warning(
                "model.scorer.ckpt_path: the classifier at '%s' was trained on other settings than this run's "
                "(split, training images or classifier settings); scores compare only under one scorer file",
                path,
            )
        net = CNN(**checkpoint["net"])
        net.load_state_dict(checkpoint["state_dict"])
        return DomainScorer(net.to(device), (-1.0, 1.0), checkpoint.get("accuracy"), checkpoint.get("blur_accuracy"))
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:  # a zoo classification run
        from hydra.utils import instantiate

        run_cfg = saved_run_config(path, key="model.scorer.ckpt_path")
        net_cfg = run_cfg.model.get("net", {})
        trained_on = (list(net_cfg.get("input_shape", [])), net_cfg.get("num_classes"))
        if trained_on != (image_shape, num_classes):
            raise UserError(
                f"model.scorer.ckpt_path: the classifier at '{path}' takes images {trained_on[0]} in "
                f"{trained_on[1]} classes, this run's data has {image_shape} in {num_classes}; "
                "give the checkpoint of a run on the same images (e.g. experiment=cnn_mnist5k for mnist5k)"
            )
        net = instantiate(net_cfg)
        if not isinstance(net, CNN):
            raise UserError(f"model.scorer.ckpt_path: '{path}' holds a {type(net).__name__}; allowed: a zoo CNN run")
        net.load_state_dict({k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
        return DomainScorer(net.to(device), (0.0, 1.0))
    raise UserError(f"model.scorer.ckpt_path: '{path}' is neither a cached scorer nor a zoo classification checkpoint")


def _fit_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: Mapping[str, Any], max_steps: Any) -> int:
    """Adam on cross-entropy for `spec.epochs` shuffled epochs (or `max_steps`) of augmented images (`augment`);
    returns the steps taken."""
    epochs = int(spec.get("epochs", TRAINING_SETTINGS["epochs"]))
    max_shift = int(spec.get("shift", TRAINING_SETTINGS["shift"]))
    max_sigma = float(spec.get("blur_sigma", TRAINING_SETTINGS["blur_sigma"]))
    batch_size = int(spec.get("batch_size", TRAINING_SETTINGS["batch_size"]))
    optimizer = torch.optim.Adam(net.parameters(), lr=float(spec.get("lr", TRAINING_SETTINGS["lr"])))
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), device=x.device)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(net(augment(x[index], max_shift, max_sigma)), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if max_steps is not None and steps >= int(max_steps):
                return steps
    return steps
