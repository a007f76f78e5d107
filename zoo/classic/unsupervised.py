"""k-means and PCA in torch (a GPU runs them too), behind train.py on the same tables as the supervised classics.

The labels of a table are never used to fit: k-means is scored against them (adjusted Rand index, normalized
mutual information) and PCA colours its scatter by them. Both fit on the training split and are scored on every
split, so that a figure on the test rows says how the fitted centroids or components carry over to new data.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import UserError

log = logging.getLogger(__name__)


class KMeans:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), best of `n_init` restarts by inertia.

    Seeding is the greedy variant scikit-learn uses: at each step `2 + log(k)` candidates are drawn in proportion
    to the squared distance to the nearest chosen centre, and the one that lowers the potential most is kept.
    """

    def __init__(
        self, n_clusters: int = 10, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, device: str = "cpu"
    ) -> None:
        for key, value in (("n_clusters", n_clusters), ("n_init", n_init), ("max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{key}: expected an integer >= 1, got {value!r}")
        self.n_clusters, self.n_init, self.max_iter, self.tol, self.device = n_clusters, n_init, max_iter, tol, device
        self.centroids: Any = None
        self.inertia = math.inf

    def fit(self, x: np.ndarray, seed: int) -> KMeans:
        import torch

        data = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        if self.n_clusters > len(data):
            raise UserError(f"model.n_clusters: {self.n_clusters} clusters need at least as many rows, got {len(data)}")
        generator = torch.Generator(device=data.device).manual_seed(seed)
        # a relative tolerance, as scikit-learn's: tol times the mean variance of the features
        tolerance = self.tol * float(data.var(dim=0).mean())
        for _ in range(self.n_init):
            centroids = _lloyd(data, _plus_plus(data, self.n_clusters, generator), self.max_iter, tolerance)
            inertia = float(_nearest(data, centroids)[1].sum())
            if inertia < self.inertia:
                self.centroids, self.inertia = centroids, inertia
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """The cluster of each row and the rows' inertia (summed squared distance to their centres)."""
        import torch

        data = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        labels, distances = _nearest(data, self.centroids)
        return labels.cpu().numpy(), float(distances.sum())


def _nearest(data: Any, centroids: Any) -> tuple[Any, Any]:
    import torch

    distances = torch.cdist(data, centroids).square()
    best, labels = distances.min(dim=1)
    return labels, best


def _plus_plus(data: Any, k: int, generator: Any) -> Any:
    import torch

    trials = 2 + int(math.log(k))
    first = torch.randint(len(data), (1,), generator=generator, device=data.device)
    centres = data[first]
    closest = torch.cdist(data, centres).square().min(dim=1).values
    for _ in range(1, k):
        weights = closest / closest.sum() if closest.sum() > 0 else torch.full_like(closest, 1 / len(closest))
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        with_candidate = torch.minimum(closest[None, :], torch.cdist(data[candidates], data).square())
        best = int(with_candidate.sum(dim=1).argmin())
        centres = torch.cat([centres, data[candidates[best]][None]])
        closest = with_candidate[best]
    return centres


def _lloyd(data: Any, centroids: Any, max_iter: int, tolerance: float) -> Any:
    import torch

    for _ in range(max_iter):
        labels, _ = _nearest(data, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, data)
        counts = torch.bincount(labels, minlength=len(centroids)).to(data.dtype)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)  # empty: stays
        shift = float((moved - centroids).square().sum())
        centroids = moved
        if shift <= tolerance:
            break
    return centroids


class PCA:
    """Principal components by the SVD of the centred training rows (torch.linalg.svd), signs fixed so that each
    component's largest-magnitude loading is positive (as scikit-learn fixes them)."""

    def __init__(self, n_components: int = 2, device: str = "cpu") -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise UserError(f"model.n_components: expected an integer >= 1, got {n_components!r}")
        self.n_components, self.device = n_components, device
        self.mean: Any = None
        self.components: Any = None
        self.explained_variance_ratio: Any = None

    def fit(self, x: np.ndarray, seed: int = 0) -> PCA:
        import torch

        data = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        if self.n_components > min(data.shape):
            raise UserError(f"model.n_components: at most {min(data.shape)} for a table of shape {tuple(data.shape)}")
        self.mean = data.mean(dim=0)
        _, singular, vt = torch.linalg.svd(data - self.mean, full_matrices=False)
        flip = torch.sign(vt[torch.arange(len(vt)), vt.abs().argmax(dim=1)])
        vt = vt * flip[:, None]
        variance = singular.square()
        self.explained_variance_ratio = (variance / variance.sum()).cpu().numpy()
        self.components = vt[: self.n_components]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        import torch

        data = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        return ((data - self.mean) @ self.components.T).cpu().numpy()

    def reconstruction_error(self, x: np.ndarray) -> float:
        """Mean squared error per entry after projecting onto the components and back."""
        import torch

        data = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        projected = (data - self.mean) @ self.components.T
        return float(((projected @ self.components + self.mean) - data).square().mean())


