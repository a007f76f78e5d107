"""Recommenders: the generator's noise floor, MovieLens files, explicit MF to near the floor, unknown ids,
ranking metrics, implicit and two-tower training, resume, evaluate, TensorBoard projector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.conftest import (
    assert_same_final_weights,
    checkpoint,
    compose_config,
    interrupted_and_resumed,
    run_script,
)
from zoo.data.recommender import (
    MovieLensDataModule,
    SyntheticRatingsDataModule,
    generate_ratings,
    read_movielens,
)
from zoo.errors import UserError
from zoo.metrics.ranking import exclude_seen, hit_rate, ndcg, target_ranks
from zoo.nn.recommender import BiasedMF, ImplicitMF, NeuMF, TwoTower
from zoo.run import evaluate, train

SMALL = ["data.num_users=200", "data.num_items=100", "data.num_ratings=8000"]
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama")


def metrics_of(cfg) -> dict[str, float]:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def tiny_ratings(seed: int = 0, users: int = 8, items: int = 10, count: int = 60) -> list[tuple[int, int, int, int]]:
    """Distinct (user, item, rating, timestamp) rows with 1-based ids; every user and item appears."""
    rng = np.random.default_rng(seed)
    cells = {(u % users, u % items) for u in range(max(users, items))}
    while len(cells) < count:
        cells.add((int(rng.integers(users)), int(rng.integers(items))))
    return [(u + 1, i + 1, int(rng.integers(1, 6)), 880_000_000 + k) for k, (u, i) in enumerate(sorted(cells))]


def write_100k(folder: Path, rows: list[tuple[int, int, int, int]], test: list[tuple[int, int, int, int]] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    every = list(rows) + list(test)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in every))
    (folder / "u1.base").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    (folder / "u1.test").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in test))
    (folder / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)))
    items = sorted({i for _, i, _, _ in every})
    flags = lambda i: "|".join("1" if k == i % len(GENRES) else "0" for k in range(len(GENRES)))  # noqa: E731
    lines = [f"{i}|Movie {i} (1995)|01-Jan-1995||http://x/{i}|{flags(i)}\n" for i in items]
    (folder / "u.item").write_text("".join(lines), encoding="latin-1")
    users = sorted({u for u, _, _, _ in every})
    jobs = ("student", "writer", "engineer")
    lines = [f"{u}|{15 + 7 * u}|{'MF'[u % 2]}|{jobs[u % 3]}|0000{u}\n" for u in users]
    (folder / "u.user").write_text("".join(lines))


def write_1m(folder: Path, rows: list[tuple[int, int, int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    items = sorted({i for _, i, _, _ in rows})
    lines = [f"{i}::Film {i} (2000)::{'Action|Comedy' if i % 2 else 'Drama'}\n" for i in items]
    (folder / "movies.dat").write_text("".join(lines), encoding="latin-1")
    users = sorted({u for u, _, _, _ in rows})
    (folder / "users.dat").write_text("".join(f"{u}::{'FM'[u % 2]}::{(1, 25, 56)[u % 3]}::{u % 5}::1\n" for u in users))


def write_latest(folder: Path, rows: list[tuple[int, int, int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["userId,movieId,rating,timestamp\n"] + [f"{u},{i * 10},{r - 0.5},{t}\n" for u, i, r, t in rows]
    (folder / "ratings.csv").write_text("".join(lines))
    items = sorted({i for _, i, _, _ in rows})
    lines = ["movieId,title,genres\n"] + [f'{i * 10},"Title, The ({1990 + i})",Comedy|Romance\n' for i in items]
    (folder / "movies.csv").write_text("".join(lines))


# ---------------------------------------------------------------- synthetic data


def test_true_parameters_reach_the_noise_floor() -> None:
    data = SyntheticRatingsDataModule(noise_std=0.5)
    source = data.source
    for split in ("train", "val", "test"):
        rows = data.rows[split]
        rmse = float(np.sqrt(np.mean((source.ratings[rows] - source.clean[rows]) ** 2)))
        assert rmse == pytest.approx(0.5, rel=0.03), split
    assert data.noise_std == 0.5
    assert np.std(source.ratings) > 0.8  # signal beyond the noise: biases and factors matter


def test_generator_is_seeded_and_cells_are_distinct() -> None:
    a, b = generate_ratings(seed=3), generate_ratings(seed=3)
    assert np.array_equal(a.ratings, b.ratings)
    assert not np.array_equal(a.ratings, generate_ratings(seed=4).ratings)
    assert len(np.unique(a.users * 400 + a.items)) == len(a.ratings) == 100_000


def test_random_split_is_80_10_10_and_fixed_by_split_seed() -> None:
    a = SyntheticRatingsDataModule(**{"num_users": 100, "num_items": 50, "num_ratings": 2000}, split_seed=0)
    b = SyntheticRatingsDataModule(**{"num_users": 100, "num_items": 50, "num_ratings": 2000}, shuffle_seed=5)
    c = SyntheticRatingsDataModule(**{"num_users": 100, "num_items": 50, "num_ratings": 2000}, split_seed=1)
    assert [len(a.rows[s]) for s in ("train", "val", "test")] == [1600, 200, 200]
    assert np.array_equal(a.rows["test"], b.rows["test"])
    assert not np.array_equal(a.rows["test"], c.rows["test"])
    assert not set(a.rows["test"]) & set(a.rows["train"]) and not set(a.rows["val"]) & set(a.rows["train"])


def test_kfold_test_sets_partition_the_ratings() -> None:
    tests = [SyntheticRatingsDataModule(num_ratings=3000, folds=3, fold=f).rows["test"] for f in range(3)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(3000))


def test_one_epoch_is_index_batches_of_the_whole_train_split() -> None:
    data = SyntheticRatingsDataModule(num_ratings=5000, batch_size=512)
    batches = list(data.train_dataloader())
    assert len(batches) == math.ceil(4000 / 512)
    users, items, ratings = (torch.cat(parts) for parts in zip(*batches))
    assert len(ratings) == 4000 and users.dtype == torch.int64 and ratings.dtype == torch.float32


# ---------------------------------------------------------------- MovieLens files


def test_movielens_100k_reader(tmp_path: Path) -> None:
    rows = tiny_ratings()
    write_100k(tmp_path, rows)
    data = read_movielens(tmp_path)
    assert data.name == "MovieLens 100K" and len(data.ratings) == len(rows) and data.scale == (1.0, 5.0)
    assert data.titles[3] == "Movie 3 (1995)" and data.genres[3] == [GENRES[3]]
    assert data.genre_names == list(GENRES)
    vector = dict(zip(data.user_feature_names, data.user_features[2]))  # user 2: 29 years, M, engineer
    assert vector["age25-34"] == 1 and vector["gender=M"] == 1 and vector["occupation=engineer"] == 1
    assert sum(vector.values()) == 3


def test_movielens_1m_reader(tmp_path: Path) -> None:
    rows = tiny_ratings(1)
    write_1m(tmp_path, rows)
    data = read_movielens(tmp_path)
    assert data.name == "MovieLens 1M" and len(data.ratings) == len(rows)
    assert data.users.tolist() == [u for u, _, _, _ in rows] and data.ratings.tolist() == [r for _, _, r, _ in rows]
    assert data.titles[1] == "Film 1 (2000)" and data.genres[1] == ["Action", "Comedy"]
    vector = dict(zip(data.user_feature_names, data.user_features[3]))  # user 3: M, age code 1 (<18)
    assert vector["gender=M"] == 1 and vector["age<18"] == 1 and vector["occupation=3"] == 1


def test_movielens_latest_small_reader(tmp_path: Path) -> None:
    rows = tiny_ratings(2)
    write_latest(tmp_path, rows)
    data = read_movielens(tmp_path)
    assert data.name == "MovieLens latest-small" and data.scale == (0.5, 5.0)
    assert set(data.items.tolist()) == {i * 10 for _, i, _, _ in rows}
    assert data.ratings.tolist() == [r - 0.5 for _, _, r, _ in rows]
    assert data.titles[20] == "Title, The (1992)" and data.genres[20] == ["Comedy", "Romance"]
    module = MovieLensDataModule(path=str(tmp_path))
    assert module.item_titles[1] == "Title, The (1992)" and module.item_ids[1] == 20
    assert module.item_features.shape == (10, 2) and module.user_features is None


def test_official_split_uses_u1_base_and_test(tmp_path: Path) -> None:
    rows = tiny_ratings(count=50)
    base, test = rows[:40], rows[40:]
    write_100k(tmp_path, base, test)
    data = MovieLensDataModule(path=str(tmp_path), split="official", val_fraction=0.1)
    assert len(data.rows["test"]) == 10 and len(data.rows["val"]) == 5 and len(data.rows["train"]) == 35
    official = {(u, i) for u, i, _, _ in test}
    users, items = data.user_ids[data.splits["test"][0].numpy()], data.item_ids[data.splits["test"][1].numpy()]
    assert set(zip(users.tolist(), items.tolist())) == official
    for fold in range(5):  # cv.folds=5 with split=official reads u<fold+1>
        (tmp_path / f"u{fold + 1}.base").write_text((tmp_path / "u1.base").read_text())
        (tmp_path / f"u{fold + 1}.test").write_text((tmp_path / "u1.test").read_text())
    assert len(MovieLensDataModule(path=str(tmp_path), split="official", folds=5, fold=4).rows["test"]) == 10


def test_missing_folder_is_one_line_naming_the_files(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        MovieLensDataModule(path=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "\n" not in message and "no such folder" in message
    for name in ("u.data", "u.item", "u.user", "ratings.dat", "movies.dat", "users.dat", "ratings.csv", "movies.csv"):
        assert name in message
    assert "grouplens.org" in message


@pytest.mark.slow  # a train.py subprocess, about 15 s
def test_train_py_without_movielens_files_ends_in_one_line(tmp_path: Path) -> None:
    result = run_script("train.py", "experiment=mf_movielens", f"data.path={tmp_path / 'ml'}", cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.path: no MovieLens ratings") and "u.data" in line and "ratings.csv" in line


def test_bad_movielens_requests_are_user_errors(tmp_path: Path) -> None:
    write_1m(tmp_path, tiny_ratings())
    with pytest.raises(UserError, match="no official split"):
        MovieLensDataModule(path=str(tmp_path), split="official")
    with pytest.raises(UserError, match="data.path: not set"):
        MovieLensDataModule(path=None)
    write_100k(tmp_path / "k", tiny_ratings())
    (tmp_path / "k" / "u1.test").unlink()
    with pytest.raises(UserError, match="u1.test"):
        MovieLensDataModule(path=str(tmp_path / "k"), split="official")


# ---------------------------------------------------------------- unknown ids


def test_unknown_ids_get_bias_only_predictions() -> None:
    net = BiasedMF(3, 3, rank=2)
    with torch.no_grad():
        net.user_bias.weight.copy_(torch.tensor([[0.1], [0.2], [0.3]]))
        net.item_bias.weight.copy_(torch.tensor([[-0.1], [-0.2], [-0.3]]))
    net.set_statistics(3.0, user_known=torch.tensor([True, True, False]), item_known=torch.tensor([True, False, True]))
    users = torch.tensor([2, 0, 2, -1, 99, 0])
    items = torch.tensor([0, 1, 1, 2, 2, 0])
    predicted = net(users, items)
    dot = (net.user_factors.weight[0] * net.item_factors.weight[0]).sum()
    expected = torch.tensor([3.0 - 0.1, 3.0 + 0.1, 3.0, 3.0 - 0.3, 3.0 - 0.3, 3.0 + 0.1 - 0.1 + dot.item()])
    assert torch.allclose(predicted, expected, atol=1e-6)
    assert net.predict_all(torch.tensor([2, -1])).shape == (2, 3)


def test_mean_normalization_gives_a_new_user_the_item_mean() -> None:
    net = BiasedMF(2, 2, rank=2, mean_normalization=True)
    net.set_statistics(3.0, item_mean=torch.tensor([4.5, 2.0]), user_known=torch.tensor([True, False]))
    assert net(torch.tensor([1, 1, -1]), torch.tensor([0, 1, 1])).tolist() == [4.5, 2.0, 2.0]


def test_unknown_ids_at_test_time_are_counted(train_config, tmp_path: Path) -> None:
    base = tiny_ratings(count=50)
    base = [row for row in base if row[0] != 8 and row[1] != 10]  # user 8 and item 10 only in the test file
    test = [(8, 1, 4, 1), (1, 10, 3, 2), (8, 10, 5, 3), (2, 3, 4, 4)]
    write_100k(tmp_path / "ml", base, test)
    cfg = train_config(
        "model=mf",
        "data=movielens",
        f"data.path={tmp_path / 'ml'}",
        "data.split=official",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "logger=none",
    )
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/unknown_users"] == 2 and metrics["test/unknown_items"] == 2
    assert 0 < metrics["test/rmse"] < 4 and 0 < metrics["test/mae"] < 4


# ---------------------------------------------------------------- ranking metrics


def test_hit_rate_and_ndcg_against_hand_computed_values() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # target 2: one item above it -> rank 1
            [0.2, 0.8, 0.1, 0.7],  # target 0: two above -> rank 2
            [0.1, 0.2, 0.3, 0.4],  # target 0: three above -> rank 3
            [0.5, 0.5, 0.5, 0.5],  # target 1: ties count against it -> rank 3
        ]
    )
    ranks = target_ranks(scores, torch.tensor([2, 0, 0, 1]))
    assert ranks.tolist() == [1, 2, 3, 3]
    assert hit_rate(ranks, 3).tolist() == [1.0, 1.0, 0.0, 0.0]
    expected = [1 / math.log2(3), 1 / math.log2(4), 0.0, 0.0]
    assert ndcg(ranks, 3).tolist() == pytest.approx(expected)
    assert ndcg(torch.tensor([0]), 10).item() == 1.0


def test_seen_items_are_left_out_except_the_target() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.9, 0.8, 0.1, 0.7]])
    indptr, indices = torch.tensor([0, 2, 4]), torch.tensor([0, 2, 1, 3])  # user 0 saw {0, 2}, user 1 {1, 3}
    masked = exclude_seen(scores, torch.tensor([0, 1]), torch.tensor([2, 3]), indptr, indices)
    assert torch.isinf(masked).nonzero().tolist() == [[0, 0], [1, 1]]
    assert masked[0, 2] == scores[0, 2] and masked[1, 3] == scores[1, 3]
    assert target_ranks(masked, torch.tensor([2, 3])).tolist() == [2, 1]


def test_leave_one_out_holds_out_each_users_latest_interactions() -> None:
    data = SyntheticRatingsDataModule(num_ratings=20000, protocol="leave_one_out", implicit_threshold=4.0)
    source, test_rows, val_rows = data.source, data.rows["test"], data.rows["val"]
    assert len(test_rows) == len(val_rows) == len(np.unique(source.users[test_rows]))
    positive = source.ratings >= 4.0
    for row, val_row in list(zip(test_rows, val_rows))[:50]:
        user = source.users[row]
        times = source.timestamps[positive & (source.users == user)]
        assert source.timestamps[row] == times.max() and source.timestamps[val_row] == np.sort(times)[-2]
    users, targets, negatives = data.splits["test"]
    assert negatives.shape == (len(users), 100)
    rated = set(zip(source.users.tolist(), source.items.tolist()))
    assert not any((int(u), int(i)) in rated for u, row in zip(users[:20], negatives[:20]) for i in row)


# ---------------------------------------------------------------- training


def test_mf_reaches_near_the_noise_floor(train_config) -> None:
    cfg = train_config(
        "experiment=mf_synthetic",
        "logger=none",
        "trainer.max_epochs=8",
        "data.batch_size=4096",
        "optimizer.lr=3e-2",
    )
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/noise_floor"] == 0.5
    assert metrics["test/rmse"] <= 1.10 * 0.5, metrics["test/rmse"]
    assert metrics["val/rmse_best"] <= metrics["val/rmse"] + 1e-6
    assert metrics["test/mae"] < metrics["test/rmse"]


@pytest.mark.slow
def test_mf_synthetic_experiment_reaches_five_percent_of_the_noise_floor(train_config) -> None:
    cfg = train_config("experiment=mf_synthetic", "logger=none")
    train(cfg)
    metrics = metrics_of(cfg)
    assert cfg.expected.max == pytest.approx(1.05 * metrics["test/noise_floor"])
    assert metrics["test/rmse"] <= cfg.expected.max, metrics["test/rmse"]


def test_movielens_through_train_with_every_format(train_config, tmp_path: Path) -> None:
    for writer in (write_100k, write_1m, write_latest):
        folder = tmp_path / writer.__name__
        writer(folder, tiny_ratings(count=80))
        cfg = train_config(
            "experiment=mf_movielens",
            f"data.path={folder}",
            "trainer.max_epochs=2",
            "logger=none",
            folder=f"run_{writer.__name__}",
        )
        train(cfg)
        metrics = metrics_of(cfg)
        assert 0 < metrics["test/rmse"] < 5 and "test/mae" in metrics


@pytest.mark.parametrize(
    ("optimizer", "runs_as"), [("adam", "SparseAdam"), ("adamw", "SparseAdam"), ("adagrad", "Adagrad")]
)
def test_sparse_gradients_train_with_a_matching_optimizer(train_config, optimizer: str, runs_as: str) -> None:
    from zoo.run import build_model

    settings = ["experiment=mf_synthetic", *SMALL, f"optimizer={optimizer}", "model.net.sparse=true"]
    lr = "optimizer.lr=0.1" if optimizer == "adagrad" else "optimizer.lr=0.03"
    optimizer_object = build_model(train_config(*settings, "scheduler=none")).configure_optimizers()
    assert type(optimizer_object).__name__ == runs_as
    cfg = train_config(*settings, lr, "trainer.max_epochs=6", "logger=none", "test=false")
    train(cfg)
    assert metrics_of(cfg)["val/rmse"] < 0.88  # untrained: 0.93; dense Adam: 0.84


def test_sparse_gradients_refuse_an_optimizer_that_cannot_take_them(train_config) -> None:
    cfg = train_config("experiment=mf_synthetic", *SMALL, "optimizer=rmsprop", "model.net.sparse=true", "logger=none")
    with pytest.raises(UserError, match="sparse"):
        train(cfg)


def test_resume_equals_the_uninterrupted_run(train_config) -> None:
    settings = [*SMALL, "trainer.max_epochs=4", "callbacks.model_checkpoint.save_top_k=-1", "test=false", "logger=none"]
    for experiment in ("mf_synthetic", "mf_implicit_synthetic"):  # the implicit one draws negatives at random
        full, resumed = interrupted_and_resumed(train_config, f"experiment={experiment}", *settings, name=experiment)
        a, b = (checkpoint(c)["state_dict"] for c in (full, resumed))
        halfway = checkpoint(full, "epoch_001.ckpt")["state_dict"]
        assert not all(torch.equal(halfway[k], a[k]) for k in a), experiment
        for key in a:
            assert torch.equal(a[key], b[key]), (experiment, key)


def test_evaluate_reproduces_the_test_metrics_and_tensorboard_has_the_projector(train_config, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = train_config("experiment=mf_synthetic", *SMALL, "trainer.max_epochs=3")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    logged = metrics_of(cfg)
    ckpt = next((run / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    for name in ("test/rmse", "test/mae", "test/unknown_users"):
        assert scored[name] == pytest.approx(logged[name], abs=1e-6), name

    scalars = set()
    for events in (run / "tensorboard").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
        if "val/rmse" in accumulator.Tags()["scalars"]:
            assert len(accumulator.Scalars("val/rmse")) == 3  # one point per epoch
    assert {"train/loss", "val/rmse", "val/mae", "test/rmse", "test/mae"} <= scalars
    assert (run / "tensorboard" / "projector_config.pbtxt").is_file()
    (metadata,) = (run / "tensorboard").rglob("items/metadata.tsv")
    labels = metadata.read_text().splitlines()
    assert labels[0] == "item 0" and len(labels) == 100
    # the projector holds the vectors of the checkpoint the test metrics used, under that checkpoint's step
    best = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert metadata.parent.parent.name == f"{best['global_step']:05d}"


def test_cross_validation_over_ratings(train_config) -> None:
    cfg = train_config("experiment=mf_synthetic", *SMALL, "cv.folds=2", "trainer.max_epochs=1", "logger=none")
    train(cfg)
    report = json.loads((Path(cfg.paths.output_dir) / "cv.json").read_text())
    assert report["folds"] == 2 and "test/rmse" in report["mean"]


# ---------------------------------------------------------------- implicit feedback and two towers


def test_implicit_mf_ranks_better_than_chance(train_config) -> None:
    cfg = train_config("experiment=mf_implicit_synthetic", "trainer.max_epochs=6", "logger=none")
    train(cfg)
    metrics = metrics_of(cfg)
    # chance: 10 of about 230 unrated items, and 10 of 101 sampled candidates
    assert metrics["test/hr@10"] > 0.08 and metrics["test/hr@10_sampled100"] > 0.18
    assert metrics["test/ndcg@10"] <= metrics["test/hr@10"]
    assert metrics["val/ndcg@10_best"] >= metrics["val/ndcg@10"] - 1e-6
    assert metrics["test/hr@10"] > metrics["test/hr@10_popularity"] > 0.0


def test_logistic_loss_two_tower_and_neumf_run(train_config, tmp_path: Path) -> None:
    write_100k(tmp_path / "ml", tiny_ratings(count=50))
    for overrides in (
        ["experiment=mf_implicit_synthetic", *SMALL, "model.loss=logistic"],
        ["model=two_tower", "data=movielens", f"data.path={tmp_path / 'ml'}", "optimizer=adam"],
        ["experiment=neumf_movielens", f"data.path={tmp_path / 'ml'}"],
    ):
        cfg = train_config(*overrides, "trainer.max_epochs=2", "logger=none", folder=f"run{len(overrides)}")
        train(cfg)
        metrics = metrics_of(cfg)
        assert 0 <= metrics["test/hr@10"] <= 1 and 0 <= metrics["test/ndcg@10_sampled100"] <= 1


def test_two_tower_scores_with_features_and_is_normalized() -> None:
    net = TwoTower(4, 5, user_features=torch.eye(4), item_features=torch.eye(5)[:, :3], dim=8, temperature=0.5)
    users = torch.tensor([0, 1, -1])
    assert torch.allclose(net.user_vectors(users).norm(dim=-1), torch.ones(3))
    scores = net.score_all(users)
    assert scores.shape == (3, 5) and scores.abs().max() <= 2.0 + 1e-5
    assert torch.allclose(
        net(users, torch.tensor([[0, 1], [2, 3], [4, 0]])), scores.gather(1, torch.tensor([[0, 1], [2, 3], [4, 0]]))
    )


def test_neumf_scores_candidates_like_all_items_and_unknown_ids_score_zero() -> None:
    torch.manual_seed(0)
    net = NeuMF(3, 4, gmf_dim=2, mlp=(8, 4), init_std=0.5)
    users = torch.tensor([0, 2])
    candidates = torch.tensor([[3, 1], [0, 2]])
    assert torch.allclose(net(users, candidates), net.score_all(users).gather(1, candidates))
    assert torch.allclose(net(users, candidates[:, 0]), net(users, candidates)[:, 0])
    net.set_known(torch.tensor([True, False, True]), torch.ones(4, dtype=torch.bool))
    assert net(torch.tensor([1, -1]), torch.tensor([0, 0])).eq(0).all()
    # the MLP branch sees the pair, not only each side: its output differs from user part + item part
    assert net.score_all(torch.tensor([0, 2])).std() > 0


@pytest.mark.slow
def test_neumf_learns_to_rank_above_popularity(train_config) -> None:
    cfg = train_config(
        "model=neumf", "data=ratings_synthetic", "optimizer.lr=5e-3", "trainer.max_epochs=6", "logger=none"
    )
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/hr@10"] > metrics["test/hr@10_popularity"] > 0.0


def test_implicit_mf_scores_candidates_like_all_items() -> None:
    net = ImplicitMF(3, 4, rank=2)
    users = torch.tensor([0, 2])
    candidates = torch.tensor([[3, 1], [0, 2]])
    assert torch.allclose(net(users, candidates), net.score_all(users).gather(1, candidates))


def test_recommend_prints_titles_and_skips_rated_items(train_config, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from zoo.run import build_model

    write_100k(tmp_path / "ml", tiny_ratings(count=40))
    cfg = train_config("model=two_tower", "data=movielens", f"data.path={tmp_path / 'ml'}")
    model = build_model(cfg)
    data = instantiate(cfg.data)
    rated = {i for u, i, _, _ in tiny_ratings(count=40) if u == 1}
    top = model.recommend(1, k=3)
    assert len(top) == 3 and not {item for item, _, _ in top} & rated
    assert all(title.startswith("Movie ") for _, title, _ in top)
    assert "Movie" in model.format_recommendations(1, k=3) and "without training data" in model.format_recommendations(
        999
    )
    assert data.num_items == 10


@pytest.mark.slow  # subprocesses of train.py and evaluate.py, 30-50 s
def test_evaluate_py_recommends_for_a_user(tmp_path: Path) -> None:
    write_100k(tmp_path / "ml", tiny_ratings(count=40))
    common = ["extras.print_config=false", "trainer.enable_progress_bar=false", "trainer.max_epochs=1"]
    trained = run_script(
        "train.py", *common, "model=two_tower", "data=movielens", f"data.path={tmp_path / 'ml'}", cwd=tmp_path
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    shown = run_script("evaluate.py", ckpt, "mode=recommend", "user_id=1", "top_k=3", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "top-3 recommendations for user 1" in shown.stdout and shown.stdout.count("Movie ") >= 3
    missing = run_script("evaluate.py", ckpt, "mode=recommend", cwd=tmp_path)
    assert missing.returncode == 2 and "user_id: required with mode=recommend" in missing.stderr


# ---------------------------------------------------------------- RecBole atomic files and the fetch script


def write_atomic(folder: Path, rows: list[tuple[int, int, int, int]], name: str = "ml-100k") -> None:
    """RecBole's atomic format: typed tab-separated headers; genres as a space-separated token_seq."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float\n"]
    lines += [f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows]
    (folder / f"{name}.inter").write_text("".join(lines))
    items = sorted({i for _, i, _, _ in rows})
    lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"]
    lines += [f"{i}\tMovie {i}\t1995\t{'Action Comedy' if i % 2 else 'Drama'}\n" for i in items]
    (folder / f"{name}.item").write_text("".join(lines))
    users = sorted({u for u, _, _, _ in rows})
    lines = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"]
    lines += [f"{u}\t{15 + 7 * u}\t{'MF'[u % 2]}\t{('student', 'writer')[u % 2]}\t{10000 + u}\n" for u in users]
    (folder / f"{name}.user").write_text("".join(lines))


