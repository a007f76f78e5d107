"""Curves over one setting, from the command line: `python -m zoo.curves elbow experiment=kmeans_digits ks=[2,15]`.

elbow: k-means inertia (and silhouette) of the experiment's training rows for each k in `ks` (a list, or [low, high]
for every k between them), as a table and `elbow.png` in `logs/<task_name>/curves/<time>/`. The other arguments are
Hydra overrides of the experiment, as for train.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from zoo.errors import UserError

USAGE = "usage: python -m zoo.curves elbow experiment=<name> ks=[2,15] [key=value ...]"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    try:
        if args[0] != "elbow":
            raise UserError(f"curve: unknown '{args[0]}'; allowed: elbow")
        elbow(args[1:])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def parse_ks(text: str) -> list[int]:
    """`[2,15]` is every k from 2 to 15; `[2,4,8]` (three or more values) is those k."""
    try:
        values = [int(v) for v in text.strip().strip("[]").split(",") if v.strip()]
    except ValueError as error:
        raise UserError(f"ks: expected a list of integers, e.g. ks=[2,15], got {text!r}") from error
    if len(values) == 2 and values[0] < values[1]:
        values = list(range(values[0], values[1] + 1))
    if not values or min(values) < 1:
        raise UserError(f"ks: expected integers >= 1, got {text!r}")
    return values


def elbow(args: list[str]) -> dict[int, tuple[float, float]]:
    """Inertia and silhouette of k-means on the experiment's training rows for each k; writes the table and plot."""
    from hydra import compose, initialize_config_dir
    from sklearn.metrics import silhouette_score

    from zoo.classic.unsupervised import KMeans
    from zoo.cli import CONFIG_DIR
    from zoo.data.table import table_from_config

    ks_args = [a for a in args if a.startswith("ks=")]
    ks = parse_ks(ks_args[-1].split("=", 1)[1] if ks_args else "[2,15]")
    overrides = [a for a in args if not a.startswith("ks=")]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
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
