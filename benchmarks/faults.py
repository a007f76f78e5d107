"""What train.py and evaluate.py do when a run is killed, stopped, poisoned with NaN, or handed a crafted file.

Why: a run on a shared machine or a cluster ends in every way but the planned one (the OOM killer, pre-emption, a
diverging loss), and checkpoints and run folders arrive from elsewhere. The zoo promises that a killed run resumes
to the uninterrupted run's weights, that no kill leaves a torn checkpoint, that SIGTERM stops with last.ckpt written
and exit 143, that a NaN stops the run in one line with exit 2 and no poisoned checkpoint, and that no file it reads
runs code. The scripts run as a user runs them (subprocesses, real signals), once per family, and the outcome of
each attempt is one cell of a table.

    python benchmarks/faults.py                                   # both tables: ~150 runs, 36 min on 2 busy cores
    python benchmarks/faults.py --families classification,gan --faults a,d
    python benchmarks/faults.py --tables 2 --tmp /tmp/faults       # the payload table only, outputs kept
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import environment

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
TIMEOUT = 300.0  # seconds a subprocess, or a wait for one of its files, may take before the cell gives up
POLL = 0.01  # seconds between looks for a file a run is about to write
KILLS = 5  # fault b: runs killed at random instants
KILL_WINDOW = 1.5  # fault b: the kill comes up to this many seconds after the first checkpoint
CELL_WIDTH = 44  # a longer outcome is cut in the table; the progress line above it has all of it

QUIET = [
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# every epoch's checkpoint kept, no test pass, no TensorBoard files: the runs here only train
EVERY_EPOCH = ["callbacks.model_checkpoint.save_top_k=-1", "test=false", "logger=none"]
CPU = "trainer.accelerator=cpu"  # the comparisons of fault a are bit for bit, which the CPU kernels guarantee


# ---------------------------------------------------------------------------------------------- families


def max_epochs(n: int) -> list[str]:
    return [f"trainer.max_epochs={n}"]


def pggan_epochs(n: int) -> list[str]:
    """PGGAN's length is its growth schedule: 24 images a phase are 5 epochs of 3 steps (epoch 1 ends in the 8x8
    fade-in); longer phases stretch the schedule to about `n` epochs."""
    return [f"model.images_per_phase={24 * max(1, math.ceil(n / 5))}"]


def cyclegan_epochs(n: int) -> list[str]:
    """One epoch at the constant rate, the rest on the linear decay, so that every epoch after a kill trains at
    another learning rate."""
    return ["model.n_epochs=1", f"model.n_epochs_decay={n - 1}", f"trainer.max_epochs={n}"]


@dataclass(frozen=True)
class Family:
    name: str
    settings: tuple[str, ...]
    epochs: Callable[[int], list[str]] = max_epochs

    def args(self, corpus: Path, n: int) -> list[str]:
        """train.py's arguments for a run of about `n` epochs (`{corpus}` is the text file this script writes)."""
        return [*QUIET, CPU, *(s.format(corpus=corpus) for s in self.settings), *self.epochs(n)]