def test_recbole_atomic_files_read_like_movielens(tmp_path: Path) -> None:
    rows = tiny_ratings(3)
    write_atomic(tmp_path, rows)
    data = read_movielens(tmp_path)
    assert data.name == "MovieLens 100K" and len(data.ratings) == len(rows) and data.scale == (1.0, 5.0)
    assert data.users.tolist() == [u for u, _, _, _ in rows] and data.ratings.tolist() == [r for _, _, r, _ in rows]
    assert data.timestamps.tolist() == [t for _, _, _, t in rows]
    assert data.titles[3] == "Movie 3" and data.genres[3] == ["Action", "Comedy"] and data.genres[2] == ["Drama"]
    vector = dict(zip(data.user_feature_names, data.user_features[2]))  # user 2: 29 years, M, student
    assert vector["age25-34"] == 1 and vector["gender=M"] == 1 and vector["occupation=student"] == 1
    assert sum(vector.values()) == 3 and not any(n.startswith("zip_code") for n in data.user_feature_names)
    module = MovieLensDataModule(path=str(tmp_path), folds=5, fold=2)
    assert module.item_titles[0] == "Movie 1" and module.item_features.shape == (10, 3)


def test_atomic_files_of_any_data_set_with_string_ids_and_no_ratings(tmp_path: Path) -> None:
    lines = [
        "session:token\tuser_id:token\titem_id:token\n",
        "s\tann\tbook-b\n",
        "s\tbob\tbook-a\n",
        "s\tann\tbook-a\n",
    ]
    (tmp_path / "shop.inter").write_text("".join(lines))
    data = read_movielens(tmp_path)
    assert data.name == "shop" and data.ratings.tolist() == [1.0, 1.0, 1.0]
    assert data.users.tolist() == [1, 2, 1] and data.items.tolist() == [2, 1, 1]  # tokens numbered in sorted order
    (tmp_path / "shop.inter").write_text("user:token\titem:token\nann\tbook\n")
    with pytest.raises(UserError, match="no user_id or item_id field"):
        read_movielens(tmp_path)
    (tmp_path / "shop.inter").write_text("user_id\titem_id\n1\t2\n")
    with pytest.raises(UserError, match="typed header"):
        read_movielens(tmp_path)


