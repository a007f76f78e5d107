"""Rating data for recommenders: a generated low-rank matrix with a known noise floor, and MovieLens files.

MovieLens is read from its standard files (100K: `u.data`, `u.item`, `u.user` and the official
`u1.base`/`u1.test` ... `u5`; 1M: `ratings.dat`, `movies.dat`, `users.dat`; latest-small: `ratings.csv`,
`movies.csv`), and any data set in RecBole's atomic format (`<name>.inter` with typed header fields such as
`user_id:token`, optional `<name>.item` and `<name>.user`), which is how the RecBole wheel ships MovieLens 100K
(scripts/fetch_movielens.py). Ratings stay whole as tensors and are batched by indexing with TensorBatches.
"""

from __future__ import annotations

import abc
import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.data.tensor import InMemoryDataModule
from zoo.errors import UserError, check_holdout_fraction

log = logging.getLogger(__name__)

MOVIELENS_URL = "https://grouplens.org/datasets/movielens/"
MOVIELENS_FILES = {
    "100k": ("u.data", "u.item", "u.user"),
    "1m": ("ratings.dat", "movies.dat", "users.dat"),
    "latest-small": ("ratings.csv", "movies.csv"),
    "atomic": ("<name>.inter", "<name>.item", "<name>.user"),
}
MOVIELENS_NAMES = {
    "100k": "MovieLens 100K",
    "1m": "MovieLens 1M",
    "latest-small": "MovieLens latest-small",
    "atomic": "RecBole atomic files",
}
# RecBole's default field names for the user, the item, the rating and the time of an interaction
ATOMIC_FIELDS = ("user_id", "item_id", "rating", "timestamp")
# token columns of .user files with at most this many values become one-hot user features
ATOMIC_MAX_CATEGORIES = 64
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# MovieLens 1M codes ages by the lower bound of a bracket; 100K ages are put in the same brackets
AGE_BOUNDS = (18, 25, 35, 45, 50, 56)
AGE_NAMES = ("age<18", "age18-24", "age25-34", "age35-44", "age45-49", "age50-55", "age56+")
PROTOCOLS = ("ratings", "leave_one_out")
SPLITS = ("random", "official")
TRAIN_UNITS = ("interaction", "user")


