"""Recommenders beside the figures they should reach: explicit MF against the noise floor of the generated
ratings, implicit MF against a popularity ranking, and (given the files) MovieLens in Surprise's own protocol,
side by side with scikit-surprise on the very same folds.

Why: an RMSE means little without the best possible one (the generator knows its noise) or without the
reference library run on the same folds, and a ranking model means little unless it beats recommending what is
popular.

    python benchmarks/recommender.py                            # synthetic ratings, explicit and implicit
    python benchmarks/recommender.py --seeds 1,2,3
    python scripts/fetch_movielens.py                           # MovieLens 100K into data/ml-100k (not in git)
    pip install -e ".[bench]"                                   # scikit-surprise 1.1.5, for the side-by-side
    python benchmarks/recommender.py --movielens data/ml-100k --no-synthetic
    python benchmarks/recommender.py --movielens data/ml-100k --surprise svd,baseline   # leave out SVD++ (slow)
    python benchmarks/recommender.py --movielens data/ml-100k --no-synthetic --no-implicit   # only the explicit table

MovieLens protocol (Surprise's): 5-fold cross-validation over all ratings, shuffled with a fixed seed (KFold,
not stratified), 80/20 per fold, the same folds for every model. The zoo recipe trains on the whole training
fold (data.val_fraction=0) for its fixed number of epochs; nothing is chosen on the test fold. Fit time is
the fit alone (no interpreter start-up, no file reading); memory is the peak resident set size of the process
during the fit, and how much it rose over the fit. The implicit recipes (BPR MF, logistic MF, two towers, NeuMF,
SASRec) are ranked leave-one-out beside popularity on the same candidates; SASRec, a sequential model, reads each
user's history up to the validation item for the test (the protocol of its paper), the others their training items.
EASE (Steck, 2019), a closed-form item-item model that ignores order, is fitted on the same split as a reference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import QUIET, compose_config, environment, mean_std, quiet_lightning, table, train_quietly

if TYPE_CHECKING:
    import numpy as np

# Surprise's documented 5-fold RMSE on MovieLens 100K
SURPRISE_SVD, SURPRISE_SVDPP = 0.934, 0.919


def run(overrides: list[str], folder: Path, name: str) -> tuple[dict[str, float], float]:
    """Train and test through zoo.run.train; its metrics (CV means with cv.folds) and the wall time."""
    return train_quietly(compose_config([*overrides, *QUIET, "logger=none"], folder, run=name))


# the explicit target of the zoo recipe on MovieLens 100K, 5-fold
TARGET_RMSE = 0.905


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Fit:
    """Times a fit and measures its memory: the process's peak RSS during the fit and its rise over the start.

    The peak is reset first (Linux: writing 5 to /proc/self/clear_refs), so each fit's peak is its own, however
    the process grew before; where that is not possible, ru_maxrss (the peak since start) is given instead.
    """

    def __enter__(self) -> Fit:
        import gc

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.own_peak = True
        except OSError:
            self.own_peak = False
        self.start_kib = _status_kib("VmRSS")
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import resource

        self.seconds = time.perf_counter() - self.began
        peak = _status_kib("VmHWM") if self.own_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mib, self.rise_mib = peak / 1024, max(0, peak - self.start_kib) / 1024


def _errors(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    import numpy as np

    difference = predicted.astype(np.float64) - actual.astype(np.float64)
    return float(np.sqrt(np.mean(difference**2))), float(np.mean(np.abs(difference)))


def zoo_fold(
    experiment: str,
    path: Path,
    folds: int,
    fold: int,
    seed: int,
    workdir: Path,
    settings: tuple[str, ...] = (),
    split: str = "test",
) -> dict[str, float]:
    """The recipe (with `settings` on top) trained on the whole training fold (val_fraction=0, its fixed epochs) and
    scored on the test fold; with split="val", trained on 90% of the training fold and scored on the other 10%."""
    import torch
    from hydra.utils import instantiate

    from zoo.run import build_model, build_trainer

    overrides = [
        f"experiment={experiment}",
        f"data.path={path}",
        f"+data.folds={folds}",
        f"+data.fold={fold}",
        f"data.split_seed={seed}",
        f"data.val_fraction={0.1 if split == 'val' else 0}",
        *settings,
        "callbacks.model_checkpoint=null",
        "callbacks.early_stopping=null",
        "callbacks.last_checkpoint=null",
        "trainer.num_sanity_val_steps=0",
        "logger=none",
        *QUIET,
    ]
    cfg = compose_config(overrides, workdir, run=f"{experiment}_{fold}_{split}")
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data)
    model = build_model(cfg, data)
    trainer = build_trainer(cfg, enable_checkpointing=False, default_root_dir=str(workdir), limit_val_batches=0)
    with Fit() as fit:
        trainer.fit(model, datamodule=data)
    users, items, ratings = data.splits[split]
    model.eval()
    with torch.no_grad():
        predicted = model(users.to(model.device), items.to(model.device)).cpu().numpy()
    rmse, mae = _errors(predicted, ratings.numpy())
    return {"rmse": rmse, "mae": mae, "seconds": fit.seconds, "peak": fit.peak_mib, "rise": fit.rise_mib}


# nested selection: the settings tried on a validation share inside each training fold; the best is refitted on the
# whole training fold and scored on the test fold (the recipe's own settings are among them)
NESTED_GRID = tuple(
    (f"model.factor_l2={factor}", f"model.bias_l2={bias}", f"model.net.rank={rank}")
    for factor in (0.8, 1.2, 1.8)
    for bias in (0.24, 0.48)
    for rank in (64, 128)
)


def nested_fold(experiment: str, path: Path, folds: int, fold: int, seed: int, workdir: Path) -> dict[str, float]:
    """Settings chosen per fold on validation inside its training part, then refitted and tested; the fit time is
    the whole selection's."""
    scores = {grid: zoo_fold(experiment, path, folds, fold, seed, workdir, grid, "val") for grid in NESTED_GRID}
    chosen = min(scores, key=lambda grid: scores[grid]["rmse"])
    result = zoo_fold(experiment, path, folds, fold, seed, workdir, chosen)
    result["seconds"] += sum(score["seconds"] for score in scores.values())
    print(f"fold {fold + 1}: chose {' '.join(chosen)} (val RMSE {scores[chosen]['rmse']:.4f})", flush=True)
    return result