def _fetch_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fetch_movielens", Path(__file__).resolve().parent.parent / "scripts" / "fetch_movielens.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_script_extracts_and_checks_the_wheels_files(tmp_path: Path) -> None:
    import hashlib
    import zipfile

    fetch = _fetch_script()
    write_atomic(tmp_path / "src", tiny_ratings(4))
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr("recbole/__init__.py", "")
        for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
            zipped.write(tmp_path / "src" / name, fetch.WHEEL_FOLDER + name)
    digests = {
        name: hashlib.sha256((tmp_path / "src" / name).read_bytes()).hexdigest()
        for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
    }
    written = fetch.extract_atomic(wheel, tmp_path / "ml", digests)
    assert sorted(p.name for p in written) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert read_movielens(tmp_path / "ml").name == "MovieLens 100K"
    # a file that does not match its digest is refused and not left behind
    wrong = {**digests, "ml-100k.item": "0" * 64}
    with pytest.raises(fetch.FetchError, match="ml-100k.item.*SHA-256"):
        fetch.extract_atomic(wheel, tmp_path / "bad", wrong)
    assert not (tmp_path / "bad" / "ml-100k.item").exists() and not list((tmp_path / "bad").glob("*.part"))
    with pytest.raises(fetch.FetchError, match="no recbole/dataset_example/ml-100k/ml-100k.kg"):
        fetch.extract_atomic(wheel, tmp_path / "bad", {"ml-100k.kg": "0" * 64})
    assert fetch.main(["--wheel", str(tmp_path / "src" / "ml-100k.inter"), "--dest", str(tmp_path / "x")]) == 1
    # the ratings digest is the same for RecBole's .inter and a GroupLens u.data of the same rows
    write_100k(tmp_path / "k", tiny_ratings(4))
    assert fetch.ratings_sha256(tmp_path / "k" / "u.data") == fetch.ratings_sha256(
        tmp_path / "ml" / "ml-100k.inter", header=True
    )


