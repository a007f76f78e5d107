"""Does fine-tuning pay? A CNN pre-trained on MNIST, fine-tuned on 10 digits per class, against the same network
trained from scratch on the same 100 images, between a floor and a ceiling. Test loss (cross-entropy) beside
accuracy: on 360 test digits one image is 0.0028 of accuracy, and the loss moves with every one.

Why: a fine-tuning recipe is only worth its pre-training if it beats training from scratch on the same few labels
by more than the spread over seeds. Every run goes through `zoo.run.train` with configs composed as `train.py`
composes them, so the table measures what a user gets:

- pre-training: `experiment=cnn_mnist5k seed=0`, once for all seeds (about 1.5 min on one thread), unless
  `--pretrained <ckpt>` gives a checkpoint of that recipe;
- pre-trained, not fine-tuned: `experiment=finetune_digits init_from=<ckpt> train=false` (no seed involved);
- fine-tuned: `experiment=finetune_digits init_from=<ckpt> seed=<s>`;
- from scratch: `experiment=scratch_digits seed=<s>` (same network, data and optimizer; its epochs chosen on
  validation like the fine-tuned recipe's), and `experiment=finetune_digits seed=<s>` without `init_from` (the
  fine-tuning recipe's own 25 epochs, from random weights);
- ceiling: `experiment=cnn_digits seed=<s>`, from scratch on every training image (1,293) at 8x8;
- floor: the majority class of the 100 training labels (all tied: the first), scored on the test split.

All rows share one test split (360 digits: split_seed 0, test_fraction 0.2) and one validation split.

`--parts lm` asks the same of a transformer: a character LM (`experiment=char_lm seed=0`, Python's documentation,
about 3 min) initialises the blocks of an MNIST-1D encoder classifier (`experiment=lm_init_mnist1d
init_from=<ckpt>`), against the same recipe from random weights, paired by seed; the floor is the majority class of
MNIST-1D's training labels, and the zoo's own `transformer_mnist1d` (width 64) is the reference beside them.

    python benchmarks/finetune.py                               # seeds 1,2,3: about 4 min on one CPU thread
    python benchmarks/finetune.py --pretrained logs/cnn_mnist5k/runs/<run>/checkpoints/last.ckpt
    python benchmarks/finetune.py --seeds 1 --threads 2
    python benchmarks/finetune.py --parts lm                    # the LM's blocks in an MNIST-1D classifier
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import QUIET, compose_config, environment, mean_std, quiet_lightning, table, train_quietly

PRETRAIN_SEED = 0


@dataclass
class Row:
    """One line of the table: a recipe's test accuracy per seed and the wall time of each run."""

    name: str
    recipe: str
    accuracy: dict[int, float] = field(default_factory=dict)
    loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def add(self, seed: int, metrics: dict[str, float], seconds: float) -> None:
        self.accuracy[seed] = metrics["test/acc"]
        self.loss.append(metrics["test/loss"])
        self.seconds.append(seconds)


def run(overrides: list[str], folder: Path, name: str) -> tuple[dict[str, float], float, Path]:
    """One `train.py` run in this process: its metrics.json, its wall time and its folder."""
    cfg = compose_config([*overrides, "logger=none", *QUIET], folder, name)
    metrics, seconds = train_quietly(cfg)
    return metrics, seconds, Path(cfg.paths.output_dir)


def majority_floor(folder: Path, experiment: str = "finetune_digits") -> float:
    """Test accuracy of always answering the most frequent training label of a recipe's data."""
    import torch
    from hydra.utils import instantiate

    data = instantiate(compose_config([f"experiment={experiment}"], folder, "floor").data)
    data.setup("fit")
    train_labels, test_labels = data.splits["train"][1], data.splits["test"][1]
    majority = torch.bincount(train_labels).argmax()
    return float((test_labels == majority).float().mean())


def margin(fine_tuned: Row, scratch: Row, what: str = "fine-tuned") -> str:
    """Paired by seed: the same subset, the same data order and augmentation draws."""
    differences = [fine_tuned.accuracy[s] - scratch.accuracy[s] for s in fine_tuned.accuracy]
    mean = statistics.fmean(differences)
    spread = f" ± {statistics.stdev(differences):.4f}" if len(differences) > 1 else ""
    per_seed = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(fine_tuned.accuracy, differences))
    return f"{what} minus from scratch: {mean:+.4f}{spread} (per seed {per_seed})"


def results_table(rows: list[Row]) -> str:
    lines = [["row", "recipe", "test/acc mean ± std", "per seed", "test/loss", "wall/run"]]
    for row in rows:
        per_seed = ", ".join(f"{s}: {a:.4f}" for s, a in row.accuracy.items() if s >= 0) or "-"
        loss = mean_std(row.loss, 3) if row.loss else "-"
        wall = f"{statistics.fmean(row.seconds):.1f} s" if row.seconds else "-"
        lines.append([row.name, row.recipe, mean_std(list(row.accuracy.values())), per_seed, loss, wall])
    return table(lines, right={2, 4, 5})


