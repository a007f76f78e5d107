"""Recommenders beside the figures they should reach: explicit MF against the noise floor of the generated
ratings, implicit MF against a popularity ranking, and (given the files) MovieLens 100K in 5-fold CV against
Surprise's published SVD figure.

Why: an RMSE means little without the best possible one (the generator knows its noise), and a ranking model
means little unless it beats recommending what is popular.

    python benchmarks/recommender.py                            # synthetic ratings, explicit and implicit
    python benchmarks/recommender.py --seeds 1,2,3
    python benchmarks/recommender.py --movielens ~/data/ml-100k  # also 5-fold MovieLens 100K (the files are
                                                                 # not shipped: grouplens.org/datasets/movielens)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import QUIET, compose_config, mean_std, quiet_lightning, table

from zoo.run import train

# Surprise's documented 5-fold RMSE on MovieLens 100K
SURPRISE_SVD, SURPRISE_SVDPP = 0.934, 0.919


def run(overrides: list[str], folder: Path, name: str) -> tuple[dict[str, float], float]:
    """Train and test through zoo.run.train; its metrics (CV means with cv.folds) and the wall time."""
    cfg = compose_config([*overrides, *QUIET, "logger=none"], folder, run=name)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1", help="comma-separated training seeds for the synthetic runs")
    parser.add_argument("--movielens", type=Path, default=None, help="a MovieLens 100K folder (u.data, u.item)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    quiet_lightning()

    rows = [["experiment", "metric", "model", "reference", "", "wall/run"]]
    with tempfile.TemporaryDirectory(prefix="recommender_") as tmp:
        folder = Path(tmp)
        explicit = [run(["experiment=mf_synthetic", f"seed={s}"], folder, f"mf_{s}") for s in seeds]
        rmse = [m["test/rmse"] for m, _ in explicit]
        floor = explicit[0][0]["test/noise_floor"]
        within = max(rmse) <= 1.05 * floor
        rows.append(
            [
                "mf_synthetic",
                "test/rmse",
                mean_std(rmse),
                f"noise floor {floor:.3f}, bound {1.05 * floor:.3f}",
                "pass" if within else "MISS",
                f"{sum(s for _, s in explicit) / len(explicit):.1f} s",
            ]
        )
        implicit = [run(["experiment=mf_implicit_synthetic", f"seed={s}"], folder, f"bpr_{s}") for s in seeds]
        for metric in ("hr@10", "ndcg@10"):
            model = [m[f"test/{metric}"] for m, _ in implicit]
            popular = [m[f"test/{metric}_popularity"] for m, _ in implicit]
            rows.append(
                [
                    "mf_implicit_synthetic",
                    f"test/{metric}",
                    mean_std(model),
                    f"popularity {mean_std(popular)}",
                    "pass" if min(model) > max(popular) else "MISS",
                    f"{sum(s for _, s in implicit) / len(implicit):.1f} s",
                ]
            )
        if args.movielens is not None:
            path = f"data.path={args.movielens.expanduser().resolve()}"
            metrics, seconds = run(["experiment=mf_movielens", path, "cv.folds=5"], folder, "ml100k")
            rows.append(
                [
                    "mf_movielens, 5-fold",
                    "test/rmse",
                    f"{metrics['test/rmse']:.4f}",
                    f"Surprise SVD {SURPRISE_SVD}, SVD++ {SURPRISE_SVDPP}",
                    "pass" if metrics["test/rmse"] <= 0.915 else "MISS",
                    f"{seconds / 5:.1f} s/fold",
                ]
            )
            overrides = ["experiment=mf_implicit_synthetic", "data=movielens", path]
            metrics, seconds = run(overrides, folder, "ml100k_bpr")
            for metric in ("hr@10", "ndcg@10"):
                popular = metrics[f"test/{metric}_popularity"]
                verdict = "pass" if metrics[f"test/{metric}"] > popular else "MISS"
                rows.append(
                    [
                        "BPR on MovieLens",
                        f"test/{metric}",
                        f"{metrics[f'test/{metric}']:.4f}",
                        f"popularity {popular:.4f}",
                        verdict,
                        f"{seconds:.1f} s",
                    ]
                )
    print(f"\nRecommenders, seeds {', '.join(map(str, seeds))} (mean ± std over seeds)")
    print(table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