# ---------------------------------------------------------------- the explicit protocol: no val, ALS


def test_val_fraction_zero_trains_on_the_whole_training_fold(train_config) -> None:
    data = SyntheticRatingsDataModule(num_ratings=3000, folds=5, fold=1, val_fraction=0.0)
    assert len(data.rows["val"]) == 0 and len(data.rows["train"]) == 2400 and len(data.rows["test"]) == 600
    assert data.val_dataloader() == []
    with pytest.raises(UserError, match="val_fraction=0"):
        SyntheticRatingsDataModule(num_ratings=3000, val_fraction=0.0, protocol="leave_one_out")
    cfg = train_config(
        "experiment=mf_synthetic",
        *SMALL,
        "data.val_fraction=0",
        "callbacks.model_checkpoint=null",
        "callbacks.early_stopping=null",
        "trainer.max_epochs=2",
        "logger=none",
    )
    train(cfg)
    metrics = metrics_of(cfg)
    assert "val/rmse" not in metrics and 0 < metrics["test/rmse"] < 1.5


def test_als_sweeps_never_raise_the_objective_and_reach_the_noise_floor() -> None:
    from zoo.nn.recommender import ALSGroups, als_sweep

    data = SyntheticRatingsDataModule(num_users=200, num_items=100, num_ratings=8000, noise_std=0.5)
    users, items, ratings = data.splits["train"]
    torch.manual_seed(0)
    net = BiasedMF(data.num_users, data.num_items, rank=4)
    net.set_statistics(data.global_mean)
    groups = (
        ALSGroups(users, data.num_users, items, data.num_items, block_elements=512),
        ALSGroups(items, data.num_items, users, data.num_users),
    )
    assert sum(len(m) for m, _, _ in groups[0].blocks) == data.num_users and len(groups[0].blocks) > 1

    def objective() -> float:
        factors, biases = net.penalty(users, items)
        error = F.mse_loss(net(users, items), ratings)
        return float(error + 0.01 * factors.mean() + 0.01 * biases.mean())

    values = [objective()]
    for _ in range(6):
        als_sweep(net, users, items, ratings, groups, 0.01, 0.01)
        values.append(objective())
    assert all(b <= a + 1e-5 for a, b in zip(values, values[1:])), values
    # after a sweep the item half is exactly optimal: the objective's gradient in the item rows vanishes
    net.zero_grad()
    factors, biases = net.penalty(users, items)
    (F.mse_loss(net(users, items), ratings) + 0.01 * factors.mean() + 0.01 * biases.mean()).backward()
    assert net.item_factors.weight.grad.abs().max() < 1e-4 and net.item_bias.weight.grad.abs().max() < 1e-4
    test_users, test_items, test_ratings = data.splits["test"]
    with torch.no_grad():
        rmse = float((net(test_users, test_items) - test_ratings).square().mean().sqrt())
    assert rmse < 0.6, rmse  # noise floor 0.5; the global mean alone: about 0.95


