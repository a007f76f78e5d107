"""Training steps per second of the zoo next to a plain PyTorch loop with the same model, data, batch and optimizer.

Why: Lightning's loop, torchmetrics, logging, checkpointing and the progress bar all add work to every step and
every epoch. Both sides run in one process, alternately, so they see the same machine, threads and load; the ratio
says what the zoo costs over the loop a user would write by hand, and the profile says where a missed target goes.

    python benchmarks/overhead.py                       # all cases on CPU, a few minutes on 2 cores
    python benchmarks/overhead.py --cases mlp --epochs 40 --repeats 3
    python benchmarks/overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import compose_config, environment, quiet_lightning, table
from omegaconf import DictConfig, OmegaConf, open_dict

if TYPE_CHECKING:
    import lightning as L
    import numpy as np
    import torch
    from lightning.pytorch.profilers import SimpleProfiler

WARMUP_EPOCHS = 1
PROFILE_EPOCHS = 5
# The zoo as a user runs it, minus the config printout (not training) and the model summary (printed before the
# timed epochs). The scheduler is off so that both sides run the same optimizer: AdamW at a constant rate.
COMMON = ["extras.print_config=false", "trainer.enable_model_summary=false", "scheduler=none"]
LEAN = [
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "callbacks.model_checkpoint=null",
    "callbacks.last_checkpoint=null",
    "+trainer.enable_checkpointing=false",
]
# Lightning's loop alone: no callback, logger, progress bar or checkpoint (the zoo's divergence guard stays)
BARE = ["callbacks=none", "logger=none", "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false"]
VARIANTS = {"zoo": [], "lean": LEAN, "bare": BARE}


class RandomCIFAR:
    """CIFAR-10-shaped noise (3x32x32, 10 classes), seeded: the speed of a ResNet without the dataset files.

    `random_cifar()` builds it as a zoo TensorDataModule.
    """

    def __init__(self, samples: int = 1920, test_samples: int = 128, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.samples, self.test_samples, self.seed = samples, test_samples, seed

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        import numpy as np

        rng = np.random.default_rng(self.seed)
        total = self.samples + self.test_samples
        x = rng.standard_normal((total, *self.input_shape), dtype=np.float32)
        y = np.arange(total) % self.num_classes
        rng.shuffle(y)
        return x[: self.samples], y[: self.samples], x[self.samples :], y[self.samples :]


@functools.cache
def _random_cifar_class() -> type[RandomCIFAR]:
    from zoo.data.tensor import TensorDataModule

    return type("RandomCIFAR", (RandomCIFAR, TensorDataModule), {})


def random_cifar(**kwargs: Any) -> RandomCIFAR:
    """A RandomCIFAR datamodule (the `_target_` of the resnet case's data)."""
    return _random_cifar_class()(**kwargs)


@dataclass
class Case:
    label: str
    overrides: list[str]
    target: float
    epochs: int
    data: dict[str, Any] | None = None


def cases(resnet_samples: int) -> dict[str, Case]:
    return {
        "mlp": Case("MLP, MNIST-1D, batch 100", ["model=mlp", "data=mnist1d"], 0.8, 30),
        "cnn": Case(
            "CNN, MNIST-1D, batch 100",
            ["experiment=cnn_mnist1d", "data.augment.shift=0"],
            0.9,
            5,
        ),
        "transformer": Case(
            "Transformer encoder (transformer_mnist1d), MNIST-1D, batch 100", ["experiment=transformer_mnist1d"], 0.9, 3
        ),
        "resnet": Case(
            "ResNet-20, random 3x32x32, batch 128",
            ["model=resnet", "data=cifar10"],
            0.95,
            2,
            data={
                "_target_": f"{random_cifar.__module__}.{random_cifar.__qualname__}",
                "input_shape": [3, 32, 32],
                "num_classes": 10,
                "batch_size": 128,
                "eval_batch_size": 1000,
                # 20% of the pool for validation leaves whole batches of 128 for training (1,536 of 1,920)
                "val_fraction": 0.2,
                "samples": resnet_samples,
                "shuffle_seed": "${seed}",
            },
        ),
    }


@dataclass
class Timing:
    steps: int
    seconds: float
    validation_seconds: float = 0.0
    profile: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.steps / self.seconds


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for queued GPU work before reading the clock; nothing to wait for on CPU."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def case_config(overrides: list[str], folder: Path, data: dict[str, Any] | None) -> DictConfig:
    cfg = compose_config(overrides, folder)
    if data is not None:
        with open_dict(cfg):
            cfg.data = OmegaConf.create(data)
    return cfg


def train_tensors(cfg: DictConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The zoo's own training split, so that the plain loop sees exactly the samples the zoo trains on."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    x, y = datamodule.splits["train"]
    return x.to(device), y.to(device)


def plain_fit(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor, epochs: int, device: torch.device) -> Timing:
    """The hand-written loop: a permutation per epoch, index batches, forward, loss, backward, AdamW, zero_grad."""
    import torch
    from hydra.utils import instantiate
    from torch import nn
    from torch.nn import functional as F

    if cfg.optimizer._target_ != "torch.optim.AdamW":
        raise ValueError(f"the plain loop runs AdamW; the zoo config chose {cfg.optimizer._target_}")
    torch.manual_seed(cfg.seed)
    net: nn.Module = instantiate(cfg.model.net).to(device).train()
    optimizer = torch.optim.AdamW(
        net.parameters(),
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )
    batch_size, total = int(cfg.data.batch_size), len(x)
    generator = torch.Generator().manual_seed(cfg.seed)
    sync = synchronizer(device)
    steps, start = 0, 0.0
    for epoch in range(WARMUP_EPOCHS + epochs):
        if epoch == WARMUP_EPOCHS:
            sync()
            steps, start = 0, time.perf_counter()
        order = torch.randperm(total, generator=generator).to(device)
        for begin in range(0, total, batch_size):
            index = order[begin : begin + batch_size]
            loss = F.cross_entropy(net(x[index]), y[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    sync()
    return Timing(steps, time.perf_counter() - start)


class EpochTimer:
    """Clock from the end of the warm-up epochs to the end of the last, less the validation loops in between.

    End to end of epochs covers whole cycles: batches, validation, checkpointing, epoch-end logging and the next
    epoch's start. Validation is subtracted because the plain loop does none; checkpoint saving, which Lightning
    runs after every other callback's `on_validation_end`, stays in. `epoch_timer()` builds it as a Lightning
    callback.
    """

    def __init__(self, warmup_epochs: int, sync: Callable[[], None], profiler: SimpleProfiler | None = None) -> None:
        self.warmup_epochs, self.sync, self.profiler = warmup_epochs, sync, profiler
        self.epochs_done = 0
        self.start = self.end = 0.0
        self.first_step = self.last_step = 0
        self.validation = 0.0
        self.validation_start: float | None = None

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs_done += 1
        if self.epochs_done == self.warmup_epochs:
            if self.profiler is not None:
                self.profiler.recorded_durations.clear()
            self.first_step, self.start = trainer.global_step, self._now()
        elif self.epochs_done > self.warmup_epochs:
            self.last_step, self.end = trainer.global_step, self._now()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.epochs_done >= self.warmup_epochs:
            self.validation_start = self._now()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validation_start is not None:
            self.validation += self._now() - self.validation_start
            self.validation_start = None

    def timing(self) -> Timing:
        if self.epochs_done <= self.warmup_epochs:
            raise RuntimeError("the run ended before its timed epochs")
        return Timing(self.last_step - self.first_step, self.end - self.start - self.validation, self.validation)


@functools.cache
def _epoch_timer_class() -> type[EpochTimer]:
    from lightning.pytorch.callbacks import Callback

    return type("EpochTimer", (EpochTimer, Callback), {})


def epoch_timer(warmup_epochs: int, sync: Callable[[], None], profiler: SimpleProfiler | None = None) -> EpochTimer:
    return _epoch_timer_class()(warmup_epochs, sync, profiler)


def zoo_fit(cfg: DictConfig, device: torch.device, profile: bool = False) -> Timing:
    """Build data, model, callbacks, loggers and trainer as zoo.run.fit_and_test does, then fit only."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.profilers import SimpleProfiler

    from zoo.run import build_model, build_trainer

    profiler = SimpleProfiler() if profile else None
    timer = epoch_timer(WARMUP_EPOCHS, synchronizer(device), profiler)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    extra = {"profiler": profiler} if profiler is not None else {}
    trainer = build_trainer(cfg, (timer,), **extra)
    trainer.fit(model, datamodule=datamodule)
    timing = timer.timing()
    if profiler is not None:
        timing.profile = {k: list(v) for k, v in profiler.recorded_durations.items()}
    return timing


@dataclass
class Result:
    name: str
    case: Case
    plain: Timing
    zoo: Timing
    lean: Timing
    bare: Timing
    medians: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.zoo.rate / self.plain.rate


def zoo_config(
    case: Case, epochs: int, device: torch.device, extra: list[str], variant: str, folder: Path
) -> DictConfig:
    overrides = [*COMMON, *case.overrides, f"trainer.max_epochs={WARMUP_EPOCHS + epochs}", *extra, *VARIANTS[variant]]
    if device.type == "cuda":
        overrides.append("trainer.accelerator=gpu")
    return case_config(overrides, folder, case.data)


def run_case(name: str, case: Case, epochs: int, repeats: int, device: torch.device, extra: list[str]) -> Result:
    """Plain and the zoo variants in turn, `repeats` times, every other time in reverse order so that a machine
    speeding up or slowing down favours none; the best rate of each counts, and the medians are kept beside it."""
    import statistics

    best: dict[str, Timing] = {}
    rates: dict[str, list[float]] = {}

    def keep(kind: str, timing: Timing) -> None:
        rates.setdefault(kind, []).append(timing.rate)
        if kind not in best or timing.rate > best[kind].rate:
            best[kind] = timing

    with tempfile.TemporaryDirectory(prefix=f"overhead_{name}_") as tmp:
        folder = Path(tmp)
        base = zoo_config(case, epochs, device, extra, "zoo", folder=folder)
        x, y = train_tensors(base, device)
        for repeat in range(repeats):
            kinds = ["plain", *VARIANTS]
            for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
                if kind == "plain":
                    keep(kind, plain_fit(base, x, y, epochs, device))
                else:
                    keep(
                        kind,
                        zoo_fit(zoo_config(case, epochs, device, extra, kind, folder / f"{kind}_{repeat}"), device),
                    )
            so_far = ", ".join(f"{kind} {best[kind].rate:.1f}" for kind in kinds)
            print(f"  {name} repeat {repeat + 1}/{repeats}: {so_far} steps/s (best so far)", flush=True)
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    return Result(name, case, best["plain"], best["zoo"], best["lean"], best["bare"], medians)


def medians_line(result: Result) -> str:
    plain = result.medians["plain"]
    others = ", ".join(
        f"{kind} {rate:.1f} ({rate / plain:.2f})" for kind, rate in result.medians.items() if kind != "plain"
    )
    return f"  {result.case.label}: plain {plain:.1f}, {others}"


def results_table(results: list[Result]) -> str:
    header = [
        "model",
        "steps",
        "plain steps/s",
        "zoo steps/s",
        "ratio",
        "zoo lean steps/s",
        "lean ratio",
        "bare Lightning steps/s",
        "bare ratio",
        "zoo overhead/step",
        "target",
        "",
    ]
    rows = [header]
    for r in results:
        overhead_us = 1e6 / r.zoo.rate - 1e6 / r.plain.rate
        rows.append(
            [
                r.case.label,
                str(r.plain.steps),
                f"{r.plain.rate:.1f}",
                f"{r.zoo.rate:.1f}",
                f"{r.ratio:.2f}",
                f"{r.lean.rate:.1f}",
                f"{r.lean.rate / r.plain.rate:.2f}",
                f"{r.bare.rate:.1f}",
                f"{r.bare.rate / r.plain.rate:.2f}",
                f"{overhead_us:.0f} us",
                f">= {r.case.target:.2f}",
                "pass" if r.ratio >= r.case.target else "MISS",
            ]
        )
    return table(rows, right={1, 2, 3, 4, 5, 6, 7, 8, 9})


def profile_table(timing: Timing, top: int) -> str:
    """SimpleProfiler's actions over the timed epochs, by total time, as a share of the timed wall clock."""
    wall = timing.seconds + timing.validation_seconds
    entries = sorted(timing.profile.items(), key=lambda item: sum(item[1]), reverse=True)
    rows = [["action", "calls", "mean", "total", "% of timed"]]
    for action, durations in entries[:top]:
        total = sum(durations)
        rows.append(
            [
                action if len(action) <= 90 else action[:87] + "...",
                str(len(durations)),
                f"{1e6 * total / len(durations):.0f} us",
                f"{total:.3f} s",
                f"{100 * total / wall:.1f}",
            ]
        )
    return table(rows, right={1, 2, 3, 4})


def step_split(timing: Timing) -> str:
    """The profiled time per step in the pieces a reader can act on."""

    def total(prefix: str, suffix: str) -> float:
        return sum(sum(d) for k, d in timing.profile.items() if k.startswith(prefix) and k.endswith(suffix))

    training = total("[Strategy]", ".training_step")
    backward = total("[Strategy]", ".backward")
    optimizer = total("[LightningModule]", ".optimizer_step") - training - backward
    rest = timing.seconds - training - backward - optimizer
    parts = {
        "training_step (forward, loss, metrics, self.log)": training,
        "backward": backward,
        "optimizer step with Lightning's closure": optimizer,
        "everything else (batch fetch, hooks, callbacks, checkpoints, epoch ends)": rest,
    }
    return "\n".join(f"  {name:<75} {1e6 * value / timing.steps:8.0f} us" for name, value in parts.items())


def load_note() -> str:
    """The machine's load next to its CPU count: other processes on the same cores make every rate noisy."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    note = f"load average {load:.1f} on {cpus} CPUs"
    if load > 0.5:
        note += ": other processes share the cores, so the rates are noisy; --threads 1 suffers least from it"
    return note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--epochs", type=int, default=None, help="timed epochs per run (default: mlp 30, cnn 5, resnet 2)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="plain/zoo alternations per case; the best counts")
    parser.add_argument("--cases", default="mlp,cnn,resnet", help="comma-separated: mlp, cnn, transformer, resnet")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides")
    parser.add_argument("--resnet-samples", type=int, default=1920, help="random CIFAR pool; 80%% of it trains")
    parser.add_argument("--profile-top", type=int, default=15, help="profiler rows printed for a missed target")
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for the zoo side, e.g. scheduler=..."
    )
    args = parser.parse_args()
    print(environment(), flush=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device)
    torch.set_num_threads(torch.get_num_threads() if args.threads is None else args.threads)
    quiet_lightning()

    available = cases(args.resnet_samples)
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in available]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(available)}")

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(load_note())
    results = []
    for name in chosen:
        case = available[name]
        epochs = args.epochs if args.epochs is not None else case.epochs
        print(f"{name}: {WARMUP_EPOCHS} warm-up + {epochs} timed epochs per run", flush=True)
        results.append(run_case(name, case, epochs, args.repeats, device, args.override))

    print(f"\n{load_note()}")
    print("Training steps per second, best of the repeats (validation excluded; zoo lean = no progress bar, no")
    print("checkpointing; bare Lightning = no callback, logger, progress bar or checkpoint either; overhead/step =")
    print("zoo's time per step minus the plain loop's)")
    print(results_table(results))
    print(
        "Median steps/s over the repeats (ratio to the plain loop's median), steadier than the best on a busy machine:"
    )
    print("\n".join(medians_line(r) for r in results))

    for r in results:
        if r.ratio >= r.case.target:
            continue
        epochs = min(args.epochs if args.epochs is not None else r.case.epochs, PROFILE_EPOCHS)
        with tempfile.TemporaryDirectory(prefix=f"overhead_{r.name}_profile_") as tmp:
            cfg = zoo_config(r.case, epochs, device, args.override, "zoo", folder=Path(tmp))
            timing = zoo_fit(cfg, device, profile=True)
        print(
            f"\n{r.name}: ratio {r.ratio:.2f} < {r.case.target:.2f}. Where the zoo's time goes (SimpleProfiler over "
            f"{epochs} timed epochs, {timing.steps} steps, {timing.rate:.1f} steps/s under the profiler; "
            f"plain loop {1e6 / r.plain.rate:.0f} us/step):"
        )
        print(profile_table(timing, args.profile_top))
        print(
            f"Per step under the profiler ({1e6 / timing.rate:.0f} us in all; the plain loop's whole step: "
            f"{1e6 / r.plain.rate:.0f} us):"
        )
        print(step_split(timing))


if __name__ == "__main__":
    main()
