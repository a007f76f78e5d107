"""The generative scores against cases worked out by hand and against a reference computation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zoo.metrics.generative import fid_interval, frechet_distance, generative_scores, precision_recall
from zoo.metrics.scorer import augment, gaussian_blur, real_floor, shift


def test_precision_and_recall_on_a_case_worked_by_hand() -> None:
    # k = 1 in one dimension. Real points 0, 1, 3 reach their nearest neighbours at 1, 1, 2: the real manifold is
    # [-1, 1] u [0, 2] u [1, 5] = [-1, 5], which holds the fakes 0.5 and 4.5 but not 7: precision 2/3.
    # Fakes 0.5, 4.5, 7 reach 4, 2.5, 2.5: [-3.5, 4.5] u [2, 7] u [4.5, 9.5] holds every real point: recall 1.
    real, fake = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.5], [4.5], [7.0]])
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3) and recall == pytest.approx(1.0)


def test_precision_and_recall_tell_collapse_from_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(600, 8, generator=generator)
    collapsed = real[:20].repeat(30, 1) + 0.01 * torch.randn(600, 8, generator=generator)  # realistic, no variety
    noise = 6 * torch.randn(600, 8, generator=generator)  # spread everywhere, mostly off the data
    p_same, r_same = precision_recall(real, torch.randn(600, 8, generator=generator))
    p_collapsed, r_collapsed = precision_recall(real, collapsed)
    p_noise, _ = precision_recall(real, noise)
    assert p_same > 0.8 and r_same > 0.8
    assert p_collapsed > 0.95 and r_collapsed < 0.3
    assert p_noise < 0.1


def test_frechet_distance_matches_scipys_matrix_square_root_with_non_commuting_covariances() -> None:
    from scipy import linalg

    generator = torch.Generator().manual_seed(1)
    real = torch.randn(500, 4, generator=generator, dtype=torch.float64) @ torch.tensor(
        [[2.0, 0.5, 0, 0], [0, 1.0, 0.3, 0], [0, 0, 0.5, 0], [0.1, 0, 0, 1.5]], dtype=torch.float64
    )
    fake = (
        torch.randn(400, 4, generator=generator, dtype=torch.float64)
        @ torch.tensor([[1.0, 0, 0.7, 0], [0, 2.0, 0, 0], [0.4, 0, 1.0, 0], [0, 0.2, 0, 0.5]], dtype=torch.float64)
        + 0.3
    )
    cov_r, cov_f = np.cov(real.numpy().T), np.cov(fake.numpy().T)
    assert not np.allclose(cov_r @ cov_f, cov_f @ cov_r)  # the case where a naive sqrt(S_r) sqrt(S_f) is wrong
    root = linalg.sqrtm(cov_r @ cov_f).real
    mean_term = float(((real.mean(0) - fake.mean(0)) ** 2).sum())
    reference = mean_term + np.trace(cov_r) + np.trace(cov_f) - 2 * np.trace(root)
    assert frechet_distance(real, fake) == pytest.approx(reference, rel=1e-8)


def test_the_bootstrap_interval_holds_the_estimate_and_separates_a_real_shift() -> None:
    generator = torch.Generator().manual_seed(2)
    real = torch.randn(400, 6, generator=generator)
    same = torch.randn(400, 6, generator=generator)
    shifted = torch.randn(400, 6, generator=generator) + 1.0  # FID about 6 (the squared mean shift)
    low, high = fid_interval(real, same, draws=50)
    assert 0 <= low < high < 1.0
    low_shift, high_shift = fid_interval(real, shifted, draws=50)
    assert low_shift <= frechet_distance(real, shifted) <= high_shift and low_shift > high
    assert fid_interval(real, shifted, draws=50) == (low_shift, high_shift)  # the same seed, the same interval


def test_the_bootstrap_interval_keeps_the_spread_but_not_the_bias_of_repeated_rows() -> None:
    generator = torch.Generator().manual_seed(4)
    real = torch.randn(300, 32, generator=generator)
    fake = torch.randn(300, 32, generator=generator) + 0.1
    estimate = frechet_distance(real, fake)
    draws = []
    resample = torch.Generator().manual_seed(0)  # the draws fid_interval makes with its default seed
    for _ in range(40):
        real_rows = torch.randint(300, (300,), generator=resample)
        fake_rows = torch.randint(300, (300,), generator=resample)
        draws.append(frechet_distance(real[real_rows], fake[fake_rows]))
    assert min(draws) > estimate  # every resample scores worse than the samples: a percentile interval would miss
    low, high = fid_interval(real, fake, draws=40)
    assert 0 <= low <= estimate <= high
    spread = torch.tensor(draws, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert high - low == pytest.approx(float(spread[1] - spread[0]), rel=1e-9) or low == 0


def test_generative_scores_carry_precision_and_recall() -> None:
    generator = torch.Generator().manual_seed(3)
    real, fake = torch.randn(100, 5, generator=generator), torch.randn(100, 5, generator=generator)
    probs = torch.full((100, 10), 0.1)
    scores = generative_scores(real, fake, probs)
    assert {"fid", "precision", "recall", "coverage", "kl_uniform", "confidence"} <= set(scores)
    assert 0 < scores["precision"] <= 1 and 0 < scores["recall"] <= 1


def test_the_scorers_blur_matches_a_gaussian_worked_by_hand_and_sigma_zero_changes_nothing() -> None:
    images = torch.zeros(2, 1, 9, 9)
    images[:, 0, 4, 4] = 1.0  # one bright pixel in the middle: the blur draws its kernel
    blurred = gaussian_blur(images, torch.tensor([1.0, 0.0]))
    weights = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    weights /= weights.sum()
    expected = np.zeros((9, 9))
    expected[1:8, 1:8] = np.outer(weights, weights)
    np.testing.assert_allclose(blurred[0, 0].numpy(), expected, atol=1e-6)
    assert torch.equal(blurred[1], images[1])
    flat = torch.full((1, 3, 6, 6), 0.25)  # replicated edges: a uniform image stays uniform
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([1.5])), flat)


def test_the_scorers_shift_moves_each_image_by_its_own_offset() -> None:
    images = torch.zeros(2, 2, 7, 7)
    images[:, :, 3, 3] = 1.0
    moved = shift(images, torch.tensor([2, -1]), torch.tensor([-3, 1]))
    assert moved[0, :, 5, 0].tolist() == [1.0, 1.0] and moved[0].sum() == 2
    assert moved[1, :, 2, 4].tolist() == [1.0, 1.0] and moved[1].sum() == 2
    torch.manual_seed(0)
    augmented = augment(images, max_shift=2, max_sigma=1.5)
    assert augmented.shape == images.shape and not torch.equal(augmented, images)
    assert torch.equal(augment(images, max_shift=0, max_sigma=0.0), images)


def test_the_fid_floor_scores_as_many_real_training_images_as_samples() -> None:
    class FlatScorer:
        """Features are the pixels; counts the images it is shown."""

        net = torch.nn.Linear(1, 1)
        shown = 0

        def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
            self.shown += len(images)
            return images.flatten(1), None

    train_images = torch.randn(3000, 1, 2, 2)
    real = torch.randn(400, 4) + 0.5
    scorer = FlatScorer()
    floor = real_floor(scorer, SimpleNamespace(splits={"train": (train_images, None)}), real, 2000)
    rows = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:2000]
    assert scorer.shown == 2000
    assert floor == pytest.approx(frechet_distance(real, train_images[rows].flatten(1)), rel=1e-9)
    # without a training split in memory: the two halves of the test images
    halves = real_floor(scorer, SimpleNamespace(), real, 2000)
    assert halves == pytest.approx(frechet_distance(real[0::2], real[1::2]), rel=1e-9)