def test_als_solver_trains_through_train_py_without_an_optimizer(train_config) -> None:
    cfg = train_config(
        "experiment=mf_synthetic",
        *SMALL,
        "model.solver=als",
        "data.batch_size=100000",
        "trainer.max_epochs=4",
        "logger=none",
    )
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/rmse"] < 0.65 and metrics["val/rmse_best"] <= metrics["val/rmse"] + 1e-6
    # each sweep counts as a step, so the checkpoint callbacks (which save only once the step moved) write files
    assert checkpoint(cfg, "last.ckpt")["global_step"] == 4


def test_count_exponent_weighs_each_rows_l2_by_its_count_to_that_power(train_config) -> None:
    from zoo.nn.recommender import ALSGroups, als_sweep
    from zoo.run import build_model

    data = SyntheticRatingsDataModule(num_users=100, num_items=60, num_ratings=3000)
    users, items, ratings = data.splits["train"]
    torch.manual_seed(0)
    net = BiasedMF(data.num_users, data.num_items, rank=3)
    net.set_statistics(data.global_mean)
    groups = (
        ALSGroups(users, data.num_users, items, data.num_items),
        ALSGroups(items, data.num_items, users, data.num_users),
    )
    user_weight = torch.bincount(users, minlength=data.num_users).float().sqrt()
    item_weight = torch.bincount(items, minlength=data.num_items).float().sqrt()

    def objective() -> float:
        error = (net(users, items) - ratings).square().sum()
        factors = (user_weight * net.user_factors.weight.square().sum(1)).sum()
        factors = factors + (item_weight * net.item_factors.weight.square().sum(1)).sum()
        biases = (user_weight * net.user_bias.weight[:, 0].square()).sum()
        biases = biases + (item_weight * net.item_bias.weight[:, 0].square()).sum()
        return float(error + 0.5 * factors + 0.2 * biases)

    values = [objective()]
    for _ in range(4):
        als_sweep(net, users, items, ratings, groups, 0.5, 0.2, count_exponent=0.5)
        values.append(objective())
    assert all(b <= a * (1 + 1e-5) for a, b in zip(values, values[1:])), values
    with pytest.raises(Exception, match="count_exponent applies to model.solver=als"):  # hydra wraps the UserError
        build_model(train_config("experiment=mf_synthetic", *SMALL, "model.count_exponent=0.5"))