@dataclass
class RatingData:
    """Ratings by raw ids, with what the files say about items and users (empty where they say nothing)."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    scale: tuple[float, float]
    name: str = "ratings"
    titles: dict[int, str] = field(default_factory=dict)
    genres: dict[int, list[str]] = field(default_factory=dict)
    genre_names: list[str] = field(default_factory=list)
    user_features: dict[int, np.ndarray] = field(default_factory=dict)
    user_feature_names: list[str] = field(default_factory=list)
    # rows that come from an official test file (MovieLens 100K u<k>.test)
    official_test: np.ndarray | None = None
    # a generated matrix knows its noise: the RMSE that the true parameters reach
    noise_std: float | None = None
    clean: np.ndarray | None = None


def generate_ratings(
    num_users: int = 600,
    num_items: int = 400,
    num_ratings: int = 100_000,
    rank: int = 4,
    global_mean: float = 3.5,
    bias_std: float = 0.3,
    factor_std: float = 0.7,
    noise_std: float = 0.5,
    seed: int = 0,
) -> RatingData:
    """r = mean + b_u + b_i + <p_u, q_i> + noise on distinct random (user, item) cells.

    Factor entries have variance factor_std / sqrt(rank), so the interaction term has std factor_std
    whatever the rank. Ratings are not clipped or rounded: the best possible RMSE is noise_std.
    """
    if num_ratings > num_users * num_items:
        raise ValueError(f"data.num_ratings={num_ratings} exceeds the {num_users * num_items} user-item cells")
    if min(num_users, num_items, num_ratings, rank) < 1 or noise_std < 0:
        raise ValueError("data: num_users, num_items, num_ratings, rank must be >= 1 and noise_std >= 0")
    rng = np.random.default_rng(seed)
    user_bias = rng.normal(0.0, bias_std, num_users)
    item_bias = rng.normal(0.0, bias_std, num_items)
    entry_std = np.sqrt(factor_std / np.sqrt(rank))
    user_factors = rng.normal(0.0, entry_std, (num_users, rank))
    item_factors = rng.normal(0.0, entry_std, (num_items, rank))
    cells = np.sort(rng.choice(num_users * num_items, size=num_ratings, replace=False))
    users, items = np.divmod(cells, num_items)
    clean = global_mean + user_bias[users] + item_bias[items] + (user_factors[users] * item_factors[items]).sum(1)
    ratings = clean + rng.normal(0.0, noise_std, num_ratings)
    return RatingData(
        users=users.astype(np.int64),
        items=items.astype(np.int64),
        ratings=ratings.astype(np.float32),
        timestamps=rng.permutation(num_ratings).astype(np.int64),  # an order of each user's history
        scale=(float(ratings.min()), float(ratings.max())),
        name=f"synthetic rank-{rank} ratings",
        titles={i: f"item {i}" for i in range(num_items)},
        noise_std=noise_std,
        clean=clean,
    )


def movielens_format(folder: Path) -> str:
    """Which MovieLens release a folder holds, told by its ratings file; a one-line UserError if none."""
    for kind, files in MOVIELENS_FILES.items():
        if kind != "atomic" and (folder / files[0]).is_file():
            return kind
    if folder.is_dir() and any(folder.glob("*.inter")):
        return "atomic"
    where = f"'{folder}'" + ("" if folder.is_dir() else " (no such folder)")
    expected = "; ".join(f"{', '.join(files)} ({MOVIELENS_NAMES[kind]})" for kind, files in MOVIELENS_FILES.items())
    raise UserError(
        f"data.path: no MovieLens ratings in {where}; expected {expected}; download and unzip one from "
        f"{MOVIELENS_URL} and set data.path to the folder holding the files"
    )


def _numbers(path: Path, delimiter: str, skip: int = 0) -> np.ndarray:
    """A numeric table; '::' (MovieLens 1M) becomes a tab first because numpy splits on one delimiter."""
    text = path.read_bytes()
    if delimiter == "::":
        text, delimiter = text.replace(b"::", b"\t"), "\t"
    try:
        table = np.loadtxt(io.BytesIO(text), delimiter=delimiter, skiprows=skip, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise UserError(f"data.path: cannot read '{path}' as MovieLens ratings ({error})") from error
    if table.shape[1] < 3:
        raise UserError(f"data.path: '{path}' has {table.shape[1]} columns; MovieLens ratings have user, item, rating")
    if len(table) == 0:
        raise UserError(f"data.path: '{path}' holds no ratings")
    return table


def _lines(path: Path, encoding: str) -> list[str]:
    return path.read_text(encoding=encoding, errors="replace").splitlines() if path.is_file() else []


def _one_hot_users(
    rows: list[tuple[int, int, str, str]], occupations: list[str]
) -> tuple[dict[int, np.ndarray], list[str]]:
    """(user id, age, gender, occupation) rows -> age bracket, gender and occupation one-hot vectors."""
    names = [*AGE_NAMES, "gender=F", "gender=M", *(f"occupation={o}" for o in occupations)]
    index = {o: len(AGE_NAMES) + 2 + k for k, o in enumerate(occupations)}
    features = {}
    for user, age, gender, occupation in rows:
        vector = np.zeros(len(names), dtype=np.float32)
        vector[int(np.searchsorted(AGE_BOUNDS, age, side="right"))] = 1.0
        if gender in ("F", "M"):
            vector[len(AGE_NAMES) + (gender == "M")] = 1.0
        if occupation in index:
            vector[index[occupation]] = 1.0
        features[user] = vector
    return features, names


def _read_100k(folder: Path, official_fold: int | None) -> RatingData:
    if official_fold is None:
        table, official = _numbers(folder / "u.data", "\t"), None
    else:
        base, test = (folder / f"u{official_fold}.base", folder / f"u{official_fold}.test")
        missing = [p.name for p in (base, test) if not p.is_file()]
        if missing:
            raise UserError(
                f"data.split=official: no {', '.join(missing)} in '{folder}'; the official splits u1..u5.base/test "
                f"ship in ml-100k.zip from {MOVIELENS_URL}"
            )
        base_table, test_table = _numbers(base, "\t"), _numbers(test, "\t")
        table = np.concatenate([base_table, test_table])
        official = np.arange(len(table)) >= len(base_table)
    genre_names = [line.split("|")[0] for line in _lines(folder / "u.genre", "latin-1") if "|" in line]
    genre_names = genre_names or list(ML100K_GENRES)
    titles, genres = {}, {}
    for line in _lines(folder / "u.item", "latin-1"):
        fields = line.split("|")
        if len(fields) < 2 or not fields[0].strip().isdigit():
            continue
        item = int(fields[0])
        titles[item] = fields[1]
        flags = fields[-len(genre_names) :] if len(fields) >= 5 + len(genre_names) else []
        genres[item] = [g for g, flag in zip(genre_names, flags) if flag.strip() == "1"]
    rows = []
    for line in _lines(folder / "u.user", "latin-1"):
        fields = line.split("|")
        if len(fields) >= 4 and fields[0].strip().isdigit() and fields[1].strip().isdigit():
            rows.append((int(fields[0]), int(fields[1]), fields[2].strip(), fields[3].strip()))
    user_features, feature_names = _one_hot_users(rows, sorted({r[3] for r in rows}))
    data = _rating_data(table, (1.0, 5.0), "MovieLens 100K", titles, genres, genre_names, user_features, feature_names)
    data.official_test = official
    return data


def _read_1m(folder: Path) -> RatingData:
    table = _numbers(folder / "ratings.dat", "::")
    titles, genres = {}, {}
    for line in _lines(folder / "movies.dat", "latin-1"):
        fields = line.split("::")
        if len(fields) >= 2 and fields[0].strip().isdigit():
            titles[int(fields[0])] = fields[1]
            genres[int(fields[0])] = [g for g in fields[2].split("|") if g] if len(fields) > 2 else []
    rows = []
    for line in _lines(folder / "users.dat", "latin-1"):
        fields = line.split("::")
        if len(fields) >= 4 and fields[0].strip().isdigit() and fields[2].strip().isdigit():
            rows.append((int(fields[0]), int(fields[2]), fields[1].strip(), fields[3].strip()))
    user_features, feature_names = _one_hot_users(rows, sorted({r[3] for r in rows}, key=lambda o: (len(o), o)))
    genre_names = sorted({g for names in genres.values() for g in names})
    return _rating_data(table, (1.0, 5.0), "MovieLens 1M", titles, genres, genre_names, user_features, feature_names)


def _read_latest(folder: Path) -> RatingData:
    table = _numbers(folder / "ratings.csv", ",", skip=1)
    titles, genres = {}, {}
    movies = folder / "movies.csv"
    if movies.is_file():
        with movies.open(encoding="utf-8", errors="replace", newline="") as f:
            for fields in csv.reader(f):
                if len(fields) >= 2 and fields[0].strip().isdigit():
                    titles[int(fields[0])] = fields[1]
                    listed = fields[2].split("|") if len(fields) > 2 else []
                    genres[int(fields[0])] = [g for g in listed if g and g != "(no genres listed)"]
    genre_names = sorted({g for names in genres.values() for g in names})
    return _rating_data(table, (0.5, 5.0), "MovieLens latest-small", titles, genres, genre_names, {}, [])


def _rating_data(
    table: np.ndarray,
    scale: tuple[float, float],
    name: str,
    titles: dict[int, str],
    genres: dict[int, list[str]],
    genre_names: list[str],
    user_features: dict[int, np.ndarray],
    feature_names: list[str],
) -> RatingData:
    timestamps = table[:, 3] if table.shape[1] > 3 else np.zeros(len(table))
    return RatingData(
        users=table[:, 0].astype(np.int64),
        items=table[:, 1].astype(np.int64),
        ratings=table[:, 2].astype(np.float32),
        timestamps=timestamps.astype(np.int64),
        scale=scale,
        name=name,
        titles=titles,
        genres=genres,
        genre_names=genre_names,
        user_features=user_features,
        user_feature_names=feature_names,
    )


def _atomic_table(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """Field names, field types and rows (lists of strings) of a RecBole atomic file (tab-separated, typed header)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines:
        raise UserError(f"data.path: '{path}' is empty; a RecBole atomic file starts with a header like user_id:token")
    header = lines[0].split("\t")
    names, types = [], []
    for column in header:
        name, _, kind = column.strip().partition(":")
        names.append(name)
        types.append(kind)
    if not all(types):
        raise UserError(
            f"data.path: '{path}' has no typed header (fields like user_id:token, rating:float); got {lines[0][:80]!r}"
        )
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    rows = [row + [""] * (len(names) - len(row)) for row in rows]
    return names, types, rows