class GaussianAnomaly:
    """Anomaly detection by density: a Gaussian fitted to the normal training rows (one per feature, or one with a
    full covariance when `multivariate`), and a row is an anomaly when its log-density falls below log ε.

    ε (`epsilon: auto`) is the threshold with the best F1 on the labelled validation rows, as in Ng's course notes;
    a number fixes log ε instead. Constant features (a digit's always-blank corner pixels) get the variance floor
    `min_variance` times the mean feature variance, so that they do not make every other row infinitely unlikely.
    """

    def __init__(
        self, multivariate: bool = False, epsilon: Any = "auto", min_variance: float = 0.01, device: str = "cpu"
    ) -> None:
        if epsilon != "auto" and (isinstance(epsilon, bool) or not isinstance(epsilon, int | float)):
            raise UserError(f"model.epsilon: expected auto or a log-density threshold, got {epsilon!r}")
        if not min_variance > 0:
            raise UserError(f"model.min_variance: expected a number > 0, got {min_variance!r}")
        self.multivariate, self.epsilon, self.min_variance, self.device = multivariate, epsilon, min_variance, device
        self.mean: Any = None
        self.precision: Any = None
        self.log_norm = 0.0
        self.log_epsilon = float(epsilon) if epsilon != "auto" else math.nan

    def fit(self, x: np.ndarray, seed: int = 0) -> GaussianAnomaly:
        import torch

        data = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        self.mean = data.mean(dim=0)
        centred = data - self.mean
        floor = self.min_variance * float(centred.var(dim=0).mean().clamp(min=1e-12))
        if self.multivariate:
            covariance = centred.T @ centred / max(1, len(data) - 1)
            covariance += floor * torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
        else:
            covariance = torch.diag(centred.var(dim=0).clamp(min=floor))
        self.precision = torch.linalg.inv(covariance)
        self.log_norm = -0.5 * (len(covariance) * math.log(2 * math.pi) + float(torch.logdet(covariance)))
        return self

    def log_density(self, x: np.ndarray) -> np.ndarray:
        import torch

        centred = torch.as_tensor(x, dtype=torch.float64, device=self.device) - self.mean
        return (self.log_norm - 0.5 * ((centred @ self.precision) * centred).sum(dim=1)).cpu().numpy()

    def choose_epsilon(self, x: np.ndarray, anomaly: np.ndarray) -> float:
        """The log-density threshold with the best F1 on labelled rows (the most permissive one among ties)."""
        from sklearn.metrics import f1_score

        density = self.log_density(x)
        candidates = np.unique(density)
        if len(candidates) > 1000:
            candidates = np.quantile(density, np.linspace(0, 1, 1000))
        scores = [f1_score(anomaly, density < c, zero_division=0) for c in candidates]
        self.log_epsilon = float(candidates[int(np.argmax(scores))])
        return self.log_epsilon

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self.log_density(x) < self.log_epsilon).astype(np.int64)


def fit_and_test(cfg: Any, output_dir: Path, model: KMeans | PCA | GaussianAnomaly, table: Any) -> dict[str, float]:
    """Fit on the training rows; score every split; write the model's tensors and its figures to the run folder."""
    import torch

    from zoo.records import atomic_write_bytes

    splits = {name: (table.encoded(x), y) for name, (x, y) in table.splits().items() if len(y)}
    train_x = np.nan_to_num(splits["train"][0], nan=0.0)
    if isinstance(model, GaussianAnomaly):
        return _fit_and_test_anomaly(model, splits, table, output_dir)
    model.fit(train_x, int(cfg.seed))
    metrics: dict[str, float] = {}
    for name, (x, y) in splits.items():
        x = np.nan_to_num(x, nan=0.0)
        metrics.update(_scores(model, x, y, name, table.task))
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, KMeans):
        tensors = {"centroids": model.centroids.cpu()}
    else:
        tensors = {"mean": model.mean.cpu(), "components": model.components.cpu()}
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    atomic_write_bytes(output_dir / "model.pt", buffer.getvalue())
    if isinstance(model, PCA):
        _pca_figures(model, train_x, splits["train"][1], table, output_dir)
    return metrics


def _scores(model: KMeans | PCA, x: np.ndarray, y: np.ndarray, split: str, task: str) -> dict[str, float]:
    from sklearn import metrics as skm

    if isinstance(model, PCA):
        scores = {"reconstruction_mse": model.reconstruction_error(x)}
        if split == "train":
            scores["explained_variance"] = float(model.explained_variance_ratio[: model.n_components].sum())
        return {f"{split}/{k}": v for k, v in scores.items()}
    labels, inertia = model.predict(x)
    scores = {"inertia": inertia}
    if len(np.unique(labels)) > 1 and len(labels) > len(np.unique(labels)):
        scores["silhouette"] = float(skm.silhouette_score(x, labels))
    if task != "regression":
        scores["ari"] = float(skm.adjusted_rand_score(y, labels))
        scores["nmi"] = float(skm.normalized_mutual_info_score(y, labels))
    return {f"{split}/{k}": v for k, v in scores.items()}


