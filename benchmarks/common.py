"""What every benchmark script needs: configs composed as train.py composes them, quiet runs, plain-text tables.

The scripts run as `python benchmarks/<name>.py`, so this folder is on the import path and `import common` works.
"""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"
# progress bars, the model summary and the config printout change nothing that is measured
QUIET = [
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose_config(overrides: Sequence[str], folder: Path, run: str = "run") -> DictConfig:
    """The train config for `overrides`, with data, logs and the run folder (`folder/run`) under `folder`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(folder)
        cfg.paths.data_dir = str(folder / "data")
        cfg.paths.log_dir = str(folder / "logs")
        cfg.paths.output_dir = str(folder / run)
    return cfg


def train_quietly(cfg: DictConfig) -> tuple[dict[str, float], float]:
    """Train and test `cfg` in this process with its console output in the run folder's stdout.txt; its metrics
    (the fold means under cv.folds) and wall time."""
    import contextlib
    import json
    import time

    from zoo.run import train

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (output_dir / "stdout.txt").open("w") as log, contextlib.redirect_stdout(log):
        train(cfg)
    seconds = time.perf_counter() - start
    report = output_dir / "cv.json"
    if report.is_file():
        return json.loads(report.read_text())["mean"], seconds
    return json.loads((output_dir / "metrics.json").read_text()), seconds


def quiet_lightning() -> None:
    """Lightning's INFO lines and known harmless warnings would bury the table."""
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO; quiet them after it)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*LeafSpec.*is deprecated.*",
        ".*smaller than the logging interval.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def environment() -> str:
    """One line naming what the figures below were measured on: the same recipe moves with the machine and the
    libraries' builds, so a table without it cannot be compared with a later one."""
    import datetime
    import os
    import platform
    import subprocess

    import lightning
    import numpy
    import torch

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    commit += " (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    threads = os.environ.get("OMP_NUM_THREADS")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"environment: {now}; commit {commit}; Python {platform.python_version()}, torch {torch.__version__} "
        f"({build}), lightning {lightning.__version__}, numpy {numpy.__version__}; CPU {cpu}, {os.cpu_count()} "
        f"cores ({usable} usable){f', OMP_NUM_THREADS={threads}' if threads else ''}; GPU {gpu}; {machine_speed()}"
    )


def exit_with_parent(interval: float = 2.0) -> None:
    """In a worker process: exit once the process that started it is gone. Without it a benchmark whose main process
    is killed (SIGTERM; Ctrl-C reaches the workers too) leaves its workers training to the end of their runs."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is handed to another parent
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def machine_speed() -> str:
    """Two numbers that scale a table's times between machines: a one-thread float32 matrix product and a pure-Python
    loop, measured now (so under the present load too). The CPU's name does not tell them: machines with the same
    label have run four times apart."""
    import time

    import torch

    from zoo.metrics.scorer import one_cpu_thread

    with one_cpu_thread(torch.device("cpu")):
        a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
        a @ a  # warm-up
        fastest = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ a
            fastest = min(fastest, time.perf_counter() - start)
    start = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i
    loop = time.perf_counter() - start
    gflops = 2 * 512**3 / fastest / 1e9
    return f"speed: {gflops:.0f} GFLOP/s matrix product (1 thread), {1 / loop:.1f}M Python additions/s"


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """`mean ± sample std` (the std is left out for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: Sequence[Sequence[str]], right: set[int] = frozenset()) -> str:
    """A header row, a rule, then the rows; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = (cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])])


def real_and_noise_scores(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """The scores of real images, of blurred real images and of uniform noise against all real test images, each
    with as many images as a run scores samples (model.score_samples).

    They bound what a generator's figures can mean: real training images against the test images are the floor for
    this many samples (the same draw as a run's test/fid_real_floor), noise the ceiling, and blurred real images show
    how far soft strokes alone move every score. The scoring classifier is trained and cached here, before any run
    starts, so that parallel runs load it instead of racing to train it.
    """
    import torch
    from hydra.utils import instantiate

    from zoo.metrics.generative import generative_scores
    from zoo.metrics.scorer import REPORTED_BLUR_SIGMA, gaussian_blur, load_or_train_scorer, training_draw

    data = instantiate(cfg.data)
    data.setup("test")
    scorer = load_or_train_scorer(cfg.model.scorer, data, torch.device("cpu"), cache=True)
    test_images, test_labels = data.splits["test"][:2]
    train_images = data.splits["train"][0]
    count = int(cfg.model.get("score_samples", len(test_images)))
    real = training_draw(train_images, count)  # the draw of a run's test/fid_real_floor
    test_features, test_probs = scorer(test_images)
    sigma = REPORTED_BLUR_SIGMA
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = f"real, blurred (sigma {sigma:g})"
    scores = {
        "real vs real": generative_scores(test_features, *scorer(real)),
        blurred: generative_scores(test_features, *scorer(gaussian_blur(real, torch.full((len(real),), sigma)))),
        "uniform noise": generative_scores(test_features, *scorer(noise)),
    }
    # a conditional generator's ceiling: the scorer's accuracy on the real test images, plain and blurred (noise: one
    # class in ten, by chance)
    blurred_test = gaussian_blur(test_images, torch.full((len(test_images),), sigma))
    scores["real vs real"]["conditional_acc"] = float((test_probs.argmax(1) == test_labels).float().mean())
    scores[blurred]["conditional_acc"] = float((scorer(blurred_test)[1].argmax(1) == test_labels).float().mean())
    scores["uniform noise"]["conditional_acc"] = 1.0 / data.num_classes
    return scores