SCORER = ["model.scorer.channels=[8,16]", "model.scorer.hidden=32", "model.scorer.max_steps=5"]
RATINGS = ["data=ratings_synthetic", "data.num_users=200", "data.num_items=100", "data.num_ratings=8000"]
# seconds per run on one CPU thread: small networks, few batches an epoch, one validation batch
FAMILIES = [
    Family(
        "classification",
        ("model=mlp", "data=digits_flat", "model.net.hidden_sizes=[32]", "trainer.limit_train_batches=4"),
    ),
    Family(
        "char_lm",
        (
            "experiment=char_lm",
            "data.path={corpus}",
            "data.block_size=16",
            "data.batch_size=16",
            "data.eval_batch_size=64",
            "model.net.d_model=32",
            "model.net.n_layers=2",
            "model.sample_tokens=20",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=1",
        ),
    ),
    Family(
        "seq2seq",
        (
            "model=seq2seq",
            "data=seq2seq_reverse",
            "data.max_len=5",
            "data.num_train=512",
            "data.num_val=64",
            "data.num_test=64",
            "data.batch_size=64",
            "model.net.d_model=32",
            "model.net.encoder_layers=1",
            "model.net.decoder_layers=1",
            "model.beam_size=2",
            "trainer.limit_train_batches=4",
        ),
    ),
    Family("mf", ("experiment=mf_synthetic", *RATINGS[1:])),
    Family("mf_implicit", ("model=mf_implicit", *RATINGS, "model.net.rank=8", "optimizer=adam")),
    Family(
        "two_tower",
        (
            "model=two_tower",
            *RATINGS,
            "model.net.dim=8",
            "model.net.hidden=[16]",
            "model.net.id_dim=8",
            "optimizer=adam",
        ),
    ),
    Family(
        "dqn",
        (
            "experiment=dqn_cartpole",
            "data.steps_per_epoch=200",
            "data.eval_episodes=1",
            "data.test_episodes=1",
            "model.net.hidden_sizes=[16]",
            "model.buffer_size=500",
            "model.batch_size=16",
            "model.learning_starts=50",
            "model.train_frequency=10",
            "model.gradient_steps=2",
            "model.target_update_interval=40",
            "model.gif=false",
            "trainer.num_sanity_val_steps=0",
        ),
    ),
    Family(
        "gan",
        (
            "model=dcgan",
            "data=mnist5k_gan",
            "scheduler=none",
            "model.generator.base_channels=8",
            "model.generator.latent_dim=16",
            "model.discriminator.base_channels=8",
            *SCORER,
            "data.eval_batch_size=200",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
        ),
    ),
    Family(
        "pggan",
        (
            "experiment=pggan_mnist",
            "data.input_shape=[1,8,8]",
            "data.steps_per_epoch=3",
            "data.eval_batch_size=200",
            "model.resolutions=[4,8]",
            "model.batch_sizes=[8,4]",
            "model.generator.latent_dim=16",
            "model.generator.channel_base=64",
            "model.generator.max_channels=16",
            "model.discriminator.channel_base=64",
            "model.discriminator.max_channels=16",
            *SCORER,
            "scheduler=warmup_cosine",  # a per-step schedule over the whole growth schedule: more state to resume
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
        ),
        pggan_epochs,
    ),
    Family(
        "cyclegan",
        (
            "model=cyclegan",
            "data=digits_pair",
            "model.generator.base_channels=4",
            "model.generator.n_blocks=1",
            "model.discriminator.base_channels=4",
            "model.pool_size=4",
            "model.grid_size=4",
            "model.scorer=null",
            "data.batch_size=8",
            "data.eval_batch_size=100",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
        ),
        cyclegan_epochs,
    ),
]
TEXT = "a stitch in time saves nine; many hands make light work.\n" * 30 + "waste not, want not! " * 40


# ---------------------------------------------------------------------------------------------- running scripts


class CellError(Exception):
    """A cell that could not reach its verdict: the message is its outcome."""