def _atomic_ids(tokens: list[str]) -> np.ndarray:
    """Raw ids as integers: numeric tokens as they are, other tokens numbered in sorted order (1-based)."""
    try:
        return np.asarray([int(float(t)) for t in tokens], dtype=np.int64)
    except ValueError:
        names = sorted(set(tokens))
        number = {t: k + 1 for k, t in enumerate(names)}
        return np.asarray([number[t] for t in tokens], dtype=np.int64)


def read_atomic(folder: Path) -> RatingData:
    """A data set in RecBole's atomic format: `<name>.inter` (user_id, item_id, optional rating and timestamp),
    `<name>.item` (a title field and a genre-like token_seq field become titles and genres) and `<name>.user`
    (age in MovieLens' brackets, other token fields with few values one-hot).

    Without a rating field every interaction counts as a rating of 1 (implicit data). Non-numeric ids are
    numbered in sorted token order, the same in all three files.
    """
    inters = sorted(folder.glob("*.inter"))
    if len(inters) > 1:
        raise UserError(f"data.path: '{folder}' holds {len(inters)} .inter files; keep one data set per folder")
    path = inters[0]
    names, _, rows = _atomic_table(path)
    column = {name: k for k, name in enumerate(names)}
    user_field, item_field, rating_field, time_field = ATOMIC_FIELDS
    missing = [f for f in (user_field, item_field) if f not in column]
    if missing:
        raise UserError(f"data.path: '{path}' has no {' or '.join(missing)} field; its fields: {', '.join(names)}")
    if not rows:
        raise UserError(f"data.path: '{path}' holds no interactions")
    user_tokens = [row[column[user_field]] for row in rows]
    item_tokens = [row[column[item_field]] for row in rows]
    try:
        ratings = np.asarray(
            [float(row[column[rating_field]]) for row in rows] if rating_field in column else np.ones(len(rows)),
            dtype=np.float64,
        )
        times = np.asarray(
            [float(row[column[time_field]] or 0) for row in rows] if time_field in column else np.zeros(len(rows)),
            dtype=np.float64,
        )
    except ValueError as error:
        raise UserError(f"data.path: cannot read '{path}' as ratings ({error})") from error
    users, items = _atomic_ids(user_tokens), _atomic_ids(item_tokens)
    user_map = dict(zip(user_tokens, users.tolist()))
    item_map = dict(zip(item_tokens, items.tolist()))
    titles, genres = _atomic_items(path.with_suffix(".item"), item_map)
    genre_names = sorted({g for listed in genres.values() for g in listed})
    user_features, feature_names = _atomic_users(path.with_suffix(".user"), user_map)
    table = np.stack([users, items, ratings, times], axis=1)
    scale = (float(ratings.min()), float(ratings.max()))
    name = {"ml-100k": "MovieLens 100K"}.get(path.stem, path.stem)
    data = _rating_data(table, scale, name, titles, genres, genre_names, user_features, feature_names)
    data.users, data.items = users, items  # exact, not through float64
    return data