SURPRISE_MODELS = {"svd": "SVD", "svdpp": "SVDpp", "baseline": "BaselineOnly"}


def surprise_fold(name: str, train: Any, test: Any, scale: tuple[float, float]) -> dict[str, float]:
    """A Surprise model with its defaults (random_state fixed), fitted on the training fold, scored on the test fold."""
    import numpy as np
    import pandas as pd
    import surprise

    frame = pd.DataFrame({"user": train[0], "item": train[1], "rating": train[2]})
    trainset = surprise.Dataset.load_from_df(frame, surprise.Reader(rating_scale=scale)).build_full_trainset()
    kind = getattr(surprise, SURPRISE_MODELS[name])
    algo = kind(random_state=0) if name != "baseline" else kind(verbose=False)
    with Fit() as fit:
        algo.fit(trainset)
    predicted = np.array([algo.predict(u, i, clip=True).est for u, i in zip(test[0].tolist(), test[1].tolist())])
    rmse, mae = _errors(predicted, test[2])
    return {"rmse": rmse, "mae": mae, "seconds": fit.seconds, "peak": fit.peak_mib, "rise": fit.rise_mib}


def movielens_side_by_side(args: argparse.Namespace) -> None:
    """Surprise's protocol on the MovieLens folder: the zoo recipe, Surprise's models and the floors, same folds."""
    import numpy as np

    from zoo.data.recommender import MovieLensDataModule

    path = args.movielens.expanduser().resolve()
    wanted = [n.strip() for n in args.surprise.split(",") if n.strip()]
    experiments = [n.strip() for n in args.experiment.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(SURPRISE_MODELS))
    if unknown:
        raise SystemExit(f"--surprise: unknown {', '.join(unknown)}; allowed: {', '.join(SURPRISE_MODELS)}")
    try:
        import surprise  # noqa: F401
    except ImportError:
        print("scikit-surprise is not installed (pip install -e '.[bench]'): the zoo model runs alone")
        wanted = []
    results: dict[str, list[dict[str, float]]] = {}
    name = ""
    with tempfile.TemporaryDirectory(prefix="movielens_") as tmp:
        for fold in range(args.folds):
            split = MovieLensDataModule(
                path=str(path), folds=args.folds, fold=fold, val_fraction=0.0, split_seed=args.fold_seed
            )
            name = split.name
            source, rows = split.source, split.rows
            train = (source.users[rows["train"]], source.items[rows["train"]], source.ratings[rows["train"]])
            test = (source.users[rows["test"]], source.items[rows["test"]], source.ratings[rows["test"]])
            mean = float(np.mean(train[2], dtype=np.float64))
            rmse, mae = _errors(np.full(len(test[2]), mean), test[2])
            results.setdefault("global mean", []).append({"rmse": rmse, "mae": mae})
            for experiment in experiments:
                label = f"zoo {experiment}"
                results.setdefault(label, []).append(
                    zoo_fold(experiment, path, args.folds, fold, args.fold_seed, Path(tmp))
                )
                if args.nested:
                    results.setdefault(f"{label}, nested selection", []).append(
                        nested_fold(experiment, path, args.folds, fold, args.fold_seed, Path(tmp))
                    )
            for model in wanted:
                results.setdefault(f"Surprise {SURPRISE_MODELS[model]}", []).append(
                    surprise_fold(model, train, test, split.scale)
                )
            done = ", ".join(f"{k} {v[-1]['rmse']:.4f}" for k, v in results.items())
            print(f"fold {fold + 1}/{args.folds}: {done}", flush=True)
    rows = [["model", "RMSE", "MAE", "fit s/fold", "fit / SVD's (worst fold)", "peak RSS MiB (+fit)"]]
    svd = results.get("Surprise SVD")
    for label, folds in results.items():
        timed = "seconds" in folds[0]
        ratio = "-"
        if timed and svd:  # fold by fold: each fit against Surprise SVD's on the same fold, in the same process
            ratios = [f["seconds"] / s["seconds"] for f, s in zip(folds, svd)]
            ratio = f"{sum(ratios) / len(ratios):.2f} ({max(ratios):.2f})"
        rows.append(
            [
                label,
                mean_std([f["rmse"] for f in folds]),
                mean_std([f["mae"] for f in folds]),
                mean_std([f["seconds"] for f in folds], 2) if timed else "-",
                ratio,
                f"{max(f['peak'] for f in folds):.0f} (+{max(f['rise'] for f in folds):.0f})" if timed else "-",
            ]
        )
    print(
        f"\n{name}, {args.folds}-fold CV over all ratings (shuffled KFold, seed {args.fold_seed}; the same folds "
        f"for every model); mean ± std over folds.\nThe zoo recipe trains on the whole training fold "
        f"(data.val_fraction=0, its fixed epoch count, settings chosen on validation inside training folds); "
        f"Surprise models run with their defaults.\nPublished (Surprise, ML-100K): SVD {SURPRISE_SVD}, SVD++ "
        f"{SURPRISE_SVDPP}; zoo target: RMSE <= {TARGET_RMSE}."
    )
    print(table(rows, right={1, 2, 3, 4, 5}))


