"""CycleGAN between MNIST digits (A) and restyled digits (B): cycle error, label preservation and FID.

Why: the experiment promises cycle L1 <= 0.05 and label preservation >= 0.8 in both directions; this prints the
measured figures (mean ± std over seeds) beside those targets and beside "no translation" (each test image handed
on unchanged: cycle error 0, and what the target domain's classifier makes of a source image), which shows how
much of the label preservation the translation earns, and beside real digits of the target domain, plain and
blurred (what the judges read at best, and what a soft stroke alone costs). Each run trains through
`zoo.run.train` with configs composed as `train.py` composes them (`experiment=cyclegan_digits seed=<s>`) and is
scored by its test step; the domain classifiers are trained once, before the runs, and cached for all of them.

    python benchmarks/cyclegan.py                                  # seeds 1,2 at the experiment's epochs (CPU: slow)
    python benchmarks/cyclegan.py --device cuda --seeds 1,2,3 --jobs 3
    python benchmarks/cyclegan.py --epochs 2 --seeds 1 --override data.style=invert
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import QUIET, compose_config, environment, mean_std, quiet_lightning
from omegaconf import DictConfig

if TYPE_CHECKING:
    import torch

COLUMNS = ("cycle_l1_aba", "cycle_l1_bab", "label_keep_ab", "label_keep_ba", "fid_ab", "fid_ba")
TARGETS = {
    "cycle_l1_aba": "<= 0.05",
    "cycle_l1_bab": "<= 0.05",
    "label_keep_ab": ">= 0.8",
    "label_keep_ba": ">= 0.8",
}


def compose_run(seed: int, root: Path, overrides: list[str]) -> DictConfig:
    return compose_config(
        ["experiment=cyclegan_digits", f"seed={seed}", *QUIET, "logger=none", *overrides], root, f"seed{seed}"
    )


def scorers(cfg: DictConfig, device: torch.device) -> tuple[object, dict[str, object]]:
    """The datamodule and both domain classifiers, trained and cached where the runs will look for them."""
    from hydra.utils import instantiate

    from zoo.metrics.scorer import load_or_train_scorer
    from zoo.tasks.cyclegan import domain_scorer_spec

    data = instantiate(cfg.data)
    data.setup("fit")
    found = {}
    for domain in ("A", "B"):
        part = data.domain(domain)
        found[domain] = load_or_train_scorer(domain_scorer_spec(cfg.model.scorer), part, device, cache=True)
    return data, found


def judged(data: object, found: dict[str, object], images: dict[str, tuple]) -> dict[str, float]:
    """Scores of fixed images, `images[domain] = (x, labels)`, handed to that domain's judge as if a generator had
    translated into it."""
    import torch

    from zoo.metrics.generative import frechet_distance

    a, _, b, _ = (t.cpu() for t in data.splits["test"])
    (into_b, labels_b), (into_a, labels_a) = images["B"], images["A"]
    features_b, probs_b = found["B"].to(torch.device("cpu"))(into_b)
    features_a, probs_a = found["A"].to(torch.device("cpu"))(into_a)
    return {
        "cycle_l1_aba": 0.0,
        "cycle_l1_bab": 0.0,
        "label_keep_ab": float((probs_b.argmax(1) == labels_b).float().mean()),
        "label_keep_ba": float((probs_a.argmax(1) == labels_a).float().mean()),
        "fid_ab": frechet_distance(found["B"](b)[0], features_b),
        "fid_ba": frechet_distance(found["A"](a)[0], features_a),
    }


def no_translation(data: object, found: dict[str, object]) -> dict[str, float]:
    """Scores of generators that return their input: the floor label preservation must beat to mean anything."""
    a, label_a, b, label_b = (t.cpu() for t in data.splits["test"])
    return judged(data, found, {"B": (a, label_a), "A": (b, label_b)})


def real_digits(data: object, found: dict[str, object], blur_sigma: float) -> dict[str, float]:
    """What the judges make of real test digits of their own domain, plain or blurred: the best label preservation
    a translation can show, and how much a soft stroke alone costs it."""
    import torch

    from zoo.metrics.scorer import gaussian_blur

    a, label_a, b, label_b = (t.cpu() for t in data.splits["test"])
    if blur_sigma > 0:
        a, b = (gaussian_blur(x.float(), torch.full((len(x),), blur_sigma)) for x in (a, b))
    return judged(data, found, {"B": (b, label_b), "A": (a, label_a)})


def run_one(seed: int, root: str, overrides: list[str], threads: int | None) -> dict[str, float]:
    """One training run (in a worker process with --jobs): test scores and seconds per epoch."""
    import torch

    from zoo.run import train

    if threads:
        torch.set_num_threads(threads)
    quiet_lightning()
    cfg = compose_run(seed, Path(root), overrides)
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    row = {name: metrics[f"test/{name}"] for name in COLUMNS}
    row["s_per_epoch"] = seconds / int(cfg.trainer.max_epochs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--epochs", type=int, default=None, help="default: the experiment's; half constant, half decay")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes (spawn) at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra overrides for every run")
    args = parser.parse_args()
    print(environment(), flush=True)
    import torch

    from zoo.metrics.scorer import REPORTED_BLUR_SIGMA

    quiet_lightning()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", *args.override]
    if args.epochs is not None:
        constant = args.epochs // 2
        overrides += [
            f"trainer.max_epochs={args.epochs}",
            f"model.n_epochs={constant}",
            f"model.n_epochs_decay={args.epochs - constant}",
        ]
    seeds = [int(s) for s in args.seeds.split(",")]

    with contextlib.ExitStack() as stack:
        root = Path(args.output_dir) if args.output_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        cfg = compose_run(seeds[0], root, overrides)
        device = torch.device("cuda" if args.device == "cuda" else "cpu")
        data, found = scorers(cfg, device)
        reference = no_translation(data, found)
        real_rows = {sigma: real_digits(data, found, sigma) for sigma in (0.0, REPORTED_BLUR_SIGMA)}
        jobs = [(seed, str(root), overrides, args.threads) for seed in seeds]
        start = time.perf_counter()
        if args.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(seeds))) as pool:
                rows = pool.starmap(run_one, jobs)
        else:
            rows = [run_one(*job) for job in jobs]
        wall = time.perf_counter() - start
    for seed, row in zip(seeds, rows):
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))

    epochs = cfg.trainer.max_epochs
    header = ["", *COLUMNS, "s / epoch"]
    lines = [header, ["---"] * len(header)]
    lines.append(["no translation", *(f"{reference[c]:.4f}" for c in COLUMNS), ""])
    lines.append(["real digits of the target domain", *(f"{real_rows[0.0][c]:.4f}" for c in COLUMNS), ""])
    blurred = real_rows[REPORTED_BLUR_SIGMA]
    lines.append([f"the same, blurred (sigma {REPORTED_BLUR_SIGMA})", *(f"{blurred[c]:.4f}" for c in COLUMNS), ""])
    lines.append([f"CycleGAN, {epochs} epochs", *(mean_std([r[c] for r in rows]) for c in COLUMNS),
                  mean_std([r["s_per_epoch"] for r in rows], 2)])  # fmt: skip
    lines.append(["target", *(TARGETS.get(c, "") for c in COLUMNS), ""])
    threads = f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
    print(f"\nseeds {seeds}, device {args.device}, {args.jobs} job(s), {threads}, wall {wall:.0f} s")
    print("s / epoch: the whole run (training, validation every epoch, test) divided by its epochs")
    print("\n".join("| " + " | ".join(line) + " |" for line in lines))


if __name__ == "__main__":
    main()
