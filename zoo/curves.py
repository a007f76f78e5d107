"""Curves over one setting, from the command line, written to `logs/<task_name>/curves/<time>/`.

learning: `python -m zoo.curves learning experiment=cnn_digits sizes=[0.1,0.25,0.5,1.0] seeds=3` trains the
experiment on each share of its training split (`data.train_fraction`, stratified; validation and test stay whole)
with each seed, and draws the training and validation accuracy (`metric=acc`, or e.g. `metric=rmse`) against the
number of training rows, with mean ± std bands over the seeds (`learning.png`, also in TensorBoard), and a one-line
diagnosis: high bias (both scores poor and close together) or high variance (a gap that closes as data grows).

elbow: `python -m zoo.curves elbow experiment=kmeans_digits ks=[2..15]`: k-means inertia (and silhouette) of the
training rows for each k in `ks` (a list, or [low..high] for every k between them), as a table and `elbow.png`.

validation: `python -m zoo.curves validation folder=<multirun folder> key=optimizer.weight_decay [metric=acc]` reads
a finished sweep (`train.py -m ... optimizer.weight_decay=0,1e-4,1e-3,1e-2 seed=1,2,3`) and draws the training and
validation metric against the swept key's value, mean ± std over the runs that share it (`validation.png` in the
sweep's folder), naming the value with the best validation score; nothing is trained.

Other arguments are Hydra overrides of the experiment, as for train.py.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import UserError

USAGE = (
    "usage: python -m zoo.curves learning experiment=<name> sizes=[0.1,0.5,1.0] seeds=3 [metric=acc] [key=value ...]\n"
    "       python -m zoo.curves elbow experiment=<name> ks=[2..15] [key=value ...]\n"
    "       python -m zoo.curves validation folder=<multirun folder> key=<swept key> [metric=acc]"
)
CURVES = ("learning", "elbow", "validation")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    try:
        if args[0] not in CURVES:
            raise UserError(f"curve: unknown '{args[0]}'; allowed: {', '.join(CURVES)}")
        {"learning": learning, "elbow": elbow, "validation": validation}[args[0]](args[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def parse_ks(text: str) -> list[int]:
    """`[2..15]` or `[2,15]` is every k from 2 to 15; `[2,4,8]` (three or more values) is those k."""
    text = text.strip().strip("[]")
    if ".." in text:
        text = ",".join(part.strip() for part in text.split("..", 1))
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise UserError(f"ks: expected a list of integers, e.g. ks=[2..15], got {text!r}") from error
    if len(values) == 2 and values[0] < values[1]:
        values = list(range(values[0], values[1] + 1))
    if not values or min(values) < 1:
        raise UserError(f"ks: expected integers >= 1, got {text!r}")
    return values


def _take(args: list[str], key: str, default: str) -> tuple[str, list[str]]:
    """The value of `key=...` among the arguments (the last one wins) and the arguments without it."""
    given = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return (given[-1] if given else default), [a for a in args if not a.startswith(f"{key}=")]


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from zoo.cli import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def learning(args: list[str]) -> dict[float, dict[str, list[float]]]:
    """Train and validation `metric` for each training share and seed; writes learning.png and prints a diagnosis."""
    from omegaconf import open_dict

    from zoo.run import train

    sizes_text, args = _take(args, "sizes", "[0.1,0.25,0.5,1.0]")
    seeds_text, args = _take(args, "seeds", "3")
    metric, overrides = _take(args, "metric", "acc")
    try:
        sizes = [float(v) for v in sizes_text.strip("[]").split(",") if v.strip()]
        seeds = int(seeds_text)
    except ValueError as error:
        raise UserError(
            f"sizes, seeds: expected e.g. sizes=[0.1,0.5,1.0] seeds=3, got {sizes_text!r}, {seeds_text!r}"
        ) from error
    if not sizes or any(not 0 < size <= 1 for size in sizes) or seeds < 1:
        raise UserError(f"sizes: expected shares in (0, 1] and seeds >= 1, got sizes={sizes_text} seeds={seeds_text}")
    base = _compose(overrides)
    folder = Path(base.paths.log_dir) / str(base.task_name) / "curves" / time.strftime("%Y-%m-%d_%H-%M-%S")
    results: dict[float, dict[str, list[float]]] = {}
    for size in sorted(sizes):
        for seed in range(seeds):
            quiet = ["extras.print_config=false", "trainer.enable_progress_bar=false", "logger=none"]
            cfg = _compose([*overrides, f"data.train_fraction={size}", f"seed={seed}", *quiet])
            with open_dict(cfg):
                cfg.paths.output_dir = str(folder / f"share_{size:g}_seed_{seed}")
            train(cfg)
            logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
            missing = [f"{split}/{metric}" for split in ("train", "val") if f"{split}/{metric}" not in logged]
            if missing:
                allowed = sorted({k.split("/", 1)[1] for k in logged if k.startswith("val/")})
                raise UserError(f"metric: the runs log no {missing[0]}; allowed: {', '.join(allowed)}")
            entry = results.setdefault(size, {"rows": [float(_training_rows(cfg))], "train": [], "val": []})
            entry["train"].append(float(logged[f"train/{metric}"]))
            entry["val"].append(float(logged[f"val/{metric}"]))
            train_value, val_value = entry["train"][-1], entry["val"][-1]
            print(f"share {size:g} seed {seed}: train/{metric} {train_value:.4f}, val/{metric} {val_value:.4f}")
    verdict = diagnose(results, higher_is_better=metric not in LOWER_IS_BETTER)
    _plot_learning(results, metric, folder / "learning.png", str(base.task_name), verdict)
    print(f"\n{'share':>6}  {'rows':>6}  {'train/' + metric:>14}  {'val/' + metric:>14}")
    for size, entry in results.items():
        rows, train_text, val_text = np.mean(entry["rows"]), _mean_std(entry["train"]), _mean_std(entry["val"])
        print(f"{size:>6g}  {rows:>6.0f}  {train_text:>14}  {val_text:>14}")
    print(f"diagnosis: {verdict}")
    print(f"learning curve written to {folder / 'learning.png'}")
    return results


LOWER_IS_BETTER = ("loss", "rmse", "mae", "ppl")


def diagnose(results: dict[float, dict[str, list[float]]], higher_is_better: bool = True) -> str:
    """High variance: a gap between training and validation that shrinks with more data; high bias: both scores
    poor and close. Scores are turned into errors (1 - accuracy) for accuracies, kept as they are for losses."""
    sizes = sorted(results)

    def error(values: list[float]) -> float:
        return 1 - float(np.mean(values)) if higher_is_better else float(np.mean(values))

    first, last = results[sizes[0]], results[sizes[-1]]
    gap_first = error(first["val"]) - error(first["train"])
    gap_last = error(last["val"]) - error(last["train"])
    scale = max(abs(error(last["val"])), 1e-12)
    if gap_last > 0.25 * scale and gap_last > 0.02:
        closing = " and it closes as data grows: more data should help" if gap_last < gap_first else ""
        return f"high variance: validation error is {gap_last:.3f} above training error at the full size{closing}"
    if higher_is_better and error(last["val"]) > 0.1:
        return f"high bias: training and validation errors are close ({gap_last:.3f}) and both high; a larger model"
    return f"neither dominates: the gap at the full size is {gap_last:.3f}"


def _training_rows(cfg: Any) -> int:
    """The rows a share keeps, read once per share: the split depends on data.split_seed, not the run's seed."""
    from hydra.utils import instantiate

    data = instantiate(cfg.data)
    data.setup("fit")
    splits = getattr(data, "splits", {})
    return len(splits["train"][1]) if "train" in splits else 0


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"