def pretrained(given: str | None, experiment: str, metric: str, folder: Path) -> Path:
    """The checkpoint given on the command line, or the last one of `experiment=<experiment> seed=0` trained now."""
    if given:
        print(f"pre-trained ({experiment}): {Path(given).resolve()}")
        return Path(given).resolve()
    metrics, seconds, output = run([f"experiment={experiment}", f"seed={PRETRAIN_SEED}"], folder, experiment)
    print(f"pre-trained: {experiment} seed {PRETRAIN_SEED}, {metric} {metrics[metric]:.4f} in {seconds:.1f} s")
    return output / "checkpoints" / "last.ckpt"


def digits_part(args: argparse.Namespace, seeds: list[int], folder: Path) -> str:
    """The CNN pre-trained on MNIST 5k, fine-tuned on 10 digits per class, beside training from scratch."""
    checkpoint = pretrained(args.pretrained, "cnn_mnist5k", "test/acc", folder)

    init = f"init_from={checkpoint}"
    zero_shot = Row("pre-trained, not fine-tuned", "finetune_digits train=false")
    zero_shot.add(-1, *run(["experiment=finetune_digits", init, "train=false"], folder, "zero_shot")[:2])

    fine_tuned = Row("fine-tuned (10 per class)", "finetune_digits init_from=<ckpt>")
    scratch = Row("from scratch (10 per class)", "scratch_digits")
    same = Row("from scratch, fine-tuning's settings", "finetune_digits")
    ceiling = Row("ceiling: all 1,293 training images", "cnn_digits")
    for seed in seeds:
        for row, experiment, extra in (
            (fine_tuned, "finetune_digits", [init]),
            (scratch, "scratch_digits", []),
            (same, "finetune_digits", []),
            (ceiling, "cnn_digits", []),
        ):
            name = f"{experiment}{'_init' if extra else ''}/seed_{seed}"
            metrics, seconds, _ = run([f"experiment={experiment}", *extra, f"seed={seed}"], folder, name)
            row.add(seed, metrics, seconds)
            print(f"  {row.recipe} seed {seed}: test/acc {metrics['test/acc']:.4f} in {seconds:.1f} s", flush=True)
    floor = Row("floor: majority class", "-")
    floor.accuracy[-1] = majority_floor(folder)
    return "\n".join(
        [
            f"\nscikit-learn digits, test split of 360; seeds {', '.join(map(str, seeds))} (mean ± sample std)",
            results_table([floor, zero_shot, same, scratch, fine_tuned, ceiling]),
            margin(fine_tuned, scratch),
        ]
    )


def lm_part(args: argparse.Namespace, seeds: list[int], folder: Path) -> str:
    """The char LM's blocks in an MNIST-1D encoder classifier, beside the same network from random weights."""
    checkpoint = pretrained(args.lm_pretrained, "char_lm", "test/ppl", folder)
    initialised = Row("LM blocks, fine-tuned", "lm_init_mnist1d init_from=<char_lm ckpt>")
    scratch = Row("from scratch, same network", "lm_init_mnist1d")
    reference = Row("the zoo's recipe (width 64)", "transformer_mnist1d")
    for seed in seeds:
        for row, experiment, extra in (
            (initialised, "lm_init_mnist1d", [f"init_from={checkpoint}"]),
            (scratch, "lm_init_mnist1d", []),
            (reference, "transformer_mnist1d", []),
        ):
            name = f"{experiment}{'_init' if extra else ''}/seed_{seed}"
            metrics, seconds, _ = run([f"experiment={experiment}", *extra, f"seed={seed}"], folder, name)
            row.add(seed, metrics, seconds)
            print(f"  {row.recipe} seed {seed}: test/acc {metrics['test/acc']:.4f} in {seconds:.1f} s", flush=True)
    floor = Row("floor: majority class", "-")
    floor.accuracy[-1] = majority_floor(folder, "lm_init_mnist1d")
    return "\n".join(
        [
            f"\nMNIST-1D, test split of 1,000; seeds {', '.join(map(str, seeds))} (mean ± sample std)",
            results_table([floor, scratch, initialised, reference]),
            margin(initialised, scratch, "LM-initialised"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (the `seed=` override)")
    parser.add_argument(
        "--pretrained", default=None, help="a checkpoint of experiment=cnn_mnist5k (skips pre-training)"
    )
    parser.add_argument("--parts", default="digits", help="comma-separated: digits (the CNN), lm (the LM's blocks)")
    parser.add_argument("--lm-pretrained", default=None, help="a checkpoint of experiment=char_lm (skips training it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--output-dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    print(environment(), flush=True)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got '{args.seeds}'")
    if args.pretrained and not Path(args.pretrained).is_file():
        parser.error(
            f"--pretrained: no file at '{args.pretrained}'; make one with python train.py experiment=cnn_mnist5k"
        )

    if args.lm_pretrained and not Path(args.lm_pretrained).is_file():
        parser.error(f"--lm-pretrained: no file at '{args.lm_pretrained}'; train.py experiment=char_lm makes one")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"digits", "lm"}:
        parser.error(f"--parts: expected digits and/or lm, got '{args.parts}'")

    import torch

    torch.set_num_threads(torch.get_num_threads() if args.threads is None else args.threads)
    quiet_lightning()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.output_dir:
            folder = Path(args.output_dir)
        else:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finetune_")))
        if "digits" in parts:
            print(digits_part(args, seeds, folder))
        if "lm" in parts:
            print(lm_part(args, seeds, folder))
    print(f"wall time in all: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
