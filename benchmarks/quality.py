"""Test accuracy of the zoo's classification recipes over several seeds, beside the figures they should reach.

Why: one run's accuracy moves by a point or more with the seed, so a recipe is judged by its mean and spread over
seeds; the run goes through `zoo.run.train` with configs composed as `train.py` composes them, so what is measured
is what a user gets, and the wall time per run says what the check costs.

    python benchmarks/quality.py                                  # 4 experiments x 3 seeds, 10-25 min on 2 cores
    python benchmarks/quality.py --experiments cnn_digits --seeds 1
    python benchmarks/quality.py --max-epochs 2                   # a quick check that everything runs
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import CONFIG_DIR, QUIET, compose_config, environment, quiet_lightning, table, train_quietly
from omegaconf import DictConfig


@dataclass(frozen=True)
class Reference:
    value: float
    source: str
    bound: float


REFERENCES = {
    "cnn_digits": Reference(0.985, "expected", 0.985),
    "mlp_mnist1d": Reference(0.68, "paper", 0.68),
    "cnn_mnist1d": Reference(0.94, "paper", 0.95),
    "logreg_mnist1d": Reference(0.32, "paper", 0.30),
}


@dataclass
class Run:
    seed: int
    accuracy: float
    seconds: float


def experiment_config(experiment: str, seed: int, max_epochs: int | None, folder: Path) -> DictConfig:
    overrides = [f"experiment={experiment}", f"seed={seed}", *QUIET]
    if max_epochs is not None:
        overrides.append(f"trainer.max_epochs={max_epochs}")
    return compose_config(overrides, folder, run=f"{experiment}/seed_{seed}")


def run_once(experiment: str, seed: int, max_epochs: int | None, folder: Path) -> Run:
    """Train and test one seed; Lightning's console output goes to the run folder's stdout.txt."""
    metrics, seconds = train_quietly(experiment_config(experiment, seed, max_epochs, folder))
    return Run(seed, float(metrics["test/acc"]), seconds)


def results_table(results: dict[str, list[Run]]) -> str:
    rows = [["experiment", "mean test/acc", "std", "per seed", "reference", "bound", "", "wall/run"]]
    for experiment, runs in results.items():
        accuracies = [r.accuracy for r in runs]
        mean = statistics.fmean(accuracies)
        std = statistics.stdev(accuracies) if len(runs) > 1 else math.nan
        reference = REFERENCES.get(experiment)
        per_seed = ", ".join(f"{r.seed}: {r.accuracy:.4f}" for r in runs)
        rows.append(
            [
                experiment,
                f"{mean:.4f}",
                f"{std:.4f}",
                per_seed,
                f"{reference.value:.3f} ({reference.source})" if reference else "-",
                f">= {reference.bound:.3f}" if reference else "-",
                ("pass" if mean >= reference.bound else "FAIL") if reference else "-",
                f"{statistics.fmean(r.seconds for r in runs):.1f} s",
            ]
        )
    return table(rows, right={1, 2, 7})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=",".join(REFERENCES), help="comma-separated experiment configs")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (the `seed=` override)")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs (quick checks)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--output-dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    print(environment(), flush=True)

    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    known = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    unknown = [e for e in experiments if e not in known]
    if unknown:
        parser.error(f"--experiments: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got '{args.seeds}'")

    import torch

    torch.set_num_threads(torch.get_num_threads() if args.threads is None else args.threads)
    quiet_lightning()

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load:.1f}", flush=True)
    results: dict[str, list[Run]] = {}
    with contextlib.ExitStack() as stack:
        if args.output_dir:
            folder = Path(args.output_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quality_")))
        for experiment in experiments:
            for seed in seeds:
                run = run_once(experiment, seed, args.max_epochs, folder)
                results.setdefault(experiment, []).append(run)
                print(f"  {experiment} seed {seed}: test/acc {run.accuracy:.4f} in {run.seconds:.1f} s", flush=True)

    epochs = f", max_epochs={args.max_epochs}" if args.max_epochs is not None else ""
    print(f"\nTest accuracy over seeds {', '.join(map(str, seeds))}{epochs} (mean, sample std; pass: mean >= bound)")
    print(results_table(results))


if __name__ == "__main__":
    main()