def _pca_figures(model: PCA, x: np.ndarray, y: np.ndarray, table: Any, output_dir: Path) -> None:
    """The cumulative explained-variance curve and the first two components' scatter, coloured by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = np.cumsum(model.explained_variance_ratio)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    axes[0].plot(np.arange(1, len(ratio) + 1), ratio, marker=".")
    axes[0].axvline(model.n_components, color="grey", linestyle="--")
    axes[0].set(xlabel="components", ylabel="cumulative explained variance", ylim=(0, 1.02))
    if model.n_components >= 2:
        points = model.transform(x)
        coloured = table.task != "regression"
        scatter = axes[1].scatter(points[:, 0], points[:, 1], c=y, s=8, cmap="tab10" if coloured else "viridis")
        axes[1].set(xlabel="component 1", ylabel="component 2", title="training rows")
        figure.colorbar(scatter, ax=axes[1])
    figure.tight_layout()
    figure.savefig(output_dir / "pca.png", dpi=100)
    plt.close(figure)


def _fit_and_test_anomaly(
    model: GaussianAnomaly, splits: dict[str, tuple[np.ndarray, np.ndarray]], table: Any, output_dir: Path
) -> dict[str, float]:
    """Fit on the normal training rows, choose ε on the labelled validation rows, report precision/recall/F1."""
    import io

    import torch

    from zoo.records import atomic_write_bytes

    if table.classes != ["normal", "anomaly"]:
        raise UserError(
            "data.normal_class: the Gaussian anomaly model needs anomaly labels; name the normal class of a labelled "
            "table, e.g. data.normal_class=0 (or a binary target with 1 = anomaly and model.epsilon=<log density>)"
        )
    x_train, y_train = (np.nan_to_num(part, nan=0.0) for part in splits["train"])
    model.fit(x_train[y_train == 0])
    if model.epsilon == "auto":
        if "val" not in splits or not splits["val"][1].any():
            raise UserError("model.epsilon: auto needs anomalies among the validation rows; raise data.val_fraction")
        model.choose_epsilon(np.nan_to_num(splits["val"][0], nan=0.0), splits["val"][1])
    metrics: dict[str, float] = {"train/log_epsilon": model.log_epsilon}
    for name, (x, y) in splits.items():
        metrics.update(_anomaly_scores(model, x, y, name))
    output_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    tensors = {"mean": model.mean.cpu(), "precision": model.precision.cpu(), "log_epsilon": model.log_epsilon}
    torch.save(tensors, buffer)
    atomic_write_bytes(output_dir / "model.pt", buffer.getvalue())
    return metrics


def _anomaly_scores(model: GaussianAnomaly, x: np.ndarray, y: np.ndarray, split: str) -> dict[str, float]:
    from sklearn import metrics as skm

    predicted = model.predict(np.nan_to_num(x, nan=0.0))
    return {
        f"{split}/precision": float(skm.precision_score(y, predicted, zero_division=0)),
        f"{split}/recall": float(skm.recall_score(y, predicted, zero_division=0)),
        f"{split}/f1": float(skm.f1_score(y, predicted, zero_division=0)),
        f"{split}/anomaly_share": float(np.mean(y)),
    }


def restore(model: KMeans | PCA | GaussianAnomaly, path: Path) -> KMeans | PCA | GaussianAnomaly:
    """The fitted state of a run's model.pt (tensors only, loaded weights-only) put back into a fresh model."""
    import torch

    from zoo.records import load_checkpoint

    tensors = load_checkpoint(path)
    expected = {KMeans: {"centroids"}, PCA: {"mean", "components"}, GaussianAnomaly: {"mean", "precision"}}
    if not expected[type(model)] <= set(tensors):
        raise UserError(f"ckpt_path: '{path}' is not the model.pt of a {type(model).__name__} run")
    if isinstance(model, KMeans):
        model.centroids = tensors["centroids"].to(model.device)
    elif isinstance(model, PCA):
        model.mean, model.components = tensors["mean"].to(model.device), tensors["components"].to(model.device)
    else:
        model.mean, model.precision = tensors["mean"].to(model.device), tensors["precision"].to(model.device)
        model.log_epsilon = float(tensors["log_epsilon"])
        dims = len(model.precision)
        model.log_norm = -0.5 * (dims * math.log(2 * math.pi) - float(torch.logdet(model.precision)))
    return model


def score_split(model: KMeans | PCA | GaussianAnomaly, x: np.ndarray, y: np.ndarray, split: str, task: str) -> dict:
    """A restored model's metrics on one split, named as the run logged them."""
    x = np.nan_to_num(x, nan=0.0)
    if isinstance(model, GaussianAnomaly):
        return _anomaly_scores(model, x, y, split)
    return _scores(model, x, y, split, task)
