"""SASRec (Kang & McAuley, 2018): self-attentive sequential recommendation.

A user is the sequence of items they interacted with, in time order. Two causal self-attention blocks read it and
the hidden state at each position, dotted with the (shared) item embeddings, scores the item that comes next. The
user's representation is the hidden state of their latest item, so a new interaction changes the ranking without
retraining: the model recommends from what the user did last, which a factorization of the whole history cannot.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from zoo.nn.attention import MultiHeadAttention
from zoo.nn.recommender import KnownIds


def left_padded(users: torch.Tensor, items: torch.Tensor, num_users: int, width: int, pad: int) -> torch.Tensor:
    """(num_users, width): each user's latest `width` items in the given order, right-aligned after `pad`.

    `users` and `items` are interactions sorted by user, then time (the order of the leave-one-out split).
    """
    users_np, items_np = users.cpu().numpy(), items.cpu().numpy()
    if len(users_np) and np.any(np.diff(users_np) < 0):
        raise ValueError("left_padded: interactions must be sorted by user")
    counts = np.bincount(users_np, minlength=num_users)
    from_end = np.cumsum(counts)[users_np] - 1 - np.arange(len(users_np))  # 0 for each user's latest item
    keep = from_end < width
    table = np.full((num_users, width), pad, dtype=np.int64)
    table[users_np[keep], width - 1 - from_end[keep]] = items_np[keep]
    return torch.from_numpy(table).to(items.device)


class _Block(nn.Module):
    """The paper's block: queries from the normalized input, keys and values from the input itself, then a
    position-wise feed-forward net on the normalized sum, each with a residual; padded positions stay zero."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attention = MultiHeadAttention(dim, heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(dim, eps=1e-8)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, dim), nn.Dropout(dropout), nn.ReLU(), nn.Linear(dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, real: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`last_only`: the output at the last position alone, (batch, 1, dim), what ranking needs of the final
        block; that position sees every key under the causal mask, so it needs no mask."""
        queries = self.attention_norm(x[:, -1:] if last_only else x)
        x = queries + self.attention(queries, context=x, causal=not last_only)
        x = self.feed_forward_norm(x)
        return (x + self.feed_forward(x)) * (real[:, -1:] if last_only else real)


class SASRec(KnownIds, nn.Module):
    """Item embeddings scaled by sqrt(dim) plus learned positions, `blocks` causal blocks, a final LayerNorm.

    The published defaults (MovieLens-1M): dim 50, 2 blocks, 1 head, dropout 0.2, the latest 200 items. The
    scores are dot products with the item embedding table the input uses. `history` holds each user's latest
    `max_length` items (set by the task: the training items while training, plus the validation item for the
    test, as in the paper); padding is the extra row `num_items`, whose embedding stays zero. Dropout regularizes;
    there is no L2 on the rows, as in the paper.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int = 50,
        blocks: int = 2,
        heads: int = 1,
        max_length: int = 200,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if max_length < 2 or blocks < 1:
            raise ValueError(f"model.net.max_length must be >= 2 and model.net.blocks >= 1, got {max_length}, {blocks}")
        if heads < 1 or dim % heads:
            raise ValueError(
                f"model.net.dim: {dim} is not divisible by model.net.heads={heads}; allowed: a multiple of it"
            )
        self.num_items, self.max_length, self.dim = num_items, max_length, dim
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        self.positions = nn.Embedding(max_length, dim)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(dim, eps=1e-8)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_normal_(parameter)
        with torch.no_grad():
            self.items.weight[num_items].zero_()
        self.register_buffer("history", torch.full((num_users, max_length), num_items), persistent=False)
        self.register_buffer("user_known", torch.ones(num_users, dtype=torch.bool))
        self.register_buffer("item_known", torch.ones(num_items, dtype=torch.bool))

    def set_history(self, users: torch.Tensor, items: torch.Tensor) -> None:
        """Interactions sorted by user, then time; each user keeps the latest `max_length`."""
        self.history = left_padded(users, items, len(self.history), self.max_length, self.num_items).to(
            self.history.device
        )

    def encode(self, sequences: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(batch, length) item indices, left-padded -> (batch, length, dim) hidden states, one per position
        (`last_only`: (batch, 1, dim), the last position's, the final block run for it alone)."""
        real = (sequences != self.num_items).unsqueeze(-1).to(self.items.weight.dtype)
        x = self.items(sequences) * self.dim**0.5 + self.positions.weight[-sequences.shape[1] :]
        x = self.input_dropout(x) * real
        for number, block in enumerate(self.blocks):
            x = block(x, real, last_only=last_only and number == len(self.blocks) - 1)
        return self.final_norm(x)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """The hidden state after each user's latest item; an unknown user (-1) reads an empty history."""
        sequences = self.history[users.clamp(min=0)]
        sequences = torch.where((users >= 0)[:, None], sequences, self.num_items)
        return self.encode(sequences, last_only=True)[:, -1]

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        vectors = self.user_vectors(users)
        if items.dim() == 2:
            vectors = vectors.unsqueeze(1)
        return (vectors * self.items(items)).sum(-1)

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_vectors(users) @ self.items.weight[: self.num_items].T

    def next_item_scores(
        self, sequences: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The score at every position of its next item and of a sampled one (training)."""
        hidden = self.encode(sequences)
        return (hidden * self.items(positives)).sum(-1), (hidden * self.items(negatives)).sum(-1)

    def item_embeddings(self) -> torch.Tensor:
        return self.items.weight[: self.num_items]