# 300 + 50 ratings: a sparse matrix; 600 + 50: more ratings than the 30 x 20 cells, a dense one
@pytest.mark.parametrize("count", [300, 600])
def test_conjugate_gradient_sweep_reaches_the_exact_solve_even_with_repeated_pairs(count: int) -> None:
    from zoo.nn.recommender import ALSGroups, als_sweep

    generator = torch.Generator().manual_seed(0)
    users = torch.randint(0, 30, (count,), generator=generator)
    items = torch.randint(0, 20, (count,), generator=generator)
    users, items = torch.cat([users, users[:50]]), torch.cat([items, items[:50]])  # 50 pairs rated once more
    ratings = torch.randint(1, 6, (count + 50,), generator=generator).double()
    groups = (ALSGroups(users, 30, items, 20), ALSGroups(items, 20, users, 30))
    nets = []
    for cg_steps in (0, 6):  # rank 4 + bias: conjugate gradients solve a 5-unknown system exactly in 5 steps
        torch.manual_seed(0)
        net = BiasedMF(30, 20, rank=4).double()
        net.set_statistics(float(ratings.mean()))
        als_sweep(net, users, items, ratings, groups, 0.1, 0.05, cg_steps=cg_steps, count_exponent=0.5)
        nets.append(net)
    exact, iterated = (dict(n.named_parameters()) for n in nets)
    for name, value in exact.items():
        assert torch.allclose(value, iterated[name], atol=1e-8), name


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_als_objective_from_counts_equals_the_per_rating_objective(train_config, exponent: float) -> None:
    from zoo.run import build_model

    overrides = ("model.solver=als", "model.cg_steps=2", f"model.count_exponent={exponent}")
    model = build_model(train_config("experiment=mf_synthetic", *SMALL, *overrides))
    net, objectives = model.net, []
    for _ in range(3):
        model._als_step(0)  # one sweep; the first builds the rating groups
        objectives.append(float(model._als_objective()[1]))
    users, items, ratings = model.als_users, model.als_items, model.als_ratings
    predictions, loss = model._als_objective()
    # each rating carries its user's and its item's L2 divided by their counts to the power 1 - exponent
    user_share = torch.bincount(users).double().pow(exponent - 1)[users]
    item_share = torch.bincount(items).double().pow(exponent - 1)[items]
    factors = user_share * net.user_factors(users).square().sum(1) + item_share * net.item_factors(items).square().sum(
        1
    )
    biases = user_share * net.user_bias(users)[:, 0].square() + item_share * net.item_bias(items)[:, 0].square()
    l2 = model.factor_l2 * factors.mean() + model.bias_l2 * biases.mean()
    expected = F.mse_loss(net(users, items), ratings) + l2
    assert torch.allclose(predictions, net(users, items), atol=1e-5)
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
    assert objectives[2] <= objectives[1] <= objectives[0], objectives  # what the sweeps minimize never rises


