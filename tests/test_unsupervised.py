"""k-means and PCA in torch against scikit-learn on the same data, and through train.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from zoo.classic.unsupervised import PCA, KMeans
from zoo.errors import UserError
from zoo.run import train


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_blobs

    return make_blobs(n_samples=600, centers=6, n_features=5, cluster_std=1.5, random_state=seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_reaches_scikit_learns_inertia_on_blobs(seed: int) -> None:
    from sklearn.cluster import KMeans as SkKMeans

    x, _ = blobs(seed)
    ours = KMeans(n_clusters=6, n_init=10).fit(x, seed=seed)
    theirs = SkKMeans(n_clusters=6, n_init=10, random_state=seed).fit(x)
    assert ours.inertia == pytest.approx(theirs.inertia_, rel=0.01)
    assert ours.predict(x)[1] == pytest.approx(ours.inertia)


def test_kmeans_finds_the_planted_clusters() -> None:
    from sklearn.metrics import adjusted_rand_score

    x, y = blobs(3)
    labels, _ = KMeans(n_clusters=6).fit(x, seed=0).predict(x)
    assert adjusted_rand_score(y, labels) > 0.9


def test_pca_components_match_scikit_learn_up_to_sign() -> None:
    from sklearn.decomposition import PCA as SkPCA

    x, _ = blobs(0)
    ours = PCA(n_components=3).fit(x)
    theirs = SkPCA(n_components=3).fit(x)
    for mine, reference in zip(ours.components.numpy(), theirs.components_):
        assert min(np.abs(mine - reference).max(), np.abs(mine + reference).max()) < 1e-8
    assert np.allclose(ours.explained_variance_ratio[:3], theirs.explained_variance_ratio_)
    # with every component the reconstruction is exact
    assert PCA(n_components=5).fit(x).reconstruction_error(x) < 1e-20


def test_bad_sizes_are_one_line() -> None:
    with pytest.raises(UserError, match=r"^model.n_clusters: 20 clusters need at least as many rows, got 10"):
        KMeans(n_clusters=20).fit(np.zeros((10, 2)), seed=0)
    with pytest.raises(UserError, match=r"^model.n_components: at most 3 for a table of shape \(10, 3\)"):
        PCA(n_components=4).fit(np.zeros((10, 3)))
    with pytest.raises(UserError, match=r"^model.n_init: expected an integer >= 1, got 0"):
        KMeans(n_init=0)


def test_kmeans_digits_through_train_py_matches_the_reference_range(train_config) -> None:
    cfg = train_config("experiment=kmeans_digits", "model.n_init=3")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    # scikit-learn's KMeans on the digits: ARI about 0.6-0.7 against the labels
    assert 0.5 < metrics["test/ari"] < 0.85 and metrics["test/nmi"] > 0.6, metrics
    assert (Path(cfg.paths.output_dir) / "model.pt").is_file()


def test_pca_digits_writes_its_picture(train_config) -> None:
    cfg = train_config("experiment=pca_digits")
    train(cfg)
    output = Path(cfg.paths.output_dir)
    metrics = json.loads((output / "metrics.json").read_text())
    assert 0.2 < metrics["train/explained_variance"] < 0.4, metrics  # two of 64 pixel directions
    assert (output / "pca.png").stat().st_size > 10_000


def test_epsilon_by_validation_f1_separates_planted_anomalies() -> None:
    from zoo.classic.unsupervised import GaussianAnomaly

    rng = np.random.default_rng(0)
    normal = rng.normal(size=(500, 3))
    model = GaussianAnomaly(multivariate=True).fit(normal)
    val = np.vstack([rng.normal(size=(95, 3)), rng.normal(loc=6.0, size=(5, 3))])
    labels = np.array([0] * 95 + [1] * 5)
    model.choose_epsilon(val, labels)
    assert model.predict(val).tolist() == labels.tolist()
    unseen = np.vstack([rng.normal(size=(50, 3)), rng.normal(loc=-6.0, size=(3, 3))])
    assert model.predict(unseen)[-3:].tolist() == [1, 1, 1] and model.predict(unseen)[:50].sum() <= 2


def test_anomaly_digits_builds_its_table_and_finds_the_other_digits(train_config) -> None:
    cfg = train_config("experiment=anomaly_digits")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert 0.03 < metrics["train/anomaly_share"] < 0.07, metrics  # 5% of the rows, about as much in each split
    assert metrics["test/recall"] >= 0.5 and metrics["test/f1"] > 0.5, metrics


def test_anomaly_model_without_anomaly_labels_is_one_line(train_config) -> None:
    cfg = train_config("data=digits_flat", "model=gaussian_anomaly")
    with pytest.raises(UserError, match=r"^data.normal_class: the Gaussian anomaly model needs anomaly labels"):
        train(cfg)
    with pytest.raises(UserError, match=r"^data.normal_class: no row has the label 'x'"):
        train(train_config("experiment=anomaly_digits", "data.normal_class=x", folder="x"))


def test_elbow_curve_falls_with_k_and_is_drawn(tmp_path: Path, monkeypatch) -> None:
    from zoo.curves import elbow, main, parse_ks

    assert parse_ks("[2,5]") == [2, 3, 4, 5] == parse_ks("[2..5]") and parse_ks("[2,4,8]") == [2, 4, 8]
    monkeypatch.chdir(tmp_path)
    results = elbow(["experiment=kmeans_digits", "ks=[2,4,8]", "model.n_init=2"])
    inertias = [results[k][0] for k in (2, 4, 8)]
    assert inertias[0] > inertias[1] > inertias[2]
    (plot,) = (tmp_path / "logs" / "kmeans_digits" / "curves").glob("*/elbow.png")
    assert plot.stat().st_size > 5_000
    assert main(["elbow", "experiment=kmeans_digits", "ks=[0]"]) == 2
    assert main(["elbow", "model=pca", "ks=[2,3]"]) == 2


def test_learning_curve_over_training_shares_and_seeds(tmp_path: Path, monkeypatch) -> None:
    from zoo.curves import learning, main

    monkeypatch.chdir(tmp_path)
    results = learning(["experiment=rf_digits", "model.n_estimators=20", "sizes=[0.2,1.0]", "seeds=2"])
    small, full = results[0.2], results[1.0]
    assert small["rows"][0] < 0.25 * full["rows"][0] and len(full["val"]) == 2
    assert np.mean(full["val"]) > np.mean(small["val"])  # more data, better validation accuracy
    (plot,) = (tmp_path / "logs" / "rf_digits" / "curves").glob("*/learning.png")
    assert plot.stat().st_size > 5_000
    assert main(["learning", "experiment=rf_digits", "sizes=[0,1]"]) == 2
    assert main(["learning", "experiment=rf_digits", "sizes=[1.0]", "seeds=1", "metric=bleu"]) == 2


def test_the_diagnosis_names_bias_and_variance() -> None:
    from zoo.curves import diagnose

    def curve(train: list[float], val: list[float]) -> dict[float, dict[str, list[float]]]:
        return {size: {"rows": [size * 100], "train": [t], "val": [v]} for size, t, v in zip((0.1, 1.0), train, val)}

    assert diagnose(curve([1.0, 0.99], [0.6, 0.8])).startswith("high variance")
    assert "closes as data grows" in diagnose(curve([1.0, 0.99], [0.6, 0.8]))
    assert diagnose(curve([0.62, 0.6], [0.6, 0.59])).startswith("high bias")
    assert diagnose(curve([0.99, 0.99], [0.97, 0.985])).startswith("neither")


def test_a_labelled_csv_becomes_an_anomaly_table(train_config, tmp_path: Path) -> None:
    from tests.test_classic import write_csv

    path = write_csv(tmp_path / "table.csv", rows=400)
    cfg = train_config(
        "model=gaussian_anomaly",
        "data=tabular_csv",
        f"data.path={path}",
        "data.target=sick",
        "data.drop=[grade,level]",
        "data.normal_class=no",
        "data.anomaly_share=0.1",
        "data.val_fraction=0.3",
    )
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert 0.05 < metrics["train/anomaly_share"] < 0.15 and "test/f1" in metrics, metrics


@pytest.mark.parametrize("experiment", ["kmeans_digits", "pca_digits", "anomaly_digits"])
def test_evaluate_restores_the_fitted_model_and_reproduces_its_test_metrics(
    train_config, tmp_path: Path, experiment: str
) -> None:
    from tests.conftest import compose_config
    from zoo.run import evaluate

    cfg = train_config(f"experiment={experiment}", "logger=none")
    train(cfg)
    trained = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    model_file = Path(cfg.paths.output_dir) / "model.pt"
    eval_cfg = compose_config("eval", [f"ckpt_path={model_file}", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    tested = {k: v for k, v in trained.items() if k.startswith("test/")}
    assert tested and set(tested) <= set(scored)
    assert all(scored[k] == pytest.approx(v, rel=1e-6, abs=1e-9) for k, v in tested.items()), (tested, scored)


def test_validation_curve_reads_a_finished_sweep_and_names_the_best_value(tmp_path: Path) -> None:
    from zoo import curves

    sweep = tmp_path / "multirun"
    scores = {0.0: (0.99, 0.90), 0.01: (0.97, 0.94), 1.0: (0.80, 0.79)}  # over-fit, right, under-fit
    for index, (decay, seed) in enumerate((d, s) for d in scores for s in (1, 2)):
        run = sweep / str(index)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"seed: {seed}\noptimizer:\n  weight_decay: {decay}\n")
        train_acc, val_acc = scores[decay]
        metrics = {"train/acc": train_acc, "val/acc": val_acc + 0.01 * seed, "val/loss": 0.5}
        (run / "metrics.json").write_text(json.dumps(metrics))
    results = curves.validation([f"folder={sweep}", "key=optimizer.weight_decay"])
    assert list(results) == [0.0, 0.01, 1.0] and results[0.01]["val"] == [0.95, 0.96]
    assert (sweep / "validation.png").stat().st_size > 1000
    with pytest.raises(UserError, match="key: 'optimizer.lr' is not in"):
        curves.validation([f"folder={sweep}", "key=optimizer.lr"])
    with pytest.raises(UserError, match="logged no train/loss; allowed: acc, loss"):
        curves.validation([f"folder={sweep}", "key=optimizer.weight_decay", "metric=loss"])
    with pytest.raises(UserError, match="holds no finished runs"):
        curves.validation([f"folder={tmp_path / 'nothing'}", "key=seed"])