@dataclass
class Finished:
    code: int
    stderr: str
    run: Path

    def last_line(self) -> str:
        """The line that says why a run ended: after a traceback, Hydra's hint about HYDRA_FULL_ERROR follows it."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        lines = [line for line in lines if not line.startswith("Set the environment variable HYDRA_FULL_ERROR")]
        return lines[-1] if lines else "(no output)"


class Bench:
    """Starts train.py and evaluate.py as a user would, from one folder (its data/ and scorer cache are shared), and
    keeps their output in files beside the run folders."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.corpus = root / "corpus.txt"
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
        for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ZOO_ROOT"):  # a run of its own, with data under root
            self.env.pop(name, None)
        self._live: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self, command: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`command` after the interpreter; stdout and stderr go to `log`.out and `log`.err (files, not pipes:
        nobody reads a pipe while a run trains, and a full one would stall it)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
            if self._stopping:  # interrupted: the cells still running end at their next start
                raise CellError("interrupted")
            process = subprocess.Popen(
                [sys.executable, *command], cwd=self.root, env=env or self.env, stdout=out, stderr=err
            )
            self._live.add(process)
        return process

    def script(
        self, name: str, args: Sequence[str], run: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """train.py or evaluate.py with run folder `run` (its logs: `run`.out, `run`.err)."""
        return self.start([str(ROOT / name), *args, f"hydra.run.dir={run}"], run, env)

    def finish(self, process: subprocess.Popen[bytes], run: Path) -> Finished:
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CellError(f"{run.name} still ran after {TIMEOUT:.0f} s") from None
        finally:
            self.stop(process)
        return Finished(code, Path(f"{run}.err").read_text(errors="replace"), run)

    def run(self, name: str, args: Sequence[str], run: Path, env: dict[str, str] | None = None) -> Finished:
        return self.finish(self.script(name, args, run, env), run)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()
        with self._lock:
            self._live.discard(process)

    def stop_all(self) -> None:
        """Kill every run still going, and start no more."""
        with self._lock:
            self._stopping = True
            live = list(self._live)
        for process in live:
            self.stop(process)


def wait_for(ready: Callable[[], bool], process: subprocess.Popen[bytes]) -> bool:
    """Polls until `ready()`; False when the process ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if process.poll() is not None:
            return ready()
        if time.monotonic() > deadline:
            raise CellError(f"nothing after {TIMEOUT:.0f} s")
        time.sleep(POLL)
    return True


def loads(path: Path) -> dict[str, Any] | None:
    """The checkpoint as the zoo reads it (weights only), or None when that fails."""
    from zoo.errors import UserError
    from zoo.records import load_checkpoint

    try:
        checkpoint = load_checkpoint(path)
    except UserError:
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def ended_early(what: str, result: Finished) -> CellError:
    return CellError(f"{what} exit {result.code}: {result.last_line()}")


# ---------------------------------------------------------------------------------------------- table 1: faults


def kill_and_resume(bench: Bench, family: Family, folder: Path) -> str:
    """a. SIGKILL right after epoch_001.ckpt appears, resume from the newest epoch checkpoint that loads, and compare
    the final weights with an uninterrupted run's."""
    args = [*family.args(bench.corpus, 4), *EVERY_EPOCH]
    full = bench.run("train.py", args, folder / "full")
    if full.code != 0:
        raise ended_early("uninterrupted run", full)
    killed = folder / "killed"
    process = bench.script("train.py", args, killed)
    try:
        appeared = wait_for((killed / "checkpoints" / "epoch_001.ckpt").exists, process)
    finally:
        bench.stop(process)
    if not appeared:
        raise CellError(f"the run ended (exit {process.returncode}) before epoch_001.ckpt")
    saved = next((p for p in sorted(killed.glob("checkpoints/epoch_*.ckpt"), reverse=True) if loads(p)), None)
    if saved is None:
        raise CellError("no epoch checkpoint of the killed run loads")
    resumed = bench.run("train.py", [*args, f"ckpt_path={saved}"], folder / "resumed")
    if resumed.code != 0:
        raise ended_early("resume", resumed)
    a, b = (loads(run / "checkpoints" / "last.ckpt") for run in (folder / "full", folder / "resumed"))
    if a is None or b is None:
        raise CellError("a final last.ckpt does not load")
    return compare(a, b, loads(saved) or {}, saved.stem)


def compare(full: dict[str, Any], resumed: dict[str, Any], saved: dict[str, Any], start: str) -> str:
    """Equal final weights and step counts, and a resumed part that trained (else equality would prove nothing)."""
    import torch

    x, y = full["state_dict"], resumed["state_dict"]
    if x.keys() != y.keys():
        return f"differs (keys: {len(x.keys() ^ y.keys())} not in both)"
    unequal = sum(not torch.equal(x[k], y[k]) for k in x)
    steps = (full.get("global_step"), resumed.get("global_step"))
    if unequal:
        return f"differs ({unequal} of {len(x)} tensors)"
    if steps[0] != steps[1]:
        return f"differs (global_step {steps[0]} vs {steps[1]})"
    start_weights = saved.get("state_dict", {})
    if start_weights.keys() == x.keys() and all(torch.equal(start_weights[k], x[k]) for k in x):
        return f"equal, but {start} already held the final weights"
    return "resumed equal" + ("" if start == "epoch_001" else f" (from {start})")


def kill_in_writes(bench: Bench, family: Family, folder: Path, shm: Path | None) -> str:
    """b. Run folders on /dev/shm, the system temp folder elsewhere: SIGKILL at KILLS random instants after the first
    checkpoint, then every *.ckpt left must load and the temp folder must hold no file (folders do not count: torch
    makes an empty one for its compile cache there on import)."""
    if shm is None:
        return "skipped: /dev/shm is not another filesystem"
    system_temp = folder / "system_temp"
    system_temp.mkdir(parents=True)
    env = {**bench.env, "TMPDIR": str(system_temp)}
    log_dir = shm / family.name
    args = [*family.args(bench.corpus, 1000), *EVERY_EPOCH]  # epoch_*.ckpt and last.ckpt every epoch
    pause = random.Random(0)  # the same instants for every family and every run of this script
    torn = in_write = finished = 0
    try:
        for attempt in range(KILLS):
            run = log_dir / f"run{attempt}"
            process = bench.start(
                [str(ROOT / "train.py"), *args, f"paths.log_dir={log_dir}", f"hydra.run.dir={run}"],
                folder / f"run{attempt}",
                env,
            )
            try:
                if not wait_for(lambda run=run: any(run.glob("checkpoints/*.ckpt")), process):
                    err = Path(f"{folder / f'run{attempt}'}.err").read_text(errors="replace").strip().splitlines()
                    raise CellError(f"run{attempt} ended (exit {process.returncode}) before a checkpoint: {err[-1:]}")
                time.sleep(pause.uniform(0.0, KILL_WINDOW))
                finished += process.poll() is not None
            finally:
                bench.stop(process)
            written = sorted(run.glob("checkpoints/*.ckpt"))
            in_write += any(run.glob("checkpoints/*.partial"))  # the kill came between a write and its rename
            torn += not written or any(loads(p) is None for p in written)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    strays = sorted(str(p.relative_to(system_temp)) for p in system_temp.rglob("*") if not p.is_dir())
    outcome = f"{KILLS}/{KILLS} loadable" if not torn else f"{torn}/{KILLS} torn"
    notes = [f"{in_write} in a write"] if in_write else []
    notes += [f"{finished} ended first"] if finished else []
    notes += [f"{len(strays)} stray in TMPDIR: {', '.join(strays[:3])}"] if strays else []
    return outcome + (f" ({'; '.join(notes)})" if notes else "")


def sigterm(bench: Bench, family: Family, folder: Path) -> str:
    """c. SIGTERM once the first checkpoint exists: exit 143 with last.ckpt written, and a resume from it ends."""
    args = [*family.args(bench.corpus, 8), *EVERY_EPOCH]
    stopped = folder / "stopped"
    process = bench.script("train.py", args, stopped)
    try:
        if not wait_for(lambda: any(stopped.glob("checkpoints/*.ckpt")), process):
            raise CellError(f"the run ended (exit {process.returncode}) before its first checkpoint")
        process.send_signal(signal.SIGTERM)
    except BaseException:
        bench.stop(process)
        raise
    result = bench.finish(process, stopped)
    problems = [] if result.code == 143 else [f"exit {result.code}"]
    if not any(line.startswith("stopped by SIGTERM") for line in result.stderr.splitlines()):
        problems.append("no 'stopped by' line")
    if "Traceback" in result.stderr:
        problems.append("traceback")
    last = stopped / "checkpoints" / "last.ckpt"
    if loads(last) is None:
        return ", ".join([*problems, "last.ckpt does not load"])
    resumed = bench.run("train.py", [*args, f"ckpt_path={last}"], folder / "resumed")
    if resumed.code != 0:
        problems.append(f"resume exit {resumed.code}: {resumed.last_line()}")
    return ", ".join(problems) if problems else "clean stop (143), resumes"


def nan_injected(bench: Bench, family: Family, folder: Path) -> str:
    """d. PoisonWeights fills the first parameter with NaN when epoch 1 starts: exit 2, one `error: training
    diverged` line, no metrics.json, and no NaN in any checkpoint left (a finite poisoned parameter in each).

    Infinities elsewhere are allowed: a metric's running best (e.g. `val_fid_best.min_value`) starts at +-inf."""
    import torch

    env = with_benchmarks_on_path(bench.env)
    args = [*family.args(bench.corpus, 3), *EVERY_EPOCH, "+callbacks.poison._target_=faults.PoisonWeights"]
    result = bench.run("train.py", args, folder / "poisoned", env)
    poisoned = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("poisoned ")]
    if not poisoned:
        return f"not poisoned (exit {result.code}): {result.last_line()}"
    problems = [] if result.code == 2 else [f"exit {result.code}"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1 or not errors[0].startswith("error: training diverged: ") or result.last_line() != errors[0]:
        problems.append(f"{len(errors)} error lines" if len(errors) != 1 else f"other error: {errors[0][7:]}")
    if "Traceback" in result.stderr:
        problems.append("traceback")
    run = result.run
    if not run.is_dir():
        return ", ".join([*problems, "run folder removed"])
    if (run / "metrics.json").exists():
        problems.append("metrics.json written")
    checkpoints = sorted(run.glob("checkpoints/*.ckpt"))
    if not checkpoints:
        problems.append("no checkpoint kept")
    for path in checkpoints:
        checkpoint = loads(path)
        if checkpoint is None:
            problems.append(f"{path.name} does not load")
            continue
        weights = checkpoint["state_dict"]
        bad = [k for k, v in weights.items() if v.is_floating_point() and torch.isnan(v).any()]
        if poisoned[0] not in weights:
            problems.append(f"{path.name} lacks {poisoned[0]}")
        elif not torch.isfinite(weights[poisoned[0]]).all():
            bad = [poisoned[0], *bad]
        if bad:
            problems.append(f"{path.name}: {len(set(bad))} poisoned ({bad[0]})")
    return ", ".join(problems) if problems else "clean stop (exit 2)"


@functools.cache
def _poison_weights() -> type:
    """The callback class of fault d, built on first use so that `--help` never imports Lightning."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class PoisonWeights(Callback):
        """Fills the first parameter with NaN when epoch `at_epoch` starts, as one exploding update would."""

        def __init__(self, at_epoch: int = 1) -> None:
            self.at_epoch = at_epoch

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch != self.at_epoch:
                return
            name, parameter = next(iter(pl_module.named_parameters()))
            with torch.no_grad():
                parameter.fill_(float("nan"))
            print(f"poisoned {name} at epoch {self.at_epoch}", file=sys.stderr, flush=True)

    PoisonWeights.__module__ = __name__
    return PoisonWeights


def __getattr__(name: str) -> Any:
    """`faults.PoisonWeights`, the `_target_` fault d gives train.py (this folder is on its PYTHONPATH)."""
    if name == "PoisonWeights":
        return _poison_weights()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FAULTS: dict[str, str] = {
    "a": "a. kill -9 mid-epoch",
    "b": "b. kill in checkpoint write",
    "c": "c. SIGTERM",
    "d": "d. NaN injected",
}


# ---------------------------------------------------------------------------------------------- table 2: payloads


def with_benchmarks_on_path(env: dict[str, str]) -> dict[str, str]:
    """`env` with this folder on PYTHONPATH, so that a subprocess can import `faults` (its callback, its payload)."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))}


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def write_pickle(path: Path, content: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)


def poison_checkpoint(path: Path, marker: Path) -> None:
    """The zoo's own checkpoint with one more entry, which runs code as it is unpickled."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"] = {"note": Payload(marker)}
    write_pickle(path, checkpoint)


def poison_config(run: Path, target: str, marker: Path) -> None:
    """`data` of the run's config.yaml becomes a call of `target` that would create `marker` if it ran."""
    from omegaconf import OmegaConf

    if target == "pathlib.Path.touch":
        node: dict[str, Any] = {"_target_": target, "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}]}
    else:  # a loader with code execution allowed, pointed at a pickle that creates the marker
        pickle = run.parent / "payload.pkl"
        write_pickle(pickle, {"x": Payload(marker)})
        node = {"_target_": target, "_args_": [str(pickle)], "weights_only": False}
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data = node
    OmegaConf.save(cfg, run / "config.yaml")


@dataclass(frozen=True)
class Runs:
    """The finished runs every payload cell copies before it tampers with the copy."""

    classification: Path
    gan: Path
    xgboost: Path
    scorer: Path


CLASSIFICATION = [*QUIET, "model=mlp", "data=digits_flat", "model.net.hidden_sizes=[32]", "logger=none"]
CLASSIFICATION += ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]
GAN = [*QUIET, CPU, *FAMILIES[7].settings, "trainer.max_epochs=1", "trainer.limit_test_batches=1", "logger=none"]
XGBOOST = ["extras.print_config=false", "experiment=xgb_breast_cancer", "model.n_estimators=50", "logger=none"]
PAYLOADS = {
    "none": "no payload",
    "pickle": "pickle: Path.touch",
    "pathlib.Path.touch": "_target_ pathlib.Path.touch",
    "torch.load": "_target_ torch.load",
    "zoo.tasks.gan.torch.load": "_target_ zoo.tasks.gan.torch.load",
}
ENTRIES = {
    "resume": "train.py ckpt_path=... (resume)",
    "score": "evaluate.py ckpt_path=...",
    "val": "evaluate.py ckpt_path=... split=val",
    "sample": "evaluate.py ckpt_path=<GAN> mode=sample",
    "scorer": "evaluate.py ckpt_path=<GAN> scorer_ckpt_path=...",
    "xgboost": "evaluate.py ckpt_path=<XGBoost run>/model.json",
    "control": "control: trust_config=true / the payload's call",
}
REFUSALS = ("refused to load", "outside the zoo's allow-list", "is not a readable")


def prepare_runs(bench: Bench, folder: Path) -> Runs:
    runs = Runs(folder / "classification", folder / "gan", folder / "xgboost", bench.root / "data/scorers")
    for args, run in ((CLASSIFICATION, runs.classification), (GAN, runs.gan), (XGBOOST, runs.xgboost)):
        result = bench.run("train.py", args, run)
        if result.code != 0:
            raise ended_early(f"the {run.name} run", result)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from zoo.metrics.scorer import cached_scorer_path

    gan = OmegaConf.load(runs.gan / "config.yaml")
    scorer = cached_scorer_path(gan.model.scorer, instantiate(gan.data))
    if scorer is None:
        raise RuntimeError("the GAN run caches no scorer (model.scorer.cache_dir is null)")
    return Runs(runs.classification, runs.gan, runs.xgboost, scorer if scorer.is_absolute() else bench.root / scorer)


def payload_cell(bench: Bench, runs: Runs, entry: str, payload: str, folder: Path) -> str:
    """Copy the run the entry point needs, plant the payload, run the entry point, and look for the marker."""
    marker = folder / "marker"
    source = {"sample": runs.gan, "scorer": runs.gan, "xgboost": runs.xgboost}.get(entry, runs.classification)
    run = folder / "run"
    shutil.copytree(source, run)
    ckpt = run / ("model.json" if entry == "xgboost" else "checkpoints/last.ckpt")
    scorer = folder / "scorer.pt"
    shutil.copyfile(runs.scorer, scorer)
    if payload == "pickle" and entry == "scorer":
        write_pickle(scorer, {"kind": "zoo.gan.scorer", "net": Payload(marker)})
    elif payload == "pickle" and entry == "xgboost":
        write_pickle(ckpt, {"booster": Payload(marker)})  # a pickle under the model's name
    elif payload == "pickle":
        poison_checkpoint(ckpt, marker)
    elif payload != "none":
        poison_config(run, payload, marker)

    if entry == "control" and payload == "pickle":
        # what an unpickler would call for the payload, called without unpickling anything
        caller = (
            "import sys, pathlib; from faults import Payload; "
            "f, a = Payload(pathlib.Path(sys.argv[1])).__reduce__(); f(*a)"
        )
        env = with_benchmarks_on_path(bench.env)
        result = bench.finish(bench.start(["-c", caller, str(marker)], folder / "load", env), folder / "load")
    elif entry == "resume":
        result = bench.run("train.py", [*CLASSIFICATION, f"ckpt_path={ckpt}"], folder / "resumed")
    else:
        extra = {
            "val": ["split=val"],
            "sample": ["mode=sample"],
            "scorer": [f"scorer_ckpt_path={scorer}"],
            "control": ["trust_config=true"],
        }.get(entry, [])
        result = bench.run("evaluate.py", [f"ckpt_path={ckpt}", *extra], folder / "evaluated")
    return verdict(result, marker, payload, control=entry == "control")


def verdict(result: Finished, marker: Path, payload: str, control: bool) -> str:
    if control:
        return "payload live" if marker.exists() else f"inert (exit {result.code})"
    if marker.exists():
        return "EXECUTED"
    if result.code == 0:
        return "ok (exit 0)" if payload == "none" else "not read (exit 0)"
    if result.code == 2 and result.last_line().startswith("error:"):
        if payload != "none" and any(words in result.last_line() for words in REFUSALS):
            return "refused (exit 2)"
        return f"other error (exit 2): {result.last_line()[7:]}"
    return f"exit {result.code}: {result.last_line()}"


# ---------------------------------------------------------------------------------------------- main


@dataclass
class Cell:
    row: str
    column: str
    work: Callable[[], str]


def run_cells(bench: Bench, cells: list[Cell], jobs: int, started: float) -> dict[tuple[str, str], str]:
    """Every cell on a pool of `jobs` threads, each waiting on its own subprocesses; a cell that fails says why."""
    outcomes: dict[tuple[str, str], str] = {}

    def one(cell: Cell) -> tuple[str, float]:
        begin = time.perf_counter()
        try:
            outcome = cell.work()
        except Exception as error:  # noqa: BLE001 - any crash is this cell's outcome, and the table goes on
            outcome = f"failed: {str(error).strip() or type(error).__name__}"
        return outcome, time.perf_counter() - begin

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(one, cell): cell for cell in cells}
        try:
            for future in concurrent.futures.as_completed(futures):
                cell = futures[future]
                outcome, seconds = future.result()
                outcomes[(cell.row, cell.column)] = outcome
                elapsed = time.perf_counter() - started
                print(f"[{elapsed:5.0f} s] {cell.row} | {cell.column}: {outcome} ({seconds:.0f} s)", flush=True)
        except BaseException:  # Ctrl-C: no queued cell starts, and the running ones lose their subprocesses
            pool.shutdown(wait=False, cancel_futures=True)
            bench.stop_all()
            raise
    return outcomes