def test_svdpp_adds_the_normalized_sum_of_the_rated_items_implicit_factors() -> None:
    from zoo.nn.recommender import SVDpp

    torch.manual_seed(0)
    net = SVDpp(3, 4, rank=2)
    net.set_statistics(3.0)
    users, items = torch.tensor([0, 0, 0, 1, 2]), torch.tensor([1, 3, 3, 2, 0])  # user 0 rated item 3 twice
    net.set_implicit(users, items)
    y, p = net.implicit_factors.weight, net.user_factors.weight
    expected_user0 = p[0] + (y[1] + y[3]) / math.sqrt(2)  # N(0) = {1, 3}: the repeated pair counts once
    assert torch.allclose(net.user_vectors(torch.tensor([0]))[0], expected_user0, atol=1e-6)
    predicted = net(torch.tensor([0]), torch.tensor([2]))
    manual = 3.0 + net.user_bias.weight[0, 0] + net.item_bias.weight[2, 0] + expected_user0 @ net.item_factors.weight[2]
    assert torch.allclose(predicted, manual.reshape(1), atol=1e-6)
    assert torch.allclose(net.predict_all(torch.tensor([0, 1]))[:, 2], net(torch.tensor([0, 1]), torch.tensor([2, 2])))
    # the implicit rows get gradients only through the items a user rated
    net(torch.tensor([1]), torch.tensor([0])).sum().backward()
    assert net.implicit_factors.weight.grad[2].abs().sum() > 0 and net.implicit_factors.weight.grad[1].eq(0).all()


def test_svdpp_trains_through_train_py_and_refuses_als(train_config) -> None:
    overrides = ("model.net.rank=4", "optimizer.lr=2e-2", "trainer.max_epochs=15", "logger=none")
    cfg = train_config("model=svdpp", "data=ratings_synthetic", *SMALL, *overrides)
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/rmse"] < 0.75, metrics  # noise floor 0.5; the global mean alone: about 0.95
    with pytest.raises(Exception, match="solver=als solves BiasedMF"):
        from zoo.run import build_model

        build_model(train_config("model=svdpp", "data=ratings_synthetic", *SMALL, "model.solver=als"))


def test_autorec_scores_the_asked_cells_like_the_dense_decoder_and_falls_back_for_unknown_ids() -> None:
    from zoo.nn.recommender import AutoRec

    torch.manual_seed(0)
    net = AutoRec(4, 5, hidden=3)
    users, items = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 0, 2, 2, 0])  # (0, 0) rated twice
    ratings = torch.tensor([1.0, 4.0, 5.0, 2.0, 3.0])
    net.set_ratings(users, items, ratings)
    item_mean = torch.tensor([3.5, 0.0, 3.5, 0.0, 0.0])
    net.set_statistics(3.0, item_mean, torch.tensor([True, True, True, False]), torch.tensor([1, 0, 1, 0, 0]).bool())
    columns = torch.zeros(5, 4)
    columns[items, users] = ratings  # the last rating of (0, 0) wins: 3
    assert columns[0, 0] == 3.0 and len(net.input_ratings) == 4
    codes = torch.sigmoid(columns @ net.encoder + net.encoder_bias)
    dense = net.decoder @ codes.T + net.decoder_bias[:, None]
    # unsorted, repeated cells; user 3 has no training data (item mean), item 3 neither (global mean)
    asked_users, asked_items = torch.tensor([2, 0, 1, 0, 3, 1]), torch.tensor([0, 2, 0, 2, 2, 3])
    expected = dense[asked_users, asked_items]
    expected[4], expected[5] = 3.5, 3.0
    assert torch.allclose(net(asked_users, asked_items), expected, atol=1e-6)
    assert torch.allclose(net.predict_all(torch.tensor([3]))[0], torch.tensor([3.5, 3.0, 3.5, 3.0, 3.0]))
    assert torch.allclose(net.predict_all(torch.tensor([1]))[0, [0, 2]], dense[1, [0, 2]], atol=1e-6)
    norms, biases = net.penalty(asked_users, asked_items)
    assert torch.isclose(norms, (net.encoder.square().sum() + net.decoder.square().sum()) / 4) and biases == 0
    # the sparse products' hand-written gradients equal autograd's through the dense computation
    weights = torch.arange(1.0, 7.0)
    (net(asked_users, asked_items)[:4] * weights[:4]).sum().backward()
    encoder, decoder = net.encoder.detach().requires_grad_(), net.decoder.detach().requires_grad_()
    dense = decoder @ torch.sigmoid(columns @ encoder + net.encoder_bias.detach()).T
    (dense[asked_users[:4], asked_items[:4]] * weights[:4]).sum().backward()
    assert torch.allclose(net.encoder.grad, encoder.grad, atol=1e-5) and net.encoder.grad.abs().sum() > 0
    assert torch.allclose(net.decoder.grad, decoder.grad, atol=1e-5) and net.decoder.grad[3].eq(0).all()
    state = net.state_dict()
    state["input_ratings"] = state["input_ratings"].flip(0)
    net.load_state_dict(state)  # other ratings, same shapes: the codes follow them
    flipped = torch.zeros(5, 4)
    flipped[[0, 0, 2, 2], [0, 1, 1, 2]] = torch.tensor(
        [2.0, 5.0, 4.0, 3.0]
    )  # cells item-major: (0,0) (0,1) (2,1) (2,2)
    expected_codes = torch.sigmoid(flipped @ net.encoder + net.encoder_bias)
    assert torch.allclose(net.item_codes(), expected_codes, atol=1e-6)


def test_autorec_learns_ratings_through_train_py_and_refuses_als(train_config) -> None:
    overrides = (
        "model.net.hidden=32",
        "model.factor_l2=5",
        "optimizer.lr=0.03",
        "trainer.max_epochs=300",
        "logger=none",
    )
    cfg = train_config("model=autorec", "data=ratings_synthetic", *SMALL, "data.batch_size=100000", *overrides)
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/rmse"] < 0.75, metrics  # noise floor 0.5; the global mean alone: about 0.95
    with pytest.raises(Exception, match="solver=als solves BiasedMF"):
        from zoo.run import build_model

        build_model(train_config("model=autorec", "data=ratings_synthetic", *SMALL, "model.solver=als"))


# ---------------------------------------------------------------- Bayesian MF (Gibbs sampling)

GIBBS = ["experiment=mf_synthetic", *SMALL, "model.solver=gibbs", "data.batch_size=100000", "scheduler=none"]