def _atomic_items(path: Path, item_map: dict[str, int]) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Titles (the first field whose name has 'title') and genres (a token_seq field named class/genre/genres)."""
    titles: dict[int, str] = {}
    genres: dict[int, list[str]] = {}
    if not path.is_file():
        return titles, genres
    names, types, rows = _atomic_table(path)
    if "item_id" not in names:
        return titles, genres
    key = names.index("item_id")
    title = next((k for k, n in enumerate(names) if "title" in n), None)
    genre = next(
        (k for k, n in enumerate(names) if n in ("class", "genre", "genres") and types[k] == "token_seq"), None
    )
    for row in rows:
        item = item_map.get(row[key])
        if item is None:
            continue
        if title is not None:
            titles[item] = row[title]
        if genre is not None:
            genres[item] = row[genre].split()
    return titles, genres


def _atomic_users(path: Path, user_map: dict[str, int]) -> tuple[dict[int, np.ndarray], list[str]]:
    """One-hot user features: a numeric `age` field in MovieLens' brackets, other token fields with few values
    (a field with a different value for every user, like a zip code in a small file, is left out)."""
    if not path.is_file():
        return {}, []
    names, types, rows = _atomic_table(path)
    if "user_id" not in names:
        return {}, []
    key = names.index("user_id")
    rows = [row for row in rows if row[key] in user_map]
    parts: list[tuple[int, list[str], dict[str, int] | None]] = []  # (column, feature names, value -> slot)
    for k, (name, kind) in enumerate(zip(names, types)):
        if k == key or kind != "token":
            continue
        values = [row[k] for row in rows]
        if name == "age" and all(v.strip().isdigit() for v in values):
            parts.append((k, list(AGE_NAMES), None))
            continue
        distinct = sorted(set(values) - {""})
        if 1 < len(distinct) <= ATOMIC_MAX_CATEGORIES and len(distinct) < len(rows):  # not one value per user
            parts.append((k, [f"{name}={v}" for v in distinct], {v: s for s, v in enumerate(distinct)}))
    feature_names = [n for _, listed, _ in parts for n in listed]
    features = {}
    for row in rows:
        vector = np.zeros(len(feature_names), dtype=np.float32)
        offset = 0
        for k, listed, slots in parts:
            if slots is None:
                vector[offset + int(np.searchsorted(AGE_BOUNDS, int(row[k]), side="right"))] = 1.0
            elif row[k] in slots:
                vector[offset + slots[row[k]]] = 1.0
            offset += len(listed)
        features[user_map[row[key]]] = vector
    return features, feature_names


def read_movielens(path: str | Path, official_fold: int | None = None) -> RatingData:
    """Read a MovieLens folder (100K, 1M or latest-small, told by its files).

    `official_fold` k reads MovieLens 100K's u<k>.base + u<k>.test and marks the test rows.
    """
    folder = Path(path).expanduser()
    kind = movielens_format(folder)
    if official_fold is not None and kind != "100k":
        raise UserError(
            f"data.split=official: {MOVIELENS_NAMES[kind]} has no official split (only MovieLens 100K ships "
            "u1..u5.base/test); use data.split=random"
        )
    if kind == "100k":
        return _read_100k(folder, official_fold)
    if kind == "atomic":
        return read_atomic(folder)
    return _read_1m(folder) if kind == "1m" else _read_latest(folder)


def lookup(sorted_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Dense indices of raw ids in a sorted id array; -1 for ids it does not hold."""
    raw = np.asarray(raw, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.full(raw.shape, -1, dtype=np.int64)
    position = np.searchsorted(sorted_ids, raw).clip(0, len(sorted_ids) - 1)
    return np.where(sorted_ids[position] == raw, position, -1).astype(np.int64)


class RatingsDataModule(InMemoryDataModule, abc.ABC):
    """Ratings as tensors, split once, batched by indexing.

    The data are read and split when the module is built, not in setup(): the recommender's embedding
    tables are sized by the number of users and items, which MovieLens files only tell when read, and
    the model is built (and a checkpoint's shapes checked) before Lightning calls setup(). zoo.run builds
    the datamodule first and hands it to the model.

    Users and items are numbered over every rating in the data, so that the table sizes do not depend
    on the split or the fold; `user_known`/`item_known` say which ones have training data. Those
    without are the "unknown" ids of evaluation: they get bias-only predictions, and are counted.

    protocol=ratings (explicit): `val_fraction` and `test_fraction` of all ratings (80/10/10 by
    default) drawn with `split_seed`, or split=official (MovieLens 100K u<k>.base/test; val from base),
    or `folds > 1`: fold `fold` of a shuffled k-fold over all ratings (not stratified) is the test set, and val
    comes out of the other folds; `holdout_fraction > 0` first draws that share of all ratings as the `holdout`
    split, the same for every fold, and the k-fold runs over the rest. `val_fraction=0` trains on all of the
    rest, for a fixed number of epochs (no validation: leave out the callbacks that watch a val metric).
    Batches: (user, item, rating).
    protocol=leave_one_out (implicit): ratings >= `implicit_threshold` (all when null) are interactions;
    each user with at least 3 keeps the latest as test, the one before as val (ties in time broken
    by `split_seed`). Batches: train (user, item), val/test (user, target, sampled negatives): the
    `sampled_negatives` items per user, never rated by the user, of the sampled-negatives protocol.
    `train_unit=user` batches training by user instead, `batch_size` users a batch (one-element tuples of user
    indices): a sequential model reads each user's whole history at once (`splits["train"]` keeps the interactions,
    sorted by user, then time).
    """

    def __init__(
        self,
        batch_size: int = 1024,
        eval_batch_size: int = 8192,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split: str = "random",
        split_seed: int = 0,
        shuffle_seed: int = 0,
        folds: int = 1,
        fold: int = 0,
        protocol: str = "ratings",
        implicit_threshold: float | None = None,
        sampled_negatives: int = 100,
        holdout_fraction: float = 0.0,
        train_unit: str = "interaction",
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"data.protocol: unknown '{protocol}'; allowed: {', '.join(PROTOCOLS)}")
        if split not in SPLITS:
            raise ValueError(f"data.split: unknown '{split}'; allowed: {', '.join(SPLITS)}")
        if not 0 <= fold < max(folds, 1):
            raise ValueError(f"data.fold must be in [0, {folds}), got {fold}")
        if not (val_fraction >= 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.val_fraction must be >= 0 and data.test_fraction > 0, summing below 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        if val_fraction == 0 and protocol != "ratings":
            raise UserError("data.val_fraction=0 applies to protocol=ratings; leave-one-out always holds out val")
        if protocol == "leave_one_out" and folds > 1:
            raise UserError("cv.folds: leave-one-out holds out each user's last interaction; k-fold does not apply")
        check_holdout_fraction(holdout_fraction, folds)
        if holdout_fraction > 0 and split == "official":
            raise UserError("data.holdout_fraction: data.split=official keeps MovieLens' own folds; allowed: 0")
        if train_unit not in TRAIN_UNITS:
            raise ValueError(f"data.train_unit: unknown '{train_unit}'; allowed: {', '.join(TRAIN_UNITS)}")
        if train_unit == "user" and protocol != "leave_one_out":
            raise UserError(
                "data.train_unit=user batches the histories of the leave-one-out split; "
                "allowed with it: data.protocol=leave_one_out"
            )
        if sampled_negatives < 1:
            raise ValueError(f"data.sampled_negatives must be >= 1, got {sampled_negatives}")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split, self.split_seed, self.shuffle_seed = split, split_seed, shuffle_seed
        self.folds, self.fold, self.protocol = folds, fold, protocol
        self.holdout_fraction = float(holdout_fraction)
        self.implicit_threshold, self.sampled_negatives = implicit_threshold, sampled_negatives
        self.train_unit = train_unit

        source = self.load()
        self.source = source
        self.name, self.scale, self.noise_std = source.name, source.scale, source.noise_std
        self.user_ids, self.item_ids = np.unique(source.users), np.unique(source.items)
        self.num_users, self.num_items = len(self.user_ids), len(self.item_ids)
        users, items = lookup(self.user_ids, source.users), lookup(self.item_ids, source.items)
        self._side_information(source)
        rated = np.unique(users * self.num_items + items)
        self.seen_indptr = np.concatenate(
            [[0], np.cumsum(np.bincount(rated // self.num_items, minlength=self.num_users))]
        )
        self.seen_items = rated % self.num_items  # CSR of every item each user rated, sorted
        self.rows: dict[str, np.ndarray] = {}
        self.splits: dict[str, tuple[torch.Tensor, ...]] = {}
        if protocol == "ratings":
            self._split_ratings(source, users, items)
        else:
            self._split_leave_one_out(source, users, items)
        log.info("%s", self.summary())

    @abc.abstractmethod
    def load(self) -> RatingData:
        """Defined by each subclass."""

    def _side_information(self, source: RatingData) -> None:
        """Titles, a genre multi-hot matrix and user feature vectors, in the dense index order."""
        self.item_titles = [source.titles.get(int(i), f"item {i}") for i in self.item_ids]
        self.genre_names = list(source.genre_names)
        self.item_features: np.ndarray | None = None
        if self.genre_names:
            column = {g: k for k, g in enumerate(self.genre_names)}
            self.item_features = np.zeros((self.num_items, len(self.genre_names)), dtype=np.float32)
            for row, item in enumerate(self.item_ids):
                for genre in source.genres.get(int(item), []):
                    if genre in column:
                        self.item_features[row, column[genre]] = 1.0
        self.user_feature_names = list(source.user_feature_names)
        self.user_features: np.ndarray | None = None
        if self.user_feature_names:
            self.user_features = np.zeros((self.num_users, len(self.user_feature_names)), dtype=np.float32)
            for row, user in enumerate(self.user_ids):
                if int(user) in source.user_features:
                    self.user_features[row] = source.user_features[int(user)]

    def _split_ratings(self, source: RatingData, users: np.ndarray, items: np.ndarray) -> None:
        total = len(source.ratings)
        rng = np.random.default_rng(self.split_seed)
        holdout = np.array([], dtype=np.int64)
        if self.split == "official":
            if source.official_test is None:
                raise UserError(f"data.split=official: {source.name} has no official split; use data.split=random")
            test, pool = np.flatnonzero(source.official_test), np.flatnonzero(~source.official_test)
        elif self.folds > 1:
            order = rng.permutation(total)
            cut = int(round(self.holdout_fraction * total))  # the outer test split, the same for every fold
            holdout, order = order[:cut], order[cut:]
            parts = np.array_split(order, self.folds)
            test = parts[self.fold]
            pool = np.concatenate([p for k, p in enumerate(parts) if k != self.fold])
        else:
            order = rng.permutation(total)
            cut = int(round(self.test_fraction * total))
            test, pool = order[:cut], order[cut:]
        pool = rng.permutation(pool)
        cut = int(round(self.val_fraction * total))
        val, train = pool[:cut], pool[cut:]
        if len(train) == 0 or (len(val) == 0 and self.val_fraction > 0) or len(test) == 0:
            raise UserError(
                f"data: {total} ratings are too few for a train/val/test split "
                f"({len(train)}/{len(val)}/{len(test)}); use more data or other fractions"
            )
        self.rows = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
        if len(holdout):
            self.rows["holdout"] = np.sort(holdout)
        train = self.rows["train"]
        self.user_known = np.zeros(self.num_users, dtype=bool)
        self.item_known = np.zeros(self.num_items, dtype=bool)
        self.user_known[users[train]] = True
        self.item_known[items[train]] = True
        values = source.ratings.astype(np.float64)
        self.global_mean = float(values[train].mean())
        counts = np.bincount(items[train], minlength=self.num_items)
        sums = np.bincount(items[train], weights=values[train], minlength=self.num_items)
        self.item_mean = np.where(counts > 0, sums / np.maximum(counts, 1), self.global_mean).astype(np.float32)
        for name, rows in self.rows.items():
            self.splits[name] = (
                torch.from_numpy(users[rows]),
                torch.from_numpy(items[rows]),
                torch.from_numpy(source.ratings[rows].astype(np.float32)),
            )

    def _split_leave_one_out(self, source: RatingData, users: np.ndarray, items: np.ndarray) -> None:
        rng = np.random.default_rng(self.split_seed)
        positive = np.ones(len(source.ratings), dtype=bool)
        if self.implicit_threshold is not None:
            positive = source.ratings >= self.implicit_threshold
        rows = np.flatnonzero(positive)
        # by user, then time, ties at random; a repeated (user, item) keeps its latest interaction
        rows = rows[np.lexsort((rng.random(len(rows)), source.timestamps[rows], users[rows]))]
        keys = users[rows] * self.num_items + items[rows]
        _, last = np.unique(keys[::-1], return_index=True)
        rows = rows[np.sort(len(rows) - 1 - last)]
        if len(rows) == 0:
            raise UserError(f"data.implicit_threshold={self.implicit_threshold} leaves no interactions")
        user, item = users[rows], items[rows]
        counts = np.bincount(user, minlength=self.num_users)
        from_end = np.cumsum(counts)[user] - 1 - np.arange(len(rows))
        candidates = np.flatnonzero(counts >= 3)
        negatives, evaluated = self._sample_negatives(candidates, rng)
        held_out = np.isin(user, evaluated)
        test, val = held_out & (from_end == 0), held_out & (from_end == 1)
        train = ~(test | val)
        if not test.any():
            raise UserError(
                "data: leave-one-out needs users with 3 interactions (train, val, test) and an item they did not rate; "
                "no user has both"
            )
        self.rows = {"train": rows[train], "val": rows[val], "test": rows[test]}
        self.user_known = np.zeros(self.num_users, dtype=bool)
        self.item_known = np.zeros(self.num_items, dtype=bool)
        self.user_known[user[train]] = True
        self.item_known[item[train]] = True
        self.global_mean = float(source.ratings[rows].mean())
        self.item_mean = np.full(self.num_items, self.global_mean, dtype=np.float32)
        self.splits["train"] = (torch.from_numpy(user[train]), torch.from_numpy(item[train]))
        self.splits["train_users"] = (torch.from_numpy(np.unique(user[train])),)
        for name, mask, draw in (("val", val, 0), ("test", test, 1)):
            held_users = user[mask]  # sorted by user, as `evaluated` is
            self.splits[name] = (
                torch.from_numpy(held_users),
                torch.from_numpy(item[mask]),
                torch.from_numpy(negatives[np.searchsorted(evaluated, held_users), draw]),
            )

    def _sample_negatives(self, candidates: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """For each user, two fixed draws (val, test) of items the user never rated; users who rated all are out."""
        count, every = self.sampled_negatives, np.arange(self.num_items)
        kept, draws = [], []
        for user in candidates:
            pool = np.setdiff1d(
                every, self.seen_items[self.seen_indptr[user] : self.seen_indptr[user + 1]], assume_unique=True
            )
            if len(pool) == 0:
                continue
            kept.append(user)
            draws.append([rng.choice(pool, count, replace=len(pool) < count) for _ in range(2)])
        if not kept:
            return np.zeros((0, 2, count), dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.asarray(draws, dtype=np.int64), np.asarray(kept, dtype=np.int64)

    def train_dataloader(self) -> Any:
        if self.train_unit == "user":
            return self._batches("train_users", train=True)
        return super().train_dataloader()

    def val_dataloader(self) -> Any:
        """No validation batches at all (not an empty loader) when val_fraction=0."""
        if self.protocol == "ratings" and len(self.rows.get("val", [])) == 0:
            return []
        return super().val_dataloader()

    def summary(self) -> str:
        sizes = "/".join(f"{len(self.rows.get(k, []))}" for k in ("train", "val", "test"))
        text = f"{self.name}: {len(self.source.ratings)} ratings, {self.num_users} users, {self.num_items} items"
        text += f"; {self.protocol} split train/val/test {sizes}"
        if self.protocol == "ratings":
            test_users, test_items = self.splits["test"][0].numpy(), self.splits["test"][1].numpy()
            unknown_users = int((~self.user_known[test_users]).sum())
            unknown_items = int((~self.item_known[test_items]).sum())
            text += f"; test ratings of users/items without training data: {unknown_users}/{unknown_items}"
        return text

    def user_index(self, raw_ids: np.ndarray) -> np.ndarray:
        return lookup(self.user_ids, raw_ids)

    def item_index(self, raw_ids: np.ndarray) -> np.ndarray:
        return lookup(self.item_ids, raw_ids)


class SyntheticRatingsDataModule(RatingsDataModule):
    """A generated low-rank rating matrix (see generate_ratings): no download, and the best RMSE is known."""

    def __init__(
        self,
        num_users: int = 600,
        num_items: int = 400,
        num_ratings: int = 100_000,
        rank: int = 4,
        global_mean: float = 3.5,
        bias_std: float = 0.3,
        factor_std: float = 0.7,
        noise_std: float = 0.5,
        generator_seed: int = 0,
        **kwargs: object,
    ) -> None:
        self.generator_args = {
            "num_users": num_users,
            "num_items": num_items,
            "num_ratings": num_ratings,
            "rank": rank,
            "global_mean": global_mean,
            "bias_std": bias_std,
            "factor_std": factor_std,
            "noise_std": noise_std,
            "seed": generator_seed,
        }
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def load(self) -> RatingData:
        return generate_ratings(**self.generator_args)  # type: ignore[arg-type]


class MovieLensDataModule(RatingsDataModule):
    """MovieLens 100K, 1M or latest-small from the folder `path`, told apart by their files.

    split=official uses MovieLens 100K's u<official_fold>.base/.test; with `folds=5` fold k uses u<k+1>.
    """

    def __init__(self, path: str | None = None, official_fold: int = 1, **kwargs: object) -> None:
        if path is None or str(path).strip() in ("", "None"):
            expected = "; ".join(", ".join(files) for files in MOVIELENS_FILES.values())
            raise UserError(f"data.path: not set; give the folder holding the MovieLens files ({expected})")
        if not 1 <= official_fold <= 5:
            raise ValueError(f"data.official_fold must be in 1..5 (u1..u5.base/test), got {official_fold}")
        self.path, self.official_fold_number = Path(str(path)), official_fold
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def load(self) -> RatingData:
        official = None
        if self.split == "official":
            if self.folds > 1 and self.folds != 5:
                raise UserError(f"cv.folds={self.folds} with data.split=official: MovieLens 100K has 5 official folds")
            official = self.fold + 1 if self.folds == 5 else self.official_fold_number
        return read_movielens(self.path, official)
