"""Leave-one-out ranking metrics: each evaluated user has one held-out target item among many candidates.

The rank of the target is pessimistic: every other candidate scoring at least as high counts as ranked
above it, so a model that gives all items the same score gets HR@k near 0, not 1.
"""

from __future__ import annotations

import math

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of column `targets[b]` in row b of `scores` (B, N); candidates at -inf never outrank it."""
    rows = torch.arange(len(scores), device=scores.device)
    target_scores = scores[rows, targets].unsqueeze(1)
    ahead = (scores >= target_scores).sum(dim=1) - 1  # minus the target itself
    return ahead


def hit_rate(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """HR@k per user: 1 when the target is among the top k."""
    return (ranks < k).float()


def ndcg(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@k per user with one relevant item: 1 / log2(rank + 2) inside the top k, else 0 (the ideal DCG is 1)."""
    gain = 1.0 / torch.log2(ranks.float() + 2.0)
    return torch.where(ranks < k, gain, torch.zeros_like(gain))


def exclude_seen(
    scores: torch.Tensor,
    users: torch.Tensor,
    targets: torch.Tensor,
    indptr: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Set to -inf the items each user already interacted with (CSR rows `indptr`/`indices`), except the target.

    This is the "all unseen items ranked" protocol: the target competes with every item the user has not seen.
    """
    starts, ends = indptr[users], indptr[users + 1]
    counts = ends - starts
    total = int(counts.sum())
    if total == 0:
        return scores
    rows = torch.repeat_interleave(torch.arange(len(users), device=scores.device), counts)
    firsts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    positions = torch.repeat_interleave(starts, counts) + torch.arange(total, device=scores.device) - firsts
    batch_rows = torch.arange(len(users), device=scores.device)
    kept = scores[batch_rows, targets].clone()
    scores = scores.clone()
    scores[rows, indices[positions]] = -math.inf
    scores[batch_rows, targets] = kept
    return scores