def _train_and_val_bands(axes: Any, positions: list[float], entries: list[dict[str, list[float]]], metric: str) -> None:
    """The training and validation metric at each position: the mean over runs, and a ± std band."""
    for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
        mean = np.array([np.mean(entry[split]) for entry in entries])
        spread = np.array([np.std(entry[split]) for entry in entries])
        axes.plot(positions, mean, marker="o", color=colour, label=f"{split}/{metric}")
        axes.fill_between(positions, mean - spread, mean + spread, color=colour, alpha=0.2)


def _plot_learning(
    results: dict[float, dict[str, list[float]]], metric: str, path: Path, title: str, verdict: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [float(np.mean(results[s]["rows"])) for s in results]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    _train_and_val_bands(axes, rows, list(results.values()), metric)
    axes.set(xlabel="training rows", ylabel=metric, title=f"{title}: learning curve")
    axes.legend()
    lines = textwrap.wrap(verdict, 110)  # the whole verdict, on as many lines as it takes
    figure.text(0.01, 0.01, "\n".join(lines), fontsize=7)
    figure.tight_layout(rect=(0, 0.025 + 0.025 * len(lines), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path.parent / "tensorboard")) as writer:
        writer.add_figure("curves/learning", figure, 0)
    plt.close(figure)


def elbow(args: list[str]) -> dict[int, tuple[float, float]]:
    """Inertia and silhouette of k-means on the experiment's training rows for each k; writes the table and plot."""
    from sklearn.metrics import silhouette_score

    from zoo.classic.unsupervised import KMeans
    from zoo.data.table import table_from_config

    ks_text, overrides = _take(args, "ks", "[2,15]")
    ks = parse_ks(ks_text)
    cfg = _compose(overrides)
    if not str(cfg.model.get("_target_", "")).endswith("unsupervised.KMeans"):
        raise UserError(f"model: the elbow curve is k-means', not {cfg.model.get('_target_')}; use model=kmeans")
    table = table_from_config(cfg.data)
    x = table.encoded(table.splits()["train"][0])
    settings = {k: v for k, v in cfg.model.items() if k not in ("_target_", "n_clusters")}
    results: dict[int, tuple[float, float]] = {}
    for k in ks:
        model = KMeans(n_clusters=k, **settings).fit(x, seed=int(cfg.seed))
        labels, inertia = model.predict(x)
        silhouette = float(silhouette_score(x, labels)) if k > 1 else float("nan")
        results[k] = (inertia, silhouette)
        print(f"k={k}: inertia {inertia:.6g}, silhouette {silhouette:.4f}", flush=True)
    folder = Path(cfg.paths.log_dir) / str(cfg.task_name) / "curves" / time.strftime("%Y-%m-%d_%H-%M-%S")
    folder.mkdir(parents=True, exist_ok=True)
    _plot(results, folder / "elbow.png", str(cfg.task_name))
    print(f"\n{'k':>4}  {'inertia':>12}  silhouette")
    for k, (inertia, silhouette) in results.items():
        print(f"{k:>4}  {inertia:>12.6g}  {silhouette:.4f}")
    print(f"elbow curve written to {folder / 'elbow.png'}")
    return results


def validation(args: list[str]) -> dict[Any, dict[str, list[float]]]:
    """Train and validation `metric` of a finished sweep's runs against the value of the swept `key`."""
    from omegaconf import OmegaConf

    folder_text, args = _take(args, "folder", "")
    key, args = _take(args, "key", "")
    metric, args = _take(args, "metric", "acc")
    if args or not folder_text or not key:
        raise UserError(f"validation: expected folder=<multirun folder> key=<swept key> [metric=acc], got {args}")
    folder = Path(folder_text).expanduser()
    runs = sorted(p for p in folder.glob("*") if (p / "metrics.json").is_file() and (p / "config.yaml").is_file())
    if not runs:
        raise UserError(f"folder: '{folder}' holds no finished runs (sub-folders with metrics.json and config.yaml)")
    results: dict[Any, dict[str, list[float]]] = {}
    for run in runs:
        value = OmegaConf.select(OmegaConf.load(run / "config.yaml"), key, default="<missing>")
        if value == "<missing>":
            raise UserError(f"key: '{key}' is not in {run / 'config.yaml'}")
        logged = json.loads((run / "metrics.json").read_text())
        for split in ("train", "val"):
            if f"{split}/{metric}" not in logged:
                allowed = sorted({k.split("/", 1)[1] for k in logged if k.startswith("val/")})
                raise UserError(f"metric: {run} logged no {split}/{metric}; allowed: {', '.join(allowed)}")
            results.setdefault(value, {"train": [], "val": []})[split].append(float(logged[f"{split}/{metric}"]))
    values = sorted(
        results, key=lambda v: (not isinstance(v, int | float), v if isinstance(v, int | float) else str(v))
    )
    results = {v: results[v] for v in values}
    pick = max if metric not in LOWER_IS_BETTER else min
    best = pick(results, key=lambda v: float(np.mean(results[v]["val"])))
    _plot_validation(results, key, metric, folder / "validation.png")
    print(f"{key:>24}  {'runs':>4}  {'train/' + metric:>16}  {'val/' + metric:>16}")
    for value, entry in results.items():
        print(f"{value!s:>24}  {len(entry['val']):>4}  {_mean_std(entry['train']):>16}  {_mean_std(entry['val']):>16}")
    print(f"best on validation: {key}={best} (val/{metric} {_mean_std(results[best]['val'])})")
    print(f"validation curve written to {folder / 'validation.png'}")
    return results


def _plot_validation(results: dict[Any, dict[str, list[float]]], key: str, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = list(results)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    positions = [float(v) for v in values] if numeric else list(range(len(values)))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    _train_and_val_bands(axes, positions, list(results.values()), metric)
    if numeric and min(positions) > 0 and max(positions) / min(positions) >= 100:
        axes.set_xscale("log")
    if not numeric:
        axes.set_xticks(positions, [str(v) for v in values])
    axes.set(xlabel=key, ylabel=metric, title=f"validation curve over {key}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot(results: dict[int, tuple[float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(results)
    figure, left = plt.subplots(figsize=(7, 4.5))
    left.plot(ks, [results[k][0] for k in ks], marker="o", color="tab:blue")
    left.set(xlabel="k (clusters)", ylabel="inertia (training rows)", title=f"{title}: elbow")
    right = left.twinx()
    right.plot(ks, [results[k][1] for k in ks], marker=".", color="tab:orange")
    right.set_ylabel("silhouette", color="tab:orange")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