def test_conditional_rows_draw_from_the_gaussian_whose_mean_is_the_ridge_solution() -> None:
    from zoo.nn.recommender import ALSGroups, conditional_rows

    torch.manual_seed(0)
    users = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # user 3 has no ratings
    items = torch.tensor([0, 1, 2, 0, 3, 1, 2, 3, 0])
    targets = torch.randn(len(users))
    table = torch.randn(4, 3)
    groups = ALSGroups(users, 4, items, 4)
    mean, precision, alpha = torch.tensor([0.3, -0.2, 0.1]), torch.diag(torch.tensor([2.0, 1.0, 3.0])), 1.7
    expected = torch.zeros(4, 3)
    covariances = []
    for user in range(3):
        features, response = table[items[users == user]], targets[users == user]
        posterior = precision + alpha * features.T @ features
        expected[user] = torch.linalg.solve(posterior, alpha * features.T @ response + precision @ mean)
        covariances.append(torch.linalg.inv(posterior))
    out = torch.full((4, 3), 7.0)
    error = conditional_rows(groups, table, targets, mean, precision, alpha, out)
    torch.testing.assert_close(out[:3], expected[:3], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3], torch.full((3,), 7.0))  # no ratings: the row is left alone
    fitted = (table[items] * out[users]).sum(1)
    assert math.isclose(float(error), float((targets - fitted).square().sum()), rel_tol=1e-5)

    generator = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(4000):
        conditional_rows(groups, table, targets, mean, precision, alpha, out, generator)
        draws.append(out[:3].clone())
    draws = torch.stack(draws)  # (4000, 3 users, 3)
    torch.testing.assert_close(draws.mean(0), expected[:3], atol=0.03, rtol=0)
    for user in range(3):
        centred = draws[:, user] - draws[:, user].mean(0)
        torch.testing.assert_close(centred.T @ centred / len(draws), covariances[user], atol=0.02, rtol=0.1)


def test_wishart_draws_average_df_times_the_scale() -> None:
    from zoo.nn.recommender import _wishart

    scale = torch.tensor([[0.5, 0.2], [0.2, 0.3]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([_wishart(scale, 7, generator) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), 7 * scale, atol=0.1, rtol=0.05)
    assert bool((torch.linalg.eigvalsh(draws) > 0).all())  # every draw a precision matrix


def test_gibbs_net_predicts_the_average_of_the_samples_predictions(train_config) -> None:
    from zoo.run import build_model

    cfg = train_config(*GIBBS, "model.samples=3", "model.net.rank=2")
    data = SyntheticRatingsDataModule(num_users=200, num_items=100, num_ratings=8000)
    task = build_model(cfg, data)
    assert task.net.user_factors.weight.shape[1] == 6 and task.chain.user_factors.weight.shape[1] == 2
    users, items = torch.randint(0, 200, (50,)), torch.randint(0, 100, (50,))
    predictions = []
    for kept in range(3):
        with torch.no_grad():
            for parameter in task.chain.parameters():
                parameter.normal_()
        predictions.append(task.chain(users, items))
        task._keep_sample(first=kept == 0)
        task.chain_kept += 1
        torch.testing.assert_close(task.net(users, items), torch.stack(predictions).mean(0), atol=1e-5, rtol=1e-5)


def test_gibbs_solver_reaches_the_noise_floor_and_beats_als_on_the_same_start(train_config) -> None:
    # the ratings' noise has std 0.5: precision 4
    settings = ("model.map_sweeps=3", "model.samples=12", "model.noise_precision=4", "trainer.max_epochs=15")
    cfg = train_config(*GIBBS, *settings, "logger=csv")
    train(cfg)
    gibbs = metrics_of(cfg)
    als = train_config(*GIBBS, "model.solver=als", "trainer.max_epochs=3", "logger=none", folder="als")
    train(als)
    start = metrics_of(als)
    # noise floor 0.5, the global mean about 0.95; the average of the samples improves on the MAP start it came from
    assert gibbs["test/rmse"] < 0.6 and gibbs["test/rmse"] < start["test/rmse"], (gibbs, start)
    frame = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    assert "train/rmse" in frame and "val/rmse_best" in frame


@pytest.mark.parametrize("solver", ["als", "gibbs"])
def test_sweep_solvers_resume_equal_to_the_uninterrupted_run(train_config, solver: str) -> None:
    settings = [
        *GIBBS,
        f"model.solver={solver}",
        "model.map_sweeps=1",
        "model.samples=3",
        "trainer.max_epochs=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
        "logger=none",
    ]
    full, resumed = interrupted_and_resumed(train_config, *settings, name=solver)
    assert_same_final_weights(full, resumed)
    assert checkpoint(resumed)["global_step"] == 4  # the sweeps before the interruption still count


@pytest.mark.parametrize("solver", ["als", "gibbs"])
def test_sweeps_ignore_mixed_precision(train_config, solver: str) -> None:
    settings = (
        *GIBBS,
        f"model.solver={solver}",
        "model.samples=2",
        "trainer.max_epochs=4",
        "test=false",
        "logger=none",
    )
    runs = [train_config(*settings, f"trainer.precision={p}", folder=p) for p in ("32-true", "bf16-mixed")]
    for cfg in runs:
        train(cfg)
    full, mixed = (checkpoint(cfg)["state_dict"] for cfg in runs)
    for key in full:
        assert torch.equal(full[key], mixed[key]), key


def test_gibbs_bad_settings_are_one_line_errors(train_config) -> None:
    from zoo.run import build_model

    data = SyntheticRatingsDataModule(num_users=200, num_items=100, num_ratings=8000)
    with pytest.raises(UserError, match=r"trainer.max_epochs: .*allowed: at most 8, got 20"):
        train(train_config(*GIBBS, "model.map_sweeps=3", "model.samples=5", "logger=none"))
    with pytest.raises(UserError, match=r"allowed: at most 8, got -1"):
        train(train_config(*GIBBS, "model.map_sweeps=3", "model.samples=5", "trainer.max_epochs=-1", "logger=none"))
    with pytest.raises(Exception, match="model.noise_precision must be > 0"):  # hydra wraps what the task raises
        build_model(train_config(*GIBBS, "model.noise_precision=0"), data)
    with pytest.raises(Exception, match="model.samples must be >= 1"):
        build_model(train_config(*GIBBS, "model.samples=0"), data)
    with pytest.raises(Exception, match="solver=gibbs solves BiasedMF"):
        build_model(train_config("model=svdpp", "data=ratings_synthetic", *SMALL, "model.solver=gibbs"), data)
