"""Callbacks and the checkpoint plug-in shared by every Lightning task."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelSummary
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.profilers import PassThroughProfiler

from zoo.errors import TrainingDiverged
from zoo.internals import batches_that_stepped, logs_this_step
from zoo.records import atomic_write_bytes, load_checkpoint

_summary_log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plug-in with a same-folder temporary file, weights-only loading, and the disk's part of
    every save done beside training.

    Lightning's own atomic save goes through a temporary file in the system temp folder; when the run folder is
    on another filesystem (a Docker volume, a tmpfs), the final move becomes a copy that a kill can tear.

    A save serializes the checkpoint on the calling thread (the bytes are then a snapshot that later steps cannot
    change) and hands them to one writer thread, which writes, flushes to disk and renames them in the order of the
    calls, removals of old checkpoints included: training goes on while the disk works (about a third of a small
    model's save, and most of a large one's). `wait()` returns once every save asked for is on disk and raises the
    first error of one that failed; loading, Lightning's teardown at the end of every fit, test or failure, and
    the divergence message wait first, so nothing reads a file that is still being written.
    """

    def __init__(self) -> None:
        super().__init__()
        self._writer: Any = None
        self._pending: list[Any] = []

    def _submit(self, work: Any, *args: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if any(future.done() and future.exception() is not None for future in self._pending):
            self.wait()  # a failed write stops the run at the next save rather than passing unseen
        self._pending = [future for future in self._pending if not future.done()]
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending.append(self._writer.submit(work, *args))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self._submit(atomic_write_bytes, Path(path), buffer.getvalue())

    def remove_checkpoint(self, path: Any) -> None:
        self._submit(super().remove_checkpoint, path)  # after the saves before it, like the new best it replaces

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        self.wait()
        return load_checkpoint(path)

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None


class NoProfiler(PassThroughProfiler):
    """Lightning's stand-in when no profiler is asked for, without its per-hook cost.

    Lightning wraps every hook it calls (a dozen module, strategy and callback hooks per callback and step) in
    `profiler.profile(name)`, a generator-based context manager even when it records nothing: about a thousand
    Python calls a step with the default callbacks, a sizeable share of a small network's step. One reusable null
    context does the same nothing.
    """

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.nullcontext[None]:  # type: ignore[override]
        return self._nothing


class DivergenceGuard(Callback):
    """Stop a run at the first NaN or infinite training loss, and never let non-finite weights into a checkpoint.

    The loss a training step returns is checked every step on the CPU; on an accelerator the check would wait for
    the device, so there the verdicts gather on the device and are read every `trainer.log_every_n_steps` steps.
    Tasks that optimize by hand return no loss; their logged `train/*` values are checked at the same cadence.
    Checkpoints are checked as they are written, so a run that slips past both still keeps no poisoned file.
    """

    def __init__(self) -> None:
        self._pending: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            if loss.device.type == "cpu":
                # one number read off the CPU costs less than the isfinite-and-all kernels for it
                finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss.detach()).all())
                if not finite:
                    self._stop(trainer, "the training loss", float(loss.detach().float().sum()))
            else:
                finite = torch.isfinite(loss.detach()).all()
                self._pending = finite if self._pending is None else self._pending & finite
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._check_pending_and_logged(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._check_pending_and_logged(trainer)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # metric states such as a running max start at -inf, so only the parameters are checked: first all at once
        # (the largest magnitude is NaN or infinite exactly when some weight is; one read of the device per save)
        weights = [value.detach() for value in pl_module.parameters()]
        if not weights or math.isfinite(torch.nn.utils.get_total_norm(weights, norm_type=math.inf).item()):
            return
        for name, value in pl_module.named_parameters():
            if not torch.isfinite(value.detach()).all():
                raise TrainingDiverged(
                    f"training diverged: weight {name} is not finite at epoch {trainer.current_epoch}, "
                    f"step {trainer.global_step}; no checkpoint was written with it and "
                    f"{last_good_checkpoint(trainer)}; try a lower learning rate or gradient clipping"
                )

    def _check_pending_and_logged(self, trainer: Any) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if not bool(pending):
                self._stop(trainer, "the training loss", float("nan"))
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/") and torch.is_tensor(value) and value.numel() == 1:
                number = float(value)
                if not math.isfinite(number):
                    self._stop(trainer, name, number)

    @staticmethod
    def _stop(trainer: Any, name: str, value: float) -> None:
        raise TrainingDiverged(
            f"training diverged: {name} is {value} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"{last_good_checkpoint(trainer)}; try a lower learning rate or gradient clipping"
        )


def last_good_checkpoint(trainer: Any) -> str:
    """The newest checkpoint written so far (last.ckpt on a tie): every one of them predates the divergence."""
    writer = getattr(trainer.strategy, "checkpoint_io", None)
    if isinstance(writer, AtomicCheckpointIO):
        writer.wait()
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    written = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")]
    if not written:
        return "no checkpoint was written yet"
    newest = max(written, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"))
    return f"the last good checkpoint is {newest}"


class LearningRates(Callback):
    """Log each optimizer parameter group's learning rate as `train/<group name>` every `log_every_n_steps` batches.

    Lightning's LearningRateMonitor names an optimizer without a scheduler after its class (`lr-Adam/g`), so the
    same rate would change its name with the schedule and between families; here it is always `train/lr`, or
    `train/lr_g` and `train/lr_d` for two networks. An unnamed group is `lr` (`lr_<index>` when there are several).
    """

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # written straight to the loggers at their cadence, as LearningRateMonitor does: through self.log the rates
        # would join the metrics Lightning reduces every step, about 0.2 ms a step on a small MLP
        if not trainer.loggers or not logs_this_step(trainer):
            return
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        rates = {}
        for index, group in enumerate(groups):
            name = group.get("name") or ("lr" if len(groups) == 1 else f"lr_{index}")
            rates[f"train/{name}"] = float(group["lr"])
        write_step_metrics(trainer, rates)


def write_step_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """What `self.log(name, value, on_step=True)` ends in, without its bookkeeping: the values go to every logger at
    the step Lightning would write them at, and into `trainer.callback_metrics` for the callbacks that read them.

    Through `self.log`, a value logged every `log_every_n_steps` batches costs about as much as a small network's
    whole step each time.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=batches_that_stepped(trainer))
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})


class RngState(Callback):
    """Store Python, NumPy and torch RNG states in every checkpoint and restore them on resume.

    Lightning restores weights, optimizers and loop counters but not random generators; without
    them dropout masks and augmentations after a resume differ from the uninterrupted run.
    """

    def state_dict(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": _numpy_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        name, keys, position, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _numpy_state() -> tuple[Any, ...]:
    """NumPy's state with its key array as a tensor, so checkpoints load with torch.load(weights_only=True)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached


class SaveOnInterrupt(Callback):
    """On Ctrl-C (SIGINT) or SIGTERM (what a cluster sends before it pre-empts a job), write `<dirpath>/last.ckpt`
    and exit with 128 + the signal's number: 130 or 143.

    Left to Lightning, Ctrl-C raises KeyboardInterrupt wherever the run is (inside an optimizer step, say), saves
    nothing and exits with 1, and SIGTERM ends the run at a batch end without a checkpoint and exits with 0, as if it
    had finished. While the fit loop runs, both signals here only take note; the next end of a training batch (or of
    training) writes the checkpoint, where the state is whole and resumes like any other save. Signals that arrive
    meanwhile are ignored, so a second Ctrl-C cannot cut the write short. Saving is collective: under DDP the ranks
    first agree that one of them was signalled.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        from pathlib import Path

        self.path = Path(dirpath) / filename
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        import signal
        import threading

        # a SIGTERM during setup or the sanity check went to Lightning's own handler, which only sets this flag
        self.signum = int(signal.SIGTERM) if trainer.received_sigterm else None
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set signal handlers
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_if_signalled(trainer)  # a signal during the last validation: no batch end comes after it
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()

    def _stop_if_signalled(self, trainer: Any) -> None:
        import signal
        import sys

        signalled = self.signum is not None
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled:
            return
        signum = self.signum or int(signal.SIGTERM)  # a rank that saw no signal stops like the one that did
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(
                f"stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}: saved {self.path}; resume with ckpt_path={self.path}",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(128 + signum)

    def _restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(signum, handler)
        self._previous = {}


class LayerSummary(ModelSummary):
    """Lightning's table of layers and parameter counts, without the FLOPs column and total.

    Lightning counts FLOPs only through a task's `example_input_array`, which the zoo's tasks leave unset (their
    input shapes come from the data), so the column would read 0 for every model.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary import get_human_readable_count

        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        widths = [max(len(name), *(len(str(v)) for v in values)) if values else len(name) for name, values in columns]
        rows = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths))]
        rows.append("-" * len(rows[0]))
        for i in range(len(columns[0][1])):
            rows.append(" | ".join(str(values[i]).ljust(w) for (_, values), w in zip(columns, widths)))
        rows.append("-" * len(rows[0]))
        totals = [
            (get_human_readable_count(trainable_parameters), "Trainable params"),
            (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
            (get_human_readable_count(total_parameters), "Total params"),
            (f"{model_size:,.3f}", "Total estimated model params size (MB)"),
            (str(total_training_modes.get("train", 0)), "Modules in train mode"),
            (str(total_training_modes.get("eval", 0)), "Modules in eval mode"),
        ]
        if total_flops:
            totals.append((get_human_readable_count(total_flops), "Total FLOPs"))
        rows += [f"{value:<10} {label}" for value, label in totals]
        _summary_log.info("\n" + "\n".join(rows))


class FrozenNormsInEval(Callback):
    """Keeps frozen batch-norm layers in eval mode, so their running statistics stay those they were loaded with
    (Lightning puts the whole model back in train mode at every epoch and after every validation)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = modules

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for module in self.modules:
            if module.training:
                module.eval()


class _StateKeyOnce:
    """Lightning builds a callback's `state_key` (its class name and the repr of its settings) for every hook it calls
    on it, even with no profiler: a dozen times a training step for each of the checkpoint and stopping callbacks.
    Their settings do not change after construction, so the key is computed once. Mixed in before the Lightning
    class, it keeps the class name and so the key: checkpoints of either class load into the other."""

    @functools.cached_property
    def state_key(self) -> str:
        return super().state_key  # type: ignore[misc]


class ModelCheckpoint(_StateKeyOnce, LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, cheaper at every training step: its key computed once, and a batch end that
    saves only with `every_n_train_steps` or `train_time_interval` set; without them (the zoo's configs) it returns
    before reading the trainer's state."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._every_n_train_steps >= 1 or self._train_time_interval is not None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class PlateauStopping(_StateKeyOnce, EarlyStopping):
    """Lightning's early stopping, except for tasks that train for a budget rather than to a plateau: a task whose
    `stops_on_plateau` is False (DQN: its budget of environment steps and the policy it ends with; GANs, PGGAN and
    CycleGAN: a schedule whose noisy image scores are not a loss that levels off) trains to its last epoch."""

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(pl_module, "stops_on_plateau", True):
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(pl_module, "stops_on_plateau", True):
            super().on_train_epoch_end(trainer, pl_module)


class Unfreeze(Callback):
    """`unfreeze_at_epoch`: from that epoch on, the frozen parameters train too and frozen batch-norm layers follow
    the training mode again. The optimizer holds them from the start (without a gradient they take no step), so
    nothing about it changes; a resumed run past the epoch unfreezes them again at its first epoch."""

    def __init__(self, epoch: int, parameters: list[torch.nn.Parameter], norms: FrozenNormsInEval) -> None:
        self.epoch, self.parameters, self.norms = epoch, parameters, norms

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch >= self.epoch and not all(p.requires_grad for p in self.parameters):
            for parameter in self.parameters:
                parameter.requires_grad_(True)
            self.norms.modules = []
            logging.getLogger(__name__).info(
                "unfroze %d parameter tensors at epoch %d", len(self.parameters), trainer.current_epoch
            )


class GradNorm(Callback):
    """`train/grad_norm`: the global L2 norm of the gradients before clipping, at the loggers' cadence.

    Exploding gradients (recurrent nets) show here first, and the clipping threshold is read from it. A non-finite
    norm is left out: under 16-mixed it is an overflow step that the grad scaler skips. Tasks that step their own
    optimizers (GANs, DQN) log what they need themselves.
    """

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not pl_module.automatic_optimization or not logs_this_step(trainer):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads).item()
            if math.isfinite(norm):
                write_step_metrics(trainer, {"train/grad_norm": norm})
