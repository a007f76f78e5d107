"""Scores of generated samples from a domain classifier's outputs, so that no Inception weights are needed.

Given a classifier trained on the real data, its penultimate features of real and generated images give a
domain Fréchet distance (FID with the classifier in Inception's place, with a bootstrap interval) and k-NN precision
and recall in that feature space, and its class probabilities of the generated images give an Inception-style
score, class coverage (classes with at least a minimum share of the samples), the KL divergence of the generated
class histogram to uniform (mode collapse raises it) and the mean confidence (blurry or alien samples lower it).
"""

from __future__ import annotations

import math

import torch


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) of two (N, D) feature sets, in float64.

    Tr((S_r S_f)^(1/2)) is computed as the sum of square roots of the eigenvalues of S_r^(1/2) S_f S_r^(1/2),
    a symmetric PSD matrix with the same spectrum, which avoids a non-symmetric matrix square root.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples of each set")
    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    values, vectors = torch.linalg.eigh(cov_r)
    sqrt_r = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = sqrt_r @ cov_f @ sqrt_r
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * trace_sqrt
    return float(distance.clamp(min=0))


def inception_score(probs: torch.Tensor, eps: float = 1e-12) -> float:
    """exp(E_x KL(p(y|x) || p(y))) (Salimans et al., 2016): high when each sample is confident and classes vary.

    Between 1 and the number of classes; one split over all samples.
    """
    probs = probs.detach().double().cpu()
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * ((probs + eps).log() - (marginal + eps).log())).sum(1).mean()
    return float(kl.exp())


DEFAULT_MIN_CLASS_SHARE = 0.02


def class_histogram(probs: torch.Tensor) -> torch.Tensor:
    """Share of samples whose most likely class is each class."""
    counts = torch.bincount(probs.argmax(1).cpu(), minlength=probs.shape[1]).double()
    return counts / counts.sum()


def covered_classes(histogram: torch.Tensor, min_share: float = DEFAULT_MIN_CLASS_SHARE) -> int:
    """Classes that take at least `min_share` of the samples (and at least one sample, whatever `min_share`).

    Why a share and not "any sample": a generator that collapses onto a few classes still lets a stray sample or
    two fall into the others, and counting those would hide the collapse.
    """
    if not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share must be in [0, 1], got {min_share}")
    histogram = histogram.double()
    return int(((histogram > 0) & (histogram >= min_share - 1e-12)).sum())


def histogram_kl_to_uniform(histogram: torch.Tensor) -> float:
    """KL(h || uniform) of a class histogram h (shares summing to 1): 0 when balanced, log(K) when one class has all."""
    histogram = histogram.double()
    present = histogram[histogram > 0]
    return float((present * (present * len(histogram)).log()).sum())


def class_coverage(probs: torch.Tensor, min_share: float = DEFAULT_MIN_CLASS_SHARE) -> int:
    """How many classes are the top prediction of at least `min_share` of the samples (`covered_classes`)."""
    return covered_classes(class_histogram(probs), min_share)


def kl_to_uniform(probs: torch.Tensor) -> float:
    """KL of the histogram of predicted classes to uniform: mode collapse raises it."""
    return histogram_kl_to_uniform(class_histogram(probs))


def mean_confidence(probs: torch.Tensor) -> float:
    """Mean probability of the most likely class: how sure the classifier is that samples are digits at all."""
    return float(probs.detach().max(1).values.double().mean())


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest counts the point itself
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Whether each point lies in the union of the balls (centre, radius)."""
    found = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start : start + chunk], centres)
        found.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(found)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of (N, D) feature sets.

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour. Precision is
    the share of generated samples inside the real manifold (are they realistic?), recall the share of real samples
    inside the generated one (is the real variety covered?): a collapsed generator keeps precision and loses recall,
    noise loses precision; FID mixes the two into one number.
    """
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision and recall with k={k} need more than {k} samples of each set")
    real, fake = real.detach().float().cpu(), fake.detach().float().cpu()
    precision = _inside(fake, real, _kth_neighbour_radii(real, k)).float().mean()
    recall = _inside(real, fake, _kth_neighbour_radii(fake, k)).float().mean()
    return float(precision), float(recall)


def fid_interval(
    real: torch.Tensor, fake: torch.Tensor, draws: int = 100, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval of the Fréchet distance: both sets resampled with replacement `draws` times.

    Why: FID has a bias and a spread that depend on the sample count; two runs whose scores differ by less than this
    interval's width are a tie. A resample leaves out about a third of the rows and repeats others, which adds to
    the distance (at small FIDs every draw can land above the estimate), so the draws are shifted to put their
    median on the estimate: the interval keeps their spread without that added bias.
    """
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        real_rows = torch.randint(len(real), (len(real),), generator=generator)
        fake_rows = torch.randint(len(fake), (len(fake),), generator=generator)
        values.append(frechet_distance(real[real_rows], fake[fake_rows]))
    draws_fid = torch.tensor(values, dtype=torch.float64)
    centred = draws_fid + (frechet_distance(real, fake) - draws_fid.median())
    low, high = centred.quantile(torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return max(0.0, float(low)), float(high)


def generative_scores(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    fake_probs: torch.Tensor,
    min_share: float = DEFAULT_MIN_CLASS_SHARE,
) -> dict[str, float]:
    """Every score at once, named as the tasks log them (`<split>/<name>`): `coverage` counts the classes with at
    least `min_share` of the samples, `kl_uniform` is the KL divergence of the predicted class histogram to
    uniform."""
    scores = {"fid": frechet_distance(real_features, fake_features)}
    if min(len(real_features), len(fake_features)) > 3:  # k-NN manifolds with k = 3 (a tiny test run has fewer)
        scores["precision"], scores["recall"] = precision_recall(real_features, fake_features, k=3)
    return {
        **scores,
        "inception_score": inception_score(fake_probs),
        "coverage": float(class_coverage(fake_probs, min_share)),
        "kl_uniform": kl_to_uniform(fake_probs),
        "confidence": mean_confidence(fake_probs),
    }


def max_kl_to_uniform(num_classes: int) -> float:
    """The KL of a histogram with a single class: the worst mode collapse."""
    return math.log(num_classes)