# implicit recipes on MovieLens (leave-one-out): name (for --ranking), label, overrides
IMPLICIT_RUNS = (
    ("bpr", "BPR MF", ["experiment=mf_implicit_movielens"]),
    ("logistic", "logistic MF", ["experiment=mf_implicit_movielens", "model.loss=logistic"]),
    ("two_tower", "two-tower", ["experiment=two_tower_movielens"]),
    ("neumf", "NeuMF", ["experiment=neumf_movielens"]),
    ("sasrec", "SASRec", ["experiment=sasrec_movielens"]),
)
TARGET_HR = 0.70
# EASE's L2 weight (Steck, 2019), chosen on the validation items: the paper tunes it per dataset in the hundreds
EASE_LAMBDAS = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)


def ease_reference(path: str, workdir: Path) -> tuple[dict[str, float], float, float]:
    """EASE (Steck, 2019) on the recipes' own leave-one-out split: the item-item weights of a ridge regression of
    each item's column on all others (zero diagonal), in closed form. A strong ranker that ignores order: what the
    matrix factorizations and towers, which read the same training items without order, can be held to. Its L2
    weight is the one with the best val/ndcg@10 (all items), as the recipes' checkpoints are chosen; the test
    metrics are the zoo's own functions on the same candidates. Returns the test metrics, the weight and the wall
    time."""
    import torch
    from hydra.utils import instantiate

    from zoo.metrics.ranking import exclude_seen, hit_rate, ndcg, target_ranks

    start = time.perf_counter()
    data = instantiate(compose_config(["experiment=mf_implicit_movielens", path, *QUIET], workdir, run="ease").data)
    data.setup("fit")
    users, items = data.splits["train"]
    interactions = torch.zeros(data.num_users, data.num_items, dtype=torch.float64)
    interactions[users, items] = 1.0
    gram = interactions.T @ interactions
    indptr, seen = torch.from_numpy(data.seen_indptr), torch.from_numpy(data.seen_items)

    def scores(weight: float) -> dict[str, dict[str, float]]:
        inverse = torch.linalg.inv(gram + weight * torch.eye(data.num_items, dtype=torch.float64))
        item_weights = -inverse / inverse.diagonal()
        item_weights.fill_diagonal_(0.0)
        every = interactions @ item_weights
        metrics = {}
        for split in ("val", "test"):
            held_users, targets, negatives = data.splits[split]
            candidates = torch.cat([targets[:, None], negatives], dim=1)
            sampled = target_ranks(every[held_users].gather(1, candidates), torch.zeros_like(targets))
            ranks = target_ranks(exclude_seen(every[held_users], held_users, targets, indptr, seen), targets)
            metrics[split] = {
                "hr@10_sampled100": hit_rate(sampled, 10).mean().item(),
                "ndcg@10_sampled100": ndcg(sampled, 10).mean().item(),
                "hr@10": hit_rate(ranks, 10).mean().item(),
                "ndcg@10": ndcg(ranks, 10).mean().item(),
            }
        return metrics

    by_weight = {weight: scores(weight) for weight in EASE_LAMBDAS}
    chosen = max(EASE_LAMBDAS, key=lambda weight: by_weight[weight]["val"]["ndcg@10"])
    return by_weight[chosen]["test"], chosen, time.perf_counter() - start