def grid(title: str, corner: str, rows: Sequence[str], columns: dict[str, str], cells: dict[Any, str]) -> str:
    from common import table

    def cut(text: str) -> str:
        return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"

    lines = [[corner, *columns.values()]]
    lines += [[row, *(cut(cells.get((row, key), "-")) for key in columns)] for row in rows]
    return f"{title}\n{table(lines)}"


def other_filesystem_shm(root: Path) -> Path | None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(root).st_dev:
        return None
    return shm / f"zoo-faults-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def work_folder(keep: str | None) -> Iterator[Path]:
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="faults_") as folder:
            yield Path(folder)
        return
    folder = Path(keep).resolve()
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"error: --tmp: '{folder}' is not empty; run folders must be new")
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def split_list(value: str, allowed: Sequence[str], option: str, parser: argparse.ArgumentParser) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        parser.error(f"{option}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [f.name for f in FAMILIES]
    parser.add_argument("--families", default=",".join(names), help="comma-separated families of table 1")
    parser.add_argument("--faults", default="a,b,c,d", help="comma-separated faults (columns) of table 1")
    parser.add_argument("--tables", default="1,2", help="1: faults x families, 2: payloads x entry points")
    parser.add_argument("--jobs", type=int, default=2, help="cells at once (each runs one-thread subprocesses)")
    parser.add_argument("--tmp", default=None, help="keep every run folder and log here (default: a temporary one)")
    args = parser.parse_args()
    print(environment(), flush=True)
    families = [f for f in FAMILIES if f.name in split_list(args.families, names, "--families", parser)]
    faults = split_list(args.faults, list(FAULTS), "--faults", parser)
    tables = split_list(args.tables, ["1", "2"], "--tables", parser)
    if args.jobs < 1:
        parser.error(f"--jobs: expected an integer >= 1, got {args.jobs}")

    import torch

    torch.set_num_threads(1)  # checkpoints load here while the runs train
    # SIGTERM ends this script as Ctrl-C does, killing its runs on the way out: an orphaned run of fault b would
    # train on for its 1000 epochs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}, {args.jobs} jobs",
        flush=True,
    )
    with work_folder(args.tmp) as root:
        bench = Bench(root)
        bench.corpus.write_text(TEXT, encoding="utf-8")
        shm = other_filesystem_shm(root)
        output = []
        try:
            if "1" in tables:
                cells = []
                for fault in faults:  # fault by fault: two runs of one family rarely share the scorer cache
                    for family in families:
                        folder = root / "faults" / family.name / fault
                        work: Callable[[], str] = {
                            "a": functools.partial(kill_and_resume, bench, family, folder),
                            "b": functools.partial(kill_in_writes, bench, family, folder, shm),
                            "c": functools.partial(sigterm, bench, family, folder),
                            "d": functools.partial(nan_injected, bench, family, folder),
                        }[fault]
                        cells.append(Cell(family.name, fault, work))
                outcomes = run_cells(bench, cells, args.jobs, started)
                title = "Table 1: faults during training (train.py subprocesses)"
                output.append(
                    grid(title, "family", [f.name for f in families], {k: FAULTS[k] for k in faults}, outcomes)
                )
            if "2" in tables:
                runs = prepare_runs(bench, root / "payloads" / "trained")
                cells = [
                    Cell(entry, payload, functools.partial(payload_cell, bench, runs, entry, payload, folder))
                    for entry in ENTRIES
                    for payload in PAYLOADS
                    if not (entry == "control" and payload == "none")
                    for folder in [root / "payloads" / f"{entry}-{payload}"]
                ]
                outcomes = run_cells(bench, cells, args.jobs, started)
                rows = {ENTRIES[k]: k for k in ENTRIES}
                renamed = {(ENTRIES[e], p): v for (e, p), v in outcomes.items()}
                title = "Table 2: crafted files (rows: entry point; columns: payload; EXECUTED: the marker was created)"
                output.append(grid(title, "entry point", list(rows), PAYLOADS, renamed))
        finally:
            bench.stop_all()
            if shm is not None:
                shutil.rmtree(shm, ignore_errors=True)
    seconds = time.perf_counter() - started
    print("\n" + "\n\n".join(output))
    print(f"\nwall time: {seconds / 60:.0f} min {seconds % 60:.0f} s")


if __name__ == "__main__":
    main()