def movielens_implicit(args: argparse.Namespace, seeds: list[int]) -> None:
    """The implicit recipes, leave-one-out, each beside popularity ranked on the same candidates; mean ± std over
    training seeds (the split is the same: leave-one-out has one)."""
    path = f"data.path={args.movielens.expanduser().resolve()}"
    k, sampled = "10", "sampled100"
    names = (f"hr@{k}_{sampled}", f"ndcg@{k}_{sampled}", f"hr@{k}", f"ndcg@{k}")
    rows = [["model", "HR@10 sampled", "NDCG@10 sampled", "HR@10 all", "NDCG@10 all", "worst HR@10 s.", "wall/run"]]
    popularity: dict[str, float] = {}
    chosen = {name.strip() for name in args.ranking.split(",")}
    allowed = [name for name, _, _ in IMPLICIT_RUNS]
    if chosen - set(allowed):
        sys.exit(f"--ranking: unknown {', '.join(sorted(chosen - set(allowed)))}; allowed: {', '.join(allowed)}")
    with tempfile.TemporaryDirectory(prefix="implicit_") as tmp:
        for _, label, overrides in (entry for entry in IMPLICIT_RUNS if entry[0] in chosen):
            runs = [
                run([*overrides, path, f"seed={seed}"], Path(tmp), f"{label.replace(' ', '_')}_{seed}")
                for seed in seeds
            ]
            scores = {name: [metrics[f"test/{name}"] for metrics, _ in runs] for name in names}
            worst = min(scores[names[0]])
            wall = sum(seconds for _, seconds in runs) / len(runs)
            rows.append([label, *(mean_std(scores[name]) for name in names), f"{worst:.4f}", f"{wall:.0f} s"])
            popularity = {name: runs[0][0][f"test/{name}_popularity"] for name in names}
            print(f"{label}: test/hr@{k}_{sampled} {', '.join(f'{v:.4f}' for v in scores[names[0]])}", flush=True)
        ease, weight, seconds = ease_reference(path, Path(tmp))
    rows.append([f"EASE, L2 {weight:g}", *(f"{ease[name]:.4f}" for name in names), "-", f"{seconds:.0f} s"])
    rows.append(["popularity", *(f"{popularity[name]:.4f}" for name in names), "-", "-"])
    print(
        f"\nImplicit feedback on {args.movielens.name}: leave-one-out (each user's latest interaction is the test "
        f"item), the checkpoint with the best val/ndcg@{k}; 'sampled': the target among 100 sampled unrated items "
        f"(He et al., 2017), 'all': among all unrated items; popularity ranked on the same candidates. Mean ± std "
        f"over seeds {', '.join(map(str, seeds))}. Target: HR@{k} sampled >= {TARGET_HR}.\nEASE (Steck, 2019; "
        f"closed form, deterministic, L2 weight chosen on val/ndcg@{k} from {', '.join(f'{w:g}' for w in EASE_LAMBDAS)}"
        f"): a strong ranker that ignores order, on the same training items: what the models without order can be "
        f"held to."
    )
    print(table(rows, right={1, 2, 3, 4, 5, 6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1", help="comma-separated training seeds (synthetic and implicit runs)")
    parser.add_argument("--movielens", type=Path, default=None, help="a MovieLens folder (any format data.path reads)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seed", type=int, default=0, help="the seed of the shuffled k-fold (data.split_seed)")
    parser.add_argument(
        "--experiment",
        default="mf_movielens,bpmf_movielens,autorec_movielens",
        help="the zoo recipes to run on the folds, comma-separated",
    )
    parser.add_argument("--surprise", default="svd,svdpp,baseline", help="Surprise models: svd, svdpp, baseline")
    parser.add_argument(
        "--ranking",
        default=",".join(name for name, _, _ in IMPLICIT_RUNS),
        help="MovieLens: the implicit recipes to rank with, comma-separated",
    )
    parser.add_argument("--no-synthetic", dest="synthetic", action="store_false", help="only the MovieLens part")
    parser.add_argument("--no-explicit", dest="explicit", action="store_false", help="MovieLens: leave out Surprise's")
    parser.add_argument("--no-implicit", dest="implicit", action="store_false", help="MovieLens: leave out ranking")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--nested", action="store_true", help="MovieLens: also choose settings per fold on validation inside it"
    )
    args = parser.parse_args()
    print(environment(), flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    import torch

    torch.set_num_threads(torch.get_num_threads() if args.threads is None else args.threads)
    quiet_lightning()

    if args.movielens is not None and args.explicit:
        movielens_side_by_side(args)
    if args.movielens is not None and args.implicit:
        movielens_implicit(args, seeds)
    if not args.synthetic:
        return
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
    print(f"\nRecommenders, seeds {', '.join(map(str, seeds))} (mean ± std over seeds)")
    print(table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
